"""Training configuration: one flat dataclass, every knob with a default and a help line.

The ``mpiqsgd train`` flags are generated from these fields (``--field-name``), so the
command line, ``config.json`` and this file cannot disagree. ``--config FILE`` reads the same
fields from a TOML or JSON file (:func:`load_config_file`), or repeats a run from its own
``config.json``; flags given on the command line override the file.
"""

from dataclasses import asdict, dataclass, fields
import difflib
import json
import math
from pathlib import Path
import re
import typing
from typing import Optional

from .. import __version__
from ..errors import ConfigError
from ..options import CodecOptions, TopologyOptions, add_fields, arg_type, flag, knob
from ..topology import resolve_topology
from ..trace import parse_steps
from .models import MODELS

__all__ = ["TrainConfig", "add_config_args", "config_from_args", "load_config_file", "RUN_LOCAL", "NOT_REPEATED",
           "agreement_digest", "check_agreement"]

# Flags each rank may set for itself: they change neither the message pattern nor the math.
# Every other flag (and any new one) must be the same on every rank of a job: even --piece-numel, which
# changes no bit of a run's result, sets how many collectives each step calls, and of what sizes.
RUN_LOCAL = ("progress", "threads", "device", "wait", "comm_timeout", "run_dir", "data_dir", "download",
             "target_acc", "diag_every", "nvar_every", "nvar_batches", "resume")
# Flags of a run's config.json that are that run's own: repeating it (--config) is a new run in a new directory.
NOT_REPEATED = ("run_dir", "resume")
# The argparse groups of the train flags, in --help's order.
GROUPS = ("data", "training", "codec", "topology", "communication", "run")


