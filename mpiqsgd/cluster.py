"""``mpiqsgd cluster``: an emulated switched cluster of N nodes on one Linux machine (root).

What is built (:meth:`Cluster.create`), for a cluster named NAME:

1. A switch: network namespace ``NAME-switch`` holding a bridge ``br0``.
2. Per node ``i`` (hostname ``node<i>``): a namespace ``NAME-node<i>`` and a veth pair, ``eth0``
   inside the node and port ``node<i>`` on the bridge, both ends created in place (no
   interface ever appears in the root namespace). ``eth0`` gets the subnet's host ``i + 1``
   (default ``10.77.0.<i+1>/24``) and no route out of the subnet.
3. The node's NIC: ``tc tbf`` at RATE on both ends of its link, the egress of ``eth0`` (the
   node's upload) and the egress of its switch port (its download). Each direction has its own
   bucket: a full-duplex link. Burst: 2 ms at RATE, at least 64 KiB (256 KiB at 1 Gbit/s is
   what ``scripts/shaped_link.sh`` used); queue latency 50 ms.
4. A head: namespace ``NAME-head`` (hostname ``head``) on the bridge with the subnet's last
   host, unshaped. ``mpiexec`` runs there; only Hydra's control traffic crosses its port.
5. Hostnames: every process that enters a namespace (:func:`enter_main`) gets a UTS namespace
   of its own with the node's hostname, so ``MPI.Get_processor_name()`` differs per node.

The root namespace receives nothing but the namespaces' names under ``/run/netns`` and the
state directory ``/run/mpiqsgd/cluster/NAME`` (``state.json``, ``hosts``, ``enter``).

A job (:meth:`Cluster.run`): Hydra's ``mpiexec -n N*K -f hosts -iface eth0 -launcher ssh
-launcher-exec enter`` started in the head. ``hosts`` lists ``node<i>:K``; Hydra calls
``enter`` like ssh (``enter -x node1 'proxy command'``) and ``enter`` runs the proxy in
node1's namespaces; ``-iface eth0`` makes the proxies dial mpiexec at the head's address (no
name resolution anywhere). MPICH is forced onto libfabric's TCP over ``eth0``
(``MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=eth0``); ranks of one node use
shared memory, as on a real cluster. ``MASTER_ADDR`` (node0's address), ``MASTER_PORT`` and
``GLOO_SOCKET_IFNAME=eth0`` are set for torch.distributed jobs. A per-node job
(:meth:`Cluster.run_per_node`) starts the command K times in each node without MPI, with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MPIQSGD_NODE_INDEX`` and the same addresses.

Removal (:meth:`Cluster.destroy`): the processes still in the cluster's namespaces are
stopped (SIGTERM, then SIGKILL), the namespaces deleted (their veths and the bridge go with
them), the state directory removed. Only names this cluster created are touched.

Not emulated: propagation delay (this kernel has no netem), separate CPUs (all nodes share
the machine's cores), NIC offloads and switch buffers beyond tbf's queue.

Nothing here imports MPI.
"""

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MpiqsgdError

__all__ = ["ClusterError", "Spec", "Cluster", "parse_rate", "parse_bytes", "parse_seconds", "default_burst_bytes",
           "preflight", "setup_commands", "parse_enter_args", "hostfile_text", "mpiexec_argv", "job_env", "enter_main",
           "add_cluster_args", "run_cluster", "netns_list", "removed_on_signals"]

STATE_ROOT = Path("/run/mpiqsgd/cluster")
IFACE = "eth0"  # the node's (and the head's) interface, inside its namespace
MASTER_PORT = 29500  # torch.distributed's usual rendezvous port
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
CLONE_NEWUTS, CLONE_NEWNET = 0x04000000, 0x40000000

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40}
_BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


class ClusterError(MpiqsgdError):
    """A cluster that cannot be built, found or used as asked (and what to do)."""


