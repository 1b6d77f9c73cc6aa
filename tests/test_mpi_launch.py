"""Launch the multi-rank tests under real mpiexec, under a timeout: the files of tests/mpi/ in one job, each
at every world size it names, and jobs of the library, the command line and the examples.

Jobs start through ``mpiqsgd.launch`` (conftest's ``mpi_run``): whichever MPI it finds, as
root and oversubscribed, with no environment to set."""

import json
import re
import sys
import time

import pytest
import torch

from conftest import mpi_run, mpiexec_marks
from mpiqsgd.cli import main
from mpiqsgd.errors import ConfigError
from mpiqsgd.linkmodel import fit
from mpiqsgd.train.checkpoint import read_state

pytestmark = mpiexec_marks()


def launch(n, *args, timeout=240):
    """``python ARGS`` on ``n`` ranks of this machine; the finished process (output captured)."""
    return mpi_run(n, [sys.executable, *args], timeout)


# One job runs every file at every world size it names (tests/mpi/subworld.py), on the first k ranks
# of its 6: the ranks start once, not once per file and size (a Python that imports torch and
# pytest is about 3 s of CPU). pytest's hypothesis and benchmark plugins, which no file here uses,
# stay out of the ranks (a second each).
MPI_TEST_FILES = {
    "mpi_topologies.py": "1 to 5 ranks",
    "mpi_adapt.py": "2 and 3",
    "mpi_overlap.py": "2 to 5",
    "mpi_optimizer.py": "DistributedOptimizer's accumulation, 2 and 3",
    "mpi_hierarchical.py": "4 and 6: 2 and 3 nodes of 2 ranks (each rank names its node)",
}
MPI_TEST_RANKS = 6


