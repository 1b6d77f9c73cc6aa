"""Training driver, library API and data plumbing, in one process (--simulate)."""

import json

import pytest
import torch

from mpiqsgd.cli import main
from mpiqsgd.codecs import make_codec
from mpiqsgd.errors import ConfigError, MpiqsgdError
from mpiqsgd.exchange import DistributedOptimizer, GradientExchange
from mpiqsgd.train import driver
from mpiqsgd.train.checkpoint import read_state
from mpiqsgd.train.config import TrainConfig
from mpiqsgd.transport import LocalGroup

SMALL = dict(dataset="synthetic", synthetic_size=1200, model="tiny", epochs=2, batch_size=32, lr=0.05,
             progress=False, threads=1)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run(tmp_path, name="run", **kw):
    cfg = TrainConfig(**{**SMALL, "run_dir": str(tmp_path / name), **kw})
    return driver.train(cfg), tmp_path / name


def final_model(run_dir, rank=0):
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    return read_state(run_dir / "checkpoints" / latest["dir"] / f"rank{rank}.pt")["model"]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_simulated_run_writes_the_run_directory(tmp_path):
    summary, d = run(tmp_path, simulate=2, codec="qsgd", bits=4, check_sync_every=3)
    assert {p.name for p in d.iterdir()} >= {"config.json", "metrics.jsonl", "comm.json", "summary.json"}
    metrics = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1.0, 2.0]
    assert all(set(m) >= {"epoch", "step", "train_loss", "val_acc", "test_acc", "wall_seconds", "bytes_sent"}
               for m in metrics)
    assert metrics[0]["bytes_sent"] < metrics[1]["bytes_sent"]
    steps = summary["steps"]
    assert steps == 2 * (1080 // (2 * 32))  # 1200 images, 10% held out
    comm = json.loads((d / "comm.json").read_text())
    assert comm["n_ranks"] == 2 and comm["sent"]["bytes"] == summary["total_bytes"]
    assert summary["bytes_per_step_per_rank"] == pytest.approx(summary["total_bytes"] / steps / 2)
    assert summary["compression_vs_fp32"] > 4
    assert set(summary["seconds_per_phase"]) >= {"compute", "encode", "communicate", "decode", "update"}
    config = json.loads((d / "config.json").read_text())
    assert config["flags"]["codec"] == "qsgd" and config["world_size"] == 2 and config["devices"] == ["cpu"] * 2
    assert metrics[-1]["val_acc"] == summary["final_val_acc"]


@pytest.mark.slow
def test_synthetic_task_learns(tmp_path):
    summary, _ = run(tmp_path, simulate=2, synthetic_size=6000, epochs=4, codec="qsgd", bits=4,
                     lr=0.05, lr_schedule="constant")
    assert summary["steps"] >= 300
    assert summary["final_val_acc"] > 0.5  # chance is 0.1


def test_sparse_code_trains_like_the_dense_code_in_fewer_bytes(tmp_path):
    flags = dict(simulate=2, bits=2, bucket=128, topology="allgather", min_compress_numel=0, checkpoint_every=1000)
    dense, a = run(tmp_path, "dense", codec="qsgd", **flags)
    sparse, b = run(tmp_path, "sparse", codec="qsgd-elias", **flags)
    for rank in (0, 1):  # same quantization and decoded values: the same model
        assert same_state(final_model(a, rank), final_model(b, rank))
    assert sparse["final_val_acc"] == dense["final_val_acc"]
    assert sparse["total_bytes"] < dense["total_bytes"] / 2


@pytest.mark.parametrize("topology", ["allgather", "ring", "scatter", "ps"])
def test_entropy_encoding_trains_like_the_dense_code_in_fewer_bytes(tmp_path, topology):
    """Every topology that carries codec messages: variable-length entropy messages, the same model."""
    flags = dict(simulate=2, codec="nuqsgd-zero", bits=3, bucket=256, topology=topology, min_compress_numel=0,
                 checkpoint_every=1000, max_steps=12, downlink="codec" if topology == "ps" else None)
    dense, a = run(tmp_path, "dense", **flags)
    coded, b = run(tmp_path, "entropy", encoding="entropy", **flags)
    for rank in (0, 1):
        assert same_state(final_model(a, rank), final_model(b, rank))
    assert coded["total_bytes"] < dense["total_bytes"] * 0.6


def test_resume_equals_uninterrupted(tmp_path):
    flags = dict(simulate=2, codec="qsgd", bits=3, rounding="nearest", error_feedback=True, checkpoint_every=1000)
    full, a = run(tmp_path, "full", **flags)
    run(tmp_path, "part", max_steps=17, **flags)
    resumed, b = run(tmp_path, "part", resume=str(tmp_path / "part"), **flags)
    assert resumed["steps"] == full["steps"]
    for rank in (0, 1):
        assert same_state(final_model(a, rank), final_model(b, rank))
    assert resumed["total_bytes"] == full["total_bytes"]
    assert resumed["final_val_acc"] == full["final_val_acc"]


def test_resume_with_stochastic_rounding_and_mid_epoch_checkpoints(tmp_path):
    flags = dict(simulate=2, codec="qsgd", bits=4, checkpoint_every=7)
    run(tmp_path, "full", **flags)
    run(tmp_path, "part", max_steps=20, **flags)
    run(tmp_path, "part", resume=str(tmp_path / "part" / "checkpoints"), **flags)
    assert same_state(final_model(tmp_path / "full"), final_model(tmp_path / "part"))
    assert len(list((tmp_path / "part" / "checkpoints").glob("step-*"))) == 1  # old ones removed


def test_resume_refuses_another_piece_size(tmp_path):
    """scatter's residuals are kept per piece: a resume must cut the chunks the same way to equal the whole run."""
    flags = dict(simulate=2, codec="sign", topology="scatter", error_feedback=True, min_compress_numel=0,
                 checkpoint_every=1000, max_steps=30, piece_numel=1024)
    run(tmp_path, "full", **flags)
    run(tmp_path, "part", **{**flags, "max_steps": 17})
    with pytest.raises(MpiqsgdError, match="written with --piece-numel 1024, this run has --piece-numel 0"):
        run(tmp_path, "part", resume=str(tmp_path / "part"), **{**flags, "piece_numel": 0})
    run(tmp_path, "part", resume=str(tmp_path / "part"), **flags)
    assert same_state(final_model(tmp_path / "full"), final_model(tmp_path / "part"))


def test_resume_refuses_another_world_size(tmp_path):
    run(tmp_path, "a", simulate=2, max_steps=3, checkpoint_every=3)
    with pytest.raises(MpiqsgdError, match="written by 2 ranks"):
        run(tmp_path, "a", simulate=3, resume=str(tmp_path / "a"))


def test_sync_check_detects_drift(tmp_path, monkeypatch):
    original = GradientExchange.finish

    def drifting(self, step):
        original(self, step)
        if self.transport.rank == 1 and step == 2:
            self.params[0].grad.add_(1e-3)

    monkeypatch.setattr(GradientExchange, "finish", drifting)
    with pytest.raises(MpiqsgdError, match=r"replicas drifted at step 4: parameters of ranks \[1\]"):
        run(tmp_path, simulate=2, check_sync_every=4)


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
    with pytest.raises(MpiqsgdError) as info:
        run(tmp_path, simulate=1, dataset="cifar10", data_dir=str(tmp_path / "nothing"))
    message = str(info.value)
    assert str(tmp_path / "nothing") in message and "--data-dir" in message and "--download" in message


def test_trains_from_an_image_folder_archive(tmp_path):
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for split, n in (("train", 40), ("test", 10)):
        for c, name in enumerate(["cat", "dog", "ship"]):
            folder = src / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.full((32, 32, 3), 60 * c, np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    archive = tmp_path / "data" / "images.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
        tar.add(src / "test", arcname="test")
    summary, _ = run(tmp_path, simulate=2, dataset="cifar10", data_dir=str(archive.parent), batch_size=8,
                     epochs=3, lr=0.02)
    assert summary["parameters"] > 0 and summary["steps"] == 3 * (108 // 16)
    assert summary["final_val_acc"] > 0.5  # three easy classes


def test_learning_rate_schedules():
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="step", lr_decay_epochs="5,8", lr_decay_factor=0.1)
    assert [driver.learning_rate(cfg, s, 10) for s in (0, 49, 50, 79, 80)] == pytest.approx([1, 1, .1, .1, .01])
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="cosine")
    assert driver.learning_rate(cfg, 0, 10) == 1.0 and driver.learning_rate(cfg, 100, 10) == pytest.approx(0)
    assert driver.learning_rate(cfg, 50, 10) == pytest.approx(0.5)
    cfg = TrainConfig(epochs=10, lr=1.0, lr_schedule="constant", warmup_epochs=2)
    assert driver.learning_rate(cfg, 10, 10) == pytest.approx(0.5) and driver.learning_rate(cfg, 30, 10) == 1.0


@pytest.mark.parametrize("kw,match", [
    (dict(epochs=0), "--epochs must be at least 1"), (dict(batch_size=0), "--batch-size"),
    (dict(lr=0), "--lr must be positive"), (dict(val_fraction=1.0), "--val-fraction"),
    (dict(lr_decay_epochs="a,b"), "comma-separated"), (dict(simulate=-1), "--simulate"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw).validate()


def test_train_cli_reports_bad_flags(capsys, tmp_path):
    code = main(["train", "--simulate", "1", "--dataset", "synthetic", "--codec", "qsgd", "--bits", "9",
                 "--run-dir", str(tmp_path / "x"), "--no-progress"])
    assert code == 2 and "bits must be between 2 and 8" in capsys.readouterr().err


def test_too_few_images_is_a_clear_error(tmp_path):
    with pytest.raises(MpiqsgdError, match="too few"):
        run(tmp_path, simulate=2, synthetic_size=100, batch_size=64)


# -- library API ------------------------------------------------------------------------

def two_rank_models(seed=0):
    torch.manual_seed(seed)
    proto = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 3))
    models = [proto, type(proto)(*[type(m)(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
                                   else torch.nn.ReLU() for m in proto])]
    models[1].load_state_dict(models[0].state_dict())
    return models


def test_gradient_exchange_averages_and_splits_small_tensors():
    models = two_rank_models()
    for r, m in enumerate(models):
        m(torch.randn(8, 40, generator=torch.Generator().manual_seed(r))).sum().backward()
    expected = [(a.grad + b.grad) / 2 for a, b in zip(models[0].parameters(), models[1].parameters())]
    group = LocalGroup(2)

    def work(t):
        ex = GradientExchange(models[t.rank].parameters(), t, make_codec("fp32"), "ring", min_compress_numel=100)
        assert [p.numel() for p in ex.uncompressed] == [30, 90, 3]  # 30x3 weight is small too
        ex.synchronize(0)
        return ex

    group.run(work, group.transports())
    for m in models:
        for p, e in zip(m.parameters(), expected):
            assert torch.allclose(p.grad, e)


def test_distributed_optimizer_keeps_replicas_identical_and_warmup_is_uncompressed():
    models = two_rank_models(1)
    group = LocalGroup(2)
    transports = group.transports()

    def work(t):
        model = models[t.rank]
        ex = GradientExchange(model.parameters(), t, make_codec("qsgd", bits=2), "allgather", warmup_steps=2)
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), ex)
        sent = []
        for step in range(4):
            opt.zero_grad()
            x = torch.randn(16, 40, generator=torch.Generator().manual_seed(10 * step + t.rank))
            model(x).pow(2).mean().backward()
            before = t.meter.sent()["bytes"]
            opt.step()
            sent.append(t.meter.sent()["bytes"] - before)
        return sent

    sent = group.run(work, transports)[0]
    assert sent[0] == sent[1] > 4 * sent[2] and sent[2] == sent[3]  # fp32 warm-up, then 2-bit
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


