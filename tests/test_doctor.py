"""mpiqsgd doctor: the findings from given facts, and one real run with its mpiexec ping-pong."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, check_site_mpi, launches_jobs
from mpiqsgd.cli import main
from mpiqsgd.doctor import findings, render

MPICH_LIB = "MPICH Version:      5.0.2\nMPICH configure:    --with-device=ch4:ucx,ofi --with-pm=hydra:gforker\n"


def healthy():
    return {"python": "/py", "cores": 2, "is_root": True,
            "mpi": {"mpi4py": "4.1.2", "library": MPICH_LIB, "standard": "4.1", "thread_provided": "multiple",
                    "thread_requested": "multiple", "implementation": "mpich", "cuda_aware": "no",
                    "cuda_how": "MPICH configure line"},
            "mpiexec": {"path": "/py/mpiexec", "implementation": "mpich", "version": "5.0.2"},
            "threads": {"numba": 2, "numba_max": 2, "torch": 2},
            "gpus": {"count": 0, "names": []},
            "ping_pong": {"command": "mpiexec -n 2 ...", "error": None,
                          "ranks": [{"rank": r, "size": 2, "host": "vm", "local_rank": r, "local_size": 2,
                                     "gpus": {"count": 0}} for r in (0, 1)],
                          "results": [{"bytes": 1, "one_way_seconds": 1e-5, "MBps": 0.1},
                                      {"bytes": 1 << 20, "one_way_seconds": 1e-3, "MBps": 1048.6}]}}


LONE = {"rank": 0, "size": 1, "host": "vm", "local_rank": 0, "local_size": 1, "gpus": {"count": 0}}


def kinds(facts):
    return [(s, w) for s, w, _ in findings(facts)]


def test_a_healthy_machine_has_no_findings():
    facts = healthy()
    assert findings(facts) == []
    text = render(facts, [])
    for part in ("MPI\n", "Launcher\n", "GPUs\n", "Threads\n", "Ping-pong (2 ranks)\n", "10.0 us one way",
                 "1 MiB 1,049 MB/s", "Problems: none", "Warnings: none", "MPICH Version: 5.0.2 (MPI 4.1)"):
        assert part in text


def test_launcher_of_another_mpi_is_a_problem_with_a_fix():
    facts = healthy()
    facts["mpiexec"] = {"path": "/usr/bin/mpiexec", "implementation": "openmpi", "version": "4.1.5"}
    found = findings(facts)
    assert [s for s, _, _ in found] == ["problem", "warning"]  # mismatch; Open MPI as root
    assert "mpiexec is openmpi (/usr/bin/mpiexec) but mpi4py uses mpich" in found[0][1]
    assert "--no-binary=mpi4py" in found[0][2]
    assert "--allow-run-as-root" in found[1][2]
    assert "Problems\n  - mpiexec is openmpi" in render(facts, found)


@pytest.mark.parametrize("change,severity,words", [
    (dict(mpi=None, mpi_error="exit status 1: ModuleNotFoundError: No module named 'mpi4py'"), "problem",
     "mpi4py is not installed"),
    (dict(mpi=None, mpi_error="timed out after 60 s"), "problem", "MPI does not start"),
    (dict(mpiexec=None, mpiexec_error="no mpiexec on PATH: pip install mpich", ping_pong=None), "problem",
     "no mpiexec on PATH"),
    (dict(threads={"numba": None, "torch": 2}), "problem", "numba is not importable"),
    (dict(ping_pong={"command": "c", "error": "timed out after 60 s"}), "problem", "ping-pong hung"),
    (dict(ping_pong={"command": "c", "error": "exit status 1: boom"}), "problem", "ping-pong failed"),
    (dict(ping_pong={"command": "c", "error": None, "ranks": [LONE, LONE]}), "problem",
     "2 separate processes of world size 1"),
    (dict(gpus={"count": 1, "names": ["H200"]}), "warning", "2 ranks per node share 1 GPU(s)"),
])
def test_each_problem_is_found_and_has_a_fix(change, severity, words):
    facts = {**healthy(), **change}
    found = [f for f in findings(facts) if words in f[1]]
    assert len(found) == 1, findings(facts)
    assert found[0][0] == severity and len(found[0][2]) > 20
    render(facts, findings(facts))  # renders whatever is missing


def test_thread_level_below_multiple_is_a_warning():
    facts = healthy()
    facts["mpi"]["thread_provided"] = "funneled"
    assert kinds(facts) == [("warning", "the MPI library provides thread level funneled (mpi4py asked for "
                                        "multiple)")]


@pytest.mark.slow
@launches_jobs
def test_doctor_runs_a_real_ping_pong(capsys):
    mpi = check_site_mpi()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mpiqsgd", "doctor", "--json", "--timeout", "120"], env=env,
                          capture_output=True, text=True, timeout=300)
    facts = json.loads(proc.stdout)
    assert facts["mpiexec"] == {"path": mpi.path, "implementation": mpi.implementation, "version": mpi.version}
    assert facts["mpi"]["implementation"] == mpi.implementation  # mpi4py's library is the launcher's MPI
    assert facts["mpi"]["mpi4py"] and facts["mpi"]["thread_provided"] in ("single", "funneled", "serialized",
                                                                          "multiple")
    pp = facts["ping_pong"]
    assert pp["error"] is None, pp
    assert [r["size"] for r in pp["ranks"]] == [2, 2] and [r["rank"] for r in pp["ranks"]] == [0, 1]
    assert [r["bytes"] for r in pp["results"]] == [1, 1024, 1 << 20, 16 << 20]
    assert all(r["one_way_seconds"] > 0 for r in pp["results"])
    problems = [f for f in facts["findings"] if f["severity"] == "problem"]
    assert proc.returncode == (1 if problems else 0)
    capsys.readouterr()
    main(["doctor", "--no-ping-pong"])  # the text report, in this process (no Python to start)
    text = capsys.readouterr().out
    for section in ("MPI\n", "Launcher\n", "GPUs\n", "Threads\n", "Ping-pong\n  skipped", "Problems", "Warnings"):
        assert section in text
