"""``mpiqsgd launch``: the right ``mpiexec`` command for this machine's MPI, explained.

Command built (MPICH / Intel MPI's Hydra, Open MPI 4 and 5):

1. ``mpiexec --version`` names the implementation (:func:`detect`).
2. Hosts come from ``-H host:slots,...`` or a hostfile in any of the formats
   (``host``, ``host:N``, ``host slots=N``); a hostfile is passed as is when it is in
   the implementation's format, else converted (Open MPI ``host slots=N``, Hydra
   ``host:N``).
3. Slots are counted as each implementation documents them (:func:`count_slots`):
   no hosts: this machine's cores (cores, not hardware threads: Open MPI's default);
   ``-H host`` without ``:N``: 1; a hostfile line without a count: Open MPI gives that
   node its number of cores (known here for this machine only), Hydra 1. Ranks beyond
   the slots: Open MPI refuses ("not enough slots") unless ``--oversubscribe``; MPICH and
   Intel MPI place them anyway. Either way the launcher says so.
4. Open MPI run as root needs ``--allow-run-as-root``; it is added, and said.
5. The program runs as ``python -m mpi4py -m mpiqsgd ...`` so that an exception on one
   rank aborts the job instead of leaving the others waiting.
6. ``--log-dir DIR``: one stdout and one stderr file per rank, through the
   implementation's own options (Hydra ``-outfile-pattern``, Open MPI
   ``--output-filename`` / ``--output dir=``); :func:`rank_log` names the files.
7. Several programs in one job (MPMD, ``-n 1 a : -n 1 b``) through ``contexts``.

:func:`job_command` is the launch the tests use: this machine, oversubscribed, as root,
under whichever MPI is found, with no environment to set.

Nothing here imports MPI.
"""

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MpiqsgdError

__all__ = ["MPIInfo", "Launch", "LaunchError", "program_argv", "detect", "find_mpiexec", "mpiexec_info", "cores",
           "parse_hosts", "parse_hostfile", "hostfile_text", "count_slots", "build_command", "job_command", "rank_log",
           "add_launch_args", "run_launch",
           "launched_world"]

# What a launcher tells each process it starts (Open MPI; MPICH, Intel MPI and srun's PMI; MVAPICH):
# (world size variable, rank variable).
LAUNCHER_VARS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK"),
                 ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"))

IMPLEMENTATIONS = ("mpich", "openmpi", "intel")
# First words of a program that mean an mpiqsgd subcommand.
SUBCOMMANDS = ("train", "bench", "report", "doctor", "sweep")


class LaunchError(MpiqsgdError):
    """A launch that cannot work as asked (and what to change)."""


@dataclass
class MPIInfo:
    """An ``mpiexec`` and the implementation it belongs to."""

    path: str
    implementation: str  # one of IMPLEMENTATIONS, or "unknown"
    version: str
    text: str = ""

    @property
    def major(self):
        m = re.match(r"\d+", self.version or "")
        return int(m.group()) if m else None


def detect(version_text):
    """``(implementation, version)`` from the output of ``mpiexec --version``."""
    t = version_text
    m = re.search(r"Intel\(R\) MPI Library.*?Version (\S+)", t)
    if m or "Intel(R) MPI" in t:
        return "intel", m.group(1) if m else ""
    m = re.search(r"\((?:Open MPI|OpenRTE)\)\s+(\S+)", t)
    if m or "Open MPI" in t or "OpenRTE" in t:
        return "openmpi", m.group(1) if m else ""
    if "HYDRA" in t or "MPICH" in t:
        m = re.search(r"Version:\s+(\S+)", t)
        return "mpich", m.group(1) if m else ""
    return "unknown", ""


def launched_world(environ=None):
    """``(world size, rank)`` of the job an MPI launcher started this process in, from its environment
    (no MPI initialized), or None outside a launcher."""
    environ = os.environ if environ is None else environ
    for size, rank in LAUNCHER_VARS:
        try:
            return int(environ[size]), int(environ.get(rank, 0))
        except (KeyError, ValueError):
            continue
    return None