def parse_rate(text):
    """Bits per second of a tc-style rate: ``1gbit``, ``100mbit``, ``2.5gbit``, ``500kbit``, ``1000000``.

    Raises:
        ClusterError: not a positive rate in bits, or a bytes-per-second unit (``mbps``: tc reads
            it as megabytes per second, which is rarely what is meant).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", str(text).lower())
    if m and m.group(2).endswith("bps"):
        raise ClusterError(f"rate {text!r}: tc reads '{m.group(2)}' as bytes per second; write the rate in bits, "
                           f"e.g. 1gbit or 100mbit")
    if not m or m.group(2) not in _RATE_UNITS and m.group(2) != "":
        raise ClusterError(f"rate {text!r}: want a number of bits per second with a unit "
                           f"({', '.join(_RATE_UNITS)}), e.g. 1gbit")
    bps = float(m.group(1)) * _RATE_UNITS.get(m.group(2), 1)
    if not 1e3 <= bps <= 1e12:
        raise ClusterError(f"rate {text!r}: want 1kbit .. 1tbit")
    return int(bps)


def parse_bytes(text):
    """Bytes of a tc-style size: ``256kb`` (KiB, as tc reads it), ``64k``, ``1mb``, ``1500b``, ``1500``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _BYTE_UNITS or float(m.group(1)) <= 0:
        raise ClusterError(f"size {text!r}: want a positive number of bytes, e.g. 256kb, 64k, 1mb or 1500b")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2)])


