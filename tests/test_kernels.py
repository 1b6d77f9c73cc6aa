"""The codec kernels' shared machinery (mpiqsgd.codecs.kernels): the counter-based uniforms, and
compiling each kernel once per node."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from mpiqsgd.codecs import kernels


def test_counter_based_uniforms_are_uniform():
    from mpiqsgd.codecs.kernels import uniform
    u = uniform(123, 200_000).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    pairs = u.view(-1, 2)  # the two halves of one hash: independent too
    assert abs(float(torch.corrcoef(pairs.T)[0, 1])) < 0.01
    joint = torch.histc((pairs[:, 0] * 4).floor() * 4 + (pairs[:, 1] * 4).floor(), bins=16, min=0, max=16)
    assert float(((joint - 6250) ** 2 / 6250).sum()) < 50  # chi-square, 15 degrees of freedom (p < 1e-5)
    assert not torch.equal(uniform(124, 1000), uniform(123, 1000))


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba absent")
@pytest.mark.parametrize("start,m", [(0, 1), (0, 16384), (16384, 7), (2 * 16384, 1000)])
def test_numba_uniforms_equal_the_torch_ones(start, m):
    import numba

    @numba.njit
    def fill(seed, start, m, u):
        kernels.fill_uniforms(seed, start, m, u)

    u = np.full(m + 2, -1.0, dtype=np.float32)
    fill(np.uint64(987654321), start, m, u)
    assert torch.equal(torch.from_numpy(u[:m]), kernels.uniform(987654321, start + m)[start:])
    assert u[m + m % 2] == -1.0  # nothing written past m rounded up to even


KERNEL_MODULE = """
from mpiqsgd.codecs.kernels import cached_jit

@cached_jit()
def add_one(x):
    return x + 1
"""

RACER = """
import json, os, sys, time
import kernel_module
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.001)
assert kernel_module.add_one(41) == 42
stats = kernel_module.add_one.stats
print(json.dumps({"compiled": sum(stats.cache_misses.values()), "loaded": sum(stats.cache_hits.values())}))
"""


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba absent")
def test_processes_that_need_a_kernel_at_once_compile_it_once(tmp_path):
    (tmp_path / "kernel_module.py").write_text(KERNEL_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(go)], env=env, cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        for racer in racers:  # every one imported, waiting for the start
            assert racer.stdout.readline().strip() == "ready", racer.stderr.read()
        go.touch()  # both call the kernel now: without the lock, each compiles it
        outs = [racer.communicate(timeout=120) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outs]
    counts = sorted((json.loads(out)["compiled"], json.loads(out)["loaded"]) for out, _ in outs)
    assert counts == [(0, 1), (1, 0)], counts  # one compiled; the other loaded its cache entry
    assert list((tmp_path / f"mpiqsgd-numba-{os.getuid()}").glob("kernel_module.add_one-*.lock"))


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba absent")
def test_a_stuck_compile_lock_delays_compilation_but_does_not_stop_it(tmp_path, monkeypatch):
    import numba
    from filelock import FileLock

    (tmp_path / "stuck_module.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import stuck_module
    monkeypatch.setattr(kernels, "COMPILE_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    dispatcher = numba.njit(stuck_module.twice)  # no disk cache: this process must compile
    kernels.compile_once_per_node(dispatcher)
    path = kernels.compile_lock_path(dispatcher, (numba.int64,))
    os.makedirs(os.path.dirname(path))
    with FileLock(path):  # another holder that never lets go
        start = time.perf_counter()
        assert dispatcher(21) == 42
        assert time.perf_counter() - start >= 0.3
