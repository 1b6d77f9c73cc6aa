"""mpiqsgd launch: implementation detection, the exact commands built (nothing launched), one real launch."""

import glob
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, check_site_mpi, launches_jobs
from mpiqsgd.cli import main
from mpiqsgd.launch import (LaunchError, MPIInfo, build_command, cores, count_slots, detect, hostfile_text,
                            job_command, parse_hostfile, parse_hosts, rank_log)

VERSIONS = {
    "mpich": ("HYDRA build details:\n    Version:                                 4.1.2\n"
              "    Release Date:                            Wed Jun  7 15:22:45 CDT 2023\n", "4.1.2"),
    "openmpi4": ("mpiexec (OpenRTE) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/\n", "4.1.5"),
    "openmpi5": ("mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n", "5.0.3"),
    "intel": ("Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619 (id: c2e19c2f3e)\n"
              "Copyright 2003-2023, Intel Corporation.\n", "2021.10"),
}
PY = "/py/bin/python"
TRAIN = ["train", "--model", "tiny"]
RUN = f"{PY} -m mpi4py -m mpiqsgd train --model tiny"


def mpi(kind):
    impl, version = detect(VERSIONS[kind][0])
    return MPIInfo("mpiexec", impl, version)


def cmd(kind, n=2, program=TRAIN, root=False, cores=8, **kw):
    launch = build_command(n, program, mpi(kind), is_root=root, local_cores=cores, python=PY, **kw)
    return launch.shell(), launch


@pytest.mark.parametrize("kind,impl", [("mpich", "mpich"), ("openmpi4", "openmpi"), ("openmpi5", "openmpi"),
                                       ("intel", "intel")])
def test_detect(kind, impl):
    assert detect(VERSIONS[kind][0]) == (impl, VERSIONS[kind][1])
    assert detect("bash: mpiexec: command not found") == ("unknown", "")


def test_local_commands():
    for kind in VERSIONS:
        assert cmd(kind)[0] == f"mpiexec -n 2 {RUN}"
    assert cmd("mpich", program=["script.py", "-v"])[0] == f"mpiexec -n 2 {PY} -m mpi4py script.py -v"
    assert cmd("mpich", program=["hostname"])[0] == "mpiexec -n 2 hostname"


def test_open_mpi_as_root():
    line, launch = cmd("openmpi5", root=True)
    assert line == f"mpiexec -n 2 --allow-run-as-root {RUN}"
    assert "--allow-run-as-root" in launch.notes[0]
    assert cmd("mpich", root=True)[0] == f"mpiexec -n 2 {RUN}"


def test_more_ranks_than_slots():
    with pytest.raises(LaunchError, match=r"4 ranks exceed this machine's 2 cores.*not enough slots.*--oversubscribe"):
        cmd("openmpi4", n=4, cores=2)
    line, launch = cmd("openmpi4", n=4, cores=2, oversubscribe=True)
    assert line == f"mpiexec -n 4 --oversubscribe {RUN}"
    line, launch = cmd("mpich", n=4, cores=2)
    assert line == f"mpiexec -n 4 {RUN}"
    assert launch.notes == ["4 ranks on this machine's 2 cores: MPICH oversubscribes without a flag; "
                            "ranks share cores and each runs slower"]
    with pytest.raises(LaunchError, match="3 ranks exceed the 2 hosts' 2 slots"):
        cmd("openmpi5", n=3, hosts=[("a", 1), ("b", 1)])


def test_open_mpi_oversubscribe_flag_whenever_asked():
    # the flag only permits: a count of cores that differs from Open MPI's cannot refuse the job
    assert cmd("openmpi4", n=2, cores=8, oversubscribe=True)[0] == f"mpiexec -n 2 --oversubscribe {RUN}"
    assert cmd("mpich", n=2, cores=8, oversubscribe=True)[0] == f"mpiexec -n 2 {RUN}"