def parse_seconds(text):
    """Seconds of ``50ms``, ``0.05s``, ``500us``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(s|ms|us)\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise ClusterError(f"time {text!r}: want a positive time with a unit, e.g. 50ms")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def default_burst_bytes(rate_bps):
    """tbf's bucket: 2 ms at the rate, at least 64 KiB (one GSO segment train; tbf needs burst >= rate/HZ)."""
    return max(rate_bps // 8 // 500, 64 * 1024)


@dataclass(frozen=True)
class Spec:
    """One cluster's shape and names; everything else is derived from it."""

    name: str  # prefix of every namespace: NAME-switch, NAME-head, NAME-node<i>
    n_nodes: int
    rate_bps: int
    ranks_per_node: int = 1
    burst_bytes: int = 0  # 0: default_burst_bytes(rate_bps)
    latency_seconds: float = 0.05  # tbf's queue: at most this long a wait, then drops
    subnet: str = "10.77.0.0/24"  # private, configured only inside the namespaces

    def __post_init__(self):
        if not NAME_RE.fullmatch(self.name):
            raise ClusterError(f"cluster name {self.name!r}: want 1-40 letters, digits, '_', '.', '-' "
                               "(starting with a letter or digit)")
        if self.n_nodes < 1 or self.ranks_per_node < 1:
            raise ClusterError(f"need at least 1 node and 1 rank per node; got {self.n_nodes} nodes, "
                               f"{self.ranks_per_node} ranks per node")
        try:
            net = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise ClusterError(f"--subnet {self.subnet!r}: {exc}") from None
        if net.version != 4 or not net.is_private:
            raise ClusterError(f"--subnet {self.subnet}: want a private IPv4 subnet, e.g. 10.77.0.0/24")
        if net.num_addresses - 2 < self.n_nodes + 1:
            raise ClusterError(f"--subnet {self.subnet} holds {max(net.num_addresses - 2, 0)} hosts; "
                               f"{self.n_nodes} nodes and the head need {self.n_nodes + 1}")
        if not self.burst_bytes:
            object.__setattr__(self, "burst_bytes", default_burst_bytes(self.rate_bps))

    # -- names and addresses
    @property
    def nodes(self):
        """Hostnames of the nodes, in hostfile (rank) order."""
        return [f"node{i}" for i in range(self.n_nodes)]

    def netns(self, host):
        """The namespace of ``host`` (a node, ``head`` or ``switch``)."""
        return f"{self.name}-{host}"

    @property
    def namespaces(self):
        """Every namespace, in creation order."""
        return [self.netns(h) for h in ("switch", "head", *self.nodes)]

    def address(self, host):
        """``host``'s address (no prefix length): node i has host i + 1, the head the last one."""
        hosts = ipaddress.ip_network(self.subnet).hosts()
        index = -1 if host == "head" else int(host.removeprefix("node"))
        return str(list(hosts)[index])

    @property
    def prefixlen(self):
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def state_dir(self):
        return STATE_ROOT / self.name

    @property
    def n_ranks(self):
        return self.n_nodes * self.ranks_per_node


def preflight(is_root=None, which=shutil.which, sys_module=Path("/sys/module"), modprobe=None):
    """Refuse early, saying why, where this machine cannot build a cluster; returns ``(ip, tc)`` paths.

    Bridge support is checked by ``/sys/module/bridge`` only where that exists; else the
    bridge's creation is the test (:meth:`Cluster.create` says so when it fails).
    """
    is_root = os.geteuid() == 0 if is_root is None else is_root
    if not is_root:
        raise ClusterError("the emulated cluster needs root (network namespaces, veth pairs, tc): "
                           "run it as root, e.g. sudo -E env PATH=$PATH python -m mpiqsgd cluster ...")
    tools = {t: which(t) for t in ("ip", "tc")}
    missing = [t for t, p in tools.items() if p is None]
    if missing:
        raise ClusterError(f"no {' or '.join(repr(t) for t in missing)} on PATH: install iproute2 "
                           "(apt-get install iproute2)")
    if sys_module.exists() and not (sys_module / "bridge").exists() and not (modprobe or _modprobe)("bridge"):
        raise ClusterError("the kernel has no bridge support (no /sys/module/bridge and modprobe bridge failed): "
                           "load it (modprobe bridge) or use a kernel with CONFIG_BRIDGE")
    return tools["ip"], tools["tc"]


def _modprobe(module):
    try:
        return subprocess.run(["modprobe", module], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def setup_commands(spec, ip="ip", tc="tc"):
    """The commands that build ``spec``'s network, in order (run in the root namespace).

    Returns:
        ``[(what, argv)]``: ``what`` names the step for an error message.
    """
    sw = spec.netns("switch")
    cmds = [(f"namespace {ns}", [ip, "netns", "add", ns]) for ns in spec.namespaces]
    cmds += [("the bridge", [ip, "-n", sw, "link", "add", "br0", "type", "bridge"]),
             ("the bridge", [ip, "-n", sw, "link", "set", "br0", "up"])]
    shape = ["tbf", "rate", f"{spec.rate_bps}bit", "burst", f"{spec.burst_bytes}b",
             "latency", f"{spec.latency_seconds * 1e3:g}ms"]
    for host in ("head", *spec.nodes):
        ns = spec.netns(host)
        cmds += [(f"{host}'s link", [ip, "-n", sw, "link", "add", host, "type", "veth", "peer", "name", IFACE,
                                     "netns", ns]),
                 (f"{host}'s link", [ip, "-n", sw, "link", "set", host, "master", "br0", "up"]),
                 (f"{host}'s link", [ip, "-n", ns, "link", "set", "lo", "up"]),
                 (f"{host}'s link", [ip, "-n", ns, "link", "set", IFACE, "up"]),
                 (f"{host}'s address", [ip, "-n", ns, "addr", "add", f"{spec.address(host)}/{spec.prefixlen}",
                                        "dev", IFACE])]
        if host != "head":
            cmds += [(f"{host}'s upload shaping", [tc, "-n", ns, "qdisc", "add", "dev", IFACE, "root", *shape]),
                     (f"{host}'s download shaping", [tc, "-n", sw, "qdisc", "add", "dev", host, "root", *shape])]
    return cmds


def hostfile_text(spec):
    """Hydra's hostfile: ``node<i>:<ranks per node>`` per line, in rank order."""
    return "".join(f"{h}:{spec.ranks_per_node}\n" for h in spec.nodes)


def mpiexec_argv(spec, mpiexec, program):
    """``mpiexec`` as started in the head for ``program`` (a list of words)."""
    d = spec.state_dir
    return [mpiexec, "-n", str(spec.n_ranks), "-f", str(d / "hosts"), "-iface", IFACE,
            "-launcher", "ssh", "-launcher-exec", str(d / "enter"), *program]


def job_env(spec, base=None):
    """The environment of a job on ``spec``: MPICH on TCP over eth0, torch.distributed's rendezvous."""
    env = dict(os.environ if base is None else base)
    env.update(MPIR_CVAR_CH4_NETMOD="ofi", FI_PROVIDER="tcp", FI_TCP_IFACE=IFACE, GLOO_SOCKET_IFNAME=IFACE,
               MASTER_ADDR=spec.address("node0"), MPIQSGD_CLUSTER=spec.name, MPIQSGD_N_NODES=str(spec.n_nodes))
    env.setdefault("MASTER_PORT", str(MASTER_PORT))
    env.pop("MPIQSGD_NODE_INDEX", None)  # set per node by enter_main
    return env


def _enter_script(spec):
    """The launcher Hydra calls like ssh: a Python script that finds this very package."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    return (f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {package_parent!r})\n"
            "from mpiqsgd.cluster import enter_main\n"
            f"enter_main({str(spec.state_dir)!r}, sys.argv[1:])\n")


class Cluster:
    """A built (or to be built) cluster; a context manager that always removes what it created.

    Example:
        with Cluster(Spec("mpiqsgd-1", n_nodes=2, rate_bps=10**9)) as c:
            c.run(["python", "-m", "mpi4py", "-m", "mpiqsgd", "bench", "exchange", "--numel", "1000000"])
    """

    def __init__(self, spec, mpiexec=None):
        self.spec = spec
        self.mpiexec = mpiexec
        self.created = []  # namespaces this object created or claimed (only these are deleted)
        self.made_state_dir = False

    # -- life cycle
    def create(self, owner_pid=None):
        """Build the network (see the module docstring); on any failure remove what was built and raise.

        Args:
            owner_pid: the process that removes the cluster when it ends (``run``); None: it
                stays until ``down`` (``up``).
        """
        spec = self.spec
        ip, tc = preflight()
        taken = sorted(set(spec.namespaces) & set(netns_list(ip)))
        if taken or spec.state_dir.exists():
            raise ClusterError(f"cluster {spec.name!r} exists already ({', '.join(taken) or spec.state_dir}): "
                               f"remove it with `python -m mpiqsgd cluster down --name {spec.name}` or choose "
                               "another --name")
        # None of these names existed a moment ago and they carry this cluster's name: claim
        # them all now, so that an interrupt between creating one and noting it cannot leak it.
        self.created = list(spec.namespaces)
        try:
            spec.state_dir.mkdir(parents=True)
            self.made_state_dir = True
            self._write_state(pid=owner_pid)
            for what, argv in setup_commands(spec, ip, tc):
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    raise ClusterError(f"could not build {what}: `{shlex.join(argv)}` said: "
                                       f"{proc.stderr.strip()}{_hint(what, proc.stderr)}")
            (spec.state_dir / "hosts").write_text(hostfile_text(spec))
            enter = spec.state_dir / "enter"
            enter.write_text(_enter_script(spec))
            enter.chmod(0o755)
        except BaseException:
            self.destroy()
            raise
        return self

    def _write_state(self, **extra):
        state = dict(asdict(self.spec), namespaces=self.spec.namespaces, **extra)
        state["addresses"] = {h: self.spec.address(h) for h in ("head", *self.spec.nodes)}
        (self.spec.state_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def attach(cls, name, mpiexec=None):
        """The cluster ``name`` built earlier by ``cluster up`` (its state file)."""
        path = STATE_ROOT / name / "state.json"
        if not path.exists():
            raise ClusterError(f"no cluster {name!r} (no {path}); build one with `python -m mpiqsgd cluster up "
                               f"--name {name} --nodes N --rate RATE`")
        state = json.loads(path.read_text())
        fields = {k: state[k] for k in ("name", "n_nodes", "rate_bps", "ranks_per_node", "burst_bytes",
                                        "latency_seconds", "subnet")}
        cluster = cls(Spec(**fields), mpiexec)
        cluster.created = list(state["namespaces"])
        cluster.made_state_dir = True
        return cluster

    def destroy(self):
        """Stop the processes left in this cluster's namespaces, delete them and the state directory.

        Signals are ignored meanwhile so that a second Ctrl-C cannot leave half a cluster.
        """
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            ip = shutil.which("ip") or "ip"
            existing = set(netns_list(ip))
            mine = [ns for ns in self.created if ns in existing]
            for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
                pids = [p for ns in mine for p in _netns_pids(ip, ns)]
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + wait * bool(pids)
                while time.monotonic() < deadline and any(_netns_pids(ip, ns) for ns in mine):
                    time.sleep(0.05)
            for ns in reversed(mine):
                subprocess.run([ip, "netns", "del", ns], capture_output=True, timeout=30)
            self.created = [ns for ns in self.created if ns in set(netns_list(ip))]
            if self.made_state_dir and not self.created:
                shutil.rmtree(self.spec.state_dir, ignore_errors=True)
                self.made_state_dir = False
            if self.created:
                raise ClusterError(f"could not delete {', '.join(self.created)}: try `ip netns del NAME`")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def __enter__(self):
        return self.create(os.getpid())

    def __exit__(self, *exc):
        self.destroy()

    # -- jobs
    def run(self, program, timeout=None, env=None, stdout=None):
        """Run ``program`` (words) under Hydra's mpiexec from the head; returns its exit status.

        ``stdout``: a file the job's output and errors go to (default: this process's).
        """
        self.mpiexec = self.mpiexec or hydra_mpiexec()
        argv = [str(self.spec.state_dir / "enter"), "--exec", "head", *mpiexec_argv(self.spec, self.mpiexec, program)]
        err = None if stdout is None else subprocess.STDOUT
        return _wait([subprocess.Popen(argv, env=job_env(self.spec, env), stdout=stdout, stderr=err)], timeout)

    def run_per_node(self, program, timeout=None, env=None):
        """Start ``program`` ranks_per_node times in every node (no MPI); returns the first nonzero status seen
        (the lowest rank's among those that failed by the same poll), or 0.

        Each copy gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
        ``MPIQSGD_NODE_INDEX`` and the rendezvous of :func:`job_env`. When one copy fails,
        the others are stopped.
        """
        spec, base = self.spec, job_env(self.spec, env)
        procs = []
        try:
            for i, host in enumerate(spec.nodes):
                for local in range(spec.ranks_per_node):
                    rank = i * spec.ranks_per_node + local
                    e = dict(base, RANK=str(rank), WORLD_SIZE=str(spec.n_ranks), LOCAL_RANK=str(local),
                             LOCAL_WORLD_SIZE=str(spec.ranks_per_node))
                    procs.append(subprocess.Popen([str(spec.state_dir / "enter"), "--exec", host, *program], env=e))
        except BaseException:
            _stop(procs)
            raise
        return _wait(procs, timeout)


def hydra_mpiexec(path=None):
    """The path of MPICH's (Hydra's) ``mpiexec``: the cluster launches through its ``-launcher-exec``."""
    from .launch import mpiexec_info

    mpi = mpiexec_info(path)
    if mpi.implementation != "mpich":
        raise ClusterError(f"{mpi.path} is {mpi.implementation}, not MPICH: the cluster launches through Hydra's "
                           "-launcher-exec (pip install mpich)")
    return mpi.path


def _wait(procs, timeout):
    """Wait for all of ``procs``; stop the rest when one fails, on a timeout or an interrupt."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c is not None for c in codes):
                _stop(procs)
                return failed[0] if failed else 0
            if deadline is not None and time.monotonic() > deadline:
                _stop(procs)
                print(f"mpiqsgd cluster: the job ran past --timeout {timeout:g} s; stopped", file=sys.stderr)
                return 124
            time.sleep(0.05)
    except BaseException:
        _stop(procs)
        raise


def _stop(procs, grace=3.0):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _hint(what, stderr):
    if what == "the bridge":
        return " (the kernel needs bridge support: modprobe bridge)"
    if "shaping" in what:
        return " (the kernel needs the tbf qdisc: modprobe sch_tbf)"
    if "link" in what and "veth" in stderr.lower():
        return " (the kernel needs veth: modprobe veth)"
    return ""


def netns_list(ip):
    proc = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ClusterError(f"`ip netns list` failed: {proc.stderr.strip()} (this system needs network namespaces)")
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _netns_pids(ip, ns):
    proc = subprocess.run([ip, "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]


# -- the launcher: runs inside mpiexec's children, Hydra calls it like ssh ------------------------

def _setns(path, nstype):
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, nstype)
        elif _libc().setns(fd, nstype) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def _unshare(flags):
    if hasattr(os, "unshare"):
        os.unshare(flags)
    elif _libc().unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def parse_enter_args(argv):
    """``(host, argv to exec)`` of the launcher's arguments (see :func:`enter_main`)."""
    direct = argv[:1] == ["--exec"]
    args = list(argv[1:] if direct else argv)
    while not direct and args and args[0].startswith("-"):  # ssh options Hydra adds (-x: no X forwarding)
        args = args[1:]
    if len(args) < 2:
        raise ClusterError(f"usage: enter [--exec] HOST COMMAND...; got {argv}")
    host, words = args[0], args[1:]
    return host, words if direct else ["/bin/sh", "-c", " ".join(words)]


def enter_main(state_dir, argv):
    """Run a command inside a host of the cluster at ``state_dir``; never returns.

    ``enter [-x ...] HOST WORD...`` (how Hydra calls ssh): the words are joined with spaces
    and run by ``sh -c``, as ssh's remote shell would. ``enter --exec HOST ARGV...``: ARGV
    is executed as is. HOST is ``head`` or ``node<i>``: the process moves into that
    namespace, into a new UTS namespace named HOST, and (on a node) gets
    ``MPIQSGD_NODE_INDEX``.
    """
    state = json.loads((Path(state_dir) / "state.json").read_text())
    try:
        host, command = parse_enter_args(argv)
    except ClusterError as exc:
        sys.exit(f"mpiqsgd cluster enter: {exc}")
    hosts = {"head": -1, **{f"node{i}": i for i in range(state["n_nodes"])}}
    if host not in hosts:
        sys.exit(f"mpiqsgd cluster enter: no host {host!r} in cluster {state['name']} (hosts: {', '.join(hosts)})")
    _setns(f"/run/netns/{state['name']}-{host}", CLONE_NEWNET)
    _unshare(CLONE_NEWUTS)
    socket.sethostname(host)
    if hosts[host] >= 0:
        os.environ["MPIQSGD_NODE_INDEX"] = str(hosts[host])
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.exit(f"mpiqsgd cluster enter: cannot run {command[0]!r} on {host}: {exc}")


# -- the command line ----------------------------------------------------------------------------

def add_cluster_args(p):
    """Subcommands of ``mpiqsgd cluster``: run, up, down, list."""
    sub = p.add_subparsers(dest="cluster_command", required=True)

    def shape_args(q, required):
        q.add_argument("--nodes", type=int, required=required, help="number of nodes")
        q.add_argument("--rate", required=required, help="each node's link rate in each direction, tc style "
                                                         "(1gbit, 100mbit, 10gbit)")
        q.add_argument("--ranks-per-node", type=int, help="MPI ranks (or per-node copies) per node (default 1)")
        q.add_argument("--burst", help="tbf bucket, tc style (256kb, 1mb; default 2 ms at the rate, >= 64kb)")
        q.add_argument("--latency", help="tbf queue latency (default 50ms)")
        q.add_argument("--subnet", help=f"private IPv4 subnet inside the cluster "
                                                              f"(default {Spec.subnet})")

    r = sub.add_parser("run", help="build a cluster, run a command on it, remove it (or run on one built by up)")
    shape_args(r, required=False)
    r.add_argument("--name", help="with --nodes: the new cluster's name; without: the name of the cluster `up` "
                                  "built, to run on (default mpiqsgd-<pid> with --nodes, else mpiqsgd)")
    r.add_argument("--per-node", action="store_true",
                   help="start the command in every node without mpiexec (RANK, WORLD_SIZE, MASTER_ADDR ... set)")
    r.add_argument("--timeout", type=float, help="stop the job after this many seconds (exit status 124)")
    r.add_argument("program", nargs=argparse.REMAINDER, help="-- then the command (an mpiqsgd subcommand such as "
                                                             "`bench exchange ...` runs under python -m mpi4py)")
    u = sub.add_parser("up", help="build a cluster that stays until `down`")
    shape_args(u, required=True)
    u.add_argument("--name", default="mpiqsgd", help="its name, the prefix of its namespaces (default mpiqsgd)")
    d = sub.add_parser("down", help="remove a cluster built by `up` (or left by a killed `run`)")
    d.add_argument("--name", default="mpiqsgd", help="its name (default mpiqsgd)")
    sub.add_parser("list", help="clusters with a state directory under /run/mpiqsgd/cluster")


def spec_from_args(args, name):
    rate = parse_rate(args.rate)
    return Spec(name=name, n_nodes=args.nodes, rate_bps=rate, ranks_per_node=args.ranks_per_node or 1,
                burst_bytes=parse_bytes(args.burst) if args.burst else 0,
                latency_seconds=parse_seconds(args.latency or "50ms"), subnet=args.subnet or Spec.subnet)


def describe(spec):
    return (f"cluster {spec.name}: {spec.n_nodes} nodes x {spec.ranks_per_node} rank(s), {spec.rate_bps / 1e9:g} "
            f"Gbit/s per node and direction (tbf burst {spec.burst_bytes} B, latency "
            f"{spec.latency_seconds * 1e3:g} ms), subnet {spec.subnet}")


def _program(args):
    from .launch import program_argv

    words = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not words:
        raise ClusterError("nothing to run: give the command after --, e.g. "
                           "mpiqsgd cluster run --nodes 2 --rate 1gbit -- bench exchange --numel 1000000")
    return words if args.per_node else program_argv(words, sys.executable)


class _Stopped(BaseException):
    """SIGTERM or SIGHUP while a cluster exists: unwind through its removal, then exit 128 + signal."""


def _raise_on_signal(signum, frame):
    raise _Stopped(signum)


@contextlib.contextmanager
def removed_on_signals(name):
    """Turn SIGTERM and SIGHUP into an exception (and Ctrl-C into exit 130) while a cluster is built or used."""
    handlers = {s: signal.signal(s, _raise_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except KeyboardInterrupt:
        print(f"mpiqsgd cluster: interrupted; removed {name}", file=sys.stderr)
        raise SystemExit(130) from None
    except _Stopped as stop:
        print(f"mpiqsgd cluster: stopped by {signal.Signals(stop.args[0]).name}; removed {name}", file=sys.stderr)
        raise SystemExit(128 + stop.args[0]) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def run_cluster(args):
    """``mpiqsgd cluster ...``."""
    c = args.cluster_command
    if c == "list":
        for state in sorted(STATE_ROOT.glob("*/state.json")) if STATE_ROOT.exists() else []:
            s = json.loads(state.read_text())
            pid = s.get("pid")
            alive = "" if pid is None else (f", run by pid {pid}" if _alive(pid) else f", left by dead pid {pid}")
            print(f"{s['name']}: {s['n_nodes']} nodes x {s['ranks_per_node']}, {s['rate_bps'] / 1e9:g} Gbit/s{alive}")
        return 0
    if c == "down":
        Cluster.attach(args.name).destroy()
        print(f"mpiqsgd cluster: removed {args.name}", file=sys.stderr)
        return 0
    if c == "up":
        cluster = Cluster(spec_from_args(args, args.name))
        with removed_on_signals(args.name):
            cluster.create(owner_pid=None)
        print(f"mpiqsgd {describe(cluster.spec)}; up. Run with `python -m mpiqsgd cluster run --name "
              f"{args.name} -- CMD`, remove with `python -m mpiqsgd cluster down --name {args.name}`",
              file=sys.stderr)
        return 0
    program = _program(args)
    mpiexec = None if args.per_node else hydra_mpiexec()
    if args.nodes is None:
        given = [f"--{k.replace('_', '-')}" for k in ("rate", "ranks_per_node", "burst", "latency", "subnet")
                 if getattr(args, k) is not None]
        if given:
            raise ClusterError(f"{', '.join(given)} without --nodes: give --nodes and --rate to build a cluster, "
                               "no shape flags to use the one `up` built")
        cluster = Cluster.attach(args.name or "mpiqsgd", mpiexec)
        job = cluster.run_per_node if args.per_node else cluster.run
        return job(program, args.timeout)
    if args.rate is None:
        raise ClusterError("--nodes needs --rate (e.g. --rate 1gbit)")
    spec = spec_from_args(args, args.name or f"mpiqsgd-{os.getpid()}")
    print(f"mpiqsgd {describe(spec)}", file=sys.stderr, flush=True)
    with removed_on_signals(spec.name), Cluster(spec, mpiexec) as cluster:
        job = cluster.run_per_node if args.per_node else cluster.run
        return job(program, args.timeout)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
