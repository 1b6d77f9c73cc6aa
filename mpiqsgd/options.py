"""The codec and topology flags, declared once: dataclasses whose fields are the flags.

Each field is a :func:`knob`: its default, its help line, its choices, its argparse group and,
where the default is ``None`` because the real one depends on other flags, the words ``--help``
shows for it. :func:`add_fields` adds a dataclass's fields to a parser, so ``train`` (whose
:class:`~mpiqsgd.train.config.TrainConfig` extends both classes here), ``bench codec``,
``bench exchange``, ``bench step`` and ``project`` show the same flags with the same help.

:meth:`CodecOptions.build_codec` and :meth:`TopologyOptions.aggregator_options` turn the
values into a codec and :func:`~mpiqsgd.topology.make_aggregator`'s options, with the flag
names in every error.
"""

import argparse
from dataclasses import MISSING, dataclass, field, fields
import typing
from typing import Optional

from .codecs import ADAPTIVE_CODECS, CODECS, ENCODINGS, LEVEL_SETS, QSGD_ONLY, make_codec
from .errors import ConfigError
from .topology import CHOICES, DOWNLINKS, HIERARCHICAL_MODES
from .topology.intsum import PIECE_NUMEL as INTSUM_PIECE_NUMEL
from .topology.ring import PIECE_NUMEL as SCATTER_PIECE_NUMEL

__all__ = ["knob", "flag", "arg_type", "add_fields", "Flags", "CodecOptions", "TopologyOptions"]


def knob(default, help, choices=None, group="training", shown=None):
    """A dataclass field that is also a command-line flag.

    Args:
        default: the field's default (and the flag's).
        help: the help line, without the default.
        choices: the values the flag takes (None: any of its type).
        group: the argparse group it is listed under.
        shown: the words ``--help`` gives for the default instead of its value, e.g. ``"4 for qsgd,
            3 for the level sets"``; every non-boolean knob whose default is ``None`` needs them.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "shown": shown})


def flag(name):
    """``--clip-sigma`` for the field ``clip_sigma``."""
    return "--" + name.replace("_", "-")


def arg_type(tp):
    """``int`` for ``int`` and ``Optional[int]``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _help(f):
    """The help line of field ``f``, with its default (none for a boolean switch)."""
    meta = f.metadata
    if arg_type(f.type) is bool:
        text = meta["help"]
    elif meta["shown"]:
        text = f"{meta['help']} (default {meta['shown']})"
    elif f.default is None:
        raise TypeError(f"knob {f.name}: a None default needs shown= (the words --help gives for it)")
    else:
        text = f"{meta['help']} (default {f.default})"
    return text.replace("%", "%%")


def add_fields(parser, cls, suppress=False, groups=None, names=None):
    """Add one flag per :func:`knob` field of dataclass ``cls`` to ``parser``, in argparse groups.

    A boolean field is a switch: ``--name`` where it defaults to False, ``--no-name`` where True.

    Args:
        parser: an ``argparse.ArgumentParser``.
        cls: the dataclass.
        suppress: flags not given stay out of the namespace (argparse.SUPPRESS), so that a caller
            can tell them from defaults; else a flag not given holds the field's default.
        groups: the groups' order (others follow in the order of their first field).
        names: only these fields (None: all).
    """
    order = {g: i for i, g in enumerate(groups or ())}
    chosen = sorted((f for f in fields(cls) if names is None or f.name in names),
                    key=lambda f: order.get(f.metadata["group"], len(order)))
    made = {}
    for f in chosen:
        meta = f.metadata
        if meta["group"] not in made:
            made[meta["group"]] = parser.add_argument_group(meta["group"])
        group = made[meta["group"]]
        default = argparse.SUPPRESS if suppress else f.default if f.default is not MISSING else None
        if arg_type(f.type) is bool:
            name, action = (flag("no_" + f.name), "store_false") if f.default else (flag(f.name), "store_true")
            group.add_argument(name, dest=f.name, action=action, default=default, help=_help(f))
        else:
            group.add_argument(flag(f.name), dest=f.name, type=arg_type(f.type), default=default,
                               choices=meta["choices"], help=_help(f))


