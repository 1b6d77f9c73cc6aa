"""``mpiqsgd train --config FILE``: TOML or JSON, flags override it, a run's config.json repeats the run."""

import json
import re

import pytest
import torch

from mpiqsgd.cli import build_parser, main
from mpiqsgd.errors import ConfigError
from mpiqsgd.train.checkpoint import read_state
from mpiqsgd.train.config import TrainConfig, config_from_args, load_config_file


def config(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_toml_with_dashes_or_underscores_and_flags_override_it(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('model = "tiny"\nbatch-size = 64\nlr = 1\nerror_feedback = true\nrounding = "nearest"\n'
                    'progress = false\nlr-decay-epochs = "5,8"\n')
    cfg = config("--config", str(path))
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.error_feedback, cfg.progress) == ("tiny", 64, 1.0, True, False)
    assert isinstance(cfg.lr, float) and cfg.decay_epochs() == [5.0, 8.0]
    assert cfg.epochs == TrainConfig.epochs  # not in the file: the default
    cfg = config("--config", str(path), "--batch-size", "16", "--model", "resnet20", "--epochs", "3")
    assert (cfg.model, cfg.batch_size, cfg.epochs, cfg.error_feedback) == ("resnet20", 16, 3, True)


def test_json_file_and_boolean_flags_override_it(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"progress": True, "train_subset": None, "codec": "sign"}))
    assert config("--config", str(path)).progress is True
    assert config("--config", str(path), "--no-progress").progress is False
    assert config("--config", str(path)).codec == "sign"


@pytest.mark.parametrize("text, message", [
    ('{"batch_sise": 3}', "unknown key 'batch_sise'; did you mean batch-size?"),
    ('{"xyzzy": 3}', "unknown key 'xyzzy'"),
    ('{"batch_size": 3, "batch-size": 4}', "batch_size is given twice"),
    ('{"batch_size": 3.5}', "batch_size must be int; got 3.5"),
    ('{"batch_size": true}', "batch_size must be int; got True"),
    ('{"lr": "fast"}', "lr must be a number; got 'fast'"),
    ('{"epochs": null}', "epochs cannot be null"),
    ('{"lr_schedule": "linear"}', "lr_schedule must be one of step, cosine, constant; got 'linear'"),
    ('[1, 2]', "expected a table of flags; got list"),
    ('{"model": ', "not valid JSON"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "job.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_file(path)


def test_bad_toml_and_missing_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "job.toml"
    path.write_text("model = \n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mpiqsgd: error: --config {path}: not valid TOML")
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "No such file" in capsys.readouterr().err


def final_model(run_dir):
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return read_state(run_dir / "checkpoints" / latest["dir"] / "rank0.pt")["model"]


def test_a_runs_config_json_repeats_it_in_a_new_directory(tmp_path):
    first = tmp_path / "first"
    argv = ["--simulate", "2", "--dataset", "synthetic", "--synthetic-size", "600", "--model", "tiny", "--epochs", "1",
            "--batch-size", "32", "--no-progress", "--threads", "1", "--codec", "qsgd", "--bits", "3",
            "--checkpoint-every", "4", "--lr", "0.07"]
    assert main(["train", *argv, "--run-dir", str(first)]) == 0
    flags = json.loads((first / "config.json").read_text())["flags"]
    for source in (first / "config.json", first):  # the file, or the run directory holding it
        repeated = load_config_file(source)
        assert set(flags) - set(repeated) == {"run_dir", "resume"}  # a repetition is a new run
        assert all(flags[k] == v for k, v in repeated.items())
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--run-dir", str(again)]) == 0
    a, b = final_model(first), final_model(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "config.json").read_text())["flags"] == {**flags, "run_dir": str(again)}
