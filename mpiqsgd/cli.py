"""Command line: ``mpiqsgd <command> ...`` (also ``python -m mpiqsgd``).

Commands:
    train            data-parallel training (mpiexec -n N ... train, or train --simulate N)
    bench codec      encode/decode throughput, bytes and variance of one codec
    bench exchange   time and bytes of one topology against fp32 allreduce (run under mpiexec)
    bench step       a training step with exchange against the step alone (run under mpiexec)
    report           tables and plots of communication cost from run directories
    launch           build (and run) the mpiexec command for this machine's MPI
    doctor           MPI, threads, GPUs and a 2-rank ping-pong, with a fix for each problem
    sweep            run an experiment grid (resumable), then write its report
    cluster          an emulated switched cluster on this machine (root): run a job on N shaped nodes
    project          projected exchange and step time of each topology on 2 .. 1,024 nodes

An uncaught exception on any rank aborts the whole MPI job (MPI_Abort) after printing
the error, instead of leaving the other ranks waiting. A :class:`~mpiqsgd.errors.StopJob`
(SIGINT or SIGTERM during training, a refused launch) ends every rank together instead: one
line on stderr and its exit status (130 after SIGINT, 143 after SIGTERM).
"""

import argparse
from dataclasses import fields
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .errors import MpiqsgdError, StopJob
from .options import CodecOptions, TopologyOptions, add_fields, flag
from .topology import resolve_topology
from .transport import abort_if_parallel, exit_now, exit_together

__all__ = ["main", "run", "build_parser"]


def build_parser():
    parser = argparse.ArgumentParser(prog="mpiqsgd", description="Quantized data-parallel SGD over MPI.")
    parser.add_argument("--version", action="version", version=f"mpiqsgd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train a model with quantized gradient exchange (under mpiexec, "
                                      "or --simulate N)")
    from .train.config import TrainConfig, add_config_args

    add_config_args(tr)
    tr.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (the lines for a "
                                                         "person go to stderr)")
    tr.set_defaults(func=run_train)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bc = bench.add_parser("codec", help="codec throughput, bytes and variance (one process)")
    add_fields(bc, CodecOptions)
    bc.add_argument("--numel", type=int, default=25_000_000, help="coordinates (default 25M, ResNet-50 size)")
    bc.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    bc.add_argument("--threads", default=None,
                    help="comma-separated kernel thread counts for the CPU scaling table (default 1,2,all)")
    bc.add_argument("--json", action="store_true", help="print one JSON object")
    bc.add_argument("--all", action="store_true",
                    help="every codec and encoding at its defaults (qsgd at 2, 3, 4, 8 bits), one table")
    bc.set_defaults(func=run_bench_codec)

    be = bench.add_parser("exchange", help="one topology vs fp32 allreduce (run under mpiexec)")
    add_fields(be, CodecOptions)
    add_fields(be, TopologyOptions)
    be.add_argument("--numel", type=int, default=25_000_000)
    be.add_argument("--repeats", type=int, default=5)
    be.add_argument("--seed", type=int, default=0)
    be.add_argument("--device", default="cpu")
    add_fields(be, TrainConfig, names=("wait",))
    be.add_argument("--json", action="store_true")
    be.add_argument("--trace", metavar="FILE", help="write the Chrome trace of the topology's last repeat here")
    be.add_argument("--sweep", action="store_true",
                    help="instead: ping-pong and sendrecv of 1 KB .. --max-mb between ranks 0 and 1, with the "
                         "latency-bandwidth fit that `mpiqsgd report --link-model` reads")
    be.add_argument("--min-kb", type=float, default=1.0, help="--sweep: smallest message in kB (default 1)")
    be.add_argument("--max-mb", type=float, default=100.0, help="--sweep: largest message in MB (default 100)")
    be.add_argument("--out", metavar="FILE", help="--sweep: also write the JSON here (rank 0)")
    be.set_defaults(func=run_bench_exchange)

    bs = bench.add_parser("step", help="training step with exchange vs compute alone (run under mpiexec)")
    add_fields(bs, CodecOptions)
    add_fields(bs, TopologyOptions)
    bs.add_argument("--model", default="resnet20", help="model (default resnet20; alexnet, tiny, resnet32 ...)")
    bs.add_argument("--batch-size", type=int, default=32, help="images per rank (default 32)")
    add_fields(bs, TrainConfig, names=("min_compress_numel", "bucket_mb", "overlap", "wait"))
    bs.add_argument("--repeats", type=int, default=10)
    bs.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bs.add_argument("--threads", type=int, help="torch threads per rank (default: the node's cores / its ranks)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--device", default="cpu")
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(func=run_bench_step)

    # Commands whose module brings its flags and its handler (stdlib imports only until run).
    from . import cluster, doctor, launch, project, report, sweep

    for name, add_args, run, text in (
            ("report", report.add_report_args, report.run_report,
             "tables and plots of communication cost from run directories"),
            ("launch", launch.add_launch_args, launch.run_launch,
             "build (and run) the mpiexec command for this machine's MPI"),
            ("doctor", doctor.add_doctor_args, doctor.run_doctor,
             "MPI, threads, GPUs and a 2-rank ping-pong, with a fix for each problem"),
            ("sweep", sweep.add_sweep_args, sweep.run_sweep,
             "run an experiment grid (resumable), then write its report"),
            ("cluster", cluster.add_cluster_args, cluster.run_cluster,
             "an emulated switched cluster on this machine (root): run a job on N shaped nodes"),
            ("project", project.add_project_args, project.run_project,
             "projected exchange and step time of each topology on 2 .. 1,024 nodes")):
        command = sub.add_parser(name, help=text)
        add_args(command)
        command.set_defaults(func=run)
    return parser