class Flags:
    """Base of the dataclasses whose fields are flags."""

    @classmethod
    def of(cls, source):
        """An instance from the fields that ``source`` holds: an argparse namespace or a dict (a run's
        ``config.json`` flags); its other keys are ignored, fields it lacks take their defaults."""
        get = source.get if isinstance(source, dict) else lambda name, default: getattr(source, name, default)
        missing = object()
        values = {f.name: get(f.name, missing) for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if v is not missing})


@dataclass
class CodecOptions(Flags):
    """The flags that choose and configure a codec (:func:`mpiqsgd.codecs.make_codec`'s parameters)."""

    codec: str = knob("qsgd", "gradient codec", list(CODECS), "codec")
    bits: Optional[int] = knob(None, "bits per coordinate on the wire, qsgd's sign included", group="codec",
                               shown="4 for qsgd, 3 for the level sets, 2 for terngrad")
    levels: Optional[int] = knob(None, "qsgd: number of magnitude levels s (sets --bits)", group="codec",
                                 shown="2^(bits-1) - 1")
    bucket: Optional[int] = knob(None, "coordinates per bucket, each scaled by its own norm", group="codec",
                                 shown="512 for qsgd and sign, 8192 for the level sets")
    rounding: Optional[str] = knob(None, "qsgd: rounding to the levels", ["stochastic", "nearest"], "codec",
                                   shown="stochastic")
    clip_sigma: Optional[float] = knob(None, "terngrad: clip each bucket at this many standard deviations",
                                       group="codec", shown="no clipping")
    norm: Optional[str] = knob(None, "level sets: bucket normalization, terngrad max only", ["l2", "max"], "codec",
                               shown="max for the adaptive codecs, l2 for the others")
    fit: Optional[str] = knob(None, "adaptive codecs: fit the levels to the gradients' histogram or to the paper's "
                                    "truncated-normal model", ["histogram", "model"], "codec", shown="histogram")
    encoding: Optional[str] = knob(None, "how quantized symbols are packed: dense, elias (qsgd, qsgd-inf) or entropy "
                                         "(rANS; qsgd, qsgd-inf and the level sets); qsgd-elias is always elias",
                                   list(ENCODINGS), "codec", shown="dense")
    error_feedback: bool = knob(False, "wrap the codec with error feedback", group="codec")

    def build_codec(self):
        """The codec these flags describe.

        Raises:
            ConfigError: a flag the codec does not take, or a value it refuses, naming the flag.
        """
        codec = self.codec
        if self.norm is not None and codec not in LEVEL_SETS:
            hint = " (qsgd: --codec qsgd-inf is the max norm)" if codec in QSGD_ONLY else ""
            raise ConfigError(f"--norm applies only to the level-set codecs {', '.join(LEVEL_SETS)} "
                              f"(got --codec {codec}){hint}")
        if self.fit is not None and codec not in ADAPTIVE_CODECS:
            raise ConfigError(f"--fit applies only to the adaptive codecs {', '.join(ADAPTIVE_CODECS)} "
                              f"(got --codec {codec})")
        for name in ("levels", "rounding"):
            if getattr(self, name) is not None and codec not in QSGD_ONLY:
                raise ConfigError(f"{flag(name)} applies only to --codec qsgd, qsgd-inf or qsgd-elias "
                                  f"(got --codec {codec})")
        if self.clip_sigma is not None and codec != "terngrad":
            raise ConfigError(f"--clip-sigma applies only to --codec terngrad (got --codec {codec})")
        if self.bits is not None and codec in ("fp32", "fp16", "sign"):
            raise ConfigError(f"--bits does not apply to --codec {codec} (it has a fixed width)")
        if self.bucket is not None and codec in ("fp32", "fp16"):
            raise ConfigError(f"--bucket does not apply to --codec {codec}")
        if codec in CODECS:
            _check_encoding(codec, self.encoding)
        return make_codec(codec, error_feedback=self.error_feedback, bits=self.bits, levels=self.levels,
                          bucket=self.bucket, rounding=self.rounding, clip_sigma=self.clip_sigma, norm=self.norm,
                          fit=self.fit, encoding=self.encoding)


