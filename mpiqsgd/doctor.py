"""``mpiqsgd doctor``: is this machine ready for mpiqsgd jobs, and if not, what to change.

Checks, each in a child process under a timeout so that a hanging ``MPI_Init`` is
reported instead of hanging the doctor:

1. mpi4py's version, its MPI library and standard version, the thread level the
   library provides (``MPI.Query_thread``) against the one mpi4py requested, and
   whether the library is CUDA-aware (best effort: Open MPI's ``ompi_info``, MPICH's
   configure line, an ``MPIX`` query where mpi4py offers one);
2. the ``mpiexec`` that :mod:`mpiqsgd.launch` would use, and its implementation;
3. GPUs visible to torch, numba's and torch's thread counts, the cores;
4. a 2-rank ping-pong launched as ``mpiexec -n 2 python -m mpi4py -m mpiqsgd.doctor
   --child ping-pong``: the ranks' hosts and GPUs, one-way latency of 1-byte messages
   and bandwidth of 1 KiB to 16 MiB messages (``Send`` / ``Recv`` of byte buffers).

:func:`findings` turns these facts into problems (the installation cannot run jobs;
exit status 1) and warnings, each with an actionable fix. ``mpi4py.MPI`` is imported
only inside the child functions, never at module level (house style: only the transport
and topologies import it).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["collect", "findings", "render", "add_doctor_args", "run_doctor", "ping_pong", "mpi_facts"]

MARK = "MPIQSGD-DOCTOR "  # prefix of the children's JSON lines
PING_PONG_BYTES = (1, 1 << 10, 1 << 20, 16 << 20)
THREAD_LEVELS = ("single", "funneled", "serialized", "multiple")
STAGED = "not needed: mpiqsgd stages every message through host memory"


# ---------------------------------------------------------------- children (run with MPI)

def _cuda_query(MPI):
    for name in ("Query_cuda_support", "query_cuda_support"):
        fn = getattr(MPI, name, None)
        if fn is not None:
            try:
                return bool(fn())
            except Exception:  # noqa: BLE001 - a best-effort probe
                return None
    return None


def mpi_facts():
    """This process's mpi4py and MPI library facts (initializes MPI as a singleton)."""
    import mpi4py
    from mpi4py import MPI

    return {"mpi4py": mpi4py.__version__, "library": MPI.Get_library_version().strip(),
            "standard": ".".join(map(str, MPI.Get_version())),
            "thread_provided": THREAD_LEVELS[MPI.Query_thread()] if MPI.Query_thread() < 4 else str(MPI.Query_thread()),
            "thread_requested": str(mpi4py.rc.thread_level), "cuda_query": _cuda_query(MPI)}


def _gpus():
    try:
        import torch
    except ImportError:
        return {"count": None}
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)]}


def ping_pong(sizes=PING_PONG_BYTES):
    """Rank 0 and 1 bounce byte buffers; rank 0 prints one JSON line (every rank does when size != 2)."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    me = {"rank": rank, "size": size, "host": MPI.Get_processor_name(), "local_rank": node.Get_rank(),
          "local_size": node.Get_size(), "gpus": _gpus(),
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    node.Free()
    if size != 2:
        print(MARK + json.dumps({"ranks": [me], "error": f"world size {size}, expected 2"}), flush=True)
        return
    peer, tag, results = 1 - rank, 7, []
    for nbytes in sizes:
        buf = np.zeros(nbytes, np.uint8)
        reps = 200 if nbytes <= 1024 else 20 if nbytes <= 1 << 20 else 4
        for timed in (False, True):
            comm.Barrier()
            start = MPI.Wtime()
            for _ in range(reps if timed else 2):
                if rank == 0:
                    comm.Send([buf, MPI.BYTE], peer, tag)
                    comm.Recv([buf, MPI.BYTE], peer, tag)
                else:
                    comm.Recv([buf, MPI.BYTE], peer, tag)
                    comm.Send([buf, MPI.BYTE], peer, tag)
        one_way = (MPI.Wtime() - start) / reps / 2
        results.append({"bytes": nbytes, "one_way_seconds": one_way, "MBps": nbytes / one_way / 1e6})
    mine = json.dumps(me).encode()
    if rank == 1:
        comm.Send([np.frombuffer(mine, np.uint8), MPI.BYTE], 0, tag + 1)
        return
    status = MPI.Status()
    comm.Probe(1, tag + 1, status)
    other = np.empty(status.Get_count(MPI.BYTE), np.uint8)
    comm.Recv([other, MPI.BYTE], 1, tag + 1)
    print(MARK + json.dumps({"ranks": [me, json.loads(other.tobytes())], "results": results}), flush=True)


# ---------------------------------------------------------------- the doctor (no MPI here)

def _child_env():
    here = str(Path(__file__).resolve().parent.parent)  # the mpiqsgd being run, also in the children
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=here + (os.pathsep + path if path else ""))


def _run_child(argv, timeout):
    """``(json objects printed with MARK, error text or None, command)``."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_child_env())
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return [], f"timed out after {timeout} s" + (f"; output: {out[-500:]}" if out else ""), argv
    except OSError as exc:
        return [], str(exc), argv
    objs = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not objs:
        tail = (proc.stdout + proc.stderr).strip()[-800:]
        return objs, f"exit status {proc.returncode}: {tail}", argv
    return objs, None, argv


