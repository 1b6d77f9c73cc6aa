"""Library API: exchange a model's gradients through a codec and a topology.

For use from a user's own PyTorch loop, in the spirit of Horovod's
``DistributedOptimizer``::

    transport = mpiqsgd.transport.world()
    broadcast_parameters(model, transport)              # same start on every rank
    exchange = GradientExchange(model.parameters(), transport, make_codec("qsgd", bits=4),
                                topology="ring", min_compress_numel=1024, bucket_mb=1, overlap=True)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), exchange)
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()                                 # arms the exchange for this step
        loss_fn(model(x), y).backward()                 # buckets leave as their gradients are ready
        opt.step()                                      # wait for all buckets, then the local update

Data path per step: gradients -> gradient buckets -> per bucket two fused flat buffers
(tensors with at least ``min_compress_numel`` elements are compressed, smaller ones such
as biases and batch norm go as fp32) -> each buffer's topology -> the mean written back
into ``.grad``. Every rank then applies the same optimizer step, so replicas stay
bit-identical. The fp32 buffer is one more message pattern of the same topology
(``allreduce`` for the ``allreduce`` baseline), counted by the same meter.

Gradient buckets (``bucket_mb``): parameters in reverse order of registration (the order
backward produces their gradients, as in DDP), filled greedily to ``bucket_mb`` MB of
fp32 gradient; ``bucket_mb=0`` is one bucket in registration order. Bucket ``i`` is
aggregated with codec stream ``i`` (independent randomness, its own error-feedback
residuals); the one-bucket exchange is stream 0, the exchange of the whole gradient.

Overlap (``overlap=True``): each parameter's post-accumulate-grad hook counts down its
bucket; a complete bucket is copied into its flat buffers and handed to one
communication thread per rank, which aggregates buckets strictly in index order (the
same order on every rank, whatever order the hooks fire in) while backward goes on.
:meth:`GradientExchange.finish` hands over the buckets whose gradients never arrived,
waits for the thread and writes all means into ``.grad``. Results are bit-identical to
the same bucketing without overlap: the same buffers, streams and order reach the same
aggregators. Only one thread calls the transport at a time (MPI needs
``MPI_THREAD_SERIALIZED``, checked at construction). Steps that refit an adaptive codec
do not overlap: the refit needs the whole gradient before the first bucket is encoded.
The meter's ``wait`` phase is the time the training thread waits in ``finish``.

Adaptive codecs (ALQ, AMQ and their -N variants) refit their levels at the steps of
the schedule (by default 0, 100, 2000, then every 10,000): every rank computes
sufficient statistics of its whole compressed gradient (registration order), they are
allgathered (phase ``adapt``, counted), merged in rank order, and every rank fits the
same levels from the same merged statistics, so all ranks hold bit-identical tables.
"""

import io
import queue
import threading

import torch

from .codecs.base import all_finite
from .errors import ConfigError, NonFiniteError
from .topology import make_aggregator, make_fp32_aggregator

__all__ = ["GradientExchange", "DistributedOptimizer", "Bucket", "make_buckets", "broadcast_parameters",
           "parameter_checksum"]


def broadcast_parameters(module, transport, root=0):
    """Overwrite every rank's parameters and buffers with ``root``'s (uncounted set-up traffic)."""
    state = module.state_dict()
    buf = io.BytesIO()
    if transport.rank == root:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    received = transport.bcast_bytes(buf.getvalue(), root)
    if transport.rank != root:
        loaded = torch.load(io.BytesIO(received), weights_only=True)
        module.load_state_dict(loaded)


