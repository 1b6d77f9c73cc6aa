"""mpiqsgd.bench in one process: the step benchmark on a LocalGroup."""


import pytest

from mpiqsgd.codecs import make_codec


def test_bench_step_times_the_step_against_compute_alone():
    from mpiqsgd.bench import bench_step
    from mpiqsgd.transport import LocalGroup

    group = LocalGroup(2)
    results = group.run(lambda t: bench_step(t, "tiny", make_codec("qsgd", bits=4), "scatter", batch_size=4,
                                             repeats=2, warmup=1, bucket_mb=0.01, overlap=True), group.transports())
    r = results[0]
    assert r["n_ranks"] == 2 and r["n_buckets"] > 1 and r["overlap"]
    assert len(r["step_seconds_per_repeat"]) == len(r["compute_seconds_per_repeat"]) == 2
    assert r["overhead_seconds"] == pytest.approx(r["step_seconds"] - r["compute_seconds"])
    assert r["bytes_per_step_per_rank"] > 0 and "encode" in r["phase_seconds_per_step"]