# -- adaptive codecs in training ------------------------------------------------------------

def test_adaptive_codec_trains_refits_and_logs_diagnostics(tmp_path):
    summary, d = run(tmp_path, simulate=2, codec="alq", bits=3, bucket=1024, adapt_at="0,10", adapt_every=20,
                     diag_every=8)
    steps = summary["steps"]
    cost = summary["adaptation"]
    assert cost["updates"] == len({0, 10} | set(range(20, steps, 20)))
    assert cost["seconds_per_update"] > 0 and cost["bytes_per_update_per_rank"] > 0
    assert cost["levels"] != [-1, -0.5, -0.25, -0.125, 0.125, 0.25, 0.5, 1]  # moved from the NUQ start
    comm = json.loads((d / "comm.json").read_text())
    assert comm["by_phase"]["adapt"]["messages"] == 2 * cost["updates"]  # each rank to the other
    lines = [json.loads(line) for line in (d / "diagnostics.jsonl").read_text().splitlines()]
    diag = [x for x in lines if "quant_variance" in x]
    refits = [x["refit"] for x in lines if "refit" in x]
    assert [x["step"] for x in diag] == list(range(0, steps, 8))
    assert [r["step"] for r in refits] == sorted({0, 10} | set(range(20, steps, 20)))
    for r in refits:  # the guarantee: the kept table is the best candidate on its statistics
        assert r["psi"][r["won"]] == min(r["psi"].values()) and {"uniform", "qsgd", "nuq", "amq"} <= set(r["psi"])
    assert all(x["quant_variance"] > 0 and x["kurtosis"] > 1 and 0 < x["level_variance"] for x in diag)
    assert all(x["abs_quantiles"]["0.5"] < x["abs_quantiles"]["0.999"] for x in diag)
    assert len({round(x["kurtosis"], 6) for x in diag}) > 1  # it moves (coord_std did not)
    # at step 0 (diagnosed before the first refit) the NUQ start has much to gain; refits take it
    assert diag[0]["refit_gain"] > 1.1 and min(x["refit_gain"] for x in diag[1:]) < diag[0]["refit_gain"]
    assert all(x["refit_gain"] > 0.99 for x in diag)  # fresh levels on the gradient itself are (near) best
    # refitted levels quantize the drifting gradients better than the NUQ start of step 0
    assert min(x["quant_variance"] for x in diag[1:]) < diag[0]["quant_variance"]