def _implementation_of_library(text):
    if "Open MPI" in text:
        return "openmpi"
    if "Intel(R) MPI" in text:
        return "intel"
    if "MPICH" in text or "MVAPICH" in text:
        return "mpich"
    return "unknown"


def _cuda_aware(mpi, impl):
    """``(yes/no/unknown, how it was decided)``."""
    if mpi.get("cuda_query") is not None:
        return ("yes" if mpi["cuda_query"] else "no"), "MPIX_Query_cuda_support"
    if impl == "openmpi":
        tool = shutil.which("ompi_info")
        if tool:
            try:
                out = subprocess.run([tool, "--parsable", "--all"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            m = re.search(r"mpi_built_with_cuda_support:value:(\w+)", out)
            if m:
                return ("yes" if m.group(1) == "true" else "no"), "ompi_info"
        return "unknown", "no ompi_info on PATH"
    if impl == "mpich":
        conf = re.search(r"configure:\s*(.*)", mpi.get("library", ""))
        if conf:
            return ("yes" if "cuda" in conf.group(1).lower() else "no"), "MPICH configure line"
    if impl == "intel":
        return "unknown", "Intel MPI: GPU buffers need I_MPI_OFFLOAD=1"
    return "unknown", "no probe for this library"


def collect(ping=True, timeout=60, mpiexec=None):
    """Gather the facts :func:`findings` and :func:`render` read (runs the child processes)."""
    from . import launch

    facts = {"python": sys.executable, "cores": os.cpu_count(), "is_root": os.geteuid() == 0}
    objs, err, _ = _run_child([sys.executable, "-m", "mpiqsgd.doctor", "--child", "info"], timeout)
    facts["mpi"] = objs[0] if objs else None
    facts["mpi_error"] = err
    if facts["mpi"]:
        impl = _implementation_of_library(facts["mpi"]["library"])
        facts["mpi"]["implementation"] = impl
        facts["mpi"]["cuda_aware"], facts["mpi"]["cuda_how"] = _cuda_aware(facts["mpi"], impl)
    try:
        info = launch.mpiexec_info(mpiexec)
        facts["mpiexec"] = {"path": info.path, "implementation": info.implementation, "version": info.version}
    except launch.LaunchError as exc:
        facts["mpiexec"], facts["mpiexec_error"] = None, str(exc)
        info = None
    facts["threads"] = _threads()
    facts["gpus"] = _gpus()
    facts["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    facts["ping_pong"] = None
    if ping and info is not None and info.implementation in launch.IMPLEMENTATIONS:
        program = [sys.executable, "-m", "mpi4py", "-m", "mpiqsgd.doctor", "--child", "ping-pong"]
        cmd = launch.build_command(2, program, info, oversubscribe=True)
        objs, err, argv = _run_child(cmd.argv, timeout)
        facts["ping_pong"] = {"command": cmd.shell(), "error": err, **(objs[0] if objs else {}),
                              "outputs": len(objs)}
        if objs and objs[0].get("error"):
            facts["ping_pong"]["ranks"] = [r for o in objs for r in o["ranks"]]
    return facts


def _threads():
    out = {}
    from .codecs.kernels import HAVE_NUMBA, MAX_THREADS, kernel_threads

    out["numba"] = kernel_threads() if HAVE_NUMBA else None
    out["numba_max"] = MAX_THREADS
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except ImportError:
        out["torch"] = None
    out["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return out


def findings(f):
    """Problems and warnings in the facts of :func:`collect`.

    Returns:
        ``[(severity, what, fix)]`` with severity ``"problem"`` (jobs cannot run) or
        ``"warning"``.
    """
    out = []

    def problem(what, fix):
        out.append(("problem", what, fix))

    def warning(what, fix):
        out.append(("warning", what, fix))

    mpi, launcher = f.get("mpi"), f.get("mpiexec")
    if mpi is None:
        err = f.get("mpi_error") or "no answer"
        if "No module named 'mpi4py'" in err or "No module named mpi4py" in err:
            problem("mpi4py is not installed", 'pip install -e ".[mpich]" (MPICH from PyPI), or build it against '
                    "your MPI: env MPICC=$(which mpicc) pip install --no-binary=mpi4py mpi4py")
        else:
            problem(f"MPI does not start in a single process (python -c 'from mpi4py import MPI'): {err}",
                    "check that the MPI library mpi4py was built against is installed and loadable "
                    "(LD_LIBRARY_PATH, 'module load'); rebuild mpi4py against it: env MPICC=$(which mpicc) "
                    "pip install --no-binary=mpi4py --force-reinstall mpi4py")
    if launcher is None:
        problem(f.get("mpiexec_error") or "no mpiexec found",
                "pip install mpich (a runtime beside this Python), or put your MPI's bin directory on PATH")
    elif launcher["implementation"] == "unknown":
        problem(f"{launcher['path']} is not MPICH, Open MPI or Intel MPI by its --version",
                "put the mpiexec of mpi4py's MPI library first on PATH, or pass --mpiexec PATH")
    if mpi and launcher and "unknown" not in (mpi["implementation"], launcher["implementation"]) \
            and mpi["implementation"] != launcher["implementation"]:
        problem(f"mpiexec is {launcher['implementation']} ({launcher['path']}) but mpi4py uses "
                f"{mpi['implementation']}: ranks would each start alone (world size 1)",
                f"use the mpiexec of {mpi['implementation']} (put it first on PATH or pass --mpiexec), or rebuild "
                "mpi4py against this launcher's MPI: env MPICC=$(which mpicc) pip install --no-binary=mpi4py "
                "--force-reinstall mpi4py")
    if mpi and mpi["thread_provided"] in THREAD_LEVELS and mpi["thread_provided"] != "multiple":
        warning(f"the MPI library provides thread level {mpi['thread_provided']} (mpi4py asked for "
                f"{mpi['thread_requested']})",
                "fine while each rank calls MPI from one thread; for communication from helper threads use an MPI "
                "built with thread support (Open MPI: --enable-mpi-thread-multiple; MPICH provides it by default)")
    if f.get("threads", {}).get("numba") is None:
        problem("numba is not importable (the codec kernels need it)", "pip install -e . (or pip install numba)")
    if launcher and launcher["implementation"] == "openmpi" and f.get("is_root"):
        warning("running as root: Open MPI refuses to start unless told it may",
                "launch with mpiqsgd launch (adds --allow-run-as-root) or export OMPI_ALLOW_RUN_AS_ROOT=1 "
                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
    pp = f.get("ping_pong")
    if pp is not None:
        ranks = pp.get("ranks") or []
        if pp.get("error") and "timed out" in pp["error"]:
            problem(f"the 2-rank ping-pong hung ({pp['command']}): {pp['error']}",
                    "the ranks cannot reach each other: check firewalls and network interfaces (Open MPI: "
                    "OMPI_MCA_btl_tcp_if_include=lo or the right NIC; MPICH: FI_PROVIDER=tcp or "
                    "MPIR_CVAR_CH4_NETMOD), and that mpiexec matches mpi4py's MPI")
        elif ranks and all(r.get("size") == 1 for r in ranks):
            problem(f"mpiexec -n 2 started {len(ranks)} separate processes of world size 1",
                    "mpiexec and mpi4py belong to different MPI installations: use the mpiexec of mpi4py's "
                    "library, or rebuild mpi4py against this mpiexec's MPI")
        elif pp.get("error"):
            problem(f"the 2-rank ping-pong failed ({pp['command']}): {pp['error']}",
                    "run that command by hand to see the error; mpiqsgd launch --dry-run -n 2 -- doctor shows "
                    "the launch it builds")
        gpus = f.get("gpus", {}).get("count") or 0
        local = max((r.get("local_size", 1) for r in ranks), default=1)
        if gpus and local > gpus:
            warning(f"{local} ranks per node share {gpus} GPU(s)", "launch at most one rank per GPU per node, "
                    "or accept that ranks sharing a GPU run slower")
    if f.get("gpus", {}).get("count") and mpi and mpi.get("cuda_aware") != "yes":
        warning(f"GPUs are visible but MPI is not known to be CUDA-aware ({mpi.get('cuda_how')})", STAGED)
    return out


def _bytes_label(n):
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}"
    return f"{n} B"


def render(f, found):
    """The report as text: sections of ``name  value`` lines, then problems and warnings with fixes."""
    lines = []

    def section(title, items):
        lines.append(title)
        lines.extend(f"  {k:<22}{v}" for k, v in items)

    mpi = f.get("mpi")
    if mpi:
        first = " ".join(mpi["library"].splitlines()[0].split())
        section("MPI", [("mpi4py", mpi["mpi4py"]), ("library", f"{first} (MPI {mpi['standard']})"),
                        ("thread level", f"{mpi['thread_provided']} provided, {mpi['thread_requested']} requested"),
                        ("CUDA-aware", f"{mpi['cuda_aware']} ({mpi['cuda_how']}); {STAGED}")])
    else:
        section("MPI", [("error", f.get("mpi_error"))])
    m = f.get("mpiexec")
    section("Launcher", [("mpiexec", f"{m['path']} ({m['implementation']} {m['version']})" if m
                          else f.get("mpiexec_error"))])
    g = f.get("gpus", {})
    gpus = "torch not importable" if g.get("count") is None else (
        f"{g['count']}: {', '.join(g['names'])}" if g["count"] else "none (training runs on the CPU)")
    section("GPUs", [("visible", gpus), ("CUDA_VISIBLE_DEVICES", f.get("cuda_visible_devices") or "unset")])
    t = f.get("threads", {})
    numba = "not importable" if t.get("numba") is None else (
        f"{t['numba']} threads per kernel call (NUMBA_NUM_THREADS {t['numba_max']}); "
        "mpiqsgd gives each rank cores // ranks per node")
    section("Threads", [("cores", f["cores"]), ("numba", numba), ("torch", t.get("torch")),
                        ("OMP_NUM_THREADS", t.get("OMP_NUM_THREADS") or "unset")])
    pp = f.get("ping_pong")
    if pp is None:
        section("Ping-pong", [("skipped", "no usable mpiexec" if f.get("mpiexec") is None or
                               f["mpiexec"]["implementation"] == "unknown" else "--no-ping-pong")])
    else:
        items = [("command", pp["command"])]
        for r in pp.get("ranks") or []:
            n = (r.get("gpus") or {}).get("count")
            items.append((f"rank {r['rank']}", f"{r['host']}, local rank {r['local_rank']} of {r['local_size']}, "
                                               f"world size {r['size']}, GPUs seen {'?' if n is None else n}"))
        res = pp.get("results")
        if res:
            items.append(("latency", f"{res[0]['one_way_seconds'] * 1e6:.1f} us one way ({res[0]['bytes']} B)"))
            items.append(("bandwidth", "; ".join(f"{_bytes_label(r['bytes'])} {r['MBps']:,.0f} MB/s"
                                                 for r in res[1:])))
        if pp.get("error"):
            items.append(("error", pp["error"]))
        section("Ping-pong (2 ranks)", items)
    for severity, title in (("problem", "Problems"), ("warning", "Warnings")):
        these = [(w, fix) for s, w, fix in found if s == severity]
        lines.append(title + ("" if these else ": none"))
        for what, fix in these:
            lines.append(f"  - {what}\n    -> {fix}")
    return "\n".join(lines)


def add_doctor_args(p):
    """Flags of ``mpiqsgd doctor``."""
    p.add_argument("--no-ping-pong", dest="ping", action="store_false", help="skip the 2-rank mpiexec ping-pong")
    p.add_argument("--timeout", type=float, default=90, help="seconds each child process may take (default 90)")
    p.add_argument("--mpiexec", help="the mpiexec to check (default: beside this Python, else on PATH)")
    p.add_argument("--json", action="store_true", help="print the facts and findings as one JSON object")


def run_doctor(args):
    """``mpiqsgd doctor``: print the checks; exit status 1 when a problem was found."""
    facts = collect(args.ping, args.timeout, args.mpiexec)
    found = findings(facts)
    if args.json:
        print(json.dumps({**facts, "findings": [{"severity": s, "what": w, "fix": x} for s, w, x in found]},
                         indent=1))
    else:
        print(render(facts, found))
    return 1 if any(s == "problem" for s, _, _ in found) else 0


def _child_main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpiqsgd.doctor")
    p.add_argument("--child", choices=["info", "ping-pong"], required=True)
    if p.parse_args(argv).child == "info":
        print(MARK + json.dumps(mpi_facts()), flush=True)
    else:
        ping_pong()


if __name__ == "__main__":
    _child_main()
