"""Message framing: a fixed prefix, a msgpack header and a raw payload.

Wire format of one encoded tensor (all integers little-endian)::

    offset  bytes  field
    0       4      magic b"MQSG"
    4       1      format version (2)
    5       4      header length H (uint32)
    9       4      checksum: CRC-32(header) XOR low 32 bits of XXH3-64(payload) (uint32)
    13      H      msgpack map: {"codec": str, "numel": int, "params": {...}}
    13+H    P      payload: raw packed bytes, layout defined by the codec

The prefix is ``PREFIX_BYTES`` = 13 bytes; the header is a few dozen bytes and its
length depends only on the codec parameters and ``numel`` (msgpack integers are
variable width, so it is computed by packing, never guessed). The checksum makes any
corruption of a message a :class:`~mpiqsgd.errors.DecodeError` instead of silently
wrong values: the header keeps CRC-32's guarantee (every burst of up to 32 flipped bits is
caught when the payload is intact), the payload is hashed with XXH3 (the ``xxhash``
package: about 6x faster than zlib's CRC-32 and 3x faster than a memcpy of the payload;
a random corruption passes with probability 2^-32). Everything that is not the payload
counts as header bytes in the meter.

A valid CRC proves only that the bytes arrived as sent, not that the sender was sane, so
:func:`unframe` also bounds what a header may claim before anything is allocated:

- the header is a map of exactly ``codec`` (str), ``numel`` (int, not bool) and ``params``
  (a map of str to msgpack scalars: nil, bool, int, float, str, bin; no nesting), at most
  ``MAX_HEADER_BYTES`` long;
- ``0 <= numel <= MAX_NUMEL`` (2^31 coordinates, 8 GiB of decoded float32): a sender
  refuses to frame more (:func:`pack_header`), a receiver refuses to decode more;
- codecs take ``bucket <= MAX_BUCKET`` (2^30) and their decoders allocate by ``numel``,
  never by ``bucket`` (a bucket of 2^30 over numel 1 is one bucket of 1);
- a receiver that states no expected size gets at most ``MAX_VALUES_PER_BYTE`` (2^14)
  values per payload byte: ``numel <= MAX_VALUES_PER_BYTE * P`` or a :class:`DecodeError`
  naming the limit, before anything is allocated.

The last rule bounds what any decoder may produce per byte received: a message of ``B``
bytes decodes to at most ``2^14 B`` float32 values (64 KiB per byte; a 126-byte message to
at most 8 MiB) with at most ``4 B + 4 MiB`` of working memory (copies of the payload, the
entropy decoder's tables and chunks). Dense codecs' payload length is a pure function of
``numel`` (at least 1 bit per value), far inside it. A variable-length message can
legitimately describe many values in a few bytes (an all-zero or constant bucket costs its
4-byte scale and a few bits), so every variable-length encoding caps its bucket at
``MAX_VARIABLE_BUCKET`` = ``4 * MAX_VALUES_PER_BYTE`` (2^16) coordinates: the bucket
scales alone then give every message an encoder writes at least one payload byte per 2^14
values, and the rule refuses none of them (``tests/test_decode_fuzz.py`` proves both). A
receiver that knows the length it expects passes it (``unframe(message, numel=n)``,
``decode(message, numel=n)``): a message of any other length is refused before decoding,
and the codec's own minimum payload for ``n`` values applies instead of the ratio (see
``docs/decoding.md``).
"""

from __future__ import annotations

import reprlib
import struct
import zlib
from typing import TYPE_CHECKING, Any, Dict, Mapping, Union

import msgpack
import xxhash

from .errors import ConfigError, DecodeError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_NUMEL",
    "MAX_BUCKET",
    "MAX_VALUES_PER_BYTE",
    "MAX_VARIABLE_BUCKET",
    "describe",
    "pack_header",
    "checksum",
    "frame",
    "frame_into",
    "seal",
    "SLACK",
    "unframe",
    "header_nbytes",
    "BytesLike",
    "Header",
]