def parameter_checksum(parameters):
    """Bytes that differ when any parameter differs in any bit (for the replica sync check)."""
    import hashlib

    h = hashlib.sha1()
    for p in parameters:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class Bucket:
    """Parameters whose gradients travel together: ``compressed`` ones and ``uncompressed`` ones."""

    def __init__(self, index, params, min_compress_numel):
        self.index = index
        self.params = params
        self.compressed = [p for p in params if p.numel() >= min_compress_numel]
        self.uncompressed = [p for p in params if p.numel() < min_compress_numel]

    def __repr__(self):
        return (f"Bucket({self.index}, {len(self.compressed)}+{len(self.uncompressed)} tensors, "
                f"{sum(p.numel() for p in self.params)} coordinates)")


def make_buckets(params, bucket_mb, min_compress_numel):
    """Cut ``params`` into :class:`Bucket` s of about ``bucket_mb`` MB of fp32 gradient (see the module doc)."""
    if bucket_mb is None or bucket_mb < 0:
        raise ConfigError(f"bucket_mb must be >= 0; got {bucket_mb}")
    if bucket_mb == 0:
        return [Bucket(0, list(params), min_compress_numel)]
    limit = bucket_mb * 1e6
    groups, current, nbytes = [], [], 0
    for p in reversed(list(params)):
        if current and nbytes + 4 * p.numel() > limit:
            groups.append(current)
            current, nbytes = [], 0
        current.append(p)
        nbytes += 4 * p.numel()
    groups.append(current)
    return [Bucket(i, g, min_compress_numel) for i, g in enumerate(groups)]


