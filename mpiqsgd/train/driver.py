"""``mpiqsgd train``: data-parallel training with quantized gradient exchange.

Per step, on every rank (worker): draw the next batch of its shard, forward, backward,
:class:`~mpiqsgd.exchange.GradientExchange` (gradient -> codec -> bytes -> transport ->
bytes -> codec -> mean), then the same SGD update everywhere. Under MPI each rank is a
process; with ``--simulate N`` the same function runs in N threads of one process over
a :class:`~mpiqsgd.transport.LocalGroup`, with a lock so that one worker computes at a
time and each worker keeps its own RNG state, which makes a simulated run end with
the same parameters as an MPI run with the same flags.

Validation and test accuracy are measured after each epoch (and every ``--eval-every``
steps), every rank scoring 1/n of the images with the first worker's batch-norm
statistics; report the test accuracy of the run's end, and choose among runs by
validation accuracy. Rank 0 writes the files. The run directory holds ``config.json``,
``metrics.jsonl``, ``diagnostics.jsonl``, ``comm.json``, ``summary.json`` and
``checkpoints/``. Every flag, the device and the checkpoint to resume are checked before
anything is written, and a new run refuses a directory holding another run's files
(``--resume`` it, or choose a new ``--run-dir``): no run deletes or overwrites another's.
Every rank checkpoints after each epoch (``--checkpoint-every``), and SIGINT or SIGTERM
stops every rank after the same step with a checkpoint of it (:mod:`.interrupt`).
"""

import contextlib
import io
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .. import __version__, diagnostics
from ..errors import MpiqsgdError, StopJob
from ..exchange import GradientExchange, broadcast_parameters, parameter_checksum
from ..fileio import atomic_write_bytes
from ..launch import launched_world
from ..machine import default_device, machine_info
from ..trace import Tracer, parse_steps, write_trace
from . import data as D
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from .config import agreement_digest, check_agreement
from .console import Console
from .interrupt import StopSignals, resume_command
from .models import build_model

__all__ = ["train", "Worker", "run_worker", "load_data", "learning_rate", "count_correct"]


@dataclass
class Shared:
    """What the workers of one process share: the data, and the compute lock of a simulation."""

    train: D.ImageArrays
    val: D.ImageArrays
    test: D.ImageArrays
    lock: object
    run_dir: Path
    console: Console
    stop: object = None  # the job's StopSignals: SIGINT/SIGTERM stop every rank after the same step


def load_data(cfg, say=None):
    """(train, val, test, origin) as the flags ask: split, subset; ``origin`` of :func:`~.data.load_source`."""
    source = D.find_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    train, test, origin = D.load_source(source, synthetic_train=cfg.synthetic_size,
                                        synthetic_test=max(1, cfg.synthetic_size // 5), seed=cfg.seed, say=say)
    if cfg.val_fraction > 0:
        train, val = D.split_train_val(train, cfg.val_fraction, seed=cfg.seed)
    else:
        val = test
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        train = D.subset(train, cfg.train_subset, seed=cfg.seed)
    return train, val, test, origin


def learning_rate(cfg, step, steps_per_epoch):
    """The learning rate of ``step`` (a pure function of the step, so resuming needs no state)."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return cfg.lr * epoch / cfg.warmup_epochs
    if cfg.lr_schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (epoch - cfg.warmup_epochs) / span)))
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.decay_epochs())
    return cfg.lr


def default_run_dir(cfg):
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    bits = f"{cfg.bits}b" if cfg.bits else ""
    return Path("runs") / f"{stamp}-{os.getpid()}-{cfg.model}-{cfg.codec}{bits}-{cfg.topology}"


def _device(cfg, local_rank):
    """The device of the rank with this node-local rank: GPU local_rank % n_gpus under auto/cuda."""
    if cfg.device == "auto":
        return torch.device(default_device(local_rank))
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MpiqsgdError(f"--device {cfg.device}: CUDA is not available here; use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise MpiqsgdError(f"--device {cfg.device}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def _sync_for(device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


class _RNG:
    """A worker's own global-RNG state (dropout), swapped in around its compute."""

    def __init__(self, seed, rank, device):
        self.device = device
        seed = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0])
        self.cpu_state = torch.Generator().manual_seed(seed).get_state()
        self.cuda_state = (torch.Generator(device=device).manual_seed(seed).get_state()
                           if device.type == "cuda" else None)

    @contextlib.contextmanager
    def active(self):
        torch.set_rng_state(self.cpu_state)
        if self.device.type == "cuda" and self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            if self.device.type == "cuda":
                self.cuda_state = torch.cuda.get_rng_state(self.device)

    def state_dict(self):
        return {"cpu": self.cpu_state, "cuda": self.cuda_state}

    def load_state_dict(self, state):
        self.cpu_state, self.cuda_state = state["cpu"], state["cuda"]