def _check_encoding(codec, encoding):
    """``--encoding`` against ``--codec``: which codecs take which encodings."""
    if encoding is None:
        return
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}")
    if codec == "qsgd-elias":
        raise ConfigError(f"--codec qsgd-elias fixes the encoding to elias (for --encoding {encoding} use "
                          "--codec qsgd)")
    if codec not in QSGD_ONLY + LEVEL_SETS:
        raise ConfigError(f"--encoding applies only to --codec qsgd, qsgd-inf and the level-set codecs "
                          f"(got --codec {codec})")
    if encoding == "elias" and codec not in QSGD_ONLY:
        raise ConfigError(f"--encoding elias applies only to --codec qsgd and qsgd-inf (got --codec {codec}); "
                          "the level-set codecs take dense or entropy")


PS_ONLY = ("downlink", "server_error_feedback", "dedicated_server")
PIECED = ("scatter", "intsum")


@dataclass
class TopologyOptions(Flags):
    """The flags that choose and configure how ranks combine their gradients."""

    topology: str = knob("auto", "gradient aggregation; auto: intsum for qsgd and qsgd-inf with the dense encoding, "
                                 "allreduce for fp32, scatter for the others", list(CHOICES), "topology")
    downlink: Optional[str] = knob(None, "ps: what the server sends back", list(DOWNLINKS), "topology", shown="fp32")
    server_error_feedback: bool = knob(False, "ps: server-side error feedback on an encoded downlink; needs "
                                              "--downlink codec", group="topology")
    dedicated_server: bool = knob(False, "ps: rank 0 only serves and does not train", group="topology")
    piece_numel: Optional[int] = knob(None, "scatter, intsum: coordinates per pipelined message (the same bits for any "
                                            "size); 0: unpipelined (scatter: one message a chunk; intsum: one "
                                            "allreduce)",
                                      group="topology", shown=f"{SCATTER_PIECE_NUMEL} for scatter, "
                                                              f"{INTSUM_PIECE_NUMEL} for intsum")
    hierarchical: str = knob("auto", "fp32 inside each node, the topology among one leader per node: on, off, or auto: "
                                     "where the ranks span several nodes and some node holds several",
                             list(HIERARCHICAL_MODES), "topology")

    def aggregator_options(self, topology):
        """:func:`~mpiqsgd.topology.make_aggregator`'s options for ``topology`` (resolved, not ``auto``).

        Its names are the topology layer's (``dedicated_server`` is ``dedicated``); switches left
        off and options not given are left out. ``hierarchical`` is not among them.

        Raises:
            ConfigError: flags given that do not apply to ``topology``, naming them.
        """
        ps_only = [flag(name) for name in PS_ONLY if getattr(self, name)]
        if ps_only and topology != "ps":
            raise ConfigError(f"{', '.join(ps_only)} only apply to --topology ps (this run uses --topology {topology})")
        if self.piece_numel is not None:
            if topology not in PIECED:
                raise ConfigError(f"--piece-numel only applies to --topology {' and '.join(PIECED)} (this run uses "
                                  f"--topology {topology})")
            if self.piece_numel < 0:
                raise ConfigError(f"--piece-numel must be >= 0 (0: unpipelined); got {self.piece_numel}")
        options = {"downlink": self.downlink, "server_error_feedback": self.server_error_feedback,
                   "dedicated": self.dedicated_server, "piece_numel": self.piece_numel}
        return {k: v for k, v in options.items() if v is not None and v is not False}
