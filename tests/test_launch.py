"""mpiqsgd launch: implementation detection, the exact commands built (nothing launched), one real launch."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from mpiqsgd.cli import main
from mpiqsgd.launch import (LaunchError, MPIInfo, build_command, detect, hostfile_text, parse_hostfile,
                            parse_hosts)

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
    launch = build_command(n, program, mpi(kind), is_root=root, cpu_count=cores, python=PY, **kw)
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
    assert parse_hostfile(ROOT / "hostfiles" / "localhost.hosts") == ([("localhost", 1)], "plain")
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


MPIEXEC = shutil.which("mpiexec")


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
def test_real_launch_writes_per_rank_logs_and_a_failing_rank_ends_the_job(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("import sys\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\n"
                      "print(f'rank {c.Get_rank()} of {c.Get_size()}')\n"
                      "if 'fail' in sys.argv and c.Get_rank() == 1:\n    raise SystemExit('rank 1 fails')\n"
                      "c.Barrier()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launch = [sys.executable, "-m", "mpiqsgd", "launch", "-n", "2", "--mpiexec", MPIEXEC]
    logs = tmp_path / "logs"
    proc = subprocess.run(launch + ["--log-dir", str(logs), "--", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if "openmpi" not in proc.stdout:  # Hydra's file names
        assert (logs / "rank-0.out").read_text() == "rank 0 of 2\n"
        assert (logs / "rank-1.out").read_text() == "rank 1 of 2\n"
    proc = subprocess.run(launch + ["--", str(script), "fail"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "rank 1 fails" in proc.stdout + proc.stderr
