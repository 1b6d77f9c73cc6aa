import json
import time

from mpiqsgd.meter import Meter, merge


def test_records_totals_by_phase_and_link():
    m = Meter(rank=2, keep_messages=True)
    m.step = 7
    m.record("push", 2, 0, 20, 100, 400)
    m.record("push", 2, 0, 20, 100, 400)
    m.record("pull", 2, 1, 0, 50, 50)
    assert m.messages[0].step == 7 and m.messages[0].bytes == 120
    t = m.totals()
    json.dumps(t)
    assert t["sent"] == {"messages": 3, "bytes": 290, "header_bytes": 40, "payload_bytes": 250, "fp32_bytes": 850}
    assert t["by_phase"]["push"]["bytes"] == 240
    assert t["by_link"]["2->0"]["messages"] == 2
    assert t["by_link"]["2->1"]["payload_bytes"] == 50


def test_messages_not_kept_by_default_and_reset():
    m = Meter()
    m.record("x", 0, 1, 1, 1, 4)
    assert m.messages == [] and m.sent()["bytes"] == 2
    m.reset()
    assert m.sent()["bytes"] == 0 and m.totals()["by_link"] == {}


def test_timer_accumulates():
    m = Meter()
    for _ in range(2):
        with m.time("encode"):
            time.sleep(0.01)
    assert 0.02 <= m.seconds["encode"] < 1


def test_merge_sums_ranks_and_reports_server_in_and_out():
    server, w1, w2 = Meter(0), Meter(1), Meter(2)
    w1.record("push", 1, 0, 10, 90, 400)
    w2.record("push", 2, 0, 10, 90, 400)
    for dest in (1, 2):
        server.record("pull", 0, dest, 13, 400, 400)
    server.record("allreduce", 0, -1, 0, 5, 5)
    job = merge([w2.totals(), server.totals(), w1.totals()])
    assert job["n_ranks"] == 3
    assert job["sent"]["bytes"] == 100 + 100 + 2 * 413 + 5
    assert job["received_by_rank"] == {0: 200, 1: 413, 2: 413}
    assert job["sent_by_rank"] == {0: 831, 1: 100, 2: 100}
    assert [t["rank"] for t in job["per_rank"]] == [0, 1, 2]
    assert job["by_phase"]["push"]["messages"] == 2
    json.dumps(job)


def test_size_histogram_per_phase_survives_merge_and_resume():
    a, b = Meter(0), Meter(1)
    a.record("push", 0, 1, 10, 90, 400)  # 100 bytes: bin 7 = [64, 128)
    a.record("push", 0, 1, 10, 190, 800)  # 200 bytes: bin 8
    b.record("push", 1, 0, 10, 90, 400)
    b.record("pull", 1, 0, 0, 0, 0)  # bin 0
    assert a.totals()["sizes"] == {"push": {"7": [1, 100], "8": [1, 200]}}
    job = merge([a.totals(), b.totals()])
    assert job["sizes"] == {"pull": {"0": [1, 0]}, "push": {"7": [2, 200], "8": [1, 200]}}
    c = Meter(0)
    c.load_totals(json.loads(json.dumps(a.totals())))
    assert c.totals()["sizes"] == a.totals()["sizes"]
