"""Benchmarks: codec throughput and variance; exchange time and bytes over MPI; the link.

Every figure is a median over ``repeats`` timed runs after warm-up, and comes with
a reference measured in the same run: a memcpy of the same buffer for codecs (``np.copyto``
on the CPU, a device-to-device copy on a GPU), an fp32 ``MPI.Allreduce`` for exchanges,
the same training step without communication for steps.

Sizes come with the limit they are measured against: for QSGD and the level sets, the
empirical entropy ``H`` of the message's symbols (signed levels, level indices; memoryless)
plus the bytes that are not symbols (frame, header, bucket scales, an entropy code's model),
for which ``vs_entropy`` = bits per coordinate / (H + those); for the Elias code also the QSGD
paper's bound on its expected length (Theorem 3.2, per bucket), ``vs_elias_bound``.
``bench_codec_all`` runs every codec and encoding (``mpiqsgd bench codec --all``).

Peak extra memory of a codec call is measured from the kernel's own accounting of the
process's resident set, which sees numba's, torch's and numpy's allocations alike (unlike
``tracemalloc``): on Linux the peak-RSS mark is reset through ``/proc/self/clear_refs``
before the call and read back (``VmHWM``) after it; elsewhere a thread samples the RSS every
millisecond. The extra is the peak minus the resident set before the call, so it includes the
call's output (reported beside it) and misses memory the allocator reuses without new pages.
"""

import math
import statistics
import threading
import time

import numpy as np
import torch

from . import wire
from .codecs import make_codec, make_generator
from .codecs import entropy as entropy_code
from .codecs.fp import FP32
from .codecs.levelset import LevelSet
from .codecs.qsgd import QSGD
from .machine import machine_info
from .topology import Nodes, make_aggregator, wants_hierarchical
from .trace import Tracer, write_trace

__all__ = ["bench_codec", "bench_codec_all", "ALL_CODECS", "symbol_stats", "bench_exchange", "bench_step",
           "bench_link", "peak_extra_bytes"]


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _rss_bytes():
    try:
        return 1024 * _status_kib("VmRSS")
    except OSError:  # not Linux: psutil if present, else nothing to measure
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().rss


def peak_extra_bytes(fn):
    """Run ``fn()`` and return (its result, peak resident bytes above those before the call).

    The second value is None where the resident set cannot be read.
    """
    before = _rss_bytes()
    if before is None:
        return fn(), None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        result = fn()
        return result, max(0, 1024 * _status_kib("VmHWM") - before)
    except OSError:
        pass
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(0, max(peak[0], _rss_bytes()) - before)


def _copy_fn(x, device):
    """The memcpy reference: ``np.copyto`` of the buffer on the CPU, ``copy_`` on a GPU."""
    scratch = torch.empty_like(x)
    if torch.device(device).type == "cpu":
        src, dst = x.numpy(), scratch.numpy()
        return lambda: np.copyto(dst, src)
    return lambda: scratch.copy_(x)


def _time_codec(codec, x, repeats, seed, device, copy):
    """Medians of encode, decode, memcpy and new-array decode seconds (after one warm-up), the last
    message, the mean normalized variance and the encode and decode seconds of every repeat.

    Like the memcpy into an existing buffer they are compared with, encode frames into one reused
    buffer, as the exchange does (:class:`~mpiqsgd.topology.base.MessageBuffers`), and decode writes
    into one reused tensor (``decode(out=)``); decode reads a writable copy of the message, as a
    receiver holds it. The new-array decode (``decode`` without ``out``) adds the allocation: page
    faults and the kernel zeroing every page (on a VM, also the host backing memory the guest has
    not touched before: 0.3 s per 100 MB measured on the project's VM)."""
    enc_s, dec_s, copy_s, new_s, variances = [], [], [], [], []
    message = None
    values = torch.empty(x.numel(), dtype=torch.float32, device=device)  # the reused decode target
    # the exchange's reused send buffer, with the slack that lets fixed-length codecs encode in place
    out = np.empty((codec.encoded_nbytes(x.numel()) or 0) + wire.SLACK, dtype=np.uint8)
    for rep in range(repeats + 1):
        rng = make_generator(seed, 0, rep, device)
        t_enc, message = _timed(lambda: codec.encode(x, rng, out=out), device)
        received = np.frombuffer(bytearray(message), dtype=np.uint8)  # what a receiver holds: a writable buffer
        t_dec, y = _timed(lambda: codec.decode(received, device, out=values), device)
        t_copy, _ = _timed(copy, device)
        variance = float((y - x).double().pow(2).sum() / x.double().pow(2).sum())
        t_new, _ = _timed(lambda: codec.decode(received, device), device)
        if rep == 0:
            continue  # warm-up
        enc_s.append(t_enc)
        dec_s.append(t_dec)
        copy_s.append(t_copy)
        new_s.append(t_new)
        variances.append(variance)
    enc, dec, cpy, new = (statistics.median(v) for v in (enc_s, dec_s, copy_s, new_s))
    return enc, dec, cpy, new, message, float(np.mean(variances)), (enc_s, dec_s)