class GradientExchange:
    """Average the gradients of ``parameters`` across ranks through a codec and topology.

    Args:
        parameters: iterable of tensors with ``.grad`` (the model's parameters).
        transport: a :class:`~mpiqsgd.transport.Transport`.
        codec: the codec of the compressed buffers (error feedback included).
        topology: ``allreduce``, ``ps``, ``ring``, ``scatter`` or ``allgather``.
        seed: base seed of codec randomness.
        min_compress_numel: tensors with fewer elements travel uncompressed (fp32).
        warmup_steps: steps before this one send everything uncompressed.
        adapt_at: steps at which an adaptive codec refits its levels ...
        adapt_every: ... and every this many steps (0: never again).
        bucket_mb: gradient bucket size in MB (0: one bucket).
        overlap: aggregate buckets in a communication thread while backward runs.
        **options: topology options (``ps``: downlink, server_error_feedback, dedicated).
    """

    def __init__(self, parameters, transport, codec, topology="scatter", seed=0, min_compress_numel=0,
                 warmup_steps=0, adapt_at=(0, 100, 2000), adapt_every=10000, bucket_mb=0, overlap=False,
                 **options):
        self.params = [p for p in parameters if p.requires_grad]
        if not self.params:
            raise ConfigError("GradientExchange: no parameters that require gradients")
        self.transport = transport
        self.codec = codec
        self.warmup_steps = warmup_steps
        self.compressed = [p for p in self.params if p.numel() >= min_compress_numel]
        self.uncompressed = [p for p in self.params if p.numel() < min_compress_numel]
        self.buckets = make_buckets(self.params, bucket_mb, min_compress_numel)
        self.aggregator = make_aggregator(topology, transport, codec, seed=seed, **options)
        self.fp32 = make_fp32_aggregator(topology, transport, seed=seed, **options)
        self.numel = {"compressed": sum(p.numel() for p in self.compressed),
                      "uncompressed": sum(p.numel() for p in self.uncompressed)}
        self.adaptive = codec.base if codec.adaptive else None
        self.adapt_at = set(adapt_at)
        self.adapt_every = adapt_every
        self.seed = seed
        self.refits = []  # {"step", "won", "psi"} of each refit (the guarantee's log)
        self.overlap = _Overlap(self) if overlap else None

    def compresses_at(self, step):
        """Whether ``step`` sends the compressed buffers through the codec (after the warm-up steps)."""
        return step >= self.warmup_steps

    def adapts_at(self, step):
        """Whether the adaptive codec refits its levels at ``step``."""
        if self.adaptive is None or not self.compressed:
            return False
        return step in self.adapt_at or (self.adapt_every > 0 and step > 0 and step % self.adapt_every == 0)

    def adapt(self, flat, step):
        """Refit the adaptive codec's levels from every rank's statistics of ``flat`` (collective)."""
        from .codecs import gradstats

        t = self.transport
        t.begin_step(step)
        if not all_finite(flat):
            raise NonFiniteError(f"gradient holds NaN/Inf at step {step}; not refitting levels to it")
        # "adapt" times this rank's own work; waiting for the others is "communicate".
        with t.timed("adapt"):
            local = gradstats.stats_to_bytes(self.adaptive.local_stats(flat))
        gathered = t.allgather_bytes(local, phase="adapt")
        with t.timed("adapt"):
            self.adaptive.fit(gradstats.merge_stats([gradstats.stats_from_bytes(b) for b in gathered]))
        self.refits.append({"step": step, **self.adaptive.last_fit})

    def diagnostics(self, step):
        """Quantization diagnostics of this rank's compressed gradient (no communication; the
        fields of :mod:`mpiqsgd.diagnostics`)."""
        from .diagnostics import quantization

        return quantization(self.codec, _flatten(self.compressed), self.seed, self.transport.rank, step)

    def _aggregate_bucket(self, bucket, flats, step, compress):
        """The means of one bucket's (compressed, uncompressed) flat buffers (collective)."""
        agg_c = self.aggregator if compress else self.fp32
        flat_c, flat_u = flats
        return (agg_c.aggregate(flat_c, step, bucket.index) if flat_c is not None else None,
                self.fp32.aggregate(flat_u, step, bucket.index) if flat_u is not None else None)

    def begin(self, step):
        """Stamp ``step`` on the meter and arm the exchange before its backward (overlap only)."""
        self.transport.begin_step(step)  # the step's compute is counted (and traced) as this step's
        if self.overlap is not None:
            self.overlap.begin(step, arm=not self.adapts_at(step))

    def finish(self, step):
        """Replace every parameter's ``.grad`` by its mean over ranks (collective).

        With overlap, waits for the buckets that :meth:`begin` armed (and sends those whose
        gradients never arrived); without, aggregates every bucket now.
        """
        if self.adapts_at(step):
            self.adapt(_flatten(self.compressed), step)
        if self.overlap is not None:
            results = self.overlap.finish(step)
        else:
            compress = self.compresses_at(step)
            results = [self._aggregate_bucket(b, _bucket_flats(b), step, compress) for b in self.buckets]
        for bucket, (mean_c, mean_u) in zip(self.buckets, results):
            if mean_c is not None:
                _unflatten(mean_c, bucket.compressed)
            if mean_u is not None:
                _unflatten(mean_u, bucket.uncompressed)

    def synchronize(self, step):
        """:meth:`finish` for a step that was never armed: aggregate every bucket now (collective)."""
        if self.overlap is not None:
            self.overlap.begin(step, arm=False)
        self.finish(step)

    def close(self):
        """Stop the communication thread (overlap only)."""
        if self.overlap is not None:
            self.overlap.close()

    def _stateful(self):
        for name, agg in (("compressed", self.aggregator), ("uncompressed", self.fp32)):
            for role, codec in agg.codecs.items():
                yield f"{name}.{role}", codec

    def state_dict(self):
        """Codec state (error-feedback residuals, adaptive levels) for checkpoints."""
        state = {}
        for key, codec in self._stateful():
            codec_state = codec.state_dict()
            if codec_state:
                state[key] = codec_state
        return state

    def load_state_dict(self, state, device="cpu"):
        for key, codec in self._stateful():
            if key in state:
                codec.load_state_dict(state[key], device)


def _flatten(params):
    if not params:
        return None
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                      for p in params])


def _bucket_flats(bucket):
    return _flatten(bucket.compressed), _flatten(bucket.uncompressed)


def _unflatten(flat, params):
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


