"""mpiqsgd.options: the codec and topology flags declared once, shown alike by every command."""

import argparse
from dataclasses import fields
import re

import pytest

from mpiqsgd.cli import build_parser
from mpiqsgd.errors import ConfigError
from mpiqsgd.options import CodecOptions, TopologyOptions, flag
from mpiqsgd.train.config import TrainConfig


def commands(parser, path=()):
    """``(argv, parser)`` of every command and subcommand under ``parser``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def entries(help_text):
    """The help text of each option, its wrapped lines joined: ``{"--bits": "--bits BITS bits per ..."}``."""
    out, current = {}, None
    for line in help_text.splitlines():
        start = re.match(r"  (-\S+|\w\S*)", line)
        if start:
            current = start.group(1).rstrip(",")
            out[current] = line.strip()
        elif current is not None and line.startswith("    "):
            out[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in out.items()}


ALL = list(commands(build_parser()))


@pytest.mark.parametrize("path, parser", ALL, ids=[" ".join(p) or "mpiqsgd" for p, _ in ALL])
def test_help_shows_real_defaults_once(path, parser):
    for option, text in entries(parser.format_help()).items():
        assert not re.search(r"default:? none\b", text, re.IGNORECASE), f"{' '.join(path)} {option}: {text}"
        assert text.count("(default") <= 1, f"{' '.join(path)} {option}: {text}"


def option_help(path, option):
    parser = dict(ALL)[path]
    return entries(parser.format_help())[option]


@pytest.mark.parametrize("cls", [CodecOptions, TopologyOptions])
def test_one_source_gives_train_and_bench_the_same_flags(cls):
    for f in fields(cls):
        name = flag(f.name)
        shown = option_help(("train",), name)
        assert shown == option_help(("bench", "exchange"), name) == option_help(("bench", "step"), name)
        if cls is CodecOptions:
            assert shown == option_help(("bench", "codec"), name) == option_help(("project",), name)
        assert f.name in {g.name for g in fields(TrainConfig)}  # config.json keeps its flat flags
    assert "(default 4 for qsgd, 3 for the level sets" in option_help(("train",), "--bits")
    assert "elias (qsgd, qsgd-inf)" in option_help(("bench", "codec"), "--encoding")


def test_bench_flags_hold_the_field_defaults():
    args = build_parser().parse_args(["bench", "exchange"])
    assert CodecOptions.of(args) == CodecOptions() and TopologyOptions.of(args) == TopologyOptions()
    train = build_parser().parse_args(["train"])
    assert not hasattr(train, "bits")  # train's flags not given stay out, so --config can set them


@pytest.mark.parametrize("options, message", [
    (dict(codec="qsgd", norm="max"), "--norm applies only to the level-set codecs"),
    (dict(codec="nuqsgd", fit="model"), "--fit applies only to the adaptive codecs"),
    (dict(codec="sign", levels=3), "--levels applies only to --codec qsgd"),
    (dict(codec="nuqsgd", rounding="nearest"), "--rounding applies only to --codec qsgd"),
    (dict(codec="qsgd", clip_sigma=2.0), "--clip-sigma applies only to --codec terngrad"),
    (dict(codec="fp32", bits=4), "--bits does not apply to --codec fp32"),
    (dict(codec="fp16", bucket=64), "--bucket does not apply to --codec fp16"),
    (dict(codec="nuqsgd", encoding="elias"), "--encoding elias applies only to --codec qsgd and qsgd-inf"),
    (dict(codec="sign", encoding="dense"), "--encoding applies only to --codec qsgd, qsgd-inf and the level-set"),
    (dict(codec="qsgd-elias", encoding="entropy"), "--codec qsgd-elias fixes the encoding to elias"),
])
def test_build_codec_errors_name_the_flag(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CodecOptions(**options).build_codec()


def test_build_codec_and_the_encodings_each_codec_takes():
    assert CodecOptions(codec="qsgd-inf", encoding="elias").build_codec().encoding == "elias"
    assert CodecOptions(codec="sign", error_feedback=True).build_codec().name == "sign"
    assert CodecOptions.of({"codec": "qsgd", "bits": 3, "lr": 0.1}).build_codec().bits == 3  # other keys ignored


def test_aggregator_options_use_the_topology_layers_names_and_name_the_flags():
    assert TopologyOptions().aggregator_options("scatter") == {}
    ps = TopologyOptions(topology="ps", downlink="codec", server_error_feedback=True, dedicated_server=True)
    assert ps.aggregator_options("ps") == {"downlink": "codec", "server_error_feedback": True, "dedicated": True}
    assert TopologyOptions(piece_numel=0).aggregator_options("intsum") == {"piece_numel": 0}
    with pytest.raises(ConfigError, match="--downlink, --dedicated-server only apply to --topology ps"):
        TopologyOptions(downlink="fp32", dedicated_server=True).aggregator_options("scatter")
    with pytest.raises(ConfigError, match="--piece-numel only applies to --topology scatter and intsum"):
        TopologyOptions(piece_numel=1000).aggregator_options("ring")
    with pytest.raises(ConfigError, match="--piece-numel must be >= 0"):
        TopologyOptions(piece_numel=-1).aggregator_options("scatter")


def test_train_config_checks_the_topology_flags_against_the_resolved_topology():
    cfg = TrainConfig(model="tiny", codec="sign", piece_numel=4096).validate()
    assert cfg.topology == "scatter" and cfg.aggregator_options(cfg.topology) == {"piece_numel": 4096}
    with pytest.raises(ConfigError, match="--piece-numel only applies"):
        TrainConfig(model="tiny", topology="ring", piece_numel=4096).validate()
