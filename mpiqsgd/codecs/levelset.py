"""Level-set codecs: NUQSGD, TernGrad, ALQ, ALQ-N, AMQ, AMQ-N (and QSGD's levels) on one wire format.

A level set is a float32 table of ``K`` levels ``-1 = L_0 < L_1 < ... < L_{K-1} = 1`` on
normalized coordinates ``r = v_i / N(v)``, with ``N`` the L2 norm (``norm="l2"``) or the
max norm (``"max"``) of the coordinate's bucket. Each coordinate is rounded to one of
its two neighbouring levels, up with probability ``(r - L_j) / (L_{j+1} - L_j)``
(unbiased: ``E[N(v) L_code] = v_i``, variance ``N(v)^2 (r - L_j)(L_{j+1} - r)``). The
receiver decodes ``N(v) * L[code]``. Kernels: :mod:`mpiqsgd.codecs.levelset_kernels`.

Level sets (``b`` bits per coordinate, ``K = 2^b`` unless stated):

=========  ===============================================================  ==========
method     levels                                                           norm
=========  ===============================================================  ==========
nuq        ``+-0.5^j``, ``j = 0..K/2-1``: the signed NUQSGD of the ALQ         l2
           paper ("NUQ, p = 0.5"); no zero level, so ``r`` between
           ``-0.5^(K/2-1)`` and ``+0.5^(K/2-1)`` rounds to one of those two
nuq0       ``0`` and ``+-0.5^j``, ``j = 0..s-1``, ``s = 2^(b-1) - 1``         l2
           (``K = 2^b - 1``): NUQSGD as in its JMLR paper, levels
           ``{0, 2^-(s-1), ..., 1/2, 1}`` with a sign; ``b >= 2``
terngrad   ``{-1, 0, 1}``, ``K = 3`` with ``b = 2`` (code 3 is invalid)        max
uniform    ``K`` evenly spaced levels from -1 to 1                          l2
qsgd       ``l / s``, ``l = -s..s``, ``s = 2^(b-1) - 1`` (``K = 2^b - 1``):      l2
           the same distribution as the ``qsgd`` codec
alq        fitted by ALQ (free levels) to the statistics of ``fit``:       max
           ``histogram`` (default), the norm-weighted histogram of the
           gradients' normalized coordinates; ``model``, a mixture of
           per-bucket truncated normals (the ALQ paper)
alq-n      as alq; ``fit="model"``: one pooled truncated normal            max
amq        ``+-p^j``, ``j = 0..K/2-1``, ``p`` fitted by AMQ, statistics as alq  max
amq-n      as amq; ``fit="model"``: the pooled truncated normal            max
=========  ===============================================================  ==========

The norm column is the default; every method takes ``norm="l2"`` or ``"max"`` (``--norm``) but
terngrad, which is max only.

Adaptive codecs (:class:`AdaptiveLevelSet`) start from the ``nuq`` levels and change
their table in :meth:`AdaptiveLevelSet.fit` (:mod:`mpiqsgd.codecs.fits`; each refit keeps the
best of its fit and the uniform, QSGD, NUQSGD and best AMQ tables). Message pattern: none of its own; the
trainer gathers :func:`~mpiqsgd.codecs.gradstats.local_stats` of every rank, merges them
with :func:`~mpiqsgd.codecs.gradstats.merge_stats` in rank order and calls ``fit`` on every
rank (or fits on one and broadcasts :attr:`LevelSet.levels_bytes`).

Wire format (payload after the frame of :mod:`mpiqsgd.wire`)::

    n_buckets float32 norms, n_buckets = ceil(numel / bucket)
    numel codes of `bits` bits, densely packed (mpiqsgd.codecs.bits): code = level index 0..K-1

Payload bytes: ``4 * ceil(numel / bucket) + ceil(numel * bits / 8)``; with the defaults
(3 bits, bucket 8192) about 0.3755 bytes per coordinate. The header carries the params
``{"bits", "bucket", "norm", "method", "levels"}``, ``levels`` being the ``4 K`` bytes of
the float32 little-endian table (32 bytes at 3 bits, 1 KiB at 8; the whole header is 111
bytes at 3 bits, 1104 at 8), so every message names the table it was encoded with;
decoding it with another table is a :class:`DecodeError`.
The last bucket may be short; its norm covers only its own coordinates.

With ``encoding="entropy"`` (the params gain ``"encoding": "entropy"``) the norms are
followed by the stream of :mod:`mpiqsgd.codecs.entropy` (the codes ``0..K-1`` as symbols):
variable length, at least ``4 * n_buckets + 4`` bytes, the same quantization and values; bucket
at most 65536 (:data:`mpiqsgd.wire.MAX_VARIABLE_BUCKET`, as for QSGD's variable-length codes).
"""