def test_slots_counted_as_each_implementation_documents(tmp_path):
    here = socket.gethostname()
    bare = tmp_path / "bare.hosts"
    bare.write_text(f"# comment\nlocalhost\n{here}  # this machine too\nnode01\n")
    hosts, fmt = parse_hostfile(bare)
    assert (hosts, fmt) == ([("localhost", None), (here, None), ("node01", None)], "plain")
    # Open MPI: a bare hostfile line is that node's cores (known here for this machine only)
    assert count_slots(hosts, "openmpi", 6, hostfile=True) == (12, ["node01"])
    # Hydra (MPICH, Intel MPI): 1 per bare line
    assert count_slots(hosts, "mpich", 6, hostfile=True) == (3, [])
    assert count_slots(hosts, "intel", 6, hostfile=True) == (3, [])
    # -H host without :N is 1 slot everywhere; counts are counts; no hosts: the cores
    assert count_slots(parse_hosts("a,b:3"), "openmpi", 6) == (4, [])
    assert count_slots([("a", 2), ("b", None)], "openmpi", 6, hostfile=True) == (2, ["b"])
    assert count_slots(None, "openmpi", 6) == (6, [])
    ompi_file = tmp_path / "o.hosts"
    ompi_file.write_text("a slots=2\nb slots = 3\n")
    assert parse_hostfile(ompi_file) == ([("a", 2), ("b", 3)], "openmpi")


def test_bare_hostfile_lines_under_open_mpi_and_mpich(tmp_path):
    remote, local = tmp_path / "remote.hosts", tmp_path / "local.hosts"
    remote.write_text("node01\nnode02\n")
    local.write_text("localhost\n")
    # Open MPI gives node01 and node02 their cores: 8 ranks may fit, so no refusal, a note
    line, launch = cmd("openmpi4", n=8, hostfile=remote)
    assert line == f"mpiexec -n 8 --hostfile {remote} {RUN}"
    assert launch.notes == ["8 ranks on the cores of node01, node02 (no slots= in the hostfile): Open MPI refuses "
                            "('not enough slots') if those nodes have fewer cores; give their lines slots=N or "
                            "pass --oversubscribe"]
    assert cmd("openmpi4", n=2, hostfile=remote)[1].notes == []  # a node has at least one core
    line, launch = cmd("openmpi5", n=8, hostfile=remote, oversubscribe=True)
    assert line == f"mpiexec -n 8 --hostfile {remote} --oversubscribe {RUN}"
    # this machine's bare line: its cores, as Open MPI counts them
    assert cmd("openmpi4", n=4, cores=4, hostfile=local)[0] == f"mpiexec -n 4 --hostfile {local} {RUN}"
    with pytest.raises(LaunchError, match=r"5 ranks exceed the 1 hosts' 4 slots.*not enough slots"):
        cmd("openmpi4", n=5, cores=4, hostfile=local)
    # Hydra: 1 slot per bare line, oversubscribed without a flag
    line, launch = cmd("mpich", n=3, hostfile=remote)
    assert line == f"mpiexec -n 3 -f {remote} {RUN}"
    assert launch.notes == ["3 ranks on the 2 hosts' 2 slots: MPICH oversubscribes without a flag; ranks share "
                            "cores and each runs slower"]


def test_cores_count_hardware_threads_of_a_core_once(tmp_path):
    def cpu(i, siblings, name="core_cpus_list"):
        (tmp_path / f"cpu{i}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{i}" / "topology" / name).write_text(siblings + "\n")

    for i, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):  # 2 cores, 2 hardware threads each
        cpu(i, siblings)
    assert cores([0, 1, 2, 3], tmp_path) == 2
    assert cores([0, 2], tmp_path) == 1  # only one core allowed to this process
    cpu(4, "4", name="thread_siblings_list")  # older kernels
    assert cores([0, 1, 4], tmp_path) == 3
    assert cores([0, 9], tmp_path) == 2  # no topology for cpu9: count CPUs
    assert 1 <= cores() <= os.cpu_count()