@pytest.mark.slow(120)
def test_mpi_tests_under_mpiexec():
    proc = launch(MPI_TEST_RANKS, "-m", "mpi4py", "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                  "-p", "no:hypothesispytest", "-p", "no:benchmark", "-x",
                  *(f"tests/mpi/{name}" for name in MPI_TEST_FILES), timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " failed" not in out and out.count(" passed") >= MPI_TEST_RANKS, out[-3000:]
    assert "ranks; the job has" not in out, out[-3000:]  # no size skipped (subworld.TOO_FEW): every size ran


MAX_SOAK_RSS_SLOPE = 500  # MiB per 1000 steps


@pytest.mark.slow(150)  # the longest test: started first
def test_sixteen_ranks_on_few_cores_overlap_every_topology():
    # 30 steps keep the suite short; `mpiexec -n 16 python -m mpi4py tests/mpi/mpi_soak.py 200`
    # is the full soak (about 7 minutes on the 2-core machine under load).
    proc = launch(16, "-m", "mpi4py", "tests/mpi/mpi_soak.py", "30", timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert out.count("replicas identical") == 5, out[-3000:]
    # The largest rank's resident set over the run: a leak of half a MiB per step (a message or a
    # model copy kept each step) fails; allocator noise over 30 steps stays well below.
    slopes = dict(re.findall(r"soak (\w+) .*\(([-+][\d.]+) MiB per 1000 steps\)", out))
    assert sorted(slopes) == ["allgather", "allreduce", "ps", "ring", "scatter"], out[-3000:]
    for topology, slope in slopes.items():
        assert float(slope) < MAX_SOAK_RSS_SLOPE, f"{topology}: RSS grows {slope} MiB per 1000 steps\n{out[-3000:]}"


def test_overlap_refuses_an_mpi_without_thread_support():
    code = ("import mpi4py; mpi4py.rc.thread_level = 'single'\n"
            "import torch\n"
            "from mpiqsgd.codecs import make_codec\n"
            "from mpiqsgd.exchange import GradientExchange\n"
            "from mpiqsgd.transport import MPITransport\n"
            "GradientExchange(torch.nn.Linear(3, 3).parameters(), MPITransport(), make_codec('qsgd'), overlap=True)\n")
    proc = launch(1, "-c", code, timeout=60)
    assert proc.returncode != 0
    assert "needs MPI_THREAD_SERIALIZED" in proc.stderr and "MPI_THREAD_SINGLE" in proc.stderr


@pytest.mark.parametrize("kind,message", [("error", "mpiqsgd: error: deliberate failure on rank 1"),
                                          ("crash", "RuntimeError: deliberate crash on rank 1")])
def test_failure_on_one_rank_aborts_the_job(kind, message):
    proc = launch(3, "tests/mpi/crash_job.py", kind, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert message in out, f"exit code {proc.returncode}, output: {out!r}"
    assert "aborting all ranks" in out


def test_a_stopped_rank_is_named_and_ends_the_job():
    start = time.perf_counter()
    proc = launch(3, "tests/mpi/stall_job.py", "2", timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "message from rank 1" in out and "'reduce_scatter'" in out and "--comm-timeout" in out, out[-3000:]
    assert "aborting all ranks" in out
    assert time.perf_counter() - start < 60


def test_console_script_error_ends_the_job():
    proc = launch(2, "-m", "mpiqsgd", "bench", "exchange", "--numel", "100", "--bucket", "0", timeout=60)
    assert proc.returncode != 0
    assert "bucket must be between 1 and" in proc.stderr


def test_bench_exchange_json_counts_exact_bytes():
    proc = launch(3, "-m", "mpi4py", "-m", "mpiqsgd", "bench", "exchange", "--numel", "10007", "--repeats", "2",
                  "--codec", "qsgd", "--bits", "4", "--topology", "ring", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["n_ranks"] == 3
    cand, base = result["candidate"], result["baseline"]
    assert cand["sent_bytes_this_rank"] == cand["sent_bytes_formula"] > 0
    assert base["sent_bytes_this_rank"] == 2 * 2 * 4 * 10007 // 3
    assert len(result["candidate_sent_bytes_by_rank"]) == 3
    assert 0 < result["bytes_vs_allreduce"] < 0.2
    assert cand["median_seconds"] > 0 and base["median_seconds"] > 0
    assert 0 < result["relative_error_vs_exact_mean"] < 3


TRAIN = ["train", "--json", "--dataset", "synthetic", "--synthetic-size", "1200", "--model", "tiny", "--epochs", "2",
         "--batch-size", "32", "--lr", "0.05", "--no-progress", "--threads", "1", "--checkpoint-every", "1000",
         "--check-sync-every", "4"]


def simulate(capsys, *argv):
    """``mpiqsgd ARGV`` (a ``--simulate`` run) in this process, not a Python of its own: its captured
    (stdout, stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err[-4000:]
    return out, err


def final_states(run_dir, n):
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return [read_state(run_dir / "checkpoints" / latest["dir"] / f"rank{r}.pt") for r in range(n)]


# The runs that must equal their simulation bit for bit, by world size. The runs of one size share
# one job (tests/mpi/train_runs.py: ranks start once, not once per run).
MPI_EQUALS_SIMULATION = {
    2: [["--codec", "qsgd", "--bits", "4", "--topology", "ring"],
        ["--codec", "qsgd-elias", "--bits", "2", "--bucket", "128", "--topology", "scatter"]],
    3: [["--codec", "qsgd", "--bits", "3", "--rounding", "nearest", "--error-feedback", "--topology", "ps",
         "--downlink", "codec", "--min-compress-numel", "100"],
        ["--codec", "sign", "--error-feedback", "--topology", "allgather"],
        ["--codec", "qsgd", "--bits", "4", "--topology", "scatter", "--bucket-mb", "0.01", "--overlap",
         "--min-compress-numel", "100", "--trace-steps", "1-2"]],  # tracing changes no bit
}


@pytest.mark.slow(40)
@pytest.mark.parametrize("n", sorted(MPI_EQUALS_SIMULATION))
def test_mpi_training_equals_simulation(tmp_path, capsys, n):
    runs = MPI_EQUALS_SIMULATION[n]
    commands = [[*TRAIN, *flags, "--run-dir", str(tmp_path / f"mpi{i}")] for i, flags in enumerate(runs)]
    mpi = launch(n, "-m", "mpi4py", "tests/mpi/train_runs.py", str(tmp_path), json.dumps(commands), timeout=400)
    assert mpi.returncode == 0, mpi.stderr[-4000:]
    for i, flags in enumerate(runs):
        mpi_dir, sim_dir = tmp_path / f"mpi{i}", tmp_path / f"sim{i}"
        sim_out, _ = simulate(capsys, *TRAIN, *flags, "--simulate", str(n), "--run-dir", str(sim_dir))
        s_mpi, s_sim = json.loads((tmp_path / f"{i}.stdout").read_text()), json.loads(sim_out)
        assert s_mpi["steps"] == s_sim["steps"] == 2 * (1080 // (n * 32)), flags
        assert s_mpi["total_bytes"] == s_sim["total_bytes"] > 0, flags
        assert s_mpi["final_val_acc"] == s_sim["final_val_acc"], flags
        for a, b in zip(final_states(mpi_dir, n), final_states(sim_dir, n)):
            assert a["model"].keys() == b["model"].keys(), flags
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), flags
        comm = json.loads((mpi_dir / "comm.json").read_text())
        assert comm["n_ranks"] == n and sorted(comm["sent_by_rank"]) == [str(r) for r in range(n)], flags
        if "--trace-steps" in flags:
            events = json.loads((mpi_dir / "trace.json").read_text())["traceEvents"]
            spans = [e for e in events if e["ph"] == "X"]
            assert {e["pid"] for e in spans} == set(range(n)) and {e["tid"] for e in spans} == {0, 1}
            assert any(e["cat"] == "communicate" and e["args"]["bytes"] > 0 and e["tid"] == 1 for e in spans)


def test_link_sweep_under_mpiexec(tmp_path):
    proc = launch(2, "-m", "mpi4py", "-m", "mpiqsgd", "bench", "exchange", "--sweep", "--max-mb", "1",
                  "--out", str(tmp_path / "link.json"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "link.json").read_text())
    assert [r["bytes"] for r in result["pingpong"]] == [1000, 3162, 10000, 31623, 100000, 316228, 1000000]
    assert all(r["seconds"] > 0 for r in result["pingpong"] + result["sendrecv"])
    for kind in ("pingpong", "sendrecv"):  # the file's fit is the fit of its own rows, an error only where none exists
        rows = result[kind]
        try:
            expect = fit([r["bytes"] for r in rows], [r["seconds"] for r in rows])
        except ConfigError as exc:  # shared memory may be too fast to fit: then the file says why
            assert result["fit"][kind] == {"error": str(exc)}, (kind, result["fit"][kind])
            assert "do not grow with message size" in str(exc), str(exc)
            continue
        assert result["fit"][kind] == pytest.approx(expect), (kind, result["fit"][kind], expect)
        assert expect["alpha_seconds"] >= 0 and expect["beta_bytes_per_second"] > 0


def test_custom_loop_example_runs_and_learns():
    proc = launch(2, "-m", "mpi4py", "scripts/custom_loop.py", "--steps", "80", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_mpi_stop_and_resume_equals_uninterrupted_simulation(tmp_path, capsys):
    flags = [*TRAIN, "--codec", "qsgd", "--rounding", "nearest", "--error-feedback"]
    first = launch(2, "-m", "mpi4py", "-m", "mpiqsgd", *flags, "--max-steps", "9", "--run-dir", str(tmp_path / "mpi"))
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = launch(2, "-m", "mpi4py", "-m", "mpiqsgd", *flags, "--resume", str(tmp_path / "mpi"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sim_out, _ = simulate(capsys, *flags, "--simulate", "2", "--run-dir", str(tmp_path / "sim"))
    assert json.loads(resumed.stdout)["steps"] == json.loads(sim_out)["steps"] == 32
    for a, b in zip(final_states(tmp_path / "mpi", 2), final_states(tmp_path / "sim", 2)):
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_hierarchical_training_equals_simulation(tmp_path, capsys):
    # 2 nodes x 2 ranks under mpiexec (MPMD: the second pair of ranks names its host nodeB through
    # env(1), which every MPI runs as a program) against --simulate 4 --ranks-per-node 2, bit for bit.
    flags = [*TRAIN, "--codec", "qsgd", "--bits", "4", "--rounding", "nearest", "--error-feedback",
             "--topology", "intsum", "--min-compress-numel", "100"]
    job = ["-m", "mpi4py", "-m", "mpiqsgd", *flags, "--run-dir", str(tmp_path / "mpi")]
    mpi = mpi_run(2, [sys.executable, *job], 300, contexts=[(2, ["env", "MPIQSGD_HOST=nodeB", sys.executable, *job])])
    assert mpi.returncode == 0, mpi.stderr[-4000:]
    said = "hierarchical exchange: 2 nodes x 2 ranks (4 in all); fp32 inside each node, intsum among the 2"
    assert said in mpi.stderr
    sim_out, sim_err = simulate(capsys, *flags, "--simulate", "4", "--ranks-per-node", "2",
                                "--run-dir", str(tmp_path / "sim"))
    assert "hierarchical exchange: 2 nodes x 2 ranks" in sim_err
    s_mpi, s_sim = json.loads(mpi.stdout), json.loads(sim_out)
    assert s_mpi["total_bytes"] == s_sim["total_bytes"] > 0 and s_mpi["final_val_acc"] == s_sim["final_val_acc"]
    for a, b in zip(final_states(tmp_path / "mpi", 4), final_states(tmp_path / "sim", 4)):  # BN buffers are per rank
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    comm = json.loads((tmp_path / "mpi" / "comm.json").read_text())
    assert comm["by_class"]["intra"]["bytes"] > 0 and comm["by_class"]["inter"]["bytes"] > 0