def count_correct(model, arrays, device, rank=0, size=1, batch=1000):
    """Correct top-1 predictions of ``model`` on images ``rank, rank + size, ...`` of ``arrays``."""
    images, labels = arrays.images[rank::size], arrays.labels[rank::size]
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = D.to_tensor(images[start:start + batch], device=device)
            y = torch.as_tensor(labels[start:start + batch], device=device)
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct


def _buffers_bytes(model):
    buf = io.BytesIO()
    torch.save([b.detach().cpu() for b in model.buffers()], buf)
    return buf.getvalue()


class Worker:
    """One rank's training: :meth:`build` (in ``__init__``), :meth:`step`, :meth:`evaluate`,
    :meth:`checkpoint`, and :meth:`run` to loop them.

    What differs between an MPI rank and a simulated one lives in ``shared.lock`` (a
    simulation computes one worker at a time) and in this worker's own global-RNG state
    (:class:`_RNG`), both entered by :meth:`computing`; the step itself does not know
    which it is.
    """

    def __init__(self, cfg, transport, shared):
        self.cfg, self.transport, self.shared = cfg, transport, shared
        self.rank, self.n = transport.rank, transport.size
        self.device = _device(cfg, transport.local_rank)
        self.dedicated = cfg.dedicated_server and cfg.topology == "ps"
        if self.dedicated and self.n < 2:
            raise MpiqsgdError("--dedicated-server needs at least 2 ranks")
        self.workers = self.n - 1 if self.dedicated else self.n
        self.worker = self.rank - 1 if self.dedicated else self.rank
        self.computes = self.worker >= 0
        self.is_root = self.rank == 0
        self.meter, self.sync = transport.meter, _sync_for(self.device)
        if parse_steps(cfg.trace_steps):
            self.meter.tracer = Tracer(self.rank, parse_steps(cfg.trace_steps))
        self.build()

    def build(self):
        cfg, device, shared = self.cfg, self.device, self.shared
        with shared.lock:
            torch.manual_seed(cfg.seed)
            self.model = build_model(cfg.model, num_classes=shared.train.num_classes).to(device)
        broadcast_parameters(self.model, self.transport)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.exchange = GradientExchange(
            self.model.parameters(), self.transport, cfg.build_codec(), cfg.topology, seed=cfg.seed,
            min_compress_numel=cfg.min_compress_numel, warmup_steps=cfg.uncompressed_warmup_steps,
            adapt_at=cfg.adapt_steps(), adapt_every=cfg.adapt_every, bucket_mb=cfg.bucket_mb,
            overlap=cfg.overlap, hierarchical=cfg.hierarchical, **cfg.aggregator_options(cfg.topology))
        if self.exchange.nodes is not None and self.is_root:
            print(f"[mpiqsgd] {self.exchange.nodes.describe(cfg.topology)}", file=sys.stderr, flush=True)
        self.rng = _RNG(cfg.seed, self.rank, device)
        self.aug = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([cfg.seed, self.rank, 11]).generate_state(1)[0]))
        self.images = torch.from_numpy(shared.train.images).to(device)
        self.labels = torch.from_numpy(shared.train.labels).to(device)
        self.steps_per_epoch = len(shared.train) // (self.workers * cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise MpiqsgdError(f"{len(shared.train)} training images are too few for {self.workers} workers x "
                               f"batch {cfg.batch_size}; lower --batch-size or raise --train-subset")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.checkpoint_every = self.steps_per_epoch if cfg.checkpoint_every is None else cfg.checkpoint_every
        self.saved_at, self.interrupted = None, 0  # the step of the last checkpoint; the signal that stopped
        self.st = {"step": 0, "last_eval": -1, "loss_sum": 0.0, "loss_count": 0, "wall": 0.0,
                   "best_val": None, "target_step": None, "target_seconds": None, "history": [],
                   "warmup_steps": 0, "warmup_seconds": {}}
        if cfg.resume:
            self.resume()

    def resume(self):
        cfg, rank = self.cfg, self.rank
        saved = load_checkpoint(cfg.resume, rank, self.n)
        _check_resume_flags(saved.get("flags", {}), cfg)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.exchange.load_state_dict(saved["exchange"], self.device)
        self.rng.load_state_dict(saved["rng"])
        self.aug.set_state(saved["aug"])
        self.meter.load_totals(saved["meter"])
        self.st.update(saved["progress"])
        self.saved_at = self.st["step"]
        # Every file passed its own checks; the replicas must also agree with each other.
        self.check_sync(f"after resuming from step {self.st['step']}")
        if rank == 0:  # drop rows written after the checkpoint by the run that stopped
            truncate_log(self.shared.run_dir / "metrics.jsonl", self.st["step"], keep_equal=True)
            truncate_log(self.shared.run_dir / "diagnostics.jsonl", self.st["step"], keep_equal=False)

    @contextlib.contextmanager
    def computing(self):
        """Enter this worker's compute: the simulation's lock and this worker's RNG state."""
        with self.shared.lock, self.rng.active():
            yield

    def step(self, order, b):
        """One training step on batch ``b`` of the epoch's ``order``: forward, backward with the
        exchange, the update."""
        cfg, st, meter = self.cfg, self.st, self.meter
        step = st["step"]
        lr = learning_rate(cfg, step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=False)
        self.exchange.begin(step)
        if self.computes:
            with meter.time("compute", self.sync), self.computing():
                sel = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                x = D.augment(D.to_tensor(self.images.index_select(0, sel), device=self.device), self.aug)
                loss = torch.nn.functional.cross_entropy(self.model(x), self.labels.index_select(0, sel))
                loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise MpiqsgdError(
                    f"training diverged at step {step} on rank {self.rank}: loss is {value}; lower --lr, or "
                    "check --error-feedback (it needs a contractive codec: nearest rounding, sign, more bits)")
            st["loss_sum"] += value
            st["loss_count"] += 1
        diag_rank = self.rank == (1 if self.dedicated else 0)
        if diag_rank:
            line = self.exchange.diagnostics(step) if cfg.diag_every and step % cfg.diag_every == 0 else None
            if cfg.nvar_every and step > 0 and step % cfg.nvar_every == 0:
                line = {**(line or {"step": step}), "nvar": self.gradient_noise(step)}
            self.diagnose(line)
        self.exchange.finish(step)
        refits = self.exchange.refits
        if diag_rank and refits and refits[-1]["step"] == step:
            refit = refits[-1]
            self.diagnose({"step": step, "refit": refit})
            if refit["won"] != "fit":
                psi = refit["psi"]
                print(f"[mpiqsgd] step {step}: the fitted levels would have variance {psi['fit']:.4g} on the "
                      f"statistics they were fitted to; kept the {refit['won']} levels ({psi[refit['won']]:.4g})",
                      file=sys.stderr, flush=True)
        with meter.time("update", self.sync):
            self.optimizer.step()
        st["step"] += 1

    def diagnose(self, line):
        """Append one line (a dict, or nothing for None) to ``diagnostics.jsonl``."""
        if line is not None:
            with open(self.shared.run_dir / "diagnostics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")

    def gradient_noise(self, step):
        """``nvar`` of :mod:`mpiqsgd.diagnostics`: gradients of ``--nvar-batches`` extra training batches
        (no augmentation), taken with ``torch.autograd.grad`` so that no ``.grad``, hook, batch-norm
        buffer or random state of training changes."""
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        pick = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, self.rank, step, 13])
                                                 .generate_state(1)[0]))
        grads = []
        with self.computing():
            rng = torch.get_rng_state()
            buffers = [b.detach().clone() for b in self.model.buffers()]
            try:
                for _ in range(cfg.nvar_batches):
                    sel = torch.randint(0, self.images.shape[0], (cfg.batch_size,), generator=pick)
                    sel = sel.to(self.images.device)
                    x = D.to_tensor(self.images.index_select(0, sel), device=self.device)
                    loss = torch.nn.functional.cross_entropy(self.model(x), self.labels.index_select(0, sel))
                    grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
            finally:
                torch.set_rng_state(rng)
                with torch.no_grad():
                    for b, v in zip(self.model.buffers(), buffers):
                        b.copy_(v)
        return diagnostics.gradient_noise(grads)

    def check_sync(self, when=None):
        """Collective: refuse unless every rank's parameters are bit-identical to rank 0's."""
        sums = self.transport.allgather_bytes(parameter_checksum(self.model.parameters()))
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        if bad:
            when = when or f"at step {self.st['step']}"
            raise MpiqsgdError(f"replicas drifted {when}: parameters of ranks {bad} differ from rank 0")

    def evaluate(self):
        """Collective: job byte totals and training loss from all ranks; rank 0 logs the accuracies."""
        st, transport, meter, shared, n, rank = self.st, self.transport, self.meter, self.shared, self.n, self.rank
        st["last_eval"] = st["step"]
        trained = time.perf_counter()  # the console's seconds per step leave the evaluation out
        job = meter.job_totals(transport)
        losses = transport.allgather_bytes(np.array([st["loss_sum"], st["loss_count"]], np.float64).tobytes())
        pairs = np.stack([np.frombuffer(b, np.float64) for b in losses])
        st["loss_sum"], st["loss_count"] = 0.0, 0
        with meter.time("eval"):
            # Every rank scores a 1/n share of the images with the first worker's batch-norm
            # statistics (each replica keeps its own), so no rank idles while one evaluates.
            source = 1 if self.dedicated else 0
            model = self.model
            stats = transport.bcast_bytes(_buffers_bytes(model) if rank == source else b"", root=source)
            with shared.lock:
                own = [b.detach().clone() for b in model.buffers()]
                for b, v in zip(model.buffers(), torch.load(io.BytesIO(stats), weights_only=True)):
                    b.copy_(v)
                counts = np.array([count_correct(model, shared.val, self.device, rank, n),
                                   count_correct(model, shared.test, self.device, rank, n)], np.int64)
                for b, v in zip(model.buffers(), own):
                    b.copy_(v)
            counts = sum(np.frombuffer(c, np.int64) for c in transport.allgather_bytes(counts.tobytes()))
        if not self.is_root:
            return job
        val, test = counts[0] / max(1, len(shared.val)), counts[1] / max(1, len(shared.test))
        wall = time.perf_counter() - self.started
        train_loss = float(pairs[:, 0].sum() / max(1.0, pairs[:, 1].sum()))
        row = {"epoch": st["step"] / self.steps_per_epoch, "step": st["step"], "train_loss": train_loss,
               "val_acc": float(val), "test_acc": float(test), "wall_seconds": wall,
               "bytes_sent": job["sent"]["bytes"], "lr": self.optimizer.param_groups[0]["lr"]}
        st["history"].append(row)
        if st["best_val"] is None or val > st["best_val"]:
            st["best_val"] = val
        if self.cfg.target_acc is not None and st["target_step"] is None and val >= self.cfg.target_acc:
            st["target_step"], st["target_seconds"] = st["step"], wall
        with open(shared.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (step0, bytes0), (time_step0, time0) = self.marks
        shared.console.evaluation(row, self.cfg.epochs, (row["bytes_sent"] - bytes0) / max(1, st["step"] - step0) / n,
                                  (trained - time0) / max(1, st["step"] - time_step0))
        self.marks = (st["step"], row["bytes_sent"]), (st["step"], time.perf_counter())
        return job

    def checkpoint(self):
        state = {"flags": self.cfg.to_dict(), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "exchange": self.exchange.state_dict(),
                 "rng": self.rng.state_dict(), "aug": self.aug.get_state(), "meter": self.meter.totals(),
                 "progress": dict(self.st, wall=time.perf_counter() - self.started)}
        with self.meter.span("checkpoint", "checkpoint"):
            save_checkpoint(self.shared.run_dir / "checkpoints", self.st["step"], state, self.transport)
        self.saved_at = self.st["step"]

    def run(self):
        """Train to the end; return rank 0's summary (None elsewhere)."""
        cfg, st, console = self.cfg, self.st, self.shared.console
        if self.is_root and cfg.progress:
            console.start_progress(self.total_steps, st["step"])
        self.started = time.perf_counter() - st["wall"]
        last = st["history"][-1] if st["history"] else {"step": 0, "bytes_sent": 0}
        self.marks = (last["step"], last["bytes_sent"]), (st["step"], time.perf_counter())
        try:
            self._loop()
        finally:
            self.exchange.close()
            if self.is_root:
                console.close_progress()
        if (self.checkpoint_every or self.interrupted) and st["step"] != self.saved_at:
            self.checkpoint()
        # An interrupted run ends within seconds: its last evaluation stands.
        evaluate = st["last_eval"] != st["step"] and not self.interrupted
        job = self.evaluate() if evaluate else self.meter.job_totals(self.transport)
        ranks = self.transport.allgather_bytes(json.dumps({"device": str(self.device),
                                                           "warmup_seconds": st["warmup_seconds"]}).encode())
        write_trace(self.meter, self.transport, self.shared.run_dir / "trace.json")
        if not self.is_root:
            return None
        summary = _finish(cfg, self.shared.run_dir, job, st, self.n, self.workers, self.steps_per_epoch,
                          [json.loads(r) for r in ranks], self.model, self.exchange,
                          time.perf_counter() - self.started if self.interrupted else None)
        if not self.interrupted:  # an interrupted run says its one line (interrupt.py) instead
            console.finish(summary, self.shared.run_dir)
        return summary

    def _timing_warmup_end(self):
        """The step after which this process's phase timings count: its first step (kernels compile
        and caches fill in it), or the first compressed one after ``--uncompressed-warmup-steps``,
        leaving at least one step of the run timed."""
        start = self.st["step"]
        return max(start, min(max(start + 1, self.cfg.uncompressed_warmup_steps + 1), self.total_steps - 1))

    def _loop(self):
        cfg, st, spe, console = self.cfg, self.st, self.steps_per_epoch, self.shared.console
        self.model.train()
        warm_end, warm_from = self._timing_warmup_end(), (st["step"], dict(self.meter.seconds))
        while st["step"] < self.total_steps and not self.interrupted:
            epoch, first = divmod(st["step"], spe)
            order = torch.from_numpy(D.shard_indices(len(self.shared.train), max(self.worker, 0), self.workers,
                                                     epoch, cfg.seed)).to(self.device)
            for b in range(first, spe):
                if st["step"] >= self.total_steps:
                    break
                first = self.is_root and st["step"] == warm_from[0]
                with console.first_step() if first else contextlib.nullcontext():
                    self.step(order, b)
                if st["step"] == warm_end:  # phase timings from here on leave compilation out
                    for phase, seconds in self.meter.seconds.items():
                        st["warmup_seconds"][phase] = (st["warmup_seconds"].get(phase, 0.0) + seconds
                                                       - warm_from[1].get(phase, 0.0))
                    st["warmup_steps"] += warm_end - warm_from[0]
                if self.is_root:
                    console.step_done()
                if cfg.check_sync_every and st["step"] % cfg.check_sync_every == 0:
                    self.check_sync()
                if st["step"] % spe == 0 or (cfg.eval_every and st["step"] % cfg.eval_every == 0):
                    self.evaluate()
                if self.checkpoint_every and st["step"] % self.checkpoint_every == 0:
                    self.checkpoint()
                if st["step"] < self.total_steps and self.stop_requested():  # after the last step: done anyway
                    break

    def stop_requested(self):
        """Collective: whether some rank received SIGINT or SIGTERM (every rank gets the same answer)."""
        stop = self.shared.stop
        if stop is None or not stop.agree(self.transport):
            return False
        self.interrupted, stop.step, stop.total_steps = stop.agreed, self.st["step"], self.total_steps
        return True


def run_worker(cfg, transport, shared):
    """Train on one rank; return rank 0's summary (None elsewhere)."""
    return Worker(cfg, transport, shared).run()


# Flags a resumed run must share with the checkpoint (others, like --epochs, may change): the ones that
# change what is computed from the state. --piece-numel is among them: scatter and intsum give the same
# bits for any piece size within a run, but scatter's error-feedback residuals are kept per piece (keyed
# by the piece's offset), so a resume with other pieces would start them from zero. It is also agreed
# across ranks (it is not RUN_LOCAL): it sets how many collectives each step calls, and of what sizes.
# --encoding is not: the encodings are lossless and hold no state.
RESUME_FLAGS = ("model", "dataset", "train_subset", "val_fraction", "synthetic_size", "batch_size", "seed",
                "codec", "bits", "levels", "bucket", "rounding", "clip_sigma", "norm", "fit", "error_feedback",
                "topology", "downlink", "server_error_feedback", "dedicated_server", "piece_numel", "hierarchical",
                "min_compress_numel", "bucket_mb")


def _check_resume_flags(saved, cfg):
    for name in RESUME_FLAGS:
        if name in saved and saved[name] != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise MpiqsgdError(f"cannot resume: the checkpoint was written with {flag} {saved[name]!r}, "
                               f"this run has {flag} {getattr(cfg, name)!r}")


def _adaptation_cost(job, exchange, n, steps, wall):
    """Cost of level refits (seconds and bytes per update) against a training step."""
    if exchange.adaptive is None:
        return None
    updates = sum(exchange.adapts_at(s) for s in range(steps))
    if not updates:
        return {"updates": 0}
    seconds = job["seconds"].get("adapt", 0.0) / n / updates
    sent = job["by_phase"].get("adapt", {}).get("bytes", 0) / n / updates
    step_seconds = wall / max(1, steps)
    return {"updates": updates, "seconds_per_update": seconds, "bytes_per_update_per_rank": sent,
            "step_seconds": step_seconds, "update_vs_step_seconds": seconds / step_seconds,
            "levels": [float(v) for v in exchange.adaptive.levels]}


def _finish(cfg, run_dir, job, st, n, workers, steps_per_epoch, ranks, model, exchange, interrupted_wall=None):
    """Write ``summary.json``, ``comm.json`` and the devices; ``interrupted_wall``: the seconds of a run
    stopped by a signal, whose accuracies are those of its last evaluation (at ``evaluated_at_step``)."""
    last = st["history"][-1] if st["history"] else {}
    steps = st["step"]
    sent = job["sent"]
    wall = last.get("wall_seconds") if interrupted_wall is None else interrupted_wall
    status = {"status": "complete"} if interrupted_wall is None else {
        "status": "interrupted", "interrupted_at_step": steps, "evaluated_at_step": last.get("step")}
    # Phase seconds of the warm-up steps (kernel compilation) apart; comm.json keeps the true totals.
    warmup = {}
    for rank in ranks:
        for phase, seconds in rank["warmup_seconds"].items():
            warmup[phase] = warmup.get(phase, 0.0) + seconds
    for rank, totals in zip(ranks, job["per_rank"]):
        totals["warmup_seconds"] = rank["warmup_seconds"]
    job.update(warmup_steps=st["warmup_steps"], warmup_seconds=dict(sorted(warmup.items())))
    summary = {
        **status,
        "final_val_acc": last.get("val_acc"),
        "best_val_acc": st["best_val"],
        "test_acc": last.get("test_acc"),
        "epochs": steps / steps_per_epoch,
        "steps": steps,
        "wall_seconds": wall,
        "target_acc": cfg.target_acc,
        "steps_to_target": st["target_step"],
        "seconds_to_target": st["target_seconds"],
        "bytes_per_step_per_rank": sent["bytes"] / max(1, steps) / n,
        "total_bytes": sent["bytes"],
        "compression_vs_fp32": sent["fp32_bytes"] / sent["bytes"] if sent["bytes"] else None,
        "seconds_per_phase": {k: (v - warmup.get(k, 0.0)) / n for k, v in job["seconds"].items()},
        "warmup_steps": st["warmup_steps"],
        "warmup_seconds_per_phase": {k: v / n for k, v in job["warmup_seconds"].items()},
        "n_ranks": n,
        "n_workers": workers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "adaptation": _adaptation_cost(job, exchange, n, steps, wall),
    }
    atomic_write_bytes(run_dir / "comm.json", json.dumps(job, indent=1).encode())
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=1).encode())
    config = json.loads((run_dir / "config.json").read_text())
    config["devices"] = [rank["device"] for rank in ranks]
    atomic_write_bytes(run_dir / "config.json", json.dumps(config, indent=1).encode())
    return summary


