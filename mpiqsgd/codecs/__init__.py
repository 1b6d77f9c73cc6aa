"""Codecs: gradient tensors to self-describing bytes and back.

===========  ==========================================  ==============================
name         what                                        payload bytes for n coords
===========  ==========================================  ==============================
fp32         identity                                    4 n
fp16         half-precision cast                         2 n
qsgd         QSGD, L2 norm per bucket                    4 ceil(n/d) + ceil(n b / 8)
qsgd-inf     QSGD, max norm per bucket                   4 ceil(n/d) + ceil(n b / 8)
qsgd-elias   QSGD, L2 norm, Elias-omega sparse code      4 ceil(n/d) + variable
sign         scaled sign, L1 scale per bucket            4 ceil(n/d) + ceil(n / 8)
nuqsgd       signed NUQ levels +-0.5^j, L2 norm          4 ceil(n/d) + ceil(n b / 8)
nuqsgd-zero  NUQ levels 0, +-0.5^j (JMLR), L2 norm      4 ceil(n/d) + ceil(n b / 8)
terngrad     levels {-1, 0, 1}, max norm (b = 2)         4 ceil(n/d) + ceil(n / 4)
alq          ALQ levels fitted to the gradients'         4 ceil(n/d) + ceil(n b / 8)
             histogram (fit="model": a mixture model)
alq-n        as alq (fit="model": one pooled model)      4 ceil(n/d) + ceil(n b / 8)
amq          levels +-p^j, p fitted as alq's levels      4 ceil(n/d) + ceil(n b / 8)
amq-n        levels +-p^j, p fitted as alq-n's levels    4 ceil(n/d) + ceil(n b / 8)
===========  ==========================================  ==============================

Encodings (``encoding=`` / ``--encoding``): ``dense`` bit packing (the sizes above);
``elias``, QSGD's Elias-omega sparse code (``qsgd-elias`` is ``qsgd`` with it); ``entropy``,
rANS of the quantized symbols with their counts in the message (:mod:`mpiqsgd.codecs.entropy`)
for qsgd, qsgd-inf and every level-set codec. Both are variable length, and the quantization
and decoded values are the dense code's.

The level-set codecs (:mod:`mpiqsgd.codecs.levelset`) share the wire name ``levelset``;
their headers carry the float32 level table (4 K bytes), so adaptive codecs' messages
name the table they were encoded with.

Every message adds a 13-byte prefix and a msgpack header of a few dozen bytes
(:mod:`mpiqsgd.wire`). ``make_codec(name, ...)`` builds one by name;
``decode(message)`` decodes any message by its header.
"""

import inspect

from ..errors import ConfigError, DecodeError
from .. import wire
from .base import Codec, make_generator
from .feedback import ErrorFeedback
from .fp import FP16, FP32
from .levelset import AdaptiveLevelSet, LevelSet
from .qsgd import QSGD
from .sign import Sign

__all__ = [
    "Codec", "ErrorFeedback", "CODECS", "ENCODINGS", "WIRE_CODECS", "make_codec", "decode",
    "make_generator",
]

# Wire name -> class: how a header's "codec" field is resolved.
WIRE_CODECS = {cls.name: cls for cls in (FP32, FP16, QSGD, Sign, LevelSet)}

# User-facing name -> (class, fixed parameters).
CODECS = {
    "fp32": (FP32, {}),
    "fp16": (FP16, {}),
    "qsgd": (QSGD, {"norm": "l2"}),
    "qsgd-inf": (QSGD, {"norm": "max"}),
    "qsgd-elias": (QSGD, {"norm": "l2", "encoding": "elias"}),
    "sign": (Sign, {}),
    "nuqsgd": (LevelSet, {"method": "nuq"}),
    "nuqsgd-zero": (LevelSet, {"method": "nuq0"}),
    "terngrad": (LevelSet, {"method": "terngrad", "norm": "max"}),
    "alq": (AdaptiveLevelSet, {"method": "alq"}),
    "alq-n": (AdaptiveLevelSet, {"method": "alq-n"}),
    "amq": (AdaptiveLevelSet, {"method": "amq"}),
    "amq-n": (AdaptiveLevelSet, {"method": "amq-n"}),
}


def make_codec(name, error_feedback=False, **params):
    """Build a codec by name.

    Args:
        name: one of :data:`CODECS`.
        error_feedback: wrap it in :class:`ErrorFeedback`.
        **params: codec parameters (``bits``, ``levels``, ``bucket``, ``rounding`` ...);
            ``None`` values are dropped so CLI defaults apply.

    Raises:
        ConfigError: unknown name or invalid parameters, listing what is valid.
    """
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}")
    cls, fixed = CODECS[name]
    params = {k: v for k, v in params.items() if v is not None}
    clash = set(params) & set(fixed)
    if clash:
        raise ConfigError(f"codec {name!r} fixes {', '.join(sorted(clash))}")
    accepted = [p for p in inspect.signature(cls).parameters if p not in fixed]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"codec {name!r} takes no parameter {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    codec = cls(**fixed, **params)
    return ErrorFeedback(codec) if error_feedback else codec


# Names by family: which flags apply to which codecs (mpiqsgd.options).
QSGD_ONLY = ("qsgd", "qsgd-inf", "qsgd-elias")
ENCODINGS = ("dense", "elias", "entropy")
LEVEL_SETS = tuple(name for name, (cls, _) in CODECS.items() if issubclass(cls, LevelSet))
ADAPTIVE_CODECS = tuple(name for name, (cls, _) in CODECS.items() if issubclass(cls, AdaptiveLevelSet))


def codec_for(header):
    """The codec a message header (as :func:`mpiqsgd.wire.unframe` returns it) names, with its
    parameters validated.

    Raises:
        DecodeError: an unknown codec, or parameters no encoder writes.
    """
    cls = WIRE_CODECS.get(header["codec"])
    if cls is None:
        raise DecodeError(f"message names unknown codec {wire.describe(header['codec'])}")
    try:
        codec = cls(**header["params"])
    except (ConfigError, TypeError, ValueError, OverflowError) as exc:
        raise DecodeError(f"message header has invalid {header['codec']} parameters: {exc}") from None
    if codec.params != header["params"]:
        raise DecodeError(f"message header has invalid {header['codec']} parameters: "
                          f"{wire.describe(header['params'])}, expected the form {wire.describe(codec.params)}")
    return codec


def decode(message, device="cpu", numel=None, out=None):
    """Decode any mpiqsgd message by its header.

    Args:
        message: a bytes-like object.
        device: where the decoded tensor goes.
        numel: the number of values the receiver expects; another count is refused.
        out: a float32 tensor to decode into, as for :meth:`Codec.decode`.

    Returns:
        a finite float32 tensor of the header's ``numel`` values.

    Raises:
        DecodeError: truncated, corrupted, foreign or hostile bytes (see :mod:`mpiqsgd.wire`).
    """
    header, payload = wire.unframe(message, numel)
    return codec_for(header)._decode_payload(header["numel"], payload, device, out)
