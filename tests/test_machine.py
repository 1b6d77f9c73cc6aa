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
    # oversubscribed ranks); the kernels run on mpiqsgd's own thread pool instead. Nothing in
    # mpiqsgd (nor in these tests) starts it, so it is still off in this process.
    import torch
    from numba.np.ufunc import parallel

    from mpiqsgd.codecs import make_codec

    before = kernels.kernel_threads()
    try:
        share_cpus(1)
        codec = make_codec("qsgd", bits=4)
        x = torch.randn(1 << 19)  # large enough for the threaded kernels
        codec.decode(codec.encode(x, torch.Generator().manual_seed(0)), "cpu", x.numel())
    finally:
        kernels.set_kernel_threads(before)
    assert not parallel._is_initialized