import zlib

import numpy as np
import torch

from .. import wire
from ..errors import ConfigError, DecodeError, NonFiniteError
from . import fits, gradstats, histogram
from . import leveltables as tables
from . import bits as bitpack
from . import entropy, kernels
from .base import Codec, check_bucket, check_choice, check_int
from .levelset_kernels import (UNROLL_BITS, fused_levelset_encode, levelset_decode, levelset_encode, normalized,
                               search_table)
from .buckets import bucket_rows, checked_norms, finite_scales

__all__ = ["LevelSet", "AdaptiveLevelSet", "METHODS", "ADAPTIVE", "named_levels", "table_id",
           "expected_variance", "normalized_variance"]

# method -> (default bits, norm it requires or None, kind of statistics for adaptive ones)
METHODS = {
    "nuq": (3, None, None),
    "nuq0": (3, None, None),
    "terngrad": (2, "max", None),
    "uniform": (3, None, None),
    "qsgd": (3, None, None),
    "alq": (3, None, "mixture"),
    "alq-n": (3, None, "pooled"),
    "amq": (3, None, "mixture"),
    "amq-n": (3, None, "pooled"),
}
ADAPTIVE = tuple(m for m, spec in METHODS.items() if spec[2] is not None)
NORMS = ("l2", "max")
FITS = ("histogram", "model")
ENCODINGS = ("dense", "entropy")


def named_levels(method, bits):
    """The float32 table of a fixed method, or the starting table of an adaptive one."""
    if method == "terngrad":
        if bits != 2:
            raise ConfigError(f"terngrad: levels {{-1, 0, 1}} take bits=2; got bits={bits}")
        return tables.to_table(tables.terngrad_levels())
    if method == "uniform":
        return tables.to_table(tables.uniform_levels(bits))
    if method == "nuq0":
        if bits < 2:
            raise ConfigError("nuqsgd-zero: levels 0 and +-0.5^j need bits >= 2")
        return tables.to_table(tables.nuq_zero_levels(bits))
    if method == "qsgd":
        if bits < 2:
            raise ConfigError("qsgd levels need bits >= 2")
        return tables.to_table(tables.qsgd_levels(bits))
    return tables.to_table(tables.nuq_levels(bits))  # nuq and the adaptive methods' start


def table_id(levels_bytes):
    """Short id of a level table (CRC-32, 8 hex digits) for messages and logs."""
    return f"{zlib.crc32(levels_bytes):08x}"