def _text_on_root(transport, result, as_json):
    """Print ``result`` as JSON on rank 0 with ``--json``; True where the caller prints text instead."""
    if transport.rank != 0:
        return False
    if as_json:
        print(json.dumps(result, indent=2))
        return False
    return True


def _say_layout(transport, result, as_json):
    """Rank 0 says when the exchange is hierarchical (on stderr beside --json's stdout)."""
    if transport.rank == 0 and result["layout"]:
        print(f"mpiqsgd: {result['layout']}", file=sys.stderr if as_json else sys.stdout, flush=True)


def _codec_and_topology(args):
    """The codec, the topology (``auto`` resolved) and its options that ``bench exchange``/``step``'s flags give."""
    codec = CodecOptions.of(args).build_codec()
    topology = resolve_topology(args.topology, codec)
    return codec, topology, TopologyOptions.of(args).aggregator_options(topology)


def _positive(name, value):
    if value < 1:
        raise MpiqsgdError(f"--{name} must be at least 1; got {value}")


def run_bench_codec(args):
    from .bench import bench_codec

    _positive("numel", args.numel)
    _positive("repeats", args.repeats)
    threads = None
    if args.threads:
        try:
            threads = [int(t) for t in args.threads.split(",")]
        except ValueError:
            raise MpiqsgdError(f"--threads must be comma-separated integers; got {args.threads!r}") from None
        for t in threads:
            _positive("threads", t)
    if args.all:
        return _bench_codec_all(args, threads)
    result = bench_codec(CodecOptions.of(args).build_codec(), args.numel, args.repeats, args.seed, args.device, threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    r = result
    print(f"{r['codec']}  numel={r['numel']:,}  median of {r['repeats']}  ({r['machine']['processor']}, "
          f"{r['machine']['torch_threads']} threads, {r['machine']['device']})")
    print(f"  encode {r['encode_GBps']:.3f} GB/s   decode {r['decode_GBps']:.3f} GB/s   "
          f"memcpy {r['memcpy_GBps']:.3f} GB/s   (decode into a new array: {r['decode_new_GBps']:.3f} GB/s)")
    print(f"  {r['bytes_per_coordinate']:.4f} bytes/coordinate ({r['compression_vs_fp32']:.2f}x smaller than fp32)")
    sym = r["symbols"]
    if sym:
        elias_bound = (f"; Elias bound {sym['elias_bound_bits_per_coordinate']:.4f} ({sym['vs_elias_bound']:.3f}x)"
                       if "vs_elias_bound" in sym else "")
        print(f"  {sym['bits_per_coordinate']:.4f} bits/coordinate ({sym['encoding']}): symbol entropy "
              f"{sym['entropy_bits_per_coordinate']:.4f} + {sym['side_bits_per_coordinate']:.4f} frame/scales/model "
              f"({sym['vs_entropy']:.3f}x that){elias_bound}")
    bound = f"  (QSGD bound {r['variance_bound']:.3f})" if r["variance_bound"] is not None else ""
    print(f"  ||Q(v)-v||^2/||v||^2 = {r['variance_ratio']:.4f}{bound}")
    for row in r["scaling"] or []:
        print(f"  {row['threads']:3d} threads: encode {row['encode_GBps']:.3f} GB/s ({row['encode_vs_memcpy']:.2f}x)"
              f"   decode {row['decode_GBps']:.3f} GB/s ({row['decode_vs_memcpy']:.2f}x)"
              f"   memcpy {row['memcpy_GBps']:.3f} GB/s   new array {row['decode_new_GBps']:.3f} GB/s")
    mem = r["memory"]
    if mem and mem["encode_peak_extra_bytes"] is not None:
        print(f"  peak extra memory: encode {mem['encode_extra_vs_fp32']:.2f}x, "
              f"decode {mem['decode_extra_vs_fp32']:.2f}x the fp32 input (outputs included)")


def _bench_codec_all(args, threads):
    from .bench import bench_codec_all

    chosen = [flag(f.name) for f in fields(CodecOptions) if getattr(args, f.name) != f.default]
    if chosen:
        raise MpiqsgdError(f"--all runs every codec at its defaults; drop {', '.join(chosen)}")
    result = bench_codec_all(args.numel, args.repeats, args.seed, args.device, threads)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"numel={result['numel']:,}, median of {result['repeats']}; {m.get('cpu_model') or m['processor']}, "
          f"{m['cpu_count']} cores, {m['device']}; GB/s of fp32 input at {m['torch_threads']} threads "
          "(x: against memcpy in the same run)")
    print(f"{'codec':<12} {'bits':>4} {'encoding':<8} {'encode GB/s':>14} {'decode GB/s':>14} {'bits/coord':>10} "
          f"{'H':>7} {'vs H+side':>9} {'vs Elias':>8} {'var/|v|^2':>9}")
    for r in result["results"]:
        sym = r["symbols"] or {}
        entropy = f"{sym['entropy_bits_per_coordinate']:.4f}" if sym else "-"
        vs_h = f"{sym['vs_entropy']:.3f}" if sym else "-"
        vs_elias = f"{sym['vs_elias_bound']:.3f}" if "vs_elias_bound" in sym else "-"
        print(f"{r['name']:<12} {r['params'].get('bits', '-')!s:>4} {sym.get('encoding', '-'):<8} "
              f"{r['encode_GBps']:7.3f} ({r['encode_vs_memcpy']:.2f}x) {r['decode_GBps']:7.3f} "
              f"({r['decode_vs_memcpy']:.2f}x) {r['bits_per_coordinate']:10.4f} {entropy:>7} {vs_h:>9} {vs_elias:>8} "
              f"{r['variance_ratio']:9.4f}")