class _Overlap:
    """The communication thread of a :class:`GradientExchange` and the hooks that feed it.

    State per step: ``remaining[i]`` counts the parameters of bucket ``i`` whose gradient
    has not arrived; ``flats[i]`` holds bucket ``i``'s copied buffers once complete;
    ``next_index`` is the first bucket not yet handed to the thread. The thread takes
    ``(bucket, flats)`` jobs from a queue in index order and appends each bucket's means
    to ``results``; ``None`` stops it.
    """

    def __init__(self, exchange):
        exchange.transport.require_threads()
        self.exchange = exchange
        self.bucket_of = {}
        for bucket in exchange.buckets:
            for p in bucket.params:
                self.bucket_of[id(p)] = bucket.index
                p.register_post_accumulate_grad_hook(self._on_grad)
        self.lock = threading.Lock()
        self.jobs = queue.Queue()
        self.done = queue.Queue()
        self.armed = False
        self.step = None
        self.thread = None
        self.early = 0  # buckets of the last step handed over during backward (before finish)

    def begin(self, step, arm):
        with self.lock:
            self.step = step
            self.armed = arm
            self.remaining = [len(b.params) for b in self.exchange.buckets]
            self.flats = [None] * len(self.exchange.buckets)
            self.next_index = 0
            self.early = 0
            self.compress = self.exchange.compresses_at(step)

    def _on_grad(self, param):
        with self.lock:
            if not self.armed:
                return
            i = self.bucket_of[id(param)]
            self.remaining[i] -= 1
            if self.remaining[i] == 0:
                self.flats[i] = _bucket_flats(self.exchange.buckets[i])
                before = self.next_index
                self._hand_over()
                self.early += self.next_index - before

    def _hand_over(self):
        """Give the thread every complete bucket from ``next_index`` on, in index order (lock held)."""
        buckets = self.exchange.buckets
        while self.next_index < len(buckets) and self.flats[self.next_index] is not None:
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="mpiqsgd-comm", daemon=True)
                self.thread.start()
            self.jobs.put((buckets[self.next_index], self.flats[self.next_index], self.step, self.compress))
            self.flats[self.next_index] = None
            self.next_index += 1

    def _serve(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            bucket, flats, step, compress = job
            try:
                self.done.put(("ok", self.exchange._aggregate_bucket(bucket, flats, step, compress)))
            except BaseException as exc:  # re-raised by finish() in the training thread
                self.done.put(("error", exc))
                return

    def finish(self, step):
        if self.step != step:
            raise ConfigError(f"GradientExchange.finish({step}) without begin({step}) (last begun: {self.step})")
        buckets = self.exchange.buckets
        with self.lock:
            self.armed = False
            for i in range(self.next_index, len(buckets)):
                if self.flats[i] is None:
                    self.flats[i] = _bucket_flats(buckets[i])
            self._hand_over()
        results = []
        with self.exchange.transport.timed("wait"):
            for _ in buckets:
                status, value = self.done.get()
                if status == "error":
                    self.thread = None
                    raise value
                results.append(value)
        return results

    def close(self):
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None


class DistributedOptimizer:
    """Wrap a torch optimizer: ``step()`` first averages gradients through ``exchange``.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the same parameters.
        exchange: a :class:`GradientExchange`.
    """

    def __init__(self, optimizer, exchange):
        self.optimizer = optimizer
        self.exchange = exchange
        self.steps = 0

    def zero_grad(self, set_to_none=True):
        """Zero the gradients and arm the exchange for the coming backward (overlap)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.exchange.begin(self.steps)

    def step(self):
        if self.exchange.overlap is not None and self.exchange.overlap.step == self.steps:
            self.exchange.finish(self.steps)
        else:
            self.exchange.synchronize(self.steps)
        self.optimizer.step()
        self.steps += 1

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "exchange": self.exchange.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.exchange.load_state_dict(state["exchange"], self.exchange.params[0].device)
        self.steps = state["steps"]