# What makes a directory a run's: a new run refuses a directory holding any of these.
RUN_FILES = ("config.json", "metrics.jsonl", "diagnostics.jsonl", "comm.json", "summary.json", "checkpoints")


def _source_run_dir(resume):
    """The run directory of ``--resume`` (a run, checkpoints or step directory)."""
    path = Path(resume)
    if path.name == "checkpoints":
        return path.parent
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def _check_run_dir(cfg, run_dir, world_size):
    """Refuse, before anything is written, a run directory or ``--resume`` that cannot be used.

    A new run never shares a directory with another run's files; ``--resume`` needs a
    checkpoint of this world size and of the same flags, and writes into its own run
    directory or into a new one.
    """
    if cfg.resume:
        if not Path(cfg.resume).exists():
            raise MpiqsgdError(f"--resume {cfg.resume}: no such directory")
        _, info = find_checkpoint(cfg.resume)
        saved = info.get("world_size")
        if saved is not None and saved != world_size:
            raise MpiqsgdError(f"cannot resume: the checkpoint at {cfg.resume} was written by {saved} ranks; "
                               f"this job has {world_size}")
        _check_resume_flags(info.get("flags") or {}, cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise MpiqsgdError(f"--run-dir {run_dir} is a file, not a directory")
    if cfg.resume and run_dir.resolve() == _source_run_dir(cfg.resume).resolve():
        return
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held:
        hint = (f"pass --resume {run_dir} to continue it, or choose a new --run-dir" if "checkpoints" in held
                else "choose a new --run-dir (it has no checkpoint to --resume from)")
        raise MpiqsgdError(f"--run-dir {run_dir} already holds a run ({', '.join(held)}); {hint}")


def _prepare_run_dir(cfg, world_size, simulate, data=None):
    """Check, then create the run directory and write its ``config.json`` (``data``: where the
    images came from); return its path."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    if cfg.resume and not cfg.run_dir:
        run_dir = _source_run_dir(cfg.resume)
    _check_run_dir(cfg, run_dir, world_size)
    config = {"flags": cfg.to_dict(), "mpiqsgd": __version__, "world_size": world_size,
              "simulated": bool(simulate), "machine": machine_info(), "data": data}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", json.dumps(config, indent=1).encode())
    except OSError as exc:
        raise MpiqsgdError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; choose a "
                           "writable --run-dir") from None
    return run_dir


def _check_before_disk(cfg, n_images, world_size, local_rank):
    """Refuse what the flags, the data and the world size cannot run, before the disk is touched."""
    _device(cfg, local_rank)
    dedicated = cfg.dedicated_server and cfg.topology == "ps"
    if dedicated and world_size < 2:
        raise MpiqsgdError("--dedicated-server needs at least 2 ranks")
    workers = world_size - 1 if dedicated else world_size
    if n_images // (workers * cfg.batch_size) < 1:
        raise MpiqsgdError(f"{n_images} training images are too few for {workers} workers x "
                           f"batch {cfg.batch_size}; lower --batch-size or raise --train-subset")


def _check_flags_agree(cfg, transport):
    """Refuse, on every rank, a job whose ranks were started with different flags.

    Ranks that disagree on the topology, the epochs or the batch size would wait for
    messages that never come; on the rate or the seed they would train diverging
    replicas. One uncounted ``allgather_bytes`` of :func:`~.config.agreement_digest`,
    before any other message and before the disk is touched.
    """
    check_agreement(transport.allgather_bytes(agreement_digest(cfg, transport.size)))


def _os_error(exc):
    """A one-line :class:`MpiqsgdError` for a file the run could not read or write."""
    where = f" {exc.filename}" if exc.filename else ""
    return MpiqsgdError(f"I/O error on{where}: {exc.strerror or exc}")


def train(cfg, transport=None, console=None):
    """Run ``cfg`` under MPI (one call per rank) or, with ``cfg.simulate``, as N threads here.

    Args:
        console: rank 0's :class:`~.console.Console` (default: lines for a person on stdout).

    Returns:
        the summary dict on rank 0 (and in a simulation), None on other ranks.

    Raises:
        Interrupted: on every rank, after SIGINT or SIGTERM stopped the run at a checkpoint
            (see :mod:`.interrupt`; called from the main thread only).
    """
    cfg.validate()
    with StopSignals() as stop:
        try:
            return _train(cfg, transport, stop, console or Console())
        except OSError as exc:  # a full or read-only disk mid-run: one line, not a traceback
            raise _os_error(exc) from None


def _check_launch(cfg, world_size, launched):
    """Refuse ``--simulate`` in one of several launched processes; say when one rank exchanges nothing."""
    if cfg.simulate and launched and launched[0] > 1:
        line = (f"mpiqsgd: error: --simulate {cfg.simulate} runs its workers as threads of one process, but "
                f"mpiexec started {launched[0]} processes; drop --simulate, or run it without mpiexec")
        raise StopJob(line if launched[1] == 0 else "", exit_code=2)
    if world_size == 1 and not cfg.simulate:
        how = (f"mpiexec started one rank: the {cfg.topology} exchange is skipped" if launched else
               "running one rank without mpiexec: no gradient exchange")
        coded = "" if cfg.codec == "fp32" else f" (the {cfg.codec} codec still encodes and decodes the gradient)"
        print(f"mpiqsgd: {how}{coded}; for N ranks: mpiexec -n N mpiqsgd train ..., or --simulate N in one "
              "process", file=sys.stderr, flush=True)


def _train(cfg, transport, stop, console):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.simulate:
        from ..transport import LocalGroup

        _check_launch(cfg, cfg.simulate, launched_world())
        train_set, val, test, origin = load_data(cfg, console.say)
        _check_before_disk(cfg, len(train_set), cfg.simulate, 0)
        run_dir = _prepare_run_dir(cfg, cfg.simulate, True, origin)
        console.run_directory(run_dir)
        shared = Shared(train_set, val, test, threading.Lock(), run_dir, console, stop)
        group = LocalGroup(cfg.simulate, cfg.ranks_per_node or None)
        summary = group.run(lambda t: run_worker(cfg, t, shared), group.transports())[0]
        if stop.agreed:
            raise stop.interrupted(run_dir, resume_command(run_dir, cfg.simulate, True), summary)
        return summary
    if transport is None:
        from ..transport import world

        transport = world(cfg.wait, cfg.comm_timeout if cfg.comm_timeout and cfg.wait == "backoff" else None)
    _check_flags_agree(cfg, transport)
    if transport.rank == 0:
        _check_launch(cfg, transport.size, launched_world())
    train_set, val, test, origin = load_data(cfg, console.say if transport.rank == 0 else None)
    _check_before_disk(cfg, len(train_set), transport.size, transport.local_rank)
    run_dir = None
    if transport.rank == 0:
        run_dir = _prepare_run_dir(cfg, transport.size, False, origin)
        console.run_directory(run_dir)
    run_dir = Path(transport.bcast_bytes(str(run_dir or "").encode()).decode())
    shared = Shared(train_set, val, test, contextlib.nullcontext(), run_dir, console, stop)
    summary = run_worker(cfg, transport, shared)
    if stop.agreed:
        command = resume_command(run_dir, transport.size, False) if transport.rank == 0 else None
        raise stop.interrupted(run_dir, command, summary)
    return summary
