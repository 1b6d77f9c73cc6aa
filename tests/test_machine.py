"""mpiqsgd.machine: sharing the CPU cores among the ranks of a node."""

import numba

from mpiqsgd.machine import share_cpus


def test_share_cpus_divides_the_cores_among_local_ranks():
    before = numba.get_num_threads()
    try:
        assert share_cpus(10**6) == 1 and numba.get_num_threads() == 1
        assert share_cpus(1) >= 1
    finally:
        numba.set_num_threads(before)
