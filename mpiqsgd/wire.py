"""Message framing: a fixed prefix, a msgpack header and a raw payload.

Wire format of one encoded tensor (all integers little-endian)::

    offset  bytes  field
    0       4      magic b"MQSG"
    4       1      format version (1)
    5       4      header length H (uint32)
    9       4      CRC-32 of header and payload (uint32)
    13      H      msgpack map: {"codec": str, "numel": int, "params": {...}}
    13+H    P      payload: raw packed bytes, layout defined by the codec

The prefix is ``PREFIX_BYTES`` = 13 bytes; the header is a few dozen bytes and its
length depends only on the codec parameters and ``numel`` (msgpack integers are
variable width, so it is computed by packing, never guessed). The CRC makes any
corruption of a message a :class:`~mpiqsgd.errors.DecodeError` instead of silently
wrong values. Everything that is not the payload counts as header bytes in the meter.
"""

import struct
import zlib

import msgpack

from .errors import DecodeError

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX_BYTES",
    "MAX_HEADER_BYTES",
    "pack_header",
    "frame",
    "unframe",
    "header_nbytes",
]

MAGIC = b"MQSG"
VERSION = 1
_PREFIX = struct.Struct("<4sBII")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 4096


def pack_header(codec, numel, params):
    """Return the msgpack bytes of a header (deterministic for equal inputs)."""
    return msgpack.packb({"codec": codec, "numel": int(numel), "params": params}, use_bin_type=True)


def frame(header_bytes, payload):
    """Join prefix, header and payload into one message.

    Args:
        header_bytes: output of :func:`pack_header`.
        payload: a bytes-like object (bytes, bytearray, memoryview, uint8 ndarray).

    Returns:
        bytes: the message.
    """
    payload = memoryview(payload).cast("B")
    crc = zlib.crc32(payload, zlib.crc32(header_bytes))
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(header_bytes), crc), header_bytes, payload))


def header_nbytes(message):
    """Bytes of ``message`` that are framing and header, not payload."""
    if len(message) < PREFIX_BYTES:
        return len(message)
    _, _, hlen, _ = _PREFIX.unpack_from(message, 0)
    return min(len(message), PREFIX_BYTES + hlen)


def unframe(message):
    """Split and check a message.

    Args:
        message: a bytes-like object.

    Returns:
        (header dict, payload memoryview).

    Raises:
        DecodeError: the bytes are truncated, corrupted or not an mpiqsgd message.
    """
    try:
        view = memoryview(message).cast("B")
    except TypeError as exc:
        raise DecodeError(f"expected a bytes-like message, got {type(message).__name__}") from exc
    if len(view) < PREFIX_BYTES:
        raise DecodeError(f"message of {len(view)} bytes is shorter than the {PREFIX_BYTES}-byte prefix")
    magic, version, hlen, crc = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise DecodeError(f"not an mpiqsgd message: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise DecodeError(f"unsupported wire format version {version} (this build reads {VERSION})")
    if hlen > MAX_HEADER_BYTES or PREFIX_BYTES + hlen > len(view):
        raise DecodeError(
            f"header length {hlen} does not fit a message of {len(view)} bytes (truncated?)"
        )
    body = view[PREFIX_BYTES:]
    if zlib.crc32(body) != crc:
        raise DecodeError(f"checksum mismatch in a message of {len(view)} bytes (corrupted or truncated)")
    try:
        header = msgpack.unpackb(
            body[:hlen], raw=False, strict_map_key=True, max_str_len=256, max_bin_len=2048,
            max_array_len=1024, max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"unreadable message header: {exc}") from exc
    if (
        not isinstance(header, dict)
        or not isinstance(header.get("codec"), str)
        or not isinstance(header.get("numel"), int)
        or not isinstance(header.get("params"), dict)
    ):
        raise DecodeError(f"malformed message header: {header!r:.200}")
    if header["numel"] < 0:
        raise DecodeError(f"negative numel {header['numel']} in message header")
    return header, body[hlen:]