def test_gradient_noise_is_logged_without_changing_training(tmp_path):
    flags = dict(simulate=2, codec="qsgd", bits=4, diag_every=0, checkpoint_every=1000)
    quiet, _ = run(tmp_path, "quiet", nvar_every=0, **flags)
    noisy, d = run(tmp_path, "noisy", nvar_every=3, nvar_batches=3, **flags)
    assert same_state(final_model(tmp_path / "quiet"), final_model(tmp_path / "noisy"))
    lines = [json.loads(line) for line in (d / "diagnostics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(3, noisy["steps"], 3))
    assert all(x["nvar"] > 0 for x in lines)


def test_resume_restores_adaptive_levels(tmp_path):
    flags = dict(simulate=2, codec="amq-n", bits=3, bucket=512, adapt_at="0,5",
                 adapt_every=12, checkpoint_every=1000, diag_every=0)
    full, _ = run(tmp_path, "full", **flags)
    run(tmp_path, "part", max_steps=15, **flags)
    resumed, _ = run(tmp_path, "part", resume=str(tmp_path / "part"), **flags)
    assert same_state(final_model(tmp_path / "full"), final_model(tmp_path / "part"))
    assert resumed["adaptation"]["levels"] == full["adaptation"]["levels"]


def test_divergence_is_a_clear_error(tmp_path):
    with pytest.raises(MpiqsgdError, match="training diverged at step"):
        run(tmp_path, simulate=2, lr=1e6, lr_schedule="constant")


def test_resume_refuses_changed_flags_and_drops_rows_after_the_checkpoint(tmp_path):
    run(tmp_path, "a", simulate=2, checkpoint_every=10, eval_every=5, max_steps=22)
    with pytest.raises(MpiqsgdError, match="written with --batch-size 32, this run has --batch-size 16"):
        run(tmp_path, "a", simulate=2, resume=str(tmp_path / "a"), batch_size=16)
    # as if the run had gone on past its last checkpoint (step 22) and crashed: rows to drop
    with open(tmp_path / "a" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 25, "stale": True}) + "\n")
    run(tmp_path, "a", simulate=2, resume=str(tmp_path / "a"), checkpoint_every=10, eval_every=5)
    assert "stale" not in (tmp_path / "a" / "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 32


@pytest.mark.parametrize("kw,match", [
    (dict(topology="ring", downlink="codec"), "--downlink only apply to --topology ps"),
    (dict(codec="alq", levels=7), "--levels applies only to --codec qsgd"),
    (dict(codec="sign", bits=2), "--bits does not apply to --codec sign"),
    (dict(seed=-1), "--seed must be >= 0"),
    (dict(nesterov=True, momentum=0.0), "--nesterov needs"),
])
def test_flag_combinations_that_cannot_work(tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path, simulate=1, **kw)


def test_dedicated_server_training_and_target_accuracy(tmp_path):
    summary, d = run(tmp_path, simulate=3, topology="ps", dedicated_server=True, epochs=1, target_acc=0.0,
                     diag_every=4)
    assert summary["n_workers"] == 2 and summary["steps"] == 1080 // (2 * 32)
    assert summary["steps_to_target"] == summary["steps"] and summary["seconds_to_target"] > 0
    assert len((d / "diagnostics.jsonl").read_text().splitlines()) == 4  # written by rank 1, the first worker


def test_resume_refuses_replicas_that_disagree_after_loading(tmp_path, monkeypatch):
    run(tmp_path, "a", simulate=2, max_steps=3, checkpoint_every=3)
    original = driver.load_checkpoint

    def perturbed(path, rank, world_size):
        saved = original(path, rank, world_size)
        if rank == 1:  # files that pass their own checks but hold another replica
            name = next(iter(saved["model"]))
            saved["model"][name] = saved["model"][name] + 1e-3
        return saved

    monkeypatch.setattr(driver, "load_checkpoint", perturbed)
    with pytest.raises(MpiqsgdError, match=r"replicas drifted after resuming from step 3: parameters of ranks \[1\]"):
        run(tmp_path, "a", simulate=2, max_steps=6, resume=str(tmp_path / "a"))


def test_diagnostics_fit_small_level_tables_only():
    from mpiqsgd.diagnostics import MAX_FIT_LEVELS, quantization

    g = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    small = quantization(make_codec("qsgd", bits=4), g, 0, 0, 0)
    large = quantization(make_codec("qsgd", bits=8), g, 0, 0, 0)
    assert small["fitted_variance"] > 0 and small["refit_gain"] >= 0.99
    assert len(make_codec("qsgd", bits=8).level_table()) > MAX_FIT_LEVELS
    assert large["level_variance"] > 0 and large["fitted_variance"] is None and large["refit_gain"] is None
