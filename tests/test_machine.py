"""mpiqsgd.machine: sharing the CPU cores among the ranks of a node."""

from mpiqsgd.codecs import kernels
from mpiqsgd.machine import share_cpus


def test_share_cpus_divides_the_cores_among_local_ranks():
    before = kernels.kernel_threads()
    try:
        assert share_cpus(10**6) == 1 and kernels.kernel_threads() == 1
        assert share_cpus(1) >= 1 and kernels.kernel_threads() == min(share_cpus(1), kernels.MAX_THREADS)
    finally:
        kernels.set_kernel_threads(before)


def test_sharing_the_cores_does_not_start_numbas_threading_layer():
    # numba.set_num_threads / get_num_threads would start it (OpenMP workers that spin beside
    # oversubscribed ranks); the kernels run on mpiqsgd's own thread pool instead
    import subprocess
    import sys
    code = ("from mpiqsgd.machine import share_cpus\n"
            "from numba.np.ufunc import parallel\n"
            "share_cpus(4)\n"
            "import torch\n"
            "from mpiqsgd.codecs import make_codec\n"
            "c = make_codec('qsgd', bits=4)\n"
            "x = torch.randn(1 << 19)\n"
            "c.decode(c.encode(x, torch.Generator().manual_seed(0)), 'cpu', x.numel())\n"
            "print(parallel._is_initialized)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"
