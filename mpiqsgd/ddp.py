"""A DDP communication hook that sends mpiqsgd's codec messages over torch.distributed.

Wire format: per DDP bucket, one mpiqsgd message of the bucket's compressed part (the
:mod:`mpiqsgd.wire` framing around the codec's payload), byte for byte what
:class:`~mpiqsgd.topology.allgather.Allgather` sends for the same flat buffer, seed, rank,
step and stream (stream = the bucket's index); tensors of fewer than
``min_compress_numel`` elements go as fp32.

Message pattern per bucket, n ranks: ``all_gather_into_tensor`` of the n encoded
messages; every rank decodes all n and averages them in rank order (the ``allgather``
topology's mean, bit-identical on every rank); the fp32 part is one ``all_reduce`` (sum).
A variable-length codec (``qsgd-elias``, ``encoding="entropy"``) first all-gathers the n
lengths (8 bytes each, phase ``lengths``; the hook waits for them), then pads every message
to the longest: the padding is sent and counted.

Bytes sent per rank per bucket: ``(n-1) * E`` (counted as n-1 messages of ``E`` bytes to
the right neighbour, as the ring allgather sends them, phase ``allgather``) with ``E`` the
codec's encoded size of the compressed part, or the longest message when variable; plus
``floor(2 (n-1)/n * 4 m)`` for the ``m`` fp32 coordinates (phase ``allreduce``, nominal as
:meth:`mpiqsgd.transport.MPITransport.allreduce_sum` counts it). Warm-up steps send the whole
bucket that way.

Collectives (``collective=``): ``allgather`` (every codec, as above) and ``intsum``, the
decode-free integer sum of :mod:`mpiqsgd.topology.intsum` (codecs ``qsgd`` and ``qsgd-inf``,
dense, error feedback allowed): an ``all_reduce(MAX)`` of the compressed part's float32 bucket
norms (phase ``scales``), then one ``all_reduce(SUM)`` of the QSGD levels packed with headroom
for the sum (:mod:`mpiqsgd.codecs.summable`, phase ``intsum``), unpacked once into the mean: no
rank decodes the others' messages. Its words travel as int64 (torch.distributed has no uint64
sum): two's-complement addition gives the uint64 sum's bits. Bytes per rank, nominal as for
any allreduce: ``floor(2 (n-1)/n * 4 ceil(m / bucket)) + floor(2 (n-1)/n * 8 ceil(m / K))`` for
``m`` compressed coordinates and ``K`` fields a word.
"""

import numpy as np
import torch
import torch.distributed as dist

from . import wire
from .codecs import make_generator, summable
from .codecs.buckets import checked_norms
from .codecs.kernels import draw_seed
from .codecs.qsgd import max_norm
from .errors import ConfigError, DecodeError
from .meter import Meter
from .topology.base import mean_of
from .transport import allreduce_nbytes

__all__ = ["MpiqsgdState", "mpiqsgd_hook", "COLLECTIVES"]


def _all_gather_single(out, tensor, group, async_op):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    return gather(out, tensor, group=group, async_op=async_op)


class MpiqsgdState:
    """Settings and state of :func:`mpiqsgd_hook` (one per DDP model).

    Args:
        process_group: the ``torch.distributed`` group DDP runs on (None: the default group).
        codec: an mpiqsgd codec (``mpiqsgd.codecs.make_codec("qsgd", bits=4)``), error
            feedback included; adaptive codecs (alq, amq) are refused: their refit needs every
            rank's whole gradient, which a hook never sees.
        seed: base seed of codec randomness (the same on every rank).
        min_compress_numel: tensors with fewer elements travel as fp32 (biases, norms).
        warmup_steps: steps before this one send everything as fp32.
        collective: how the encoded messages travel; one of :data:`COLLECTIVES`.
        meter: the :class:`~mpiqsgd.meter.Meter` that counts the messages (default: a new one).
    """

    def __init__(self, process_group, codec, seed=0, min_compress_numel=0, warmup_steps=0, collective="allgather",
                 meter=None):
        if codec.adaptive:
            raise ConfigError(f"MpiqsgdState: codec= {codec!r} is adaptive; its refit needs every rank's whole "
                              "gradient, which a DDP hook never sees: use a fixed level set (nuqsgd, qsgd) or "
                              "mpiqsgd.GradientExchange")
        if collective not in COLLECTIVES:
            raise ConfigError(f"MpiqsgdState: collective= must be one of {', '.join(COLLECTIVES)}; got {collective!r}")
        if collective == "intsum":
            summable.check_codec(codec, "MpiqsgdState(collective='intsum')")
        if min_compress_numel < 0 or warmup_steps < 0:
            raise ConfigError(f"MpiqsgdState: min_compress_numel= and warmup_steps= must be >= 0; got "
                              f"{min_compress_numel} and {warmup_steps}")
        # User-tuned.
        self.process_group = process_group
        self.codec = codec
        self.seed = seed
        self.min_compress_numel = min_compress_numel
        self.warmup_steps = warmup_steps
        self.collective = collective
        # Internal: the step seeds the codec (every rank draws its own stream per step and
        # bucket, as the exchange does); error-feedback residuals live in the codec, one per
        # bucket (key ``(index, "grad")``, ``"grad"`` for bucket 0), reset when DDP rebuilds a
        # bucket to another length.
        self.step = 0
        # Statistics: every message, as GradientExchange counts them.
        self.meter = meter

    @property
    def rank(self):
        return dist.get_rank(self.process_group)

    @property
    def size(self):
        return dist.get_world_size(self.process_group)

    def state_dict(self):
        """The step and the codec's state (error-feedback residuals) for checkpoints."""
        return {"step": self.step, "codec": self.codec.state_dict()}

    def load_state_dict(self, state, device="cpu"):
        self.step = state["step"]
        self.codec.load_state_dict(state["codec"], device)

    def _meter(self):
        if self.meter is None:
            self.meter = Meter(self.rank)
        return self.meter