def run_bench_exchange(args):
    from .bench import bench_exchange
    from .transport import world

    if args.sweep:
        return run_bench_link(args)
    _positive("numel", args.numel)
    _positive("repeats", args.repeats)
    transport = world(args.wait)
    codec, topology, options = _codec_and_topology(args)
    result = bench_exchange(transport, codec, topology, args.numel, args.repeats, args.seed, args.device,
                            trace=args.trace, hierarchical=args.hierarchical, **options)
    _say_layout(transport, result, args.json)
    if not _text_on_root(transport, result, args.json):
        return
    r = result
    print(f"{r['n_ranks']} ranks, numel={r['numel']:,}, median of {r['repeats']} (slowest rank per repeat)")
    for key in ("baseline", "candidate"):
        x = r[key]
        print(f"  {x['topology']:<10} {x['codec']:<60} {x['median_seconds'] * 1e3:9.2f} ms  "
              f"{x['sent_bytes_this_rank']:>12,} bytes sent by rank 0")
    print(f"  speedup vs allreduce {r['speedup_vs_allreduce']:.2f}x, bytes {r['bytes_vs_allreduce']:.3f}x, "
          f"relative error vs exact mean {r['relative_error_vs_exact_mean']:.4f}")
    if r["candidate"]["hierarchical"]:
        base, cand = r["baseline"]["job_bytes_by_class"], r["candidate"]["job_bytes_by_class"]
        print(f"  bytes per call, all ranks: inter-node {cand['inter']:,} (the flat fp32 allreduce, all counted as "
              f"inter-node: {base['inter']:,}), "
              f"intra-node {cand['intra']:,} (fp32, shared memory)")


