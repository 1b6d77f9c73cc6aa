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

Gradient accumulation (``backward_passes_per_step=k``): the hooks count each parameter's
gradients since the last exchange (passes inside :meth:`GradientExchange.no_sync` are not
counted); a bucket is complete after the k-th, and a (k+1)-th raises :class:`ConfigError`
instead of leaving a gradient out. :class:`DistributedOptimizer` is a ``torch.optim.Optimizer``
(docs/pytorch.md: schedulers, closures, clipping after ``synchronize()``, GradScaler, checkpoints).

Nodes with several ranks (``hierarchical``): where the ranks span more than one node and some node
holds several (``"auto"``, the default), both buffers go through
:class:`~mpiqsgd.topology.Hierarchical`: fp32 to the node's leader, the topology among the
leaders, fp32 back (``"on"`` forces it, ``"off"`` keeps every rank alike);
:attr:`GradientExchange.nodes` is then the layout (None when flat).

Adaptive codecs (ALQ, AMQ and their -N variants) refit their levels at the steps of
the schedule (by default 0, 100, 2000, then every 10,000): every rank computes
sufficient statistics of its whole compressed gradient (registration order), they are
allgathered (phase ``adapt``, counted), merged in rank order, and every rank fits the
same levels from the same merged statistics, so all ranks hold bit-identical tables.
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Sequence, Tuple
from typing import cast, overload

import torch
from torch.utils.hooks import RemovableHandle

from .codecs.base import all_finite
from .errors import ConfigError, NonFiniteError
from .topology import Nodes, make_aggregator, make_fp32_aggregator, resolve_topology, wants_hierarchical

if TYPE_CHECKING:
    from .codecs.base import Codec, Device
    from .transport import Transport

__all__ = ["GradientExchange", "DistributedOptimizer", "Bucket", "make_buckets", "broadcast_parameters",
           "parameter_checksum"]


# A bucket's (compressed, uncompressed) flat buffers, or their means; None where it holds no such tensor.
Flats = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def broadcast_parameters(module: torch.nn.Module, transport: Transport, root: int = 0) -> None:
    """Overwrite every rank's parameters and buffers with ``root``'s (uncounted set-up traffic)."""
    state = module.state_dict()
    buf = io.BytesIO()
    if transport.rank == root:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    received = transport.bcast_bytes(buf.getvalue(), root)
    if transport.rank != root:
        loaded = torch.load(io.BytesIO(received), weights_only=True)
        module.load_state_dict(loaded)


def parameter_checksum(parameters: Iterable[torch.Tensor]) -> bytes:
    """Bytes that differ when any parameter differs in any bit (for the replica sync check)."""
    import hashlib

    h = hashlib.sha1()
    for p in parameters:
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class Bucket:
    """Parameters whose gradients travel together: ``compressed`` ones and ``uncompressed`` ones."""

    def __init__(self, index: int, params: list[torch.Tensor], min_compress_numel: int) -> None:
        self.index = index
        self.params = params
        self.compressed = [p for p in params if p.numel() >= min_compress_numel]
        self.uncompressed = [p for p in params if p.numel() < min_compress_numel]

    def __repr__(self) -> str:
        return (f"Bucket({self.index}, {len(self.compressed)}+{len(self.uncompressed)} tensors, "
                f"{sum(p.numel() for p in self.params)} coordinates)")


