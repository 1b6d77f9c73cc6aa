"""The codec contract: a 1-D float32 tensor to self-describing bytes and back.

Every message is framed by :mod:`mpiqsgd.wire` (prefix, msgpack header naming the
codec, its parameters and ``numel``, then the payload). A subclass defines only its
payload: its exact length (:meth:`Codec.payload_nbytes`; ``None`` for a variable-length
code, which then gives :meth:`Codec.min_payload_nbytes`), how to produce it together
with the values a receiver will decode (:meth:`Codec._quantize`), and how to read it
back (:meth:`Codec._dequantize`). The base class does the framing, the checks on
input and on received bytes, and guarantees that the values returned by
:meth:`Codec.encode_decode` are bit-identical to :meth:`Codec.decode` of the bytes.

The contract also declares what the exchange needs from stateful codecs, so that no
caller probes for attributes:

- state: :meth:`Codec.state_dict` / :meth:`Codec.load_state_dict` (empty for stateless
  codecs; error-feedback residuals, fitted level tables);
- adaptation: :attr:`Codec.adaptive`, :meth:`Codec.local_stats` and :meth:`Codec.fit`
  (adaptive level sets refit their table from statistics merged across ranks);
- :attr:`Codec.base`: the codec whose wire format the messages have (itself, or the codec
  an :class:`~mpiqsgd.codecs.feedback.ErrorFeedback` compensates).

Decoding untrusted bytes: a receiver that states no expected size decodes at most
:data:`~mpiqsgd.wire.MAX_VALUES_PER_BYTE` (2^14) values per payload byte
(:func:`mpiqsgd.wire.unframe` refuses more before anything is allocated), so every codec
keeps ``min_payload_nbytes(numel) * MAX_VALUES_PER_BYTE >= numel``: dense codecs spend at
least a bit per value; a variable-length encoding, which may code a bucket of zeros in a few
bits, takes a bucket of at most :data:`~mpiqsgd.wire.MAX_VARIABLE_BUCKET` (2^16)
coordinates (:func:`check_bucket`), whose 4-byte scale is then at least a byte per 2^14
values. ``docs/decoding.md`` has the whole bound.
"""

from __future__ import annotations

from typing import Any, Collection, Hashable, Mapping, TypeVar, Union

import numpy as np
import numpy.typing as npt
import torch

from .. import wire
from ..errors import ConfigError, DecodeError, NonFiniteError
from .kernels import SeedAt

__all__ = ["Codec", "Rng", "make_generator", "check_choice", "check_int", "check_bucket", "all_finite",
           "non_finite_error"]

# The randomness an encode takes: a generator (make_generator), or a SeedAt for one piece of a message.
Rng = Union[torch.Generator, SeedAt]
# Where tensors go: torch.types.Device without its None, which torch.device() refuses (_check_out calls it).
Device = Union[torch.device, str, int]
_T = TypeVar("_T")


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, from one sum in the common case.

    A NaN or Inf makes the sum non-finite, so a finite sum proves the values finite; only a
    non-finite sum (which may just be overflow) takes the elementwise test, which torch
    runs far slower than a sum on the CPU.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_error(codec: str, x: torch.Tensor) -> NonFiniteError:
    """The :class:`NonFiniteError` refusing to encode ``x``, which holds NaN or Inf (counted)."""
    bad = int((~torch.isfinite(x)).sum())
    return NonFiniteError(f"{codec}: refusing to encode a gradient with {bad} NaN/Inf value(s) out of {x.numel()}")


