"""The DDP communication hook: its state's checks in one process, and DDP under torchrun
(2 processes on gloo, tests/ddp_job.py) against mpiqsgd's own allgather topology."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from mpiqsgd.codecs import make_codec
from mpiqsgd.ddp import COLLECTIVES, MpiqsgdState
from mpiqsgd.errors import ConfigError


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_state_refuses_what_the_hook_cannot_do():
    with pytest.raises(ConfigError, match=r"codec= .* is adaptive"):
        MpiqsgdState(None, make_codec("alq"))
    with pytest.raises(ConfigError, match=r"collective= must be one of allgather, intsum; got 'allreduce'"):
        MpiqsgdState(None, make_codec("qsgd"), collective="allreduce")
    with pytest.raises(ConfigError, match=r"collective='intsum'\) sums QSGD levels"):
        MpiqsgdState(None, make_codec("sign"), collective="intsum")
    with pytest.raises(ConfigError, match="min_compress_numel= and warmup_steps= must be >= 0"):
        MpiqsgdState(None, make_codec("qsgd"), min_compress_numel=-1)
    assert list(COLLECTIVES) == ["allgather", "intsum"]


def test_state_dict_round_trip():
    state = MpiqsgdState(None, make_codec("qsgd", bits=2, rounding="nearest", error_feedback=True))
    state.step = 7
    state.codec.residuals[(1, "grad")] = __import__("torch").ones(3)
    other = MpiqsgdState(None, make_codec("qsgd", bits=2, rounding="nearest", error_feedback=True))
    other.load_state_dict(state.state_dict())
    assert other.step == 7 and other.codec.residuals[(1, "grad")].sum() == 3


@pytest.mark.slow
def test_ddp_hook_under_torchrun_matches_mpiqsgd_allgather_and_intsum():
    cases = ("qsgd4", "ef-nearest", "elias", "intsum4", "intsum-ef")
    proc = torchrun(2, "tests/ddp_job.py", ",".join(cases))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for case in cases:
        assert out.count(f"ok {case} rank") == 2, out[-3000:]


@pytest.mark.slow
def test_ddp_hook_with_a_compiled_model_under_torchrun():
    proc = torchrun(2, "tests/ddp_job.py", "compiled", timeout=500)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and ("CppCompileError" in out or "InvalidCxxCompiler" in out):
        pytest.skip("torch.compile's C++ compiler is unavailable here")
    assert proc.returncode == 0, out[-6000:]
    assert out.count("ok qsgd4 compiled rank") == 2, out[-3000:]