def test_mpmd_contexts_and_the_tests_job_command():
    line, _ = cmd("openmpi4", n=1, program=[PY, "a.py"], root=True, oversubscribe=True,
                  contexts=[(1, [PY, "b.py", "-x"])])
    assert line == f"mpiexec -n 1 --oversubscribe --allow-run-as-root {PY} a.py : -n 1 {PY} b.py -x"
    line, _ = cmd("mpich", n=2, program=[PY, "a.py"], contexts=[(1, [PY, "b.py"]), (2, ["hostname"])], cores=2)
    assert line == f"mpiexec -n 2 {PY} a.py : -n 1 {PY} b.py : -n 2 hostname"
    with pytest.raises(LaunchError, match="3 ranks exceed this machine's 2 cores"):
        cmd("openmpi5", n=2, cores=2, contexts=[(1, ["hostname"])])
    with pytest.raises(LaunchError, match="at least 1"):
        cmd("mpich", contexts=[(0, ["hostname"])])
    # job_command runs argv as given (a .py script is not wrapped), oversubscribed as Open MPI needs
    argv = job_command(3, ["python", "x.py"], mpi("openmpi4"), [(1, ["python", "y.py"])]).argv
    assert argv[:3] == ["mpiexec", "-n", "3"] and "--oversubscribe" in argv
    assert argv[argv.index("python"):] == ["python", "x.py", ":", "-n", "1", "python", "y.py"]
    assert job_command(2, ["python", "x.py"], mpi("mpich")).argv == ["mpiexec", "-n", "2", "python", "x.py"]


def test_rank_log_names_each_implementations_files():
    assert rank_log(mpi("mpich"), "logs", 3, 4) == "logs/rank-3.out"
    assert rank_log(mpi("intel"), "logs", 3, 4, "stderr") == "logs/rank-3.err"
    assert rank_log(mpi("openmpi4"), "logs", 1, 2) == "logs/1/rank.1/stdout"
    assert rank_log(mpi("openmpi4"), "logs", 3, 12, "stderr") == "logs/1/rank.03/stderr"
    assert rank_log(mpi("openmpi5"), "logs", 0, 2) == "logs/*/rank.0/stdout"
    with pytest.raises(ValueError):
        rank_log(mpi("mpich"), "logs", 0, 2, "out")


def test_hosts_flag():
    hosts = parse_hosts("node01:4,node02:4")
    assert hosts == [("node01", 4), ("node02", 4)] and parse_hosts("a,b:2") == [("a", 1), ("b", 2)]
    assert cmd("openmpi5", n=8, hosts=hosts)[0] == f"mpiexec -n 8 -H node01:4,node02:4 {RUN}"
    assert cmd("mpich", n=8, hosts=hosts)[0] == f"mpiexec -n 8 -hosts node01:4,node02:4 {RUN}"
    line, launch = cmd("intel", n=8, hosts=hosts, hostfile_out="/tmp/h")
    assert line == f"mpiexec -n 8 -machinefile /tmp/h {RUN}"
    assert launch.files == {"/tmp/h": "node01:4\nnode02:4\n"}
    with pytest.raises(LaunchError, match="bad slot count"):
        parse_hosts("a:zero")


def test_hostfiles_are_passed_or_converted(tmp_path):
    ompi, hydra = ROOT / "hostfiles" / "openmpi.hosts", ROOT / "hostfiles" / "mpich.hosts"
    assert parse_hostfile(ompi) == ([("node01", 4), ("node02", 4)], "openmpi")
    assert parse_hostfile(hydra) == ([("node01", 4), ("node02", 4)], "mpich")
    assert parse_hostfile(ROOT / "hostfiles" / "localhost.hosts") == ([("localhost", None)], "plain")
    assert cmd("openmpi4", n=8, hostfile=ompi)[0] == f"mpiexec -n 8 --hostfile {ompi} {RUN}"
    assert cmd("mpich", n=8, hostfile=hydra)[0] == f"mpiexec -n 8 -f {hydra} {RUN}"
    line, launch = cmd("mpich", n=8, hostfile=ompi, hostfile_out=tmp_path / "h")
    assert line == f"mpiexec -n 8 -f {tmp_path / 'h'} {RUN}"
    assert launch.files == {str(tmp_path / "h"): "node01:4\nnode02:4\n"}
    line, launch = cmd("openmpi5", n=8, hostfile=hydra, hostfile_out="/x/h")
    assert line == f"mpiexec -n 8 --hostfile /x/h {RUN}" and launch.files["/x/h"] == hostfile_text(
        [("node01", 4), ("node02", 4)], "openmpi") == "node01 slots=4\nnode02 slots=4\n"
    assert cmd("intel", n=8, hostfile=hydra)[0] == f"mpiexec -n 8 -machinefile {hydra} {RUN}"