@dataclass
class TrainConfig(CodecOptions, TopologyOptions):
    """Every flag of ``mpiqsgd train``: the codec and topology flags of the classes it extends
    (:mod:`mpiqsgd.options`), then its own, all in one flat table (as ``config.json`` holds them)."""

    # model and data
    model: str = knob("resnet20", "model: tiny, alexnet, resnet20/32/44/56/110, resnet50", group="data")
    dataset: str = knob("cifar10", "cifar10 (files) or synthetic (no files)", ["cifar10", "synthetic"], "data")
    data_dir: Optional[str] = knob(None, "where CIFAR-10 lives (batches or image-folder dir/.tar.gz)", group="data",
                                   shown="the first of ./data, ../shared/datasets, "
                                         "~/.cache/mpiqsgd/data that holds it")
    download: bool = knob(False, "download CIFAR-10 with torchvision if not found", group="data")
    train_subset: Optional[int] = knob(None, "use only N training images (quick runs)", group="data", shown="all")
    val_fraction: float = knob(0.1, "share of the training set held out for validation", group="data")
    synthetic_size: int = knob(10000, "training images of --dataset synthetic", group="data")

    # optimization
    epochs: int = knob(20, "epochs over the training shard")
    max_steps: Optional[int] = knob(None, "stop after this many steps (before the epochs end)",
                                    shown="all the epochs' steps")
    batch_size: int = knob(128, "images per worker per step")
    lr: float = knob(0.1, "peak learning rate")
    momentum: float = knob(0.9, "SGD momentum")
    nesterov: bool = knob(False, "Nesterov momentum")
    weight_decay: float = knob(1e-4, "L2 weight decay")
    lr_schedule: str = knob("step", "step, cosine or constant", ["step", "cosine", "constant"])
    lr_decay_epochs: Optional[str] = knob(None, "step schedule: comma-separated epochs", shown="50%,75% of --epochs")
    lr_decay_factor: float = knob(0.1, "step schedule: multiply the rate by this at each decay epoch")
    warmup_epochs: float = knob(0.0, "linear learning-rate warm-up from 0, in epochs")
    seed: int = knob(0, "seed of model init, data order, augmentation and codec randomness")

    # communication (the codec and topology flags are CodecOptions' and TopologyOptions')
    min_compress_numel: int = knob(1024, "tensors smaller than this go uncompressed (fp32)", group="communication")
    bucket_mb: float = knob(0.0, "gradient bucket size in MB, filled in backward order (0: one bucket)",
                            group="communication")
    overlap: bool = knob(False, "exchange each bucket in a communication thread while backward runs",
                         group="communication")
    wait: str = knob("backoff", "how a rank waits for messages: backoff (yields its core) or spin",
                     ["backoff", "spin"], "run")
    comm_timeout: float = knob(120.0, "seconds a rank waits for a peer before it names it and ends the job "
                                      "(step 0: 10x; 0: wait forever; needs --wait backoff)", group="run")
    uncompressed_warmup_steps: int = knob(0, "first steps exchange fp32 only", group="communication")
    adapt_at: str = knob("0,100,2000", "adaptive codecs: steps at which levels are refit", group="communication")
    adapt_every: int = knob(10000, "adaptive codecs: then refit every N steps (0: never)", group="communication")
    diag_every: int = knob(50, "log quantization diagnostics of rank 0's gradient every N steps (0: never)",
                           group="run")
    nvar_every: int = knob(1000, "log the gradient's normalized variance across extra mini-batches every N "
                                 "steps after step 0 (0: never)", group="run")
    nvar_batches: int = knob(4, "extra mini-batches of each --nvar-every sample (at least 2)", group="run")

    # execution and output
    simulate: int = knob(0, "simulate N workers in this one process instead of MPI ranks", group="run")
    ranks_per_node: int = knob(0, "with --simulate: group the workers into nodes of this many, in rank order (0: "
                                  "one node); MPI ranks are grouped by host name", group="run")
    threads: Optional[int] = knob(None, "torch threads per rank (same value on both sides to compare runs bitwise)",
                                  group="run", shown="torch's: the cores")
    device: str = knob("auto", "auto (GPU local_rank % n_gpus, else cpu), cpu, cuda, cuda:i", group="run")
    run_dir: Optional[str] = knob(None, "output directory", group="run",
                                  shown="runs/<time>-<pid>-<model>-<codec>-<topology>")
    eval_every: int = knob(0, "evaluate every N steps as well as after each epoch (0: per epoch)", group="run")
    target_acc: Optional[float] = knob(None, "report steps and seconds to reach this validation accuracy",
                                       group="run", shown="off")
    check_sync_every: int = knob(0, "verify parameters are bit-identical on all ranks every N steps", group="run")
    checkpoint_every: Optional[int] = knob(None, "checkpoint every N steps and at the end; 0: only at an "
                                                 "interruption (SIGINT, SIGTERM)", group="run", shown="every epoch")
    resume: Optional[str] = knob(None, "resume from a run directory or checkpoint directory", group="run",
                                  shown="a new run")
    trace_steps: str = knob("", "record a timeline (trace.json) of these steps: N, A-B, */N (every N-th), "
                                "comma-separated, or all; evaluations and checkpoints too",
                            group="run", shown="off")
    progress: bool = knob(True, "no progress bar or progress lines on rank 0", group="run")

    def validate(self):
        """Raise :class:`ConfigError` for values that cannot work (touches no file)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if arg_type(f.type) is float and value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag(f.name)} must be a finite number; got {value}")
        if not _DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:<index>; got {self.device!r}")
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is unknown; choose one of: {', '.join(sorted(MODELS))}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        for name in ("max_steps", "train_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1; got {value}")
        if self.nvar_batches < 2:
            raise ConfigError(f"--nvar-batches must be at least 2; got {self.nvar_batches}")
        for name in ("eval_every", "check_sync_every", "adapt_every", "diag_every", "nvar_every", "checkpoint_every",
                     "min_compress_numel", "uncompressed_warmup_steps", "simulate", "ranks_per_node"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.comm_timeout < float("inf"):
            raise ConfigError(f"--comm-timeout must be a finite number of seconds >= 0; got {self.comm_timeout}")
        if not 0 <= self.bucket_mb < float("inf"):
            raise ConfigError(f"--bucket-mb must be a finite number >= 0; got {self.bucket_mb}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive; got {self.lr}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0; got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1; got {self.threads}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError("--weight-decay must be >= 0 and --momentum in [0, 1)")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov needs --momentum above 0")
        self.topology = resolve_topology(self.topology, self.build_codec())  # config.json records what ran
        self.aggregator_options(self.topology)
        if self.ranks_per_node and not self.simulate:
            raise ConfigError("--ranks-per-node groups simulated workers (--simulate N); MPI ranks are grouped by "
                              "their host names (MPIQSGD_HOST overrides a rank's)")
        if self.warmup_epochs < 0 or self.lr_decay_factor <= 0:
            raise ConfigError("--warmup-epochs must be >= 0 and --lr-decay-factor above 0")
        if any(not math.isfinite(e) for e in self.decay_epochs()):
            raise ConfigError(f"--lr-decay-epochs must be finite numbers; got {self.lr_decay_epochs!r}")
        self.adapt_steps()
        parse_steps(self.trace_steps)
        return self

    def adapt_steps(self):
        """Steps listed by ``--adapt-at``."""
        try:
            return tuple(int(s) for s in self.adapt_at.split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"--adapt-at must be comma-separated step numbers; got {self.adapt_at!r}") from None

    def decay_epochs(self):
        """Epochs at which the step schedule multiplies the rate by ``lr_decay_factor``."""
        if self.lr_decay_epochs is None:
            return [self.epochs * 0.5, self.epochs * 0.75]
        try:
            return [float(e) for e in self.lr_decay_epochs.split(",") if e.strip()]
        except ValueError:
            raise ConfigError(f"--lr-decay-epochs must be comma-separated numbers; got {self.lr_decay_epochs!r}")

    def to_dict(self):
        return asdict(self)


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def add_config_args(parser):
    """Add ``--config`` and one ``--flag`` per :class:`TrainConfig` field, in the :data:`GROUPS`.

    The flags have no argparse defaults (a flag not given is absent from the namespace), so that
    :func:`config_from_args` can tell the flags given from the file's values and the field defaults.
    """
    parser.add_argument("--config", metavar="FILE",
                        help="TOML or JSON file of these flags (field names, - or _), or a run's config.json (or "
                             "run directory) to repeat that run in a new directory; flags given here override it")
    add_fields(parser, TrainConfig, suppress=True, groups=GROUPS)


def config_from_args(args):
    """A validated :class:`TrainConfig`: the field defaults, then ``--config``'s values, then the flags given."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    return TrainConfig(**values).validate()