def _thread_counts(threads):
    """Distinct kernel thread counts to scale over: 1, 2 and all by default."""
    from .codecs.kernels import MAX_THREADS as most

    wanted = (1, 2, most) if threads is None else threads
    return sorted({min(max(1, int(t)), most) for t in wanted})


def _scaling(codec, x, repeats, seed, device, copy, threads):
    """Encode/decode/memcpy speed at each kernel (and torch) thread count, memcpy in the same run."""
    from .codecs.kernels import set_kernel_threads

    fp32_bytes = 4 * x.numel()
    old_kernel, old_torch = set_kernel_threads(1), torch.get_num_threads()
    rows = []
    try:
        for n_threads in _thread_counts(threads):
            set_kernel_threads(n_threads)
            torch.set_num_threads(n_threads)
            enc, dec, cpy, new = _time_codec(codec, x, repeats, seed, device, copy)[:4]
            rows.append({"threads": n_threads, "encode_seconds": enc, "decode_seconds": dec, "memcpy_seconds": cpy,
                         "decode_new_seconds": new, "encode_GBps": fp32_bytes / enc / 1e9,
                         "decode_GBps": fp32_bytes / dec / 1e9, "decode_new_GBps": fp32_bytes / new / 1e9,
                         "memcpy_GBps": fp32_bytes / cpy / 1e9, "encode_vs_memcpy": cpy / enc,
                         "decode_vs_memcpy": cpy / dec, "decode_new_vs_memcpy": cpy / new})
    finally:
        set_kernel_threads(old_kernel)
        torch.set_num_threads(old_torch)
    return rows


def _memory(codec, x, message, device):
    """Peak extra resident bytes of one encode and one decode, beside their outputs' bytes."""
    rng = make_generator(0, 0, 0, device)
    encoded, enc_extra = peak_extra_bytes(lambda: codec.encode(x, rng))
    decoded, dec_extra = peak_extra_bytes(lambda: codec.decode(message, device))
    fp32_bytes = 4 * x.numel()
    return {"method": "peak RSS above the RSS before the call (VmHWM reset by /proc/self/clear_refs, "
                      "or 1 ms RSS sampling); includes the output",
            "encode_peak_extra_bytes": enc_extra, "encode_output_bytes": len(encoded),
            "decode_peak_extra_bytes": dec_extra, "decode_output_bytes": decoded.numel() * decoded.element_size(),
            "encode_extra_vs_fp32": None if enc_extra is None else enc_extra / fp32_bytes,
            "decode_extra_vs_fp32": None if dec_extra is None else dec_extra / fp32_bytes}


def _dense_twin(codec):
    """The same codec with the dense encoding: the same quantization, bit-packed."""
    params = {k: v for k, v in codec.params.items() if k != "encoding"}
    return type(codec)(**params)