def make_generator(seed: int, rank: int = 0, step: int = 0, device: Device = "cpu", stream: int = 0) -> torch.Generator:
    """A ``torch.Generator`` seeded from (seed, rank, step[, stream]), the only source of codec randomness.

    Different ranks, steps and streams (e.g. the gradient buckets of one step) get
    independent streams; the same inputs always give the same stream, so runs are
    reproducible. Stream 0 is the stream of (seed, rank, step) alone.
    """
    entropy = [int(seed), int(rank), int(step)] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def check_choice(codec: str, name: str, value: _T, choices: Collection[_T]) -> _T:
    if value not in choices:
        raise ConfigError(f"{codec}: {name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_int(codec: str, name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{codec}: {name} must be an integer; got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"{codec}: {name} must be {bound}; got {value}")
    return int(value)


def check_bucket(codec: str, bucket: object, encoding: str) -> int:
    """``bucket`` checked for ``encoding``: at most :data:`~mpiqsgd.wire.MAX_BUCKET` for the dense code,
    at most :data:`~mpiqsgd.wire.MAX_VARIABLE_BUCKET` for a variable-length one (whose messages must
    stay within :data:`~mpiqsgd.wire.MAX_VALUES_PER_BYTE`: see the module docstring)."""
    bucket = check_int(codec, "bucket", bucket, 1, wire.MAX_BUCKET)
    if encoding != "dense" and bucket > wire.MAX_VARIABLE_BUCKET:
        raise ConfigError(f"{codec}: {encoding} encoding takes bucket <= {wire.MAX_VARIABLE_BUCKET} (one 4-byte scale "
                          f"per bucket keeps its messages within wire.MAX_VALUES_PER_BYTE = {wire.MAX_VALUES_PER_BYTE} "
                          f"values per byte); got {bucket}")
    return bucket


class Codec:
    """Base class of all codecs.

    Subclasses set ``name`` (the wire name), ``stochastic``, validate their
    parameters in ``__init__`` and expose them as :attr:`params` (a dict of msgpack
    scalars: the header carries exactly these).
    """

    name: str = "codec"
    stochastic: bool = False
    bits: int | None = None  # bits per coordinate on the wire, where fixed
    bucket: int | None = None  # coordinates per scale; None for codecs without buckets
    rounding: str | None = None  # "stochastic" or "nearest" where the codec offers the choice
    adaptive: bool = False  # refits itself from merged statistics (local_stats / fit)
    norm: str | None = None  # "l2" or "max": how each bucket is normalized, for codecs that round to levels
    # True where _quantize reduces every coordinate into a bucket norm (NaN and Inf carry into
    # it) and raises non_finite_error itself: encode then skips its own pass over the input.
    checks_finite: bool = False
    # Adaptive codecs: what their last fit chose ({"won": the table's name, "psi": {name: score}}; None before one).
    last_fit: dict[str, Any] | None = None

    @property
    def base(self) -> Codec:
        """The codec that defines this codec's wire format (itself unless it wraps another)."""
        return self

    def variance_bound(self) -> float | None:
        """Upper bound on E||Q(v) - v||^2 / ||v||^2, or None when the codec states none."""
        return None

    def level_table(self) -> npt.NDArray[np.float64] | None:
        """The levels (float64, -1 to 1) that unbiased stochastic rounding of each bucket's normalized
        coordinates picks from, or None for codecs that do not round to levels (diagnostics use it)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State that a checkpoint must keep (msgpack/torch-serializable); empty when stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], device: Device = "cpu") -> None:
        """Restore :meth:`state_dict`; ``device`` places tensors."""
        if state:
            raise ConfigError(f"{self.name} keeps no state; got {sorted(state)}")

    def local_stats(self, flat: torch.Tensor) -> dict[str, Any]:
        """This rank's sufficient statistics of ``flat`` for a refit (adaptive codecs only)."""
        raise ConfigError(f"{self.name} is not adaptive: it has no statistics to fit")

    def fit(self, stats: Mapping[str, Any]) -> None:
        """Refit from statistics merged across ranks in rank order (adaptive codecs only)."""
        raise ConfigError(f"{self.name} is not adaptive: it cannot fit")

    @property
    def params(self) -> dict[str, Any]:
        """Parameters carried in every header; equal params mean compatible bytes."""
        return {}

    def payload_nbytes(self, numel: int) -> int | None:
        """Exact payload bytes for ``numel`` coordinates (pure function), or None when the
        length depends on the data (then :meth:`min_payload_nbytes` bounds it)."""
        raise NotImplementedError

    def min_payload_nbytes(self, numel: int) -> int:
        """Fewest payload bytes any message of ``numel`` coordinates can have."""
        nbytes = self.payload_nbytes(numel)
        if nbytes is None:
            raise NotImplementedError(f"{self.name}: a variable-length code defines min_payload_nbytes")
        return nbytes

    @property
    def fixed_size(self) -> bool:
        """True when every message of ``numel`` coordinates has the same length."""
        return self.payload_nbytes(1) is not None

    def _quantize(self, x: torch.Tensor, rng: Rng | None, want_decoded: bool,
                  into: npt.NDArray[np.uint8] | None = None,
                  ) -> tuple[torch.Tensor | npt.NDArray[np.uint8], torch.Tensor | None]:
        """Return (payload, decoded float32 tensor) for a flat ``x``, finite unless the codec
        :attr:`checks_finite` itself.

        The decoded tensor may be None when ``want_decoded`` is false (plain ``encode``).
        ``into`` is None, or a writable uint8 ndarray of ``payload_nbytes(numel) + wire.SLACK``
        bytes inside the message being framed: a codec that writes its payload there returns
        ``into`` itself (its first ``payload_nbytes`` bytes are the payload; kernels may store up
        to :data:`wire.SLACK` bytes past them), which saves a copy and a fresh allocation. Any
        other payload is a uint8 tensor, which the base class copies into the frame.
        """
        raise NotImplementedError

    def _dequantize(self, payload: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return the float32 values of a payload (a uint8 tensor of the exact length, or for a
        variable-length code at least :meth:`min_payload_nbytes`; the codec checks the rest).
        ``out``: None, or a checked float32 tensor of ``numel`` values: a codec that decodes
        into it returns it; any other tensor returned is copied into it.

        Raise :class:`DecodeError` for values no encoder produces.
        """
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------

    def header_bytes(self, numel: int) -> bytes:
        """The msgpack header of a message of ``numel`` coordinates."""
        return wire.pack_header(self.name, numel, self.params)

    def encoded_nbytes(self, numel: int) -> int | None:
        """Exact length of ``encode`` of ``numel`` coordinates (pure function); None for a
        variable-length code."""
        payload = self.payload_nbytes(numel)
        return None if payload is None else wire.PREFIX_BYTES + len(self.header_bytes(numel)) + payload

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def _check_input(self, x: torch.Tensor, rng: Rng | None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{self.name}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ConfigError(f"{self.name}: expected a floating-point tensor, got {x.dtype}")
        x = x.detach().reshape(-1).to(torch.float32)
        if not self.checks_finite and not all_finite(x):
            raise non_finite_error(self.name, x)
        if self.stochastic and not isinstance(rng, (torch.Generator, SeedAt)):
            raise ConfigError(
                f"{self.name} rounds stochastically and needs a torch.Generator "
                "(mpiqsgd.codecs.make_generator(seed, rank, step))"
            )
        return x.contiguous()

    def encode_decode(self, x: torch.Tensor, rng: Rng | None = None, key: Hashable = None,
                      out: wire.BytesLike | None = None) -> tuple[bytes | memoryview, torch.Tensor]:
        """Encode ``x`` and also return what every receiver will decode from the bytes.

        Args:
            x: floating-point tensor (flattened; converted to float32). Must be finite.
            rng: ``torch.Generator`` on ``x``'s device, or a :class:`~mpiqsgd.codecs.kernels.SeedAt` (one
                piece of a message); required by stochastic codecs.
            key: identifies the buffer for stateful wrappers (error feedback); ignored here.
            out: a writable buffer to frame the message into (reused from call to call, see
                :func:`mpiqsgd.wire.frame_into`); one too small (or None) gets new bytes.

        Returns:
            (message, float32 tensor of ``x.numel()`` values on ``x``'s device); the message is
            ``bytes``, or a read-only memoryview of ``out`` that is valid until ``out`` is reused.
        """
        message, decoded = self._encode(x, rng, True, out)
        assert decoded is not None  # want_decoded
        return message, decoded

    def _payload_slot(self, out: wire.BytesLike | None, header: bytes, numel: int) -> npt.NDArray[np.uint8] | None:
        """The place of the payload inside ``out`` (for :meth:`_quantize`'s ``into``), or None
        when ``out`` cannot take the whole message of a fixed-length code plus the slack."""
        nbytes = self.payload_nbytes(numel)
        if out is None or not nbytes:
            return None
        view = memoryview(out).cast("B")
        start = wire.PREFIX_BYTES + len(header)
        if view.readonly or len(view) < start + nbytes + wire.SLACK:
            return None
        return np.frombuffer(view, dtype=np.uint8, count=nbytes + wire.SLACK, offset=start)

    def _encode(self, x: torch.Tensor, rng: Rng | None, want_decoded: bool, out: wire.BytesLike | None = None,
                ) -> tuple[bytes | memoryview, torch.Tensor | None]:
        x = self._check_input(x, rng)
        header = self.header_bytes(x.numel())
        payload: torch.Tensor | npt.NDArray[np.uint8]
        decoded: torch.Tensor | None
        if x.numel() == 0:
            payload, decoded = torch.zeros(0, dtype=torch.uint8), x.clone()
        else:
            into = self._payload_slot(out, header, x.numel())
            payload, decoded = self._quantize(x, rng, want_decoded, into)
            if out is not None and into is not None and payload is into:
                return wire.seal(out, header, into.size - wire.SLACK), decoded
        assert isinstance(payload, torch.Tensor)  # _quantize's contract: ``into`` itself or a uint8 tensor
        array = payload.cpu().numpy()
        if out is not None and len(memoryview(out).cast("B")) >= wire.PREFIX_BYTES + len(header) + array.size:
            return wire.frame_into(out, header, array), decoded
        return wire.frame(header, array), decoded

    def encode(self, x: torch.Tensor, rng: Rng | None = None, key: Hashable = None,
               out: wire.BytesLike | None = None) -> bytes | memoryview:
        """Encode ``x`` into a self-describing message (see :meth:`encode_decode`)."""
        return self._encode(x, rng, False, out)[0]

    def decode(self, message: wire.BytesLike, device: Device = "cpu", numel: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode a message produced by a codec with the same parameters.

        The values may share memory with ``message`` when it is a writable buffer (a
        received message): decoding copies nothing it does not have to.

        Args:
            numel: the number of values the receiver expects (any, when None).
            out: a flat contiguous float32 tensor of the message's ``numel`` values on ``device``
                to decode into (reused from call to call, its pages stay mapped: a fresh 100 MB
                array costs page faults and the kernel's zeroing of every page); the return
                value is then ``out``. Bytes found invalid while decoding raise DecodeError
                with ``out`` partly written.

        Raises:
            DecodeError: the bytes are invalid, were encoded with other parameters, or hold
                another number of values than ``numel``.
            ConfigError: ``out`` is not a float32 tensor of that many values on ``device``.
        """
        header, payload = wire.unframe(message, numel)
        if header["codec"] != self.name or header["params"] != self.params:
            raise DecodeError(
                f"message was encoded with {header['codec']} {header['params']}, "
                f"but this codec is {self.name} {self.params}"
            )
        return self._decode_payload(header["numel"], payload, device, out)

    def _decode_payload(self, numel: int, payload: memoryview, device: Device,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        expected = self.payload_nbytes(numel)
        if expected is None:
            least = self.min_payload_nbytes(numel)
            if len(payload) < least:
                raise DecodeError(
                    f"{self.name}: payload of {len(payload)} bytes, but numel={numel} needs at least {least}"
                )
        elif len(payload) != expected:
            raise DecodeError(
                f"{self.name}: payload of {len(payload)} bytes, but numel={numel} needs {expected}"
            )
        if out is not None:
            _check_out(self.name, out, numel, device)
        if numel == 0:
            if len(payload):
                raise DecodeError(f"{self.name}: {len(payload)} payload bytes for numel=0")
            return torch.zeros(0, dtype=torch.float32, device=device) if out is None else out
        # A received message (a writable buffer) is decoded in place; read-only bytes are copied.
        array = np.frombuffer(payload, dtype=np.uint8)
        buf = torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)
        values = self._dequantize(buf, numel, out)
        if out is None or values is out:
            return values
        return out.copy_(values)


def _check_out(codec: str, out: object, numel: int, device: Device) -> None:
    """Refuse an ``out`` the kernels cannot write as a flat array of ``numel`` values (numba does not
    check bounds: a 2-D or strided tensor would be written past its end)."""
    device = torch.device(device)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 1
            and out.is_contiguous() and out.numel() == numel and not out.requires_grad
            and out.device.type == device.type and (device.index is None or out.device.index == device.index)):
        what = (f"a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
                f"{' (strided)' if not out.is_contiguous() else ''}{' requiring grad' if out.requires_grad else ''}"
                if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ConfigError(f"{codec}: decode(out=) needs a flat contiguous float32 tensor of {numel} values on "
                          f"{device} (not requiring grad); got {what}")
