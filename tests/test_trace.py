"""Timelines (trace.json): the span recorder, step sampling, and a traced run through the library API."""

import json

import pytest

from mpiqsgd.errors import ConfigError
from mpiqsgd.meter import Meter
from mpiqsgd.report import load_run, trace_lines
from mpiqsgd.trace import Tracer, chrome_events, parse_steps, write_trace
from mpiqsgd.train import driver
from mpiqsgd.train.config import TrainConfig
from mpiqsgd.transport import LocalGroup
from overlap_cases import train_steps


def test_step_specs():
    assert parse_steps("") is None and parse_steps("0") is None and parse_steps(None) is None
    sampled = parse_steps("3, 10-12, */100")
    assert [s for s in range(0, 205) if sampled(s)] == [0, 3, 10, 11, 12, 100, 200]
    assert parse_steps("0-0")(0) and not parse_steps("0-0")(1)
    assert parse_steps("all")(12345)
    for bad in ("x", "5-2", "*/0", "1,,2"):
        with pytest.raises(ConfigError, match="trace-steps"):
            parse_steps(bad)
    with pytest.raises(ConfigError, match="trace-steps"):
        TrainConfig(trace_steps="1-").validate()


def test_spans_of_sampled_steps_only_and_evaluations_always():
    m = Meter(rank=3)
    with m.time("encode"):  # no tracer: counted, not traced
        pass
    m.tracer = Tracer(3, parse_steps("1"))
    for step in range(3):
        m.step = step
        with m.time("communicate", name="recv", message="push", peer=0) as span:
            span["bytes"] = 100 + step
        with m.span("bucket 0", "exchange", numel=7):
            pass
    with m.time("eval"):
        pass
    assert m.seconds["communicate"] > 0 and m.seconds["encode"] >= 0
    events = [e for e in chrome_events([m.tracer.state()]) if e["ph"] == "X"]
    assert [(e["cat"], e["name"], e["args"]["step"]) for e in events] == [
        ("communicate", "recv", 1), ("exchange", "bucket 0", 1), ("eval", "eval", 2)]
    recv = events[0]
    assert recv["args"] == {"step": 1, "message": "push", "peer": 0, "bytes": 101}
    assert recv["pid"] == 3 and recv["tid"] == 0 and recv["dur"] >= 0
    assert min(e["ts"] for e in events) == 0
    assert m.tracer.recording_seconds > 0


def test_traced_overlap_run_separates_threads_and_gives_message_sizes():
    group = LocalGroup(2)
    transports = group.transports()
    for t in transports:
        t.meter.tracer = Tracer(t.rank, parse_steps("1-2"))
    case = ("ring", "fp32", {}, {})  # a codec without kernels to compile: the test stays fast
    group.run(lambda t: train_steps(t, case, overlap=True), transports)
    states = [t.meter.tracer.state() for t in transports]
    events = chrome_events(states)
    json.dumps(events)
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["args"]["step"] for e in spans} == {1, 2} and {e["pid"] for e in spans} == {0, 1}
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {"training", "communication"}
    comm = [e for e in spans if e["cat"] == "communicate"]
    assert comm and all(e["tid"] == 1 and e["args"]["bytes"] > 0 for e in comm)
    assert {e["name"] for e in spans if e["cat"] == "exchange"} == {"bucket 0", "bucket 1", "bucket 2"}
    assert {e["args"]["bucket"] for e in spans if e["cat"] == "encode"} == {0, 1, 2}
    assert any(e["cat"] == "wait" and e["tid"] == 0 for e in spans)
    # the recorded sizes are the metered ones
    sent = sum(e["args"]["bytes"] for e in comm if e["pid"] == 0)
    per_step = transports[0].meter.sent()["bytes"] / 4
    assert sent == pytest.approx(2 * per_step)


def test_no_tracer_writes_nothing(tmp_path):
    t = LocalGroup(1).transports()[0]
    assert write_trace(t.meter, t, tmp_path / "trace.json") is None and not (tmp_path / "trace.json").exists()


def test_training_run_writes_one_trace_for_all_ranks(tmp_path):
    cfg = TrainConfig(dataset="synthetic", synthetic_size=256, model="tiny", epochs=1, batch_size=32, progress=False,
                      threads=1, simulate=2, max_steps=3, trace_steps="1", checkpoint_every=2,
                      run_dir=str(tmp_path / "run"))
    driver.train(cfg)
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    cats = {(e["pid"], e["cat"]) for e in spans}
    for pid in (0, 1):
        assert {(pid, c) for c in ("compute", "encode", "communicate", "decode", "update", "eval",
                                   "checkpoint")} <= cats
    assert {e["args"]["step"] for e in spans if e["cat"] == "compute"} == {1}
    assert trace["otherData"]["events"] == len(spans) and trace["otherData"]["recording_microseconds_per_event"] > 0
    (line,) = trace_lines([load_run(tmp_path / "run")])
    assert f"{len(spans)} events" in line and "us per event" in line and "% of the run's" in line
