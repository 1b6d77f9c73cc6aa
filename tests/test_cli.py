import json

import pytest

from mpiqsgd.cli import main
from mpiqsgd.codecs import make_codec


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_codec_json(capsys):
    code, out, _ = run(capsys, "bench", "codec", "--numel", "20000", "--repeats", "2", "--bits", "3",
                       "--bucket", "128", "--json")
    assert code == 0
    r = json.loads(out)
    codec = make_codec("qsgd", bits=3, bucket=128)
    assert r["encoded_bytes"] == codec.encoded_nbytes(20000)
    assert r["bytes_per_coordinate"] == pytest.approx(codec.encoded_nbytes(20000) / 20000)
    assert r["variance_bound"] == pytest.approx(min(128 / 9, 128**0.5 / 3))
    assert 0 < r["variance_ratio"] <= r["variance_bound"]
    for key in ("encode_GBps", "decode_GBps", "memcpy_GBps", "encode_vs_memcpy"):
        assert r[key] > 0
    assert r["machine"]["cpu_count"] >= 1


def test_bench_codec_sizes_against_entropy_and_elias_bound(capsys):
    code, out, _ = run(capsys, "bench", "codec", "--numel", "50000", "--repeats", "1", "--threads", "1",
                       "--bits", "2", "--encoding", "elias", "--json")
    assert code == 0
    sym = json.loads(out)["symbols"]
    assert sym["encoding"] == "elias" and 0 < sym["entropy_bits_per_coordinate"] < 1
    assert sym["vs_entropy"] > 1 and 0.5 < sym["vs_elias_bound"] < 1  # above the entropy, below the paper's bound
    code, out, _ = run(capsys, "bench", "codec", "--numel", "50000", "--repeats", "1", "--threads", "1",
                       "--codec", "terngrad", "--encoding", "entropy", "--json")
    sym = json.loads(out)["symbols"]
    assert 1 <= sym["vs_entropy"] < 1.03 and sym["model_bytes"] > 0
    assert json.loads(out)["bits_per_coordinate"] == pytest.approx(sym["bits_per_coordinate"], rel=0.01)


def test_bench_codec_all(capsys, monkeypatch):
    from mpiqsgd import bench

    monkeypatch.setattr(bench, "ALL_CODECS", [("fp16", {}), ("qsgd", {"bits": 2, "encoding": "entropy"}),
                                              ("amq", {"encoding": "dense"})])
    code, out, _ = run(capsys, "bench", "codec", "--all", "--numel", "20000", "--repeats", "1", "--threads", "1",
                       "--json")
    assert code == 0
    r = json.loads(out)
    assert [x["name"] for x in r["results"]] == ["fp16", "qsgd", "amq"] and r["results"][0]["symbols"] is None
    assert r["results"][1]["symbols"]["encoding"] == "entropy" and r["machine"]["cpu_count"] >= 1
    code, out, _ = run(capsys, "bench", "codec", "--all", "--numel", "20000", "--repeats", "1", "--threads", "1")
    assert code == 0 and "vs H+side" in out and "entropy" in out
    code, _, err = run(capsys, "bench", "codec", "--all", "--bits", "3")
    assert code == 2 and "drop --bits" in err


def test_bench_codec_reports_thread_scaling_and_memory(capsys):
    code, out, _ = run(capsys, "bench", "codec", "--numel", "300000", "--repeats", "1", "--codec", "nuqsgd",
                       "--threads", "1,2", "--json")
    assert code == 0
    r = json.loads(out)
    import numba
    assert [row["threads"] for row in r["scaling"]] == sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
    for row in r["scaling"]:
        assert row["encode_GBps"] > 0 and row["memcpy_GBps"] > 0 and row["decode_vs_memcpy"] > 0
    mem = r["memory"]
    assert mem["decode_output_bytes"] == 4 * 300000
    assert mem["encode_output_bytes"] == r["encoded_bytes"]
    if mem["decode_peak_extra_bytes"] is not None:
        assert mem["decode_peak_extra_bytes"] >= 0 and mem["encode_peak_extra_bytes"] >= 0


def test_bench_codec_text_and_error_feedback(capsys):
    code, out, _ = run(capsys, "bench", "codec", "--numel", "5000", "--repeats", "1", "--codec", "sign",
                       "--error-feedback")
    assert code == 0
    assert "ErrorFeedback(Sign(bucket=512))" in out and "bytes/coordinate" in out


@pytest.mark.parametrize("argv,message", [
    (["--bits", "0"], "bits must be between 2 and 8"),
    (["--codec", "fp32", "--bits", "4"], "--bits does not apply to --codec fp32"),
    (["--numel", "0"], "--numel must be at least 1"),
    (["--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_input_gives_a_clear_error_and_exit_code(capsys, argv, message):
    code, _, err = run(capsys, "bench", "codec", "--numel", "100", *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_unknown_codec_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "codec", "--codec", "zip"])
    assert "invalid choice" in capsys.readouterr().err


def test_bench_codec_adaptive_fits_first_and_is_json(capsys):
    code, out, _ = run(capsys, "bench", "codec", "--codec", "alq-n", "--numel", "50000", "--repeats", "1",
                       "--bucket", "1024", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["adaptive"]["fit_seconds"] > 0 and len(r["adaptive"]["levels"]) == 8
    assert r["params"]["levels"] == pytest.approx(r["adaptive"]["levels"])
    assert r["variance_ratio"] < 1  # fitted levels; NUQ's start would be far above 1 here


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "codec", "--help"],
                                  ["bench", "exchange", "--help"]])
def test_help_renders(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mpiqsgd" in out and "%%" not in out