def mpiqsgd_hook(state, bucket):
    """Average a DDP bucket's gradients through an mpiqsgd codec; for ``register_comm_hook``.

    1. Cut the bucket into the gradients of at least ``state.min_compress_numel`` elements
       (compressed) and the rest (fp32).
    2. Encode the compressed part with ``make_generator(seed, rank, step, stream=index)``,
       the bucket's error-feedback residual added (when the codec has error feedback).
    3. Start the collectives: the n messages through ``all_gather_into_tensor``, the fp32
       part through ``all_reduce``.
    4. When both complete: decode the n messages, average them in rank order (identical on
       every rank), divide the fp32 sum by n, and place both where the bucket had them.

    Args:
        state: a :class:`MpiqsgdState`.
        bucket: the ``torch.distributed.GradBucket`` DDP hands over.

    Returns:
        A ``torch.futures.Future`` of the averaged bucket (the shape and dtype of ``bucket.buffer()``).

    Example::

        >>> from mpiqsgd.codecs import make_codec
        >>> from mpiqsgd.ddp import MpiqsgdState, mpiqsgd_hook
        >>> state = MpiqsgdState(process_group=None, codec=make_codec("qsgd", bits=4), min_compress_numel=1024)
        >>> ddp_model.register_comm_hook(state, mpiqsgd_hook)
    """
    step = state.step
    if bucket.is_last():
        state.step += 1
    state._meter().step = step
    mask, flat_c, flat_u = _split(state, bucket, step)
    futures, finish = [], []
    if flat_c is not None:
        future, done = COLLECTIVES[state.collective](state, bucket.index(), step, flat_c, bucket.buffer().device)
        futures.append(future)
        finish.append(done)
    return _with_fp32_part(state, bucket.buffer(), mask, flat_c, flat_u, futures, finish)


def _split(state, bucket, step):
    """(compressed mask, flat compressed part, flat fp32 part) of a bucket's buffer; None for an empty part."""
    buffer = bucket.buffer()
    if step < state.warmup_steps:
        return None, None, buffer.to(torch.float32)
    if state.min_compress_numel == 0:
        return None, buffer.to(torch.float32), None
    mask = torch.cat([torch.full((g.numel(),), g.numel() >= state.min_compress_numel, dtype=torch.bool)
                      for g in bucket.gradients()]).to(buffer.device)
    flat = buffer.to(torch.float32)
    return mask, (flat[mask] if bool(mask.any()) else None), (flat[~mask] if not bool(mask.all()) else None)


def _allgather(state, index, step, flat_c, device):
    """Start the ``all_gather_into_tensor`` of a bucket's compressed part as one mpiqsgd message;
    return (its future, the function that decodes the n messages into the part's mean)."""
    group, codec, meter = state.process_group, state.codec, state._meter()
    n, rank = state.size, state.rank
    rng = make_generator(state.seed, rank, step, stream=index)
    with meter.time("encode", bucket=index, numel=flat_c.numel()):
        message, own = codec.encode_decode(flat_c.cpu(), rng, key="grad" if index == 0 else (index, "grad"))
    message = np.frombuffer(memoryview(message).cast("B"), dtype=np.uint8)
    nbytes = message.size
    if codec.fixed_size:
        lengths = [nbytes] * n
    else:  # pad to the longest message: all_gather_into_tensor takes equal sizes only
        mine = torch.tensor([nbytes], dtype=torch.int64, device=device)
        gathered = torch.empty(n, dtype=torch.int64, device=device)
        for dest in _right(rank, n):
            meter.record("lengths", rank, dest, 0, 8, 0)
        with meter.time("communicate", name="allgather", message="lengths", bytes=8):
            _all_gather_single(gathered, mine, group, async_op=False)
        lengths = gathered.cpu().tolist()
    padded = max(lengths)
    send = torch.zeros(padded, dtype=torch.uint8)
    send[:nbytes] = torch.from_numpy(message.copy())
    send = send.to(device)
    received = torch.empty(n * padded, dtype=torch.uint8, device=device)
    header = wire.header_nbytes(message)
    for dest in _right(rank, n):
        meter.record("allgather", rank, dest, header, padded - header, 4 * flat_c.numel())
    future = _all_gather_single(received, send, group, async_op=True).get_future()

    def finish_c():
        data = received.cpu().numpy()
        decoded = []
        for src in range(n):
            if src == rank:
                decoded.append(own)
                continue
            start = src * padded
            with meter.time("decode", bucket=index, bytes=lengths[src], numel=flat_c.numel()):
                decoded.append(codec.decode(data[start:start + lengths[src]], "cpu", flat_c.numel()))
        return mean_of(decoded)

    return future, finish_c