MAGIC = b"MQSG"
VERSION = 2
_PREFIX = struct.Struct("<4sBII")
PREFIX_BYTES = _PREFIX.size
MAX_HEADER_BYTES = 4096
MAX_NUMEL = 1 << 31  # coordinates one message may claim
MAX_BUCKET = 1 << 30  # coordinates per bucket a codec accepts
# Values a message may decode to per payload byte when the receiver states no expected size.
MAX_VALUES_PER_BYTE = 1 << 14
# Coordinates per bucket of a variable-length encoding: its 4-byte scale per bucket keeps every
# message within MAX_VALUES_PER_BYTE.
MAX_VARIABLE_BUCKET = 4 * MAX_VALUES_PER_BYTE
# Bytes past a message's end that a buffer to encode into in place must also have: the codec
# kernels store whole 8-code groups, so the last group may reach 7 bytes beyond the payload.
SLACK = 8
# What a message, a payload or a buffer to frame into may be (typing.Union: Python 3.9 evaluates it).
BytesLike = Union[bytes, bytearray, memoryview, "npt.NDArray[np.uint8]"]
# A checked message header: {"codec": str, "numel": int, "params": {str: msgpack scalar}}.
Header = Dict[str, Any]
_KEYS = frozenset(("codec", "numel", "params"))
_SCALARS = (type(None), bool, int, float, str, bytes)

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlong = 3, 60, 60, 40


def describe(obj: object) -> str:
    """A short repr of untrusted header content (bounded in depth and length)."""
    return _repr.repr(obj)


def pack_header(codec: str, numel: int, params: Mapping[str, Any]) -> bytes:
    """Return the msgpack bytes of a header (deterministic for equal inputs).

    Raises:
        ConfigError: ``numel`` above :data:`MAX_NUMEL` (no receiver would decode it).
    """
    numel = int(numel)
    if numel > MAX_NUMEL:
        raise ConfigError(f"{codec}: a message holds at most {MAX_NUMEL} values (wire.MAX_NUMEL); got {numel}. "
                          "Split the tensor")
    return msgpack.packb({"codec": codec, "numel": numel, "params": params}, use_bin_type=True)


def checksum(header_bytes: BytesLike, payload: BytesLike) -> int:
    """The prefix's checksum of a header and a payload (bytes-like objects)."""
    return zlib.crc32(header_bytes) ^ (xxhash.xxh3_64_intdigest(payload) & 0xFFFF_FFFF)


def frame(header_bytes: bytes, payload: BytesLike) -> bytes:
    """Join prefix, header and payload into one message.

    Args:
        header_bytes: output of :func:`pack_header`.
        payload: a bytes-like object (bytes, bytearray, memoryview, uint8 ndarray).

    Returns:
        bytes: the message.
    """
    payload = memoryview(payload).cast("B")
    crc = checksum(header_bytes, payload)
    return b"".join((_PREFIX.pack(MAGIC, VERSION, len(header_bytes), crc), header_bytes, payload))


def frame_into(out: BytesLike, header_bytes: bytes, payload: BytesLike) -> memoryview:
    """Write prefix, header and payload into ``out``: the message without a join or fresh allocation.

    Args:
        out: a writable buffer (bytearray, uint8 ndarray) of at least the message's length;
            reused from call to call, its pages stay mapped (a fresh 100 MB ``bytes`` costs
            page faults on every byte, several times a memcpy).
        header_bytes, payload: as :func:`frame`.

    Returns:
        A read-only memoryview of the message (the first bytes of ``out``): decoders copy
        what they would otherwise decode in place, so values never alias a reused buffer.
    """
    payload = memoryview(payload).cast("B")
    view = _writable(out, PREFIX_BYTES + len(header_bytes) + len(payload), "frame_into")
    start = PREFIX_BYTES + len(header_bytes)
    view[start:start + len(payload)] = payload
    return seal(view, header_bytes, len(payload))