def make_buckets(params: Iterable[torch.Tensor], bucket_mb: float | None, min_compress_numel: int) -> list[Bucket]:
    """Cut ``params`` into :class:`Bucket` s of about ``bucket_mb`` MB of fp32 gradient (see the module doc)."""
    if bucket_mb is None or bucket_mb < 0:
        raise ConfigError(f"bucket_mb must be >= 0; got {bucket_mb}")
    if bucket_mb == 0:
        return [Bucket(0, list(params), min_compress_numel)]
    limit = bucket_mb * 1e6
    groups: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    nbytes = 0
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
        topology: ``auto`` (intsum for QSGD, scatter for other codecs, allreduce for fp32),
            ``allreduce``, ``ps``, ``ring``, ``scatter``, ``allgather`` or ``intsum``.
        seed: base seed of codec randomness.
        min_compress_numel: tensors with fewer elements travel uncompressed (fp32).
        warmup_steps: steps before this one send everything uncompressed.
        adapt_at: steps at which an adaptive codec refits its levels ...
        adapt_every: ... and every this many steps (0: never again).
        bucket_mb: gradient bucket size in MB (0: one bucket).
        overlap: aggregate buckets in a communication thread while backward runs.
        backward_passes_per_step: backward passes whose summed gradients one exchange sends
            (gradient accumulation); one more before the exchange raises :class:`ConfigError`.
        hierarchical: ``auto`` (default: hierarchical where the ranks span several nodes and some
            node holds several), ``on`` or ``off`` (see the module doc).
        **options: topology options (``ps``: downlink, server_error_feedback, dedicated).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], transport: Transport, codec: Codec, topology: str = "auto",
                 seed: int = 0, min_compress_numel: int = 0, warmup_steps: int = 0,
                 adapt_at: Iterable[int] = (0, 100, 2000), adapt_every: int = 10000, bucket_mb: float = 0,
                 overlap: bool = False, backward_passes_per_step: int = 1, hierarchical: str = "auto",
                 **options: Any) -> None:
        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise ConfigError("GradientExchange: no parameters that require gradients")
        self.transport = transport
        self.codec = codec
        self.warmup_steps = warmup_steps
        self.min_compress_numel = min_compress_numel
        self.bucket_mb = bucket_mb
        topology = resolve_topology(topology, codec)
        hier = wants_hierarchical(transport, hierarchical, dedicated=bool(options.get("dedicated")))
        self.nodes: Nodes | None = Nodes(transport) if hier else None  # collective: every rank decides alike
        self.aggregator = make_aggregator(topology, transport, codec, seed=seed, nodes=self.nodes, **options)
        self.fp32 = make_fp32_aggregator(topology, transport, seed=seed, nodes=self.nodes, **options)
        self.adaptive = codec.base if codec.adaptive else None
        self.adapt_at = set(adapt_at)
        self.adapt_every = adapt_every
        self.seed = seed
        self.refits: list[dict[str, Any]] = []  # {"step", "won", "psi"} of each refit (the guarantee's log)
        self.backward_passes_per_step = backward_passes_per_step
        # Gradient arrivals per parameter since the last exchange, counted by post-accumulate-grad
        # hooks: they say when a bucket is complete (overlap) and catch a backward pass beyond
        # backward_passes_per_step, whose gradient would otherwise miss the exchange (or be summed
        # into the next one) without a word.
        self._lock = threading.Lock()
        self._arrivals: dict[int, int] = {}
        self._counting = True  # False inside no_sync()
        self._hooks: list[RemovableHandle] = []
        self._hooked: set[int] = set()
        self._set_params(params)
        self.overlap = _Overlap(self) if overlap else None

    @property
    def backward_passes_per_step(self) -> int:
        """Backward passes whose gradients one exchange sums (gradient accumulation); buckets leave after the last."""
        return self._passes

    @backward_passes_per_step.setter
    def backward_passes_per_step(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"backward_passes_per_step must be an integer >= 1; got {k!r}")
        self._passes = k

    def _set_params(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        self._ids = {id(p) for p in self.params}
        self.compressed = [p for p in self.params if p.numel() >= self.min_compress_numel]
        self.uncompressed = [p for p in self.params if p.numel() < self.min_compress_numel]
        self.buckets = make_buckets(self.params, self.bucket_mb, self.min_compress_numel)
        self.numel = {"compressed": sum(p.numel() for p in self.compressed),
                      "uncompressed": sum(p.numel() for p in self.uncompressed)}
        ref = weakref.ref(self)  # an exchange that is dropped stops counting

        def on_grad(param: torch.Tensor) -> None:
            exchange = ref()
            if exchange is not None:
                exchange._on_grad(param)

        for p in params:
            if id(p) not in self._hooked:
                self._hooks.append(p.register_post_accumulate_grad_hook(on_grad))
                self._hooked.add(id(p))

    def add_parameters(self, parameters: Iterable[torch.Tensor]) -> None:
        """Exchange ``parameters`` too from the next step on (a layer unfrozen, a new param group).

        Every rank must add the same parameters in the same order. The buckets are rebuilt:
        error-feedback residuals of buckets whose length changes restart from zero.
        """
        new = [p for p in parameters if id(p) not in self._ids]
        if not new:
            return
        if self.overlap is not None and self.overlap.pending:
            raise ConfigError("GradientExchange.add_parameters between begin() and finish(): add them between steps")
        self._set_params(self.params + new)
        if self.overlap is not None:
            self.overlap.rebucket()

    def _on_grad(self, param: torch.Tensor) -> None:
        """A post-accumulate-grad hook: count the arrival; a bucket whose last gradient is in leaves (overlap)."""
        if not self._counting:
            return
        k = self.backward_passes_per_step
        with self._lock:
            n = self._arrivals.get(id(param), 0) + 1
            if n > k:
                raise ConfigError(
                    f"backward pass {n} since the last exchange, but backward_passes_per_step={k}: the exchange "
                    f"would miss this gradient. Call step() (or GradientExchange.finish) after every {k} backward "
                    "pass(es), raise backward_passes_per_step=, or run the extra passes inside no_sync() (or an "
                    "earlier GradientExchange over the same parameters was not close()d)")
            self._arrivals[id(param)] = n
        if n == k and self.overlap is not None:
            self.overlap._on_grad(param)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside this block accumulate gradients locally and are not counted (DDP's
        ``no_sync``): the exchange after the block sends their sum."""
        before, self._counting = self._counting, False
        try:
            yield
        finally:
            self._counting = before

    def _reset_arrivals(self) -> None:
        with self._lock:
            self._arrivals.clear()

    def compresses_at(self, step: int) -> bool:
        """Whether ``step`` sends the compressed buffers through the codec (after the warm-up steps)."""
        return step >= self.warmup_steps

    def adapts_at(self, step: int) -> bool:
        """Whether the adaptive codec refits its levels at ``step``."""
        if self.adaptive is None or not self.compressed:
            return False
        return step in self.adapt_at or (self.adapt_every > 0 and step > 0 and step % self.adapt_every == 0)

    def adapt(self, flat: torch.Tensor, step: int) -> None:
        """Refit the adaptive codec's levels from every rank's statistics of ``flat`` (collective)."""
        from .codecs import gradstats

        adaptive = self.adaptive
        if adaptive is None:
            raise ConfigError(f"{self.codec.name} is not adaptive: it has no levels to refit")
        t = self.transport
        t.begin_step(step)
        if not all_finite(flat):
            raise NonFiniteError(f"gradient holds NaN/Inf at step {step}; not refitting levels to it")
        # "adapt" times this rank's own work; waiting for the others is "communicate".
        with t.timed("adapt"):
            local = gradstats.stats_to_bytes(adaptive.local_stats(flat))
        gathered = t.allgather_bytes(local, phase="adapt")
        with t.timed("adapt"):
            adaptive.fit(gradstats.merge_stats([gradstats.stats_from_bytes(b) for b in gathered]))
        self.refits.append({"step": step, **(adaptive.last_fit or {})})

    def diagnostics(self, step: int) -> dict[str, Any]:
        """Quantization diagnostics of this rank's compressed gradient (no communication; the
        fields of :mod:`mpiqsgd.diagnostics`)."""
        from .diagnostics import quantization

        return quantization(self.codec, _flatten(self.compressed), self.seed, self.transport.rank, step)

    def _aggregate_bucket(self, bucket: Bucket, flats: Flats, step: int, compress: bool) -> Flats:
        """The means of one bucket's (compressed, uncompressed) flat buffers (collective)."""
        agg_c = self.aggregator if compress else self.fp32
        flat_c, flat_u = flats
        return (agg_c.aggregate(flat_c, step, bucket.index) if flat_c is not None else None,
                self.fp32.aggregate(flat_u, step, bucket.index) if flat_u is not None else None)

    def begin(self, step: int) -> None:
        """Stamp ``step`` on the meter, start counting backward passes anew and arm the exchange
        before its backward (overlap only)."""
        self.transport.begin_step(step)  # the step's compute is counted (and traced) as this step's
        self._reset_arrivals()
        if self.overlap is not None:
            self.overlap.begin(step, arm=not self.adapts_at(step))

    def finish(self, step: int) -> None:
        """Replace every parameter's ``.grad`` by its mean over ranks (collective).

        With overlap, waits for the buckets that :meth:`begin` armed (and sends those whose
        gradients never arrived); without, aggregates every bucket now. A parameter without a
        gradient on this rank (an unused branch) contributes zeros and receives the mean, as
        DDP's ``find_unused_parameters=True`` does; one that no longer requires a gradient
        (frozen after construction) keeps its ``.grad``.
        """
        if self.adapts_at(step):
            flat = _flatten(self.compressed)
            assert flat is not None  # adapts_at is False without compressed parameters
            self.adapt(flat, step)
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
        self._reset_arrivals()

    def pending(self, step: int) -> bool:
        """Whether :meth:`begin` armed ``step`` and :meth:`finish` has not yet completed it (overlap only)."""
        return self.overlap is not None and self.overlap.pending and self.overlap.step == step

    def synchronize(self, step: int) -> None:
        """:meth:`finish` for a step that was never armed: aggregate every bucket now (collective)."""
        if self.overlap is not None:
            self.overlap.begin(step, arm=False)
        self.finish(step)

    def close(self) -> None:
        """Stop the communication thread (overlap only) and remove the gradient hooks."""
        if self.overlap is not None:
            self.overlap.close()
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._hooked = [], set()

    def _stateful(self) -> Iterator[tuple[str, Codec]]:
        for name, agg in (("compressed", self.aggregator), ("uncompressed", self.fp32)):
            for role, codec in agg.codecs.items():
                yield f"{name}.{role}", codec

    def state_dict(self) -> dict[str, Any]:
        """Codec state (error-feedback residuals, adaptive levels) for checkpoints."""
        state: dict[str, Any] = {}
        for key, codec in self._stateful():
            codec_state = codec.state_dict()
            if codec_state:
                state[key] = codec_state
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: Device = "cpu") -> None:
        for key, codec in self._stateful():
            if key in state:
                codec.load_state_dict(state[key], device)