def _read_toml(path, data):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"--config {path}: reading TOML needs Python 3.11 or `pip install tomli`; or write "
                              "the file as JSON") from None
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None


def _file_value(path, key, f, value):
    """``value`` of field ``f`` checked against its type and choices (ints accepted for floats)."""
    kind = arg_type(f.type)
    if value is None:
        if type(None) in typing.get_args(f.type):
            return None
        raise ConfigError(f"--config {path}: {key} cannot be null")
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"--config {path}: {key} must be {'a number' if kind is float else kind.__name__}; "
                          f"got {value!r}")
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"--config {path}: {key} must be one of {', '.join(choices)}; got {value!r}")
    return float(value) if kind is float else value


def load_config_file(path):
    """The :class:`TrainConfig` values of a ``--config`` file, checked (not yet validated together).

    Args:
        path: a ``.toml`` file, else JSON: a flat table of field names (``batch_size`` or
            ``batch-size``), or a run's ``config.json`` (``{"flags": {...}, ...}``) or run
            directory, whose flags but :data:`NOT_REPEATED` are taken.

    Raises:
        ConfigError: an unreadable file, an unknown key (naming the closest field), or a value
            of the wrong type or outside the field's choices.
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        table = _read_toml(path, data)
    else:
        try:
            table = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config {path}: not valid JSON ({exc}); a TOML file's name ends in .toml") from None
    if not isinstance(table, dict):
        raise ConfigError(f"--config {path}: expected a table of flags; got {type(table).__name__}")
    if isinstance(table.get("flags"), dict):  # a run's own config.json
        table = {k: v for k, v in table["flags"].items() if k not in NOT_REPEATED}
    known = {f.name: f for f in fields(TrainConfig)}
    values = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')}?" if close else ""
            raise ConfigError(f"--config {path}: unknown key {key!r}{hint}")
        if name in values:
            raise ConfigError(f"--config {path}: {name} is given twice (with - and with _)")
        values[name] = _file_value(path, key, known[name], value)
    return values


def agreement_digest(cfg, world_size):
    """What every rank of a job must agree on, as canonical JSON bytes: the version, the world
    size, whether it resumes, and every flag but the :data:`RUN_LOCAL` ones."""
    flags = {k: v for k, v in cfg.to_dict().items() if k not in RUN_LOCAL}
    flags.update(resume=cfg.resume is not None, world_size=world_size)  # its path may differ by node
    return json.dumps({"mpiqsgd": __version__, **flags}, sort_keys=True).encode()


def _ranks(ranks):
    """``"rank 3"``, ``"ranks 0-2"`` or ``"ranks 0, 2, 5"``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


def check_agreement(digests, shown=6):
    """Raise :class:`ConfigError` unless every rank's :func:`agreement_digest` is the same.

    Args:
        digests: each rank's digest bytes, in rank order (as ``allgather_bytes`` returns them).
        shown: name at most this many differing flags.

    Raises:
        ConfigError: naming each differing flag with the ranks that hold each value, or the
            ranks whose digest is not readable (another mpiqsgd version).
    """
    if all(d == digests[0] for d in digests):
        return
    parsed = {}
    for rank, digest in enumerate(digests):
        try:
            value = json.loads(bytes(digest))
        except (ValueError, UnicodeDecodeError):
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"rank {rank} sent an unreadable flag digest; start every rank with the same "
                              "mpiqsgd and the same flags")
        parsed[rank] = value
    keys = sorted(set().union(*parsed.values()))
    lines = []
    for key in keys:
        by_value = {}
        for rank, flags in parsed.items():
            by_value.setdefault(json.dumps(flags.get(key), sort_keys=True), []).append(rank)
        if len(by_value) > 1:
            name = f"{key} version" if key == "mpiqsgd" else key if key == "world_size" else flag(key)
            held = ", ".join(f"{_ranks(r)} {json.loads(v)!r}" for v, r in by_value.items())
            lines.append(f"{name} ({held})")
    more = f"; and {len(lines) - shown} more" if len(lines) > shown else ""
    raise ConfigError(f"the ranks were started with different flags: {'; '.join(lines[:shown])}{more}; start "
                      "every rank with the same flags")