def _parse_levels(codec, levels):
    if isinstance(levels, (bytes, bytearray, memoryview)):
        raw = bytes(levels)
        if len(raw) % 4 or not 8 <= len(raw) <= 1024:
            raise ConfigError(f"{codec}: levels must be 2..256 float32 values (8..1024 bytes); got {len(raw)} bytes")
        table = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        try:
            table = np.asarray(levels, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{codec}: levels must be float32 bytes or a sequence of numbers; got {levels!r:.100}") \
                from None
        if table.ndim != 1 or not 2 <= table.size <= 256:
            raise ConfigError(f"{codec}: levels must be a list of 2..256 numbers; got {levels!r:.100}")
        table = table.astype(np.float32)
    if not (np.all(np.isfinite(table)) and table[0] == -1.0 and table[-1] == 1.0 and np.all(np.diff(table) > 0)):
        raise ConfigError(f"{codec}: levels must be strictly increasing from exactly -1 to exactly 1; "
                          f"got {np.round(table[:16], 6).tolist()}{' ...' if table.size > 16 else ''}")
    return table


class LevelSet(Codec):
    """Stochastic rounding to a level set (see the module docstring for the methods).

    Args:
        bits: bits per coordinate on the wire, 1..8 (default 3; terngrad 2). ``K <= 2^bits``.
        bucket: coordinates per bucket, each with its own fp32 norm. Default 8192.
        norm: ``"l2"`` or ``"max"``; default ``"max"`` for the adaptive methods, ``"l2"`` for the
            fixed ones (terngrad: only ``"max"``).
        method: one of :data:`METHODS`.
        levels: float32 little-endian bytes (or a sequence) of the table; default the
            method's own (for adaptive methods: its starting table). Fixed methods accept
            only their own table.
        clip_sigma: clip each coordinate to ``+-clip_sigma * std`` of its bucket before
            quantizing (TernGrad uses 2.5); biased; encoder-side only, not in the header.
        encoding: ``"dense"`` bit packing (default) or ``"entropy"`` (rANS, variable length;
            bucket at most 65536).
    """

    name = "levelset"
    stochastic = True

    def __init__(self, bits=None, bucket=8192, norm=None, method="nuq", levels=None, clip_sigma=None,
                 encoding="dense"):
        self.method = check_choice(self.name, "method", method, tuple(METHODS))
        self.encoding = check_choice(method, "encoding", encoding, ENCODINGS)
        if encoding == "entropy":
            entropy.check_available(method)
        default_bits, fixed_norm, _ = METHODS[method]
        self.bits = check_int(method, "bits", default_bits if bits is None else bits, 1, 8)
        self.bucket = check_bucket(method, bucket, encoding)
        if norm is None:  # measured: max-norm buckets give adaptive levels half the variance (README)
            norm = fixed_norm or ("max" if method in ADAPTIVE else "l2")
        self.norm = check_choice(method, "norm", norm, NORMS)
        if fixed_norm is not None and norm != fixed_norm:
            raise ConfigError(f"{method}: norm must be {fixed_norm!r}; got {norm!r}")
        if clip_sigma is not None and (isinstance(clip_sigma, bool) or not isinstance(clip_sigma, (int, float))
                                       or not 0 < clip_sigma < float("inf")):
            raise ConfigError(f"{method}: clip_sigma must be a positive number or None; got {clip_sigma!r}")
        self.clip_sigma = None if clip_sigma is None else float(clip_sigma)
        self.checks_finite = self.clip_sigma is None  # the norms of the unclipped input see every value
        own = named_levels(method, self.bits)
        table = own if levels is None else _parse_levels(method, levels)
        if method not in ADAPTIVE and levels is not None and not np.array_equal(table, own):
            raise ConfigError(f"{method}: levels must be the method's own {own.tolist()}; got {table.tolist()}")
        self._set_table(table)
        self.force_torch = False  # tests: run the torch kernels on the CPU too

    def _set_table(self, table):
        if table.size > 2**self.bits:
            raise ConfigError(f"{self.method}: {table.size} levels do not fit in bits={self.bits}")
        if self.method in ADAPTIVE and table.size != 2**self.bits:
            raise ConfigError(f"{self.method}: needs exactly 2^bits = {2**self.bits} levels; got {table.size}")
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.levels_bytes = self.table.astype("<f4").tobytes()
        self._levels_t = torch.from_numpy(self.table.copy())
        self._search = search_table(self.table)

    @property
    def levels(self):
        """The level table as float64 values (a copy)."""
        return self.table.astype(np.float64)

    def level_table(self):
        return self.levels

    @property
    def params(self):
        params = {"bits": self.bits, "bucket": self.bucket, "norm": self.norm, "method": self.method,
                  "levels": self.levels_bytes}
        if self.encoding != "dense":  # dense headers stay as they were
            params["encoding"] = self.encoding
        return params

    def __repr__(self):
        shown = ", ".join(f"{v:.4g}" for v in self.table[:8]) + (", ..." if self.table.size > 8 else "")
        encoding = f", encoding={self.encoding!r}" if self.encoding != "dense" else ""
        return (f"{type(self).__name__}(method={self.method!r}, bits={self.bits}, bucket={self.bucket}, "
                f"norm={self.norm!r}, levels=[{shown}] #{table_id(self.levels_bytes)}{encoding})")

    def payload_nbytes(self, numel):
        if self.encoding == "entropy":
            return None
        return 4 * (-(-numel // self.bucket)) + bitpack.packed_nbytes(numel, self.bits)

    def min_payload_nbytes(self, numel):
        if self.encoding == "dense":
            return self.payload_nbytes(numel)
        return 4 * (-(-numel // self.bucket)) + entropy.MIN_STREAM_BYTES if numel else 0

    def _levels_on(self, device):
        return self._levels_t if torch.device(device).type == "cpu" else self._levels_t.to(device)

    def _clip(self, x):
        out = []
        for v in bucket_rows(x, self.bucket):
            bound = self.clip_sigma * v.std(dim=1, correction=0, keepdim=True)
            out.append(torch.maximum(torch.minimum(v, bound), -bound).reshape(-1))
        return torch.cat(out)

    def _quantize(self, x, rng, want_decoded, into=None):
        if self.clip_sigma is not None:
            x = self._clip(x)
        seed = kernels.draw_seed(rng)
        cpu = kernels.use_numba(x.device, self.force_torch)
        codes = kernels.codes_slot(into, x.numel(), self.bucket) if cpu else None  # only dense codes have an `into`
        if cpu and self.clip_sigma is None and self.bits <= UNROLL_BITS and kernels.one_pass(self.bucket):
            # norms and codes in one pass: each bucket read once
            norms, packed, decoded, bad = fused_levelset_encode(
                x, self.norm, self._levels_on(x.device), self.bucket, self.bits, seed, want_decoded, codes)
            if bad:
                checked_norms(x, self.bucket, self.norm, self.method)  # raises the cause
                raise NonFiniteError(f"{self.method}: {bad} bucket norm(s) not finite or beyond float32")
        else:
            norms = checked_norms(x, self.bucket, self.norm, self.method, force_torch=self.force_torch)
            packed, decoded = levelset_encode(x, norms, self._levels_on(x.device), self.bucket, self.bits, seed,
                                              want_decoded, self.force_torch, self._search, out=codes)
        if codes is not None:
            kernels.place_scales(into, norms)
            return into, decoded
        if self.encoding == "entropy":
            code_symbol, table = entropy.levelset_symbols(self.bits, self.table)
            packed = torch.from_numpy(entropy.encode(packed.cpu().numpy(), x.numel(), self.bits, code_symbol,
                                                     table.size)).to(norms.device)
        return torch.cat([norms.view(torch.uint8), packed]), decoded

    def _dequantize(self, payload, numel, out=None):
        n_buckets = -(-numel // self.bucket)
        norms = finite_scales(payload, n_buckets, self.method)
        if self.encoding == "entropy":
            target = kernels.host_array(out)
            values = entropy.decode(payload[4 * n_buckets:].cpu().numpy(), numel, self.table.size,
                                    norms.cpu().numpy(), min(self.bucket, numel), self.table, self.method, target)
            return out if target is not None else torch.from_numpy(values).to(payload.device)
        # min(): the same buckets; nothing is sized by a bucket larger than the message
        values, bad = levelset_decode(payload[4 * n_buckets:], norms, self._levels_on(payload.device),
                                      min(self.bucket, numel), self.bits, numel, self.force_torch, out=out)
        if bad:
            raise DecodeError(f"{self.method}: {bad} level code(s) >= K={self.table.size} in payload")
        return values

    def decode(self, message, device="cpu", numel=None, out=None):
        """Decode a message encoded with the same parameters and the same level table (``out``
        as for :meth:`Codec.decode`).

        Raises:
            DecodeError: invalid bytes, other parameters, or another level table (e.g.
                a message encoded before the last :meth:`AdaptiveLevelSet.fit`).
        """
        header, payload = wire.unframe(message, numel)
        params = header["params"]
        if header["codec"] == self.name and params != self.params:
            same_rest = {k: v for k, v in params.items() if k != "levels"} == \
                {k: v for k, v in self.params.items() if k != "levels"}
            theirs = params.get("levels")
            if same_rest and isinstance(theirs, bytes):
                raise DecodeError(
                    f"{self.method}: message was encoded with level table #{table_id(theirs)} "
                    f"{_describe(theirs)}, but this codec holds table #{table_id(self.levels_bytes)} "
                    f"{_describe(self.levels_bytes)}; the levels changed (fit or load) between "
                    "encoding and decoding")
        return super().decode(message, device, numel, out)


def _describe(levels_bytes):
    t = np.frombuffer(levels_bytes[: 4 * min(256, len(levels_bytes) // 4)], dtype="<f4")
    shown = ", ".join(f"{v:.4g}" for v in t[:8])
    return f"[{shown}{', ...' if t.size > 8 else ''}]"


class AdaptiveLevelSet(LevelSet):
    """A level set refitted to the gradients' statistics (ALQ, ALQ-N, AMQ, AMQ-N).

    Args:
        bits, bucket, norm, method, levels, clip_sigma, encoding: as :class:`LevelSet`; ``method`` is
            one of :data:`ADAPTIVE`; ``levels`` is the starting table (default ``nuq``).
        fit: ``"histogram"`` (default): fit to the norm-weighted histogram of the gradients'
            normalized coordinates (:mod:`mpiqsgd.codecs.histogram`), so the levels minimize
            the measured variance; ``"model"``: the paper's truncated-normal model, a mixture
            of per-bucket normals (alq, amq) or one pooled normal (alq-n, amq-n).
        max_buckets: ``fit="model"`` mixtures keep this many buckets of largest norm. Default 64.
        weight_power: mixture component weight ``count * norm**weight_power``. Default 2.
        bins: ``fit="histogram"``: bins of the histogram. Default 2048.

    Every refit keeps the fitted table only if its variance on the statistics it was fitted
    to is no worse than that of the uniform (QSGD), exponential (NUQSGD) and best AMQ tables
    (:func:`mpiqsgd.codecs.fits.guarded`); :attr:`last_fit` says which table won and each
    candidate's variance, for the trainer's log.

    Example::

        codec = make_codec("alq", bits=3, bucket=8192)
        stats = merge_stats(comm.allgather(codec.local_stats(flat_grad)))  # every rank, rank order
        codec.fit(stats)  # same levels on every rank; older messages no longer decode
    """

    adaptive = True

    def __init__(self, bits=None, bucket=8192, norm=None, method="alq", levels=None, clip_sigma=None,
                 fit="histogram", max_buckets=64, weight_power=2.0, bins=None, encoding="dense"):
        if method not in ADAPTIVE:
            raise ConfigError(f"adaptive level sets: method must be one of {', '.join(ADAPTIVE)}; got {method!r}")
        super().__init__(bits=bits, bucket=bucket, norm=norm, method=method, levels=levels, clip_sigma=clip_sigma,
                         encoding=encoding)
        self.fit_kind = check_choice(method, "fit", fit, FITS)
        self.max_buckets = check_int(method, "max_buckets", max_buckets, 1, 1 << 20)
        self.bins = check_int(method, "bins", histogram.BINS if bins is None else bins, 2, histogram.MAX_BINS)
        if self.bins % 2:
            raise ConfigError(f"{method}: bins must be even; got {self.bins}")
        self.weight_power = float(weight_power)
        self.stats = None  # the merged statistics of the last fit
        self.p = 0.5 if method.startswith("amq") else None  # AMQ multiplier of the table
        self.n_fits = 0
        self.model_variance = None  # Psi of the table under the last fitted density
        self.last_fit = None  # {"won": "fit" or a baseline's name, "psi": {name: Psi}} of the last refit

    @property
    def stats_kind(self):
        """``"histogram"`` (``fit="histogram"``), else ``"mixture"`` (alq, amq) or ``"pooled"`` (alq-n, amq-n)."""
        return "histogram" if self.fit_kind == "histogram" else METHODS[self.method][2]

    def local_stats(self, flat):
        """This rank's sufficient statistics of ``flat`` for this codec (a dict)."""
        return gradstats.local_stats(flat, self.bucket, self.stats_kind, self.norm, self.max_buckets, self.bins)

    def fit(self, stats):
        """Refit the level table to merged statistics; a pure function of ``stats``.

        Args:
            stats: a statistics dict (from :func:`~mpiqsgd.codecs.gradstats.merge_stats`) or its bytes.

        Returns:
            The new float32 table (also the codec's; ``params["levels"]`` changes with it).
        """
        if isinstance(stats, (bytes, bytearray, memoryview)):
            stats = gradstats.stats_from_bytes(stats)
        if stats["kind"] != self.stats_kind or stats["norm"] != self.norm or stats["bucket"] != self.bucket:
            raise ConfigError(
                f"{self.method}: needs {self.stats_kind} statistics with norm={self.norm} and bucket={self.bucket}; "
                f"got {stats['kind']} with norm={stats['norm']} and bucket={stats['bucket']}")
        density = gradstats.density_from_stats(stats, self.weight_power)
        amq_table, p, value = fits.fit_amq(density, self.bits)
        candidates = fits.baselines(density, self.bits, amq=amq_table)
        if self.method.startswith("alq"):
            table, value = fits.fit_alq(density, self.bits, extra=list(candidates.values()))
            p = None
        else:
            table = candidates.pop("amq")  # the fit itself
        table, value, won, scores = fits.guarded(table, value, density, self.bits, candidates)
        self._set_table(table)
        if self.method.startswith("amq"):
            self.p = p if won == "fit" else None  # a baseline table is no power of one p
        self.stats = stats
        self.model_variance = value
        self.last_fit = {"won": won, "psi": scores}
        self.n_fits += 1
        return self.table.copy()

    def set_levels(self, levels):
        """Install a table (bytes or sequence), e.g. one fitted and broadcast by another rank."""
        self._set_table(_parse_levels(self.method, levels))

    def state_dict(self):
        """Level table, last statistics and fit count (msgpack-friendly values) for checkpoints."""
        return {"method": self.method, "bits": self.bits, "bucket": self.bucket, "norm": self.norm,
                "fit": self.fit_kind, "levels": self.levels_bytes, "p": self.p, "n_fits": self.n_fits,
                "model_variance": self.model_variance,
                "stats": None if self.stats is None else gradstats.stats_to_bytes(self.stats)}

    def load_state_dict(self, state, device="cpu"):
        """Restore :meth:`state_dict` (``device`` is accepted for symmetry with other codec state)."""
        for key in ("method", "bits", "bucket", "norm"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"{self.method}: checkpoint has {key}={state[key]!r}, "
                                  f"this codec {getattr(self, key)!r}")
        if state.get("fit", "model") != self.fit_kind:
            raise ConfigError(f"{self.method}: checkpoint has fit={state.get('fit', 'model')!r}, "
                              f"this codec {self.fit_kind!r}; resume with --fit {state.get('fit', 'model')}")
        self.set_levels(state["levels"])
        self.p = state.get("p")
        self.n_fits = int(state.get("n_fits", 0))
        self.model_variance = state.get("model_variance")
        self.stats = None if state.get("stats") is None else gradstats.stats_from_bytes(state["stats"])


def _codes_and_r(levels, flat, bucket, norm):
    """The float32 normalized coordinates the kernels see, their interval index, and the norms."""
    x = flat.detach().reshape(-1).to(torch.float32)
    r, scale = normalized(x, checked_norms(x, bucket, norm, "expected_variance"), bucket)
    L = torch.as_tensor(np.asarray(levels, dtype=np.float32), device=x.device)
    j = (torch.searchsorted(L, r, right=True) - 1).clamp_(0, L.numel() - 2)
    return x, r, j, L, scale


def expected_variance(levels, flat, bucket, norm="l2"):
    """Exact ``E||Q(x) - x||^2`` of stochastic rounding of ``flat`` to ``levels`` (float64 sum).

    ``sum_i norm_b(i)^2 (r_i - L_j)(L_{j+1} - r_i)`` with ``r_i`` the float32 normalized
    coordinate as the encoder computes it. ``levels`` is any valid table (array-like).
    """
    x, r, j, L, scale = _codes_and_r(levels, flat, bucket, norm)
    r, L, scale = r.double(), L.double(), scale.double()
    return float((scale.pow(2) * (r - L[j]) * (L[j + 1] - r)).sum())


def normalized_variance(levels, flat, bucket, norm="l2"):
    """:func:`expected_variance` divided by ``||flat||^2`` (0 for a zero vector)."""
    total = float(flat.detach().reshape(-1).double().pow(2).sum())
    return expected_variance(levels, flat, bucket, norm) / total if total > 0 else 0.0
