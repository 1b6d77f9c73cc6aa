"""Library API: exchange a model's gradients through a codec and a topology.

For use from a user's own PyTorch loop, in the spirit of Horovod's
``DistributedOptimizer``::

    transport = mpiqsgd.transport.world()
    broadcast_parameters(model, transport)              # same start on every rank
    exchange = GradientExchange(model.parameters(), transport, make_codec("qsgd", bits=4),
                                topology="ring", min_compress_numel=1024)
    opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), exchange)
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()                                      # exchange, then the local update

Data path per step: gradients -> two fused flat buffers (tensors with at least
``min_compress_numel`` elements are compressed, smaller ones such as biases and batch
norm go as fp32) -> each buffer's topology -> the mean written back into ``.grad``.
Every rank then applies the same optimizer step, so replicas stay bit-identical.
The fp32 buffer is one more message pattern of the same topology (``allreduce`` for
the ``allreduce`` baseline), counted by the same meter.

Adaptive codecs (ALQ, AMQ and their -N variants) refit their levels at the steps of
the schedule (by default 0, 100, 2000, then every 10,000): every rank computes
sufficient statistics of its own compressed buffer, they are allgathered (phase
``adapt``, counted), merged in rank order, and every rank fits the same levels from the
same merged statistics, so all ranks hold bit-identical tables.
"""

import io

import torch

from .codecs.fp import FP32
from .errors import ConfigError, NonFiniteError
from .topology import make_aggregator

__all__ = ["GradientExchange", "DistributedOptimizer", "broadcast_parameters", "parameter_checksum"]


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


class GradientExchange:
    """Average the gradients of ``parameters`` across ranks through a codec and topology.

    Args:
        parameters: iterable of tensors with ``.grad`` (the model's parameters).
        transport: a :class:`~mpiqsgd.transport.Transport`.
        codec: the codec of the compressed buffer (possibly error-feedback wrapped).
        topology: ``allreduce``, ``ps``, ``ring`` or ``allgather``.
        seed: base seed of codec randomness.
        min_compress_numel: tensors with fewer elements travel uncompressed (fp32).
        warmup_steps: steps before this one send everything uncompressed.
        adapt_at: steps at which an adaptive codec refits its levels ...
        adapt_every: ... and every this many steps (0: never again).
        **options: topology options (``ps``: downlink, server_error_feedback, dedicated).
    """

    def __init__(self, parameters, transport, codec, topology="ring", seed=0, min_compress_numel=0,
                 warmup_steps=0, adapt_at=(0, 100, 2000), adapt_every=10000, **options):
        self.params = [p for p in parameters if p.requires_grad]
        if not self.params:
            raise ConfigError("GradientExchange: no parameters that require gradients")
        self.transport = transport
        self.codec = codec
        self.warmup_steps = warmup_steps
        self.compressed = [p for p in self.params if p.numel() >= min_compress_numel]
        self.uncompressed = [p for p in self.params if p.numel() < min_compress_numel]
        self.aggregator = make_aggregator(topology, transport, codec, seed=seed, **options)
        self.fp32 = make_aggregator(topology, transport, FP32(), seed=seed, **options)
        self.numel = {"compressed": sum(p.numel() for p in self.compressed),
                      "uncompressed": sum(p.numel() for p in self.uncompressed)}
        inner = getattr(codec, "inner", codec)
        self.adaptive = inner if hasattr(inner, "fit") else None
        self.adapt_at = set(adapt_at)
        self.adapt_every = adapt_every
        self.seed = seed

    def adapts_at(self, step):
        """Whether the adaptive codec refits its levels at ``step``."""
        if self.adaptive is None or not self.compressed:
            return False
        return step in self.adapt_at or (self.adapt_every > 0 and step > 0 and step % self.adapt_every == 0)

    def adapt(self, flat, step):
        """Refit the adaptive codec's levels from every rank's statistics of ``flat`` (collective)."""
        from .codecs import adapt

        meter = self.transport.meter
        meter.step = step
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError(f"gradient holds NaN/Inf at step {step}; not refitting levels to it")
        # "adapt" times this rank's own work; waiting for the others is "communicate".
        with meter.time("adapt"):
            local = adapt.stats_to_bytes(self.adaptive.local_stats(flat))
        with meter.time("communicate"):
            gathered = self.transport.allgather_bytes(local, phase="adapt")
        with meter.time("adapt"):
            self.adaptive.fit(adapt.merge_stats([adapt.stats_from_bytes(b) for b in gathered]))

    def diagnostics(self, step):
        """Quantization diagnostics of this rank's compressed buffer (no communication).

        Returns:
            dict: ``quant_variance`` = ||Q(v) - v||^2 / ||v||^2 for one draw (from a generator
            separate from training's, so training is unchanged), and ``coord_std`` = the
            standard deviation of the normalized coordinates v_i / ||bucket||.
        """
        from .codecs import make_generator
        from .codecs.qsgd import bucket_norms

        inner = getattr(self.codec, "inner", self.codec)
        flat = self._flatten(self.compressed)
        if not flat.numel() or not bool(flat.any()):
            return {"step": step, "quant_variance": None, "coord_std": None}
        rng = make_generator(self.seed + 7919, self.transport.rank, step, flat.device)
        _, decoded = inner.encode_decode(flat, rng)
        bucket = getattr(inner, "bucket", flat.numel())
        norms = bucket_norms(flat, bucket).repeat_interleave(bucket)[:flat.numel()]
        r = flat / torch.where(norms > 0, norms, torch.ones_like(norms))
        return {"step": step,
                "quant_variance": float((decoded - flat).double().pow(2).sum() / flat.double().pow(2).sum()),
                "coord_std": float(r.double().std())}

    @staticmethod
    def _flatten(params):
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
                          for p in params])

    @staticmethod
    def _unflatten(flat, params):
        offset = 0
        for p in params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def synchronize(self, step):
        """Replace every parameter's ``.grad`` by its mean over ranks (collective)."""
        compress = step >= self.warmup_steps
        if self.adapts_at(step):
            self.adapt(self._flatten(self.compressed), step)
        for group, agg in ((self.compressed, self.aggregator if compress else self.fp32),
                           (self.uncompressed, self.fp32)):
            if group:
                self._unflatten(agg.aggregate(self._flatten(group), step), group)

    def state_dict(self):
        """Codec state (error-feedback residuals, adaptive levels) for checkpoints."""
        state = {}
        for name, agg in (("compressed", self.aggregator), ("uncompressed", self.fp32)):
            for role, codec in (("codec", agg.codec), ("down_codec", getattr(agg, "down_codec", None))):
                if hasattr(codec, "state_dict"):
                    state[f"{name}.{role}"] = codec.state_dict()
        return state

    def load_state_dict(self, state, device="cpu"):
        for name, agg in (("compressed", self.aggregator), ("uncompressed", self.fp32)):
            for role, codec in (("codec", agg.codec), ("down_codec", getattr(agg, "down_codec", None))):
                key = f"{name}.{role}"
                if key in state and hasattr(codec, "load_state_dict"):
                    codec.load_state_dict(state[key], device)


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
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
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