def run_bench_link(args):
    from .bench import bench_link
    from .linkmodel import sweep_sizes
    from .transport import world

    if not 0 < args.min_kb * 1e3 <= args.max_mb * 1e6:
        raise MpiqsgdError(f"--min-kb {args.min_kb} and --max-mb {args.max_mb}: need 0 < min <= max")
    transport = world()
    result = bench_link(transport, sweep_sizes(int(args.min_kb * 1e3), int(args.max_mb * 1e6)), args.seed)
    if transport.rank != 0:
        return
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
        return
    print(f"ranks 0 <-> 1 of {result['n_ranks']}: median seconds per message (ping-pong one way / sendrecv)")
    for pp, sr in zip(result["pingpong"], result["sendrecv"]):
        print(f"  {pp['bytes']:>12,} B  {pp['seconds'] * 1e6:12.1f} us  {pp['MBps']:9.1f} MB/s   "
              f"{sr['seconds'] * 1e6:12.1f} us  {sr['MBps']:9.1f} MB/s")
    f = result["fit"]["pingpong"]
    if "error" in f:
        print(f"  no fit: {f['error']} (try larger sizes: --max-mb)")
        return
    print(f"  fit t = alpha + bytes / beta: alpha {f['alpha_seconds'] * 1e6:.1f} us, beta "
          f"{f['beta_bytes_per_second'] / 1e6:.1f} MB/s ({f['beta_bytes_per_second'] * 8 / 1e9:.3g} Gbit/s), "
          f"worst point off by {100 * f['max_relative_error']:.0f}%" + (f"; wrote {args.out}" if args.out else ""))


def run_bench_step(args):
    import torch

    from .bench import bench_step
    from .transport import world

    _positive("repeats", args.repeats)
    _positive("batch-size", args.batch_size)
    transport = world(args.wait)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // transport.local_size))
    codec, topology, options = _codec_and_topology(args)
    result = bench_step(transport, args.model, codec, topology, args.batch_size, args.repeats, args.warmup,
                        args.bucket_mb, args.overlap, args.min_compress_numel, args.seed, args.device,
                        hierarchical=args.hierarchical, **options)
    _say_layout(transport, result, args.json)
    if not _text_on_root(transport, result, args.json):
        return
    r = result
    phases = "  ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(r["phase_seconds_per_step"].items()))
    print(f"{r['n_ranks']} ranks, {r['model']} batch {r['batch_size']}, {r['topology']} {r['codec']}, "
          f"{r['n_buckets']} bucket(s){', overlap' if r['overlap'] else ''}; median of {r['repeats']}")
    print(f"  step {r['step_seconds'] * 1e3:.1f} ms  compute alone {r['compute_seconds'] * 1e3:.1f} ms  "
          f"overhead {r['overhead_seconds'] * 1e3:.1f} ms ({100 * r['overhead_vs_compute']:.1f}% of compute)")
    print(f"  {r['bytes_per_step_per_rank']:,.0f} bytes/step/rank; ms per step by phase: {phases}")


def run_train(args):
    from .train.config import config_from_args
    from .train.console import Console
    from .train.driver import train

    train(config_from_args(args), console=Console(as_json=args.json))


def main(argv=None):
    """Run one command (``argv``, else ``sys.argv[1:]``); return its exit status. For use in a process
    that goes on afterwards (a test, a notebook): :func:`run` is the console script."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except StopJob as exc:  # every rank stops together (a refused launch, SIGINT or SIGTERM): no abort
        if str(exc):
            print(exc, file=sys.stderr, flush=True)
        exit_together(exc.exit_code)
        return exc.exit_code
    except MpiqsgdError as exc:
        abort_if_parallel(f"mpiqsgd: error: {exc}")
        print(f"mpiqsgd: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        abort_if_parallel(traceback.format_exc())
        raise
    return code or 0


def run(argv=None):
    """Entry point of the ``mpiqsgd`` console script and of ``python -m mpiqsgd``: :func:`main`, then
    the process ends at once with its status (:func:`~mpiqsgd.transport.exit_now`: without the
    interpreter's teardown, a second or more of CPU per rank). An exception that escapes ``main``
    ends the process as Python does, with its traceback."""
    exit_now(main(argv))