def elias_bound_bits(levels, bucket, numel):
    """The QSGD paper's bound (Theorem 3.2) on the expected Elias bits of ``numel`` coordinates:
    ``(3 + 1.5 log2(2 (s^2 + d) / (s (s + sqrt d)))) s (s + sqrt d) + 32`` per bucket of ``d``."""
    total = 0.0
    for d, count in ((bucket, numel // bucket), (numel % bucket, 1 if numel % bucket else 0)):
        if count:
            s, nnz = levels, levels * (levels + math.sqrt(d))
            total += count * ((3 + 1.5 * math.log2(2 * (s * s + d) / nnz)) * nnz + 32)
    return total


def symbol_stats(codec, x, seed=0):
    """Bits per coordinate of ``codec``'s message of ``x`` against the limits it is measured by.

    Returns:
        None for codecs without quantized symbols (fp32, fp16, sign); else a dict with the
        message's ``bits_per_coordinate``, the symbols' empirical ``entropy_bits_per_coordinate``,
        ``side_bits_per_coordinate`` (frame, header, scales, model), ``vs_entropy`` and, for the
        Elias code, ``elias_bound_bits_per_coordinate`` and ``vs_elias_bound``.
    """
    base = codec.base
    if not isinstance(base, (QSGD, LevelSet)):
        return None
    n = x.numel()
    message = base.encode(x, make_generator(seed, 0, 0, x.device))
    dense = _dense_twin(base).encode(x, make_generator(seed, 0, 0, x.device))
    header, payload = wire.unframe(dense)
    scale_bytes = 4 * -(-n // base.bucket)
    packed = np.frombuffer(payload, dtype=np.uint8)[scale_bytes:].copy()
    if isinstance(base, QSGD):
        code_symbol, table = entropy_code.qsgd_symbols(base.bits, base.levels)
    else:
        code_symbol, table = entropy_code.levelset_symbols(base.bits, base.table)
    counts = entropy_code.symbol_counts(packed, n, base.bits, code_symbol, table.size)
    h = entropy_code.entropy_bits(counts)
    _, own = wire.unframe(message)
    side = len(message) - len(own) + scale_bytes
    stats = {"encoding": base.encoding}
    if stats["encoding"] == "entropy":
        parts = entropy_code.describe(np.frombuffer(own, np.uint8)[scale_bytes:], n, table.size)
        side += parts["model_bytes"]
        stats.update(group=parts["group"], symbols_used=parts["symbols_used"], model_bytes=parts["model_bytes"])
    bits = 8 * len(message) / n
    limit = h + 8 * side / n
    stats.update(bits_per_coordinate=bits, entropy_bits_per_coordinate=h, side_bits_per_coordinate=8 * side / n,
                 vs_entropy=bits / limit)
    if stats["encoding"] == "elias" and base.norm == "l2":  # the bound is the L2 norm's
        bound = (elias_bound_bits(base.levels, base.bucket, n) + 8 * (len(message) - len(own))) / n
        stats.update(elias_bound_bits_per_coordinate=bound, vs_elias_bound=bits / bound)
    return stats


def bench_codec(codec, numel, repeats=5, seed=0, device="cpu", threads=None):
    """Time encode and decode of a Gaussian vector of ``numel`` coordinates.

    Args:
        codec, numel, repeats, seed, device: what to time, on how many coordinates, how often.
        threads: kernel thread counts for the CPU scaling table (default 1, 2 and all).

    Returns:
        JSON-ready dict: medians in seconds, GB/s of fp32 input (1e9 bytes), bytes per
        coordinate, the measured normalized variance ||Q(v) - v||^2 / ||v||^2 (mean over
        repeats), and a memcpy of the same buffer as the reference. An adaptive codec first
        fits its levels to the vector; ``adaptive`` gives the seconds of its statistics and
        fit on a second call (``first_call_seconds`` includes compiling kernels). On the CPU,
        ``scaling`` repeats the timings at each thread count (memcpy in the same run) and
        ``memory`` gives the peak extra memory of one encode and one decode (see the module
        docstring for the method).
    """
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(device)
    copy = _copy_fn(x, device)
    adaptive = {}
    inner = codec.base
    if codec.adaptive:  # adaptive: fit the levels to this vector first, and time it
        t_first, stats = _timed(lambda: inner.local_stats(x), device)  # includes compiling kernels
        t_first_fit, _ = _timed(lambda: inner.fit(stats), device)
        t_stats, stats = _timed(lambda: inner.local_stats(x), device)
        t_fit, _ = _timed(lambda: inner.fit(stats), device)
        adaptive = {"stats_seconds": t_stats, "fit_seconds": t_fit, "first_call_seconds": t_first + t_first_fit,
                    "levels": [float(v) for v in inner.levels]}
    fp32_bytes = 4 * numel
    enc, dec, copy_s, new, message, variance, (enc_series, dec_series) = _time_codec(codec, x, repeats, seed,
                                                                                     device, copy)
    cpu = torch.device(device).type == "cpu"
    return {
        "benchmark": "codec",
        "codec": repr(codec),
        "params": {k: (np.frombuffer(v, "<f4").tolist() if isinstance(v, bytes) else v)
                   for k, v in codec.params.items()},
        "numel": numel,
        "repeats": repeats,
        "encoded_bytes": len(message),
        "bytes_per_coordinate": len(message) / numel,
        "bits_per_coordinate": 8 * len(message) / numel,
        "symbols": symbol_stats(codec, x, seed),
        "compression_vs_fp32": FP32().encoded_nbytes(numel) / len(message),
        "encode_seconds": enc,
        "decode_seconds": dec,
        "memcpy_seconds": copy_s,
        "encode_GBps": fp32_bytes / enc / 1e9,
        "decode_GBps": fp32_bytes / dec / 1e9,
        "encode_GBps_range": [fp32_bytes / max(enc_series) / 1e9, fp32_bytes / min(enc_series) / 1e9],
        "decode_GBps_range": [fp32_bytes / max(dec_series) / 1e9, fp32_bytes / min(dec_series) / 1e9],
        "memcpy_GBps": fp32_bytes / copy_s / 1e9,
        "encode_vs_memcpy": copy_s / enc,
        "decode_vs_memcpy": copy_s / dec,
        "decode_new_seconds": new,
        "decode_new_GBps": fp32_bytes / new / 1e9,
        "decode_new_vs_memcpy": copy_s / new,
        "decode_into": "a reused tensor (decode(out=)); decode_new: a new array per call",
        "memcpy": "np.copyto" if cpu else "device copy_",
        "variance_ratio": variance,
        "variance_bound": codec.variance_bound(),
        "adaptive": adaptive or None,
        "scaling": _scaling(codec, x, repeats, seed, device, copy, threads) if cpu else None,
        "memory": _memory(codec, x, message, device) if cpu else None,
        "machine": machine_info(device),
    }


# (codec name, parameters) of `bench codec --all`: every codec, every encoding it takes.
ALL_CODECS = [("fp32", {}), ("fp16", {}), ("sign", {})] + \
    [("qsgd", {"bits": b, "encoding": e}) for b in (2, 3, 4, 8) for e in ("dense", "elias", "entropy")] + \
    [("qsgd-inf", {"bits": 4, "encoding": e}) for e in ("dense", "elias", "entropy")] + \
    [(name, {"encoding": e}) for name in ("nuqsgd", "nuqsgd-zero", "terngrad", "alq", "alq-n", "amq", "amq-n")
     for e in ("dense", "entropy")]


def bench_codec_all(numel, repeats=5, seed=0, device="cpu", threads=None, codecs=None):
    """:func:`bench_codec` of every codec and encoding (:data:`ALL_CODECS`, or ``codecs``).

    Returns:
        JSON-ready dict: ``results`` (one :func:`bench_codec` dict per codec, with ``name``) and
        the machine.
    """
    results = []
    for name, params in codecs or ALL_CODECS:
        result = bench_codec(make_codec(name, **params), numel, repeats, seed, device, threads)
        results.append({"name": name, **result})
    return {"benchmark": "codec-all", "numel": numel, "repeats": repeats, "results": results,
            "machine": machine_info(device)}


def _median_max(transport, seconds):
    """Median over repeats of the slowest rank's time (an exchange ends when all ranks finish)."""
    per_rank = transport.allgather_bytes(np.asarray(seconds, dtype=np.float64).tobytes())
    table = np.stack([np.frombuffer(b, dtype=np.float64) for b in per_rank])
    return float(np.median(table.max(axis=0))), table.max(axis=0).tolist()


def bench_exchange(transport, codec, topology, numel, repeats=5, seed=0, device="cpu", trace=None,
                   hierarchical="auto", **options):
    """Time one topology against fp32 allreduce on every rank's random gradient.

    Args:
        trace: a path: write the Chrome trace of the candidate's last repeat there (rank 0).
        hierarchical: the candidate's ``auto``, ``on`` or ``off`` (:class:`~mpiqsgd.topology.Hierarchical`;
            the baseline is always the flat fp32 ``MPI_Allreduce``).

    Returns:
        JSON-ready dict (meaningful on every rank; print it on rank 0).
    """
    rank, n = transport.rank, transport.size
    if str(device) == "cuda":
        device = f"cuda:{transport.local_rank % torch.cuda.device_count()}"
    dedicated = bool(options.get("dedicated"))
    grad = torch.randn(numel, generator=torch.Generator().manual_seed(seed + rank)).to(device)
    if dedicated and rank == 0:
        grad.zero_()  # the server contributes nothing; the reference mean is over the workers
    runs = {}
    nodes = Nodes(transport) if wants_hierarchical(transport, hierarchical, dedicated=dedicated) else None
    candidates = [("allreduce", FP32(), {}, None), (topology, codec, options, nodes)]
    for label, (name, cod, opts, layout) in zip(("baseline", "candidate"), candidates):
        agg = make_aggregator(name, transport, cod, seed=seed, nodes=layout, **opts)
        if trace and label == "candidate":
            transport.meter.tracer = Tracer(rank, lambda step: step == repeats)
        seconds = []
        for rep in range(repeats + 1):
            transport.meter.reset()
            transport.barrier()
            t, result = _timed(lambda: agg.aggregate(grad, rep), device)
            if rep:
                seconds.append(t)
        sent = transport.meter.sent()
        by_class = transport.meter.job_totals(transport)["by_class"]  # the last repeat's, all ranks
        median, series = _median_max(transport, seconds)
        runs[label] = {"topology": name, "options": {k: v for k, v in opts.items() if v is not None},
                       "hierarchical": layout is not None, "codec": repr(cod),
                       "median_seconds": median, "job_bytes_by_class": {k: v["bytes"] for k, v in by_class.items()},
                       "seconds_per_repeat": series, "sent_bytes_this_rank": sent["bytes"],
                       "sent_bytes_formula": agg.sent_nbytes(numel, rank),
                       "phase_seconds_this_rank": dict(transport.meter.seconds), "result": result}
    if trace:
        write_trace(transport.meter, transport, trace)
        transport.meter.tracer = None
    exact = runs["baseline"].pop("result")
    if dedicated:
        exact = exact * (n / (n - 1))
    approx = runs["candidate"].pop("result")
    bytes_by_rank = [int(np.frombuffer(b, np.int64)[0]) for b in
                     transport.allgather_bytes(
                         np.array([runs["candidate"]["sent_bytes_this_rank"]], np.int64).tobytes())]
    return {
        "benchmark": "exchange",
        "n_ranks": n,
        "n_nodes": transport.n_nodes,
        "ranks_per_node": [transport.nodes.count(k) for k in range(transport.n_nodes)],
        "layout": None if nodes is None else nodes.describe(topology),
        "numel": numel,
        "repeats": repeats,
        "baseline": runs["baseline"],
        "candidate": runs["candidate"],
        "candidate_sent_bytes_by_rank": bytes_by_rank,
        "speedup_vs_allreduce": runs["baseline"]["median_seconds"] / runs["candidate"]["median_seconds"],
        "bytes_vs_allreduce": (runs["candidate"]["sent_bytes_this_rank"]
                               / max(1, runs["baseline"]["sent_bytes_this_rank"])),
        "relative_error_vs_exact_mean": float((approx - exact).norm() / exact.norm().clamp_min(1e-30)),
        "machine": machine_info(device),
    }


def _step_inputs(model_name, batch_size, seed, rank, device):
    """A fixed batch of CIFAR-sized random images and labels for this rank."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    return x, y


def bench_step(transport, model_name, codec, topology, batch_size=32, repeats=10, warmup=3, bucket_mb=0.0,
               overlap=False, min_compress_numel=1024, seed=0, device="cpu", hierarchical="auto", **options):
    """Time a training step (forward, backward, exchange, SGD) against the same step without exchange.

    Both are timed in the same run, alternating: each repeat runs one compute-only step
    (forward, backward, SGD on a second replica, no communication) and one full step, each
    started together on all ranks by a barrier and timed on the slowest rank.
    ``overhead_seconds`` = full step - compute-only step (medians): what communication
    costs a step after whatever overlap hides.

    Returns:
        JSON-ready dict (meaningful on every rank; print it on rank 0).
    """
    from .exchange import GradientExchange, broadcast_parameters
    from .train.models import build_model

    rank = transport.rank
    torch.manual_seed(seed)
    models = [build_model(model_name, num_classes=10).to(device) for _ in range(2)]
    for m in models:
        broadcast_parameters(m, transport)
        m.train()
    alone_opt, full_opt = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models)
    exchange = GradientExchange(models[1].parameters(), transport, codec, topology, seed=seed,
                                min_compress_numel=min_compress_numel, bucket_mb=bucket_mb, overlap=overlap,
                                adapt_at=(0,), hierarchical=hierarchical, **options)
    x, y = _step_inputs(model_name, batch_size, seed, rank, device)
    loss_fn = torch.nn.functional.cross_entropy

    def alone():
        alone_opt.zero_grad()
        loss_fn(models[0](x), y).backward()
        alone_opt.step()

    def full(step):
        full_opt.zero_grad()
        exchange.begin(step)
        loss_fn(models[1](x), y).backward()
        exchange.finish(step)
        full_opt.step()

    alone_s, full_s = [], []
    try:
        for rep in range(warmup + repeats):
            if rep == warmup:
                transport.meter.reset()
            transport.barrier()
            t_alone, _ = _timed(alone, device)
            transport.barrier()
            t_full, _ = _timed(lambda: full(rep), device)
            if rep >= warmup:
                alone_s.append(t_alone)
                full_s.append(t_full)
    finally:
        exchange.close()
    alone_median, alone_series = _median_max(transport, alone_s)
    full_median, full_series = _median_max(transport, full_s)
    job = transport.meter.job_totals(transport)
    n = transport.size
    return {
        "benchmark": "step",
        "n_ranks": n,
        "model": model_name,
        "parameters": sum(p.numel() for p in models[1].parameters()),
        "batch_size": batch_size,
        "codec": repr(codec),
        "topology": topology,
        "hierarchical": exchange.nodes is not None,
        "layout": None if exchange.nodes is None else exchange.nodes.describe(topology),
        "bytes_per_step_by_class": {k: v["bytes"] / repeats for k, v in job["by_class"].items()},
        "bucket_mb": bucket_mb,
        "n_buckets": len(exchange.buckets),
        "overlap": overlap,
        "repeats": repeats,
        "compute_seconds": alone_median,
        "step_seconds": full_median,
        "compute_seconds_per_repeat": alone_series,
        "step_seconds_per_repeat": full_series,
        "overhead_seconds": full_median - alone_median,
        "overhead_vs_compute": (full_median - alone_median) / alone_median,
        "bytes_per_step_per_rank": job["sent"]["bytes"] / repeats / n,
        "phase_seconds_per_step": {k: v / repeats / n for k, v in job["seconds"].items()},
        "machine": machine_info(device),
    }


def _link_repeats(nbytes):
    return 30 if nbytes <= 100_000 else 10 if nbytes <= 3_000_000 else 3


def bench_link(transport, sizes, seed=0):
    """Ping-pong and sendrecv of raw byte messages between ranks 0 and 1, through the transport.

    Per size, after one warm-up: ``pingpong``, rank 0 sends and rank 1 sends it back
    (one-way = half the round trip); ``sendrecv``, both send to each other at once (the
    ring's pattern; full duplex shows as the same time as one way). Times are medians of
    rank 0's repeats, each started by a barrier. Other ranks only join the barriers. The
    ping-pong fit (:func:`mpiqsgd.linkmodel.fit`) is what ``mpiqsgd report --link-model`` reads.

    Returns:
        JSON-ready dict (meaningful on rank 0).
    """
    from .errors import ConfigError
    from .linkmodel import fit

    if transport.size < 2:
        raise ConfigError("bench exchange --sweep needs at least 2 ranks (mpiexec -n 2)")
    rank = transport.rank
    rng = np.random.default_rng(seed)
    results = {"pingpong": [], "sendrecv": []}
    for nbytes in sizes:
        buf = rng.integers(0, 256, nbytes, dtype=np.uint8)
        times = {"pingpong": [], "sendrecv": []}
        for rep in range(_link_repeats(nbytes) + 1):
            transport.barrier()
            start = time.perf_counter()
            if rank == 0:
                transport.send(buf, 1, "link", 0)
                transport.recv(1, "link")
            elif rank == 1:
                transport.send(transport.recv(0, "link"), 0, "link", 0)
            times["pingpong"].append((time.perf_counter() - start) / 2)
            transport.barrier()
            start = time.perf_counter()
            if rank < 2:
                transport.sendrecv(buf, 1 - rank, 1 - rank, "link", 0)
            times["sendrecv"].append(time.perf_counter() - start)
        for kind, series in times.items():
            results[kind].append({"bytes": nbytes, "seconds": statistics.median(series[1:]),
                                  "MBps": nbytes / statistics.median(series[1:]) / 1e6})
    transport.meter.reset()
    fits = {}
    for kind, rows in results.items():
        try:
            fits[kind] = fit([r["bytes"] for r in rows], [r["seconds"] for r in rows])
        except ConfigError as exc:  # e.g. shared memory, where small sizes are all noise
            fits[kind] = {"error": str(exc)}
    return {
        "benchmark": "link",
        "n_ranks": transport.size,
        "sizes": list(sizes),
        "pingpong": results["pingpong"],
        "sendrecv": results["sendrecv"],
        "fit": fits,
        "model": "t = alpha + bytes / beta per message (fit of the ping-pong one-way times)",
        "machine": machine_info(),
    }