def seal(out: BytesLike, header_bytes: bytes, payload_nbytes: int) -> memoryview:
    """Frame a payload that was written in place: ``out[PREFIX_BYTES + len(header_bytes):]``
    holds its ``payload_nbytes`` bytes; write the prefix (checksum included) and the header
    before it. Returns the message as :func:`frame_into` does (a read-only view of ``out``)."""
    start = PREFIX_BYTES + len(header_bytes)
    end = start + payload_nbytes
    view = _writable(out, end, "seal")
    _PREFIX.pack_into(view, 0, MAGIC, VERSION, len(header_bytes), checksum(header_bytes, view[start:end]))
    view[PREFIX_BYTES:start] = header_bytes
    return view[:end].toreadonly()


def _writable(out: BytesLike, nbytes: int, what: str) -> memoryview:
    view = memoryview(out).cast("B")
    if view.readonly or len(view) < nbytes:
        raise ConfigError(f"{what}: needs a writable buffer of {nbytes} bytes; got "
                          f"{'a read-only' if view.readonly else 'a writable'} one of {len(view)}")
    return view


def header_nbytes(message: BytesLike) -> int:
    """Bytes of ``message`` that are framing and header, not payload."""
    if len(message) < PREFIX_BYTES:
        return len(message)
    _, _, hlen, _ = _PREFIX.unpack_from(message, 0)
    return min(len(message), PREFIX_BYTES + hlen)


def unframe(message: BytesLike, numel: int | None = None) -> tuple[Header, memoryview]:
    """Split and check a message.

    Args:
        message: a bytes-like object.
        numel: the number of values the receiver expects, if it knows; a header claiming
            another number is refused before anything is decoded. When None, a header may
            claim at most ``MAX_VALUES_PER_BYTE`` values per payload byte.

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
    if checksum(body[:hlen], body[hlen:]) != crc:
        raise DecodeError(f"checksum mismatch in a message of {len(view)} bytes (corrupted or truncated)")
    try:
        header = msgpack.unpackb(
            body[:hlen], raw=False, strict_map_key=True, max_str_len=256, max_bin_len=2048,
            max_array_len=1024, max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(f"unreadable message header ({type(exc).__name__}: {exc})") from exc
    _check_header(header)
    payload = body[hlen:]
    if numel is None:
        _check_ratio(header["numel"], len(payload))
    elif header["numel"] != numel:
        raise DecodeError(f"message holds {header['numel']} values, the receiver expects {numel}")
    return header, payload


def _check_ratio(numel: int, payload_nbytes: int) -> None:
    """Refuse a header claiming more values than ``MAX_VALUES_PER_BYTE`` per payload byte."""
    if numel > MAX_VALUES_PER_BYTE * payload_nbytes:
        raise DecodeError(
            f"message claims {numel} values in a payload of {payload_nbytes} bytes, more than the "
            f"{MAX_VALUES_PER_BYTE} values per payload byte (wire.MAX_VALUES_PER_BYTE) that any encoder writes "
            "and that a receiver decodes without an expected size; a receiver that knows how many values it "
            "expects passes that count (decode(message, numel=n)) and the codec's own checks apply instead")


def _check_header(header: Any) -> None:
    """Refuse any header :func:`pack_header` cannot produce (without recursing into it)."""
    if type(header) is not dict or header.keys() != _KEYS:
        raise DecodeError(f"malformed message header: {describe(header)}; expected a map of "
                          "codec, numel and params")
    params = header["params"]
    if type(header["codec"]) is not str or type(header["numel"]) is not int or type(params) is not dict:
        raise DecodeError(f"malformed message header: {describe(header)}; expected codec a str, "
                          "numel an int and params a map")
    for key, value in params.items():
        if type(key) is not str or type(value) not in _SCALARS:
            raise DecodeError(f"message header has invalid {header['codec']:.40} parameters: "
                              f"{describe(key)} = {describe(value)} is not a named scalar")
    numel = header["numel"]
    if numel < 0:
        raise DecodeError(f"negative numel {numel} in message header")
    if numel > MAX_NUMEL:
        raise DecodeError(f"message header claims numel={numel}, above the cap of {MAX_NUMEL} (wire.MAX_NUMEL)")