def test_per_rank_logs():
    assert cmd("mpich", log_dir="logs")[0] == (
        f"mpiexec -n 2 -outfile-pattern logs/rank-%r.out -errfile-pattern logs/rank-%r.err {RUN}")
    assert cmd("intel", log_dir="logs")[0] == (
        f"mpiexec -n 2 -outfile-pattern logs/rank-%r.out -errfile-pattern logs/rank-%r.err {RUN}")
    assert cmd("openmpi4", log_dir="logs")[0] == f"mpiexec -n 2 --output-filename logs {RUN}"
    assert cmd("openmpi5", log_dir="logs", root=True)[0] == (
        f"mpiexec -n 2 --allow-run-as-root --output dir=logs {RUN}")


def test_unknown_implementation_and_empty_program():
    with pytest.raises(LaunchError, match="--mpi mpich"):
        build_command(2, TRAIN, MPIInfo("mpiexec", "unknown", "", "what"))
    with pytest.raises(LaunchError, match="nothing to launch"):
        cmd("mpich", program=[])


def test_dry_run_prints_the_command(capsys):
    assert main(["launch", "-n", "2", "--mpi", "openmpi", "--mpiexec", "mpirun", "--dry-run", "-H", "a:1,b:1",
                 "--", "train", "--epochs", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("mpirun -n 2 -H a:1,b:1 ") and out.rstrip().endswith("-m mpiqsgd train --epochs 1")
    assert main(["launch", "-n", "3", "--mpi", "openmpi", "--dry-run", "-H", "a:1", "--", "train"]) == 2
    assert "not enough slots" in capsys.readouterr().err


@launches_jobs
def test_slot_count_agrees_with_the_real_mpi(tmp_path):
    # as many ranks as the launcher counts for a bare "localhost" line start without a flag;
    # under Open MPI one more is refused, as the launcher says before it starts anything
    mpi = check_site_mpi()
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost\n")
    hello = [sys.executable, "-c", "print('up')"]
    n = cores()
    fits = build_command(n, hello, mpi, hostfile=str(hostfile))
    assert "--oversubscribe" not in fits.argv
    proc = subprocess.run(fits.argv, capture_output=True, text=True, timeout=120)
    # count, not split: mpiexec may interleave the ranks' lines ("upup\n\n")
    assert proc.returncode == 0 and proc.stdout.count("up") == n, proc.stdout + proc.stderr
    if mpi.implementation == "openmpi":
        with pytest.raises(LaunchError, match="not enough slots"):
            build_command(n + 1, hello, mpi, hostfile=str(hostfile))
        over = build_command(n + 1, hello, mpi, hostfile=str(hostfile), oversubscribe=True).argv
        proc = subprocess.run([a for a in over if a != "--oversubscribe"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and "not enough slots" in proc.stdout + proc.stderr
        proc = subprocess.run(over, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.count("up") == n + 1, proc.stdout + proc.stderr


@launches_jobs
def test_real_launch_writes_per_rank_logs_and_a_failing_rank_ends_the_job(tmp_path):
    found = check_site_mpi()  # the launcher's own answer decides where the logs are
    script = tmp_path / "hello.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "print(f'rank {c.Get_rank()} of {c.Get_size()}')\n"
                      "if 'fail' in sys.argv and c.Get_rank() == 1:\n    raise SystemExit('rank 1 fails')\n"
                      "c.Barrier()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launch = [sys.executable, "-m", "mpiqsgd", "launch", "-n", "2", "--oversubscribe", "--mpiexec", found.path]
    logs = tmp_path / "logs"
    proc = subprocess.run(launch + ["--log-dir", str(logs), "--", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mpiexec is {found.implementation} {found.version} ({found.path})" in proc.stderr
    for rank in (0, 1):
        paths = glob.glob(rank_log(found, str(logs), rank, 2))
        assert len(paths) == 1, (rank, sorted(p.relative_to(logs).as_posix() for p in logs.rglob("*")))
        assert open(paths[0]).read() == f"rank {rank} of 2\n"
    proc = subprocess.run(launch + ["--", str(script), "fail"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "rank 1 fails" in proc.stdout + proc.stderr