def _with_fp32_part(state, buffer, mask, flat_c, flat_u, futures, finish):
    """Start the ``all_reduce`` of the fp32 part (if any) beside the compressed part's collectives
    (``futures``, finished by ``finish``); return the future of the averaged bucket."""
    if flat_u is not None:
        n, summed = state.size, flat_u.clone()
        _record_allreduce(state._meter(), "allreduce", state.rank, n, 4 * summed.numel(), summed.numel())
        futures.append(dist.all_reduce(summed, group=state.process_group, async_op=True).get_future())
        finish.append(lambda: summed.div_(n))
    return torch.futures.collect_all(futures).then(lambda _: _combine(buffer, mask, flat_c, flat_u, finish))


def _combine(buffer, mask, flat_c, flat_u, finish):
    """The averaged bucket from the finished parts (compressed, then fp32), where the bucket had them."""
    parts = [f() for f in finish]
    if flat_c is None or flat_u is None:
        return parts[0].to(buffer.device, buffer.dtype).view_as(buffer)
    mean_c, mean_u = parts
    out = torch.empty(buffer.numel(), dtype=torch.float32, device=buffer.device)
    out[mask] = mean_c.to(buffer.device)
    out[~mask] = mean_u
    return out.to(buffer.dtype).view_as(buffer)


def _intsum(state, index, step, flat_c, device):
    """Agree on the compressed part's bucket norms, then start the ``all_reduce`` of its packed QSGD
    levels; return (its future, the function that unpacks the sum into the part's mean)."""
    group, codec, meter = state.process_group, state.codec, state._meter()
    n, rank = state.size, state.rank
    base = codec.base
    feedback = codec if codec is not base else None
    key = "grad" if index == 0 else (index, "grad")
    layout = summable.SummableLayout(base.levels, n)
    x = flat_c.detach().to("cpu", torch.float32).contiguous()
    m = x.numel()
    with meter.time("encode", bucket=index, numel=m, name="scales"):
        p = feedback.compensate(x, key).contiguous() if feedback else x
        norms = checked_norms(p, base.bucket, base.norm, base.name, max_norm(base.levels)).contiguous()
    shared = norms.to(device)
    _record_allreduce(meter, "scales", rank, n, shared.numel() * 4, 0)
    with meter.time("communicate", name="allreduce", message="scales"):
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=group)
    norms = shared.cpu()
    scale, unit = summable.bucket_scales(norms, base.levels)
    rng = make_generator(state.seed, rank, step, stream=index)
    seed = draw_seed(rng) if base.stochastic else 0
    words = np.empty(layout.n_words(m), dtype=np.uint64)
    own = np.empty(m, dtype=np.float32) if feedback else None
    with meter.time("encode", bucket=index, numel=m):
        summable.encode_words(p, scale, unit, base.bucket, layout, seed, base.stochastic, words, 0,
                              layout.n_chunks(m), own)
    if feedback:
        feedback.update(key, p, torch.from_numpy(own), x)
    summed = torch.from_numpy(words.view(np.int64)).to(device)
    _record_allreduce(meter, "intsum", rank, n, words.nbytes, m)
    future = dist.all_reduce(summed, group=group, async_op=True).get_future()

    def finish_c():
        total = summed.cpu().numpy().view(np.uint64)
        out = np.empty(m, dtype=np.float32)
        with meter.time("decode", bucket=index, numel=m):
            bad = summable.unpack_mean(total, (unit / n).numpy(), base.bucket, layout, out, 0, layout.n_chunks(m))
        if bad:
            i = summable.first_bad_field(total, layout, m) or 0
            raise DecodeError(f"mpiqsgd_hook: the summed levels of bucket {i // base.bucket} of DDP bucket {index} "
                              f"exceed what {n} ranks can send ({layout.top} in {layout.width}-bit fields): a rank "
                              "sent codes no encoder of this job writes")
        return torch.from_numpy(out)

    return future, finish_c


def _record_allreduce(meter, phase, rank, n, nbytes, fp32_numel):
    """Count an allreduce of ``nbytes`` at its nominal cost, standing for ``fp32_numel`` fp32 values."""
    if n > 1:
        meter.record(phase, rank, -1, 0, allreduce_nbytes(nbytes, n, itemsize=1), allreduce_nbytes(fp32_numel, n))


def _right(rank, n):
    """The destinations the meter records for one rank's n-1 ring-allgather messages (its right neighbour)."""
    return [(rank + 1) % n] * (n - 1)


# collective name -> function (state, index, step, flat_c, device) -> (Future, finish)
COLLECTIVES = {"allgather": _allgather, "intsum": _intsum}