def find_mpiexec():
    """The ``mpiexec`` beside this Python (a virtual environment's MPICH wheel), else on PATH, else None."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def mpiexec_info(path=None, timeout=20):
    """Run ``mpiexec --version`` and :func:`detect` its implementation.

    Raises:
        LaunchError: no ``mpiexec`` found, or it does not answer.
    """
    path = path or find_mpiexec()
    if path is None:
        raise LaunchError("no mpiexec on PATH: pip install mpich (or load your cluster's MPI module)")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LaunchError(f"{path} --version failed: {exc}") from None
    text = proc.stdout + proc.stderr
    return MPIInfo(path, *detect(text), text)


def cores(cpus=None, sysfs="/sys/devices/system/cpu"):
    """Cores this process may run on, hardware threads of one core counted once (as Open MPI counts slots).

    Args:
        cpus: CPU numbers (default: this process's affinity, else ``os.cpu_count()``).
        sysfs: where the CPUs' ``topology/`` directories are.

    Returns:
        The number of distinct cores among ``cpus``; the number of CPUs where the
        topology cannot be read.
    """
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except AttributeError:  # not Linux
            cpus = range(os.cpu_count() or 1)
    siblings = set()
    for cpu in cpus:
        topology = Path(sysfs) / f"cpu{cpu}" / "topology"
        for name in ("core_cpus_list", "thread_siblings_list"):
            try:
                siblings.add((topology / name).read_text().strip())
                break
            except OSError:
                continue
        else:
            return max(1, len(cpus))
    return max(1, len(siblings))


def parse_hosts(spec):
    """``"a:4,b:2,c"`` -> ``[("a", 4), ("b", 2), ("c", 1)]``."""
    hosts = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, slots = item.partition(":")
        hosts.append((name, _slots(slots or "1", item)))
    if not hosts:
        raise LaunchError(f"-H {spec!r} names no host")
    return hosts


def _slots(text, where):
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"bad slot count in {where!r}: want a positive integer")
    return int(text)


def parse_hostfile(path):
    """Hosts of a hostfile in any format: ``host``, ``host:N`` (Hydra) or ``host slots=N`` (Open MPI).

    Returns:
        ``(hosts, format)``: ``[(host, slots)]``, slots None on a line without a count
        (each implementation has its own default: :func:`count_slots`), and
        ``"openmpi"``, ``"mpich"`` or ``"plain"`` (names only: every implementation reads it).
    """
    hosts, formats = [], set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        m = re.search(r"\bslots\s*=\s*(\S+)", line)
        if m:
            hosts.append((words[0], _slots(m.group(1), line)))
            formats.add("openmpi")
        elif ":" in words[0]:
            name, _, slots = words[0].partition(":")
            hosts.append((name, _slots(slots, line)))
            formats.add("mpich")
        else:
            hosts.append((words[0], None))
    if not hosts:
        raise LaunchError(f"hostfile {path} names no host")
    if len(formats) > 1:
        raise LaunchError(f"hostfile {path} mixes 'host:N' and 'host slots=N' lines")
    return hosts, formats.pop() if formats else "plain"


def hostfile_text(hosts, implementation):
    """A hostfile for ``implementation``: ``host slots=N`` (Open MPI) or ``host:N`` (Hydra); ``host`` for N None."""
    if implementation == "openmpi":
        return "".join(f"{h} slots={n}\n" if n else f"{h}\n" for h, n in hosts)
    return "".join(f"{h}:{n}\n" if n else f"{h}\n" for h, n in hosts)


def _is_this_machine(host):
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.gethostname().split(".")[0]}
    return host in names or host.startswith("localhost.")


def count_slots(hosts, implementation, local_cores, hostfile=False):
    """The slots ``implementation`` gives ``hosts``, as its documentation says.

    1. No hosts: this machine's cores (``local_cores``).
    2. A host with a count (``-H host:N``, ``host:N``, ``host slots=N``): N.
    3. ``-H host`` without ``:N``: 1 (Open MPI and Hydra alike).
    4. A hostfile line without a count: Open MPI gives the node its number of cores
       (``local_cores`` for this machine, unknown for another); Hydra (MPICH, Intel MPI) 1.

    Returns:
        ``(slots, unknown)``: the slots known, and the hosts whose count only Open MPI
        knows (each has at least 1).
    """
    if not hosts:
        return local_cores, []
    slots, unknown = 0, []
    for host, n in hosts:
        if n is not None:
            slots += n
        elif implementation == "openmpi" and hostfile:
            if _is_this_machine(host):
                slots += local_cores
            else:
                unknown.append(host)
        else:
            slots += 1
    return slots, unknown


def rank_log(mpi, log_dir, rank, n_ranks, stream="stdout"):
    """Where ``--log-dir`` puts one rank's ``stdout`` or ``stderr`` under ``mpi``: a path, or a glob pattern.

    Hydra: ``DIR/rank-R.out`` / ``.err``. Open MPI: ``DIR/JOB/rank.R/stdout``, R left-filled
    with zeros to the width of the largest rank; JOB is ``1`` under Open MPI 4 and the
    job's name under 5 (a ``*`` here).
    """
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"stream is stdout or stderr, not {stream!r}")
    if mpi.implementation == "openmpi":
        job = "*" if (mpi.major or 0) >= 5 else "1"
        return f"{log_dir}/{job}/rank.{rank:0{len(str(n_ranks - 1))}d}/{stream}"
    return f"{log_dir}/rank-{rank}.{stream[3:]}"


@dataclass
class Launch:
    """A command to run: ``files`` and ``dirs`` to make first, ``notes`` to tell."""

    argv: list
    files: dict = field(default_factory=dict)  # path -> text
    dirs: list = field(default_factory=list)  # directories to create
    notes: list = field(default_factory=list)

    def shell(self):
        """The command as one shell line."""
        return shlex.join(self.argv)


def program_argv(args, python):
    """The argv that runs ``args`` under MPI: an mpiqsgd subcommand or a script through mpi4py, else as given."""
    if not args:
        raise LaunchError("nothing to launch: give the command after --, e.g. mpiqsgd launch -n 2 -- train ...")
    if args[0] in SUBCOMMANDS:
        return [python, "-m", "mpi4py", "-m", "mpiqsgd", *args]
    if args[0].endswith(".py"):
        return [python, "-m", "mpi4py", *args]
    return list(args)


def build_command(n, program, mpi, hosts=None, hostfile=None, oversubscribe=False, log_dir=None, is_root=None,
                  local_cores=None, python=None, hostfile_out=None, contexts=()):
    """The launch of ``program`` on ``n`` ranks with ``mpi`` (an :class:`MPIInfo`); launches nothing.

    Args:
        n: ranks.
        program: the words after ``--``: an mpiqsgd subcommand (``train ...``), a
            ``.py`` script (both run under ``python -m mpi4py``) or any command.
        mpi: the implementation to build for.
        hosts: ``[(host, slots)]`` from ``-H``, or None.
        hostfile: a hostfile path, or None (not with ``hosts``).
        oversubscribe: allow more ranks than slots (Open MPI gets ``--oversubscribe``
            whenever this is set: the flag only permits, and a count of cores that
            differs from Open MPI's then cannot refuse the job).
        log_dir: per-rank stdout/stderr files in this directory.
        is_root, local_cores: this machine's facts (default: asked from the OS, :func:`cores`).
        python: the interpreter for the ranks (default this one).
        hostfile_out: where a converted hostfile goes (default ``<log_dir or .>/hosts.<implementation>``).
        contexts: further ``(n, program)`` started in the same job (MPMD: ``... : -n 1 b``).

    Raises:
        LaunchError: ranks exceed slots under Open MPI without ``oversubscribe``, bad hosts,
            an unknown implementation.
    """
    for k in (n, *(k for k, _ in contexts)):
        if k < 1:
            raise LaunchError(f"-n must be at least 1; got {k}")
    if hosts and hostfile:
        raise LaunchError("give -H or --hostfile, not both")
    impl = mpi.implementation
    if impl not in IMPLEMENTATIONS:
        raise LaunchError(f"{mpi.path} is neither MPICH, Open MPI nor Intel MPI (its --version said: "
                          f"{mpi.text.strip()[:200]!r}); pass --mpi mpich|openmpi|intel")
    is_root = (os.geteuid() == 0) if is_root is None else is_root
    local_cores = local_cores or cores()
    launch = Launch([mpi.path, "-n", str(n)])
    argv, notes = launch.argv, launch.notes

    file_hosts = None
    if hostfile:
        file_hosts, fmt = parse_hostfile(hostfile)
        wanted = "openmpi" if impl == "openmpi" else "mpich"
        if fmt not in ("plain", wanted):
            target = str(hostfile_out or Path(log_dir or ".") / f"hosts.{impl}")
            launch.files[target] = hostfile_text(file_hosts, impl)
            notes.append(f"{hostfile} is in {fmt} format; {impl} reads {target}, converted")
            hostfile = target
        argv += {"openmpi": ["--hostfile"], "mpich": ["-f"], "intel": ["-machinefile"]}[impl] + [str(hostfile)]
    elif hosts:
        spec = ",".join(f"{h}:{s}" for h, s in hosts)
        if impl == "intel":  # Intel MPI's -hosts takes names only: slots go through a machine file
            target = str(hostfile_out or Path(log_dir or ".") / "hosts.intel")
            launch.files[target] = hostfile_text(hosts, impl)
            argv += ["-machinefile", target]
        else:
            argv += ["-H" if impl == "openmpi" else "-hosts", spec]

    _place(launch, n + sum(k for k, _ in contexts), impl, hosts or file_hosts, file_hosts is not None,
           local_cores, oversubscribe)
    if impl == "openmpi" and is_root:
        argv.append("--allow-run-as-root")
        notes.append("running as root: Open MPI needs --allow-run-as-root (added)")

    if log_dir:
        log_dir = str(log_dir)
        launch.dirs.append(log_dir)
        if impl == "openmpi":
            five = (mpi.major or 0) >= 5
            argv += ["--output", f"dir={log_dir}"] if five else ["--output-filename", log_dir]
            notes.append(f"per-rank output under {log_dir}/{'<job>' if five else '1'}/rank.<r>/stdout and stderr")
        else:
            argv += ["-outfile-pattern", f"{log_dir}/rank-%r.out", "-errfile-pattern", f"{log_dir}/rank-%r.err"]
            notes.append(f"per-rank output in {log_dir}/rank-<r>.out and .err")
    python = python or sys.executable
    argv += program_argv(program, python)
    for k, more in contexts:
        argv += [":", "-n", str(k), *program_argv(more, python)]
    return launch


def _place(launch, n, impl, listed, from_hostfile, local_cores, oversubscribe):
    """Count the slots; refuse, oversubscribe (Open MPI) or warn; and say so."""
    slots, unknown = count_slots(listed, impl, local_cores, from_hostfile)
    if not listed:
        where = f"this machine's {slots} cores"
    else:
        where = f"the {len(listed) - len(unknown)} hosts' {slots} slots" if len(unknown) < len(listed) else ""
        if unknown:
            where += (" and " if where else "") + f"the cores of {', '.join(unknown)} (no slots= in the hostfile)"
    if n <= slots + len(unknown):  # a host has at least one core: these fit
        if impl == "openmpi" and oversubscribe:
            launch.argv.append("--oversubscribe")
        return
    if impl != "openmpi":
        launch.notes.append(f"{n} ranks on {where}: {'MPICH' if impl == 'mpich' else 'Intel MPI'} oversubscribes "
                            "without a flag; ranks share cores and each runs slower")
    elif oversubscribe:
        launch.argv.append("--oversubscribe")
        launch.notes.append(f"{n} ranks on {where}: oversubscribed (--oversubscribe); ranks share cores")
    elif unknown:
        launch.notes.append(f"{n} ranks on {where}: Open MPI refuses ('not enough slots') if those nodes have "
                            "fewer cores; give their lines slots=N or pass --oversubscribe")
    else:
        raise LaunchError(f"{n} ranks exceed {where}: Open MPI refuses to start them ('not enough slots'). "
                          "Pass --oversubscribe (ranks then share cores and each runs slower), or give "
                          "more hosts or slots (-H host:slots,... or --hostfile)")


def job_command(n, argv, mpi=None, contexts=()):
    """``argv`` on ``n`` ranks of this machine (and ``contexts``, MPMD) under ``mpi``, default the one found.

    The launch the tests use: oversubscribed and as root where the implementation needs
    flags for that (Open MPI), ``argv`` run as given (it names its interpreter).
    """
    return build_command(n, list(argv), mpi or mpiexec_info(), oversubscribe=True,
                         contexts=[(k, list(a)) for k, a in contexts])


def add_launch_args(p):
    """Flags of ``mpiqsgd launch``."""
    p.add_argument("-n", "--np", dest="n", type=int, required=True, help="number of ranks")
    p.add_argument("-H", "--hosts", help="hosts and slots: host:slots,host:slots,...")
    p.add_argument("--hostfile", help="hostfile: 'host', 'host:N' or 'host slots=N' lines")
    p.add_argument("--oversubscribe", action="store_true", help="allow more ranks than slots (Open MPI)")
    p.add_argument("--log-dir", help="write each rank's stdout and stderr to files in this directory")
    p.add_argument("--dry-run", action="store_true", help="print the command (and hostfile) without running it")
    p.add_argument("--mpiexec", help="the mpiexec to use (default: beside this Python, else on PATH)")
    p.add_argument("--mpi", choices=IMPLEMENTATIONS, help="implementation, when --version does not tell")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- then an mpiqsgd command (train ...) or a program")


def run_launch(args):
    """``mpiqsgd launch``: build the command, tell what was decided, run it (or not, with ``--dry-run``)."""
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if args.mpi:
        mpi = MPIInfo(args.mpiexec or find_mpiexec() or "mpiexec", args.mpi, "")
    else:
        mpi = mpiexec_info(args.mpiexec)
    hosts = parse_hosts(args.hosts) if args.hosts else None
    launch = build_command(args.n, program, mpi, hosts, args.hostfile, args.oversubscribe, args.log_dir)
    found = (f"mpiexec is {mpi.path}, taken as {mpi.implementation} (--mpi)" if args.mpi
             else f"mpiexec is {mpi.implementation} {mpi.version} ({mpi.path})")
    for note in [found, *launch.notes]:
        print(f"mpiqsgd launch: {note}", file=sys.stderr)
    for path, text in launch.files.items():
        print(f"mpiqsgd launch: hostfile {path}:\n" + "".join(f"  {line}\n" for line in text.splitlines()),
              file=sys.stderr, end="")
    print(launch.shell(), flush=True)
    if args.dry_run:
        return 0
    for d in launch.dirs:
        Path(d).mkdir(parents=True, exist_ok=True)
    for path, text in launch.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return subprocess.run(launch.argv).returncode