def _flatten(params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    if not params:
        return None
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                      for p in params])


def _bucket_flats(bucket: Bucket) -> Flats:
    return _flatten(bucket.compressed), _flatten(bucket.uncompressed)


def _unflatten(flat: torch.Tensor, params: Iterable[torch.Tensor]) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        if not p.requires_grad:
            offset += n
            continue
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


class _Overlap:
    """The communication thread of a :class:`GradientExchange`, fed by its gradient hooks.

    State per step: ``remaining[i]`` counts the parameters of bucket ``i`` whose last
    gradient of the step (backward pass ``backward_passes_per_step``) has not arrived; ``flats[i]`` holds
    bucket ``i``'s copied buffers once complete;
    ``next_index`` is the first bucket not yet handed to the thread. The thread takes
    ``(bucket, flats)`` jobs from a queue in index order and appends each bucket's means
    to ``results``; ``None`` stops it.
    """

    def __init__(self, exchange: GradientExchange) -> None:
        exchange.transport.require_threads()
        self.exchange = exchange
        self.lock = threading.Lock()
        self.jobs: queue.Queue[tuple[Bucket, Flats, int, bool] | None] = queue.Queue()
        self.done: queue.Queue[tuple[str, Any]] = queue.Queue()  # ("ok", means) or ("error", exception)
        self.armed = False
        self.pending = False  # begun and not yet finished
        self.step: int | None = None
        self.thread: threading.Thread | None = None
        self.early = 0  # buckets of the last step handed over during backward (before finish)
        self.rebucket()

    def rebucket(self) -> None:
        """Map each parameter to its bucket (after the exchange's buckets were rebuilt)."""
        self.bucket_of = {id(p): bucket.index for bucket in self.exchange.buckets for p in bucket.params}

    def begin(self, step: int, arm: bool) -> None:
        with self.lock:
            self.step = step
            self.armed = arm
            self.pending = True
            self.remaining = [len(b.params) for b in self.exchange.buckets]
            self.flats: list[Flats | None] = [None] * len(self.exchange.buckets)
            self.next_index = 0
            self.early = 0
            self.compress = self.exchange.compresses_at(step)

    def _on_grad(self, param: torch.Tensor) -> None:
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

    def _hand_over(self) -> None:
        """Give the thread every complete bucket from ``next_index`` on, in index order (lock held)."""
        buckets = self.exchange.buckets
        while self.next_index < len(buckets):
            flats = self.flats[self.next_index]
            if flats is None:
                break
            assert self.step is not None  # begin() ran
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="mpiqsgd-comm", daemon=True)
                self.thread.start()
            self.jobs.put((buckets[self.next_index], flats, self.step, self.compress))
            self.flats[self.next_index] = None
            self.next_index += 1

    def _serve(self) -> None:
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

    def finish(self, step: int) -> list[Flats]:
        if self.step != step or not self.pending:
            raise ConfigError(f"GradientExchange.finish({step}) without begin({step}) (last begun: {self.step})")
        buckets = self.exchange.buckets
        with self.lock:
            self.armed = False
            self.pending = False
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

    def close(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None


class DistributedOptimizer(torch.optim.Optimizer):
    """A torch optimizer whose ``step()`` first averages the gradients across ranks through ``exchange``.

    ``DistributedOptimizer(opt, exchange)`` returns an instance of a subclass of
    ``type(opt)`` built at run time (Horovod's design), sharing ``opt``'s parameter groups,
    state, defaults and hooks: it is an ``Optimizer`` and a ``type(opt)``, so LR schedulers,
    ``torch.amp.GradScaler``, ``zero_grad(set_to_none=...)``, ``add_param_group`` and
    checkpoints work as with ``opt`` (use it instead of ``opt`` from then on). Per step:

    1. ``zero_grad()`` zeroes the gradients and arms the exchange (with overlap, buckets
       leave as their gradients are ready in the last declared backward pass);
    2. ``backward()``, ``backward_passes_per_step`` times (gradient accumulation); passes
       inside :meth:`no_sync` are not counted; one more pass stops with :class:`ConfigError`;
    3. optionally :meth:`synchronize`: ``.grad`` now holds the mean over ranks (clip it here);
    4. ``step(closure=None)``: the exchange (unless :meth:`synchronize` did it), then the
       wrapped optimizer's update. With a closure, every evaluation of it is exchanged.

    Under ``GradScaler.step`` (fp16) the exchange sees the unscaled fp32 gradients, and a
    step with NaN/Inf on any rank is skipped on every rank (one 1-byte allgather, phase
    ``nonfinite``); each rank's scaler keeps its own scale. Parameters of the optimizer that
    require gradients but are not in the exchange (a layer unfrozen, ``add_param_group``)
    are added to it (:meth:`GradientExchange.add_parameters`).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (a subset of) the exchange's parameters.
        exchange: a :class:`GradientExchange`.
        backward_passes_per_step: backward passes whose summed gradients one step exchanges
            (None: the exchange's ``backward_passes_per_step``, 1 by default).
        skip_non_finite: agree across ranks before every exchange whether any gradient holds
            NaN/Inf, and if so skip the step everywhere (needed with ``GradScaler`` when
            calling :meth:`synchronize` yourself; automatic under ``GradScaler.step``).

    Attributes:
        steps: optimizer steps taken (seeds the codecs; kept in :meth:`state_dict`).
        skipped: whether the last exchange was skipped for NaN/Inf.
    """

    # GradScaler.step then calls step() itself with ``grad_scale`` / ``found_inf`` set instead of
    # skipping it on the ranks that found Inf: all ranks must take part in the exchange.
    _step_supports_amp_scaling = True

    def __new__(cls, optimizer: torch.optim.Optimizer | None = None, exchange: GradientExchange | None = None,
                *args: Any, **kwargs: Any) -> DistributedOptimizer:
        if cls is not DistributedOptimizer:  # copy.deepcopy, pickle: the state comes after
            return super().__new__(cls)
        if isinstance(optimizer, DistributedOptimizer):
            raise ConfigError("DistributedOptimizer: optimizer= is already a DistributedOptimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"DistributedOptimizer: optimizer= must be a torch.optim.Optimizer; "
                              f"got {type(optimizer).__name__}")
        obj = object.__new__(_distributed_class(type(optimizer)))
        obj.__dict__.update(optimizer.__dict__)  # Optimizer.__init__ already ran on these
        return obj

    def __init__(self, optimizer: torch.optim.Optimizer, exchange: GradientExchange,
                 backward_passes_per_step: int | None = None, skip_non_finite: bool = False) -> None:
        if not isinstance(exchange, GradientExchange):
            raise ConfigError(f"DistributedOptimizer: exchange= must be a GradientExchange; "
                              f"got {type(exchange).__name__}")
        if backward_passes_per_step is not None:
            exchange.backward_passes_per_step = backward_passes_per_step
        if skip_non_finite and exchange.overlap is not None:
            raise ConfigError(_AMP_OVERLAP)
        self.exchange = exchange
        self.skip_non_finite = skip_non_finite
        self.steps = 0
        self.skipped = False
        self._synchronized = False
        self._track_parameters()

    @property
    def backward_passes_per_step(self) -> int:
        return self.exchange.backward_passes_per_step

    def no_sync(self) -> ContextManager[None]:
        """Context manager: backward passes inside it accumulate locally and are not counted (DDP's ``no_sync``)."""
        return self.exchange.no_sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and arm the exchange for the coming backward passes (overlap)."""
        super().zero_grad(set_to_none=set_to_none)
        self.exchange.begin(self.steps)
        self._synchronized = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if "exchange" in self.__dict__:  # not while the wrapped optimizer's __init__ adds its groups
            self._track_parameters()

    def _track_parameters(self) -> None:
        """Add the parameters that require gradients and are missing from the exchange (same on every rank)."""
        missing = [p for group in self.param_groups for p in group["params"]
                   if p.requires_grad and id(p) not in self.exchange._ids]
        if missing:
            self.exchange.add_parameters(missing)

    def synchronize(self) -> None:
        """Finish this step's exchange now (collective): ``.grad`` holds the mean over ranks, for
        clipping or inspection; the next ``step()`` only updates. With ``GradScaler``, call
        ``scaler.unscale_(opt)`` first (and pass ``skip_non_finite=True``)."""
        if self._synchronized:
            raise ConfigError("DistributedOptimizer.synchronize() twice in one step: call step() in between")
        self._exchange(None, self.skip_non_finite)
        self._synchronized = True

    def _exchange(self, grad_scale: torch.Tensor | None, check_finite: bool) -> None:
        ex = self.exchange
        self._track_parameters()
        self.skipped = False
        if check_finite:
            if ex.overlap is not None:
                raise ConfigError(_AMP_OVERLAP)
            grads = list({id(p): p.grad for group in self.param_groups for p in group["params"]
                          if p.grad is not None}.values())
            if grad_scale is not None and grads:  # GradScaler.step without unscale_: unscale as it would
                torch._foreach_mul_(grads, grad_scale.double().reciprocal().float().to(grads[0].device))
            bad = not all(all_finite(g) for g in grads)
            flags = ex.transport.allgather_bytes(bytes([bad]), phase="nonfinite")
            if any(flag != b"\x00" for flag in flags):
                self.skipped = True  # on every rank: the gradients stay local, the update is skipped
                ex._reset_arrivals()
                return
        if ex.pending(self.steps):
            ex.finish(self.steps)
        else:
            ex.synchronize(self.steps)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Exchange the gradients (unless :meth:`synchronize` did), then the wrapped optimizer's update.

        Args:
            closure: re-evaluates the model and returns the loss (as for any torch optimizer);
                the gradients of every evaluation are exchanged before the update uses them.
        """
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step around this call
        amp = "found_inf" in self.__dict__
        if self._synchronized and self.exchange._arrivals:
            raise ConfigError("backward() after synchronize() in the same step: its gradient would never be "
                              "exchanged; call synchronize() after the last backward pass")
        try:
            if closure is not None:
                if self._synchronized:
                    raise ConfigError("step(closure) after synchronize(): the closure recomputes the gradients; "
                                      "call one or the other")

                def evaluate() -> float:
                    with torch.enable_grad():
                        loss = closure()
                    self._exchange(None, self.skip_non_finite)
                    return loss

                return self._update(evaluate)
            if self._synchronized:
                if grad_scale is not None:
                    raise ConfigError("GradScaler.step after synchronize() without scaler.unscale_(optimizer) "
                                      "first: the exchange averaged scaled gradients")
            else:
                self._exchange(grad_scale, amp or self.skip_non_finite)
            return None if self.skipped else self._update(None)
        finally:
            self._synchronized = False
            self.steps += 1

    def _update(self, closure: Callable[[], float] | None) -> float | None:
        # The wrapped update must not see GradScaler's attributes: the gradients are unscaled and
        # checked already, and a fused optimizer would unscale them a second time.
        saved: dict[str, Any] = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        try:
            return super().step(closure) if closure is not None else super().step()
        finally:
            self.__dict__.update(saved)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"mpiqsgd"``: the exchange's codec state
        (error-feedback residuals, adaptive levels) and :attr:`steps`."""
        state = super().state_dict()
        state["mpiqsgd"] = {"exchange": self.exchange.state_dict(), "steps": self.steps}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a plain optimizer's state dict restores the optimizer alone)."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("mpiqsgd", None)
        super().load_state_dict(state_dict)
        if ours is not None:
            self.exchange.load_state_dict(ours["exchange"], self.exchange.params[0].device)
            self.steps = ours["steps"]


# Optimizer.__setstate__ (copy.deepcopy) wraps an unhooked step in the profiler's step hooks; the
# wrapped optimizer's step that ours calls already runs them, once.
DistributedOptimizer.step.hooked = True  # type: ignore[attr-defined]

_AMP_OVERLAP = ("GradScaler (and skip_non_finite=True) need the exchange to see unscaled gradients, but overlap=True "
                "sends buckets during backward, while they are still scaled: build the GradientExchange with "
                "overlap=False")

_CLASSES: dict[type[torch.optim.Optimizer], type[DistributedOptimizer]] = {}


def _distributed_class(base: type[torch.optim.Optimizer]) -> type[DistributedOptimizer]:
    """``DistributedOptimizer`` mixed into ``base`` (one class per optimizer class, as Horovod builds)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = cast("type[DistributedOptimizer]", type(
            base.__name__, (DistributedOptimizer, base),
            {"__module__": __name__, "__qualname__": f"DistributedOptimizer[{base.__name__}]"}))
    return cls
