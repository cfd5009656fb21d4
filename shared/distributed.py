"""Distributed data parallel helpers (torchrun / torch.distributed): the single-process protocol on several ranks.

Layout: each rank holds, for every member k, its shard of member k's minibatch M_k; the local stacked batch is the K
local shards stacked along dim 0 (K * B / world samples). The vectorized path wraps the model in
DistributedDataParallel (gradients averaged over ranks during the single backward); the sequential path runs the K
passes without DDP and then averages the accumulated gradients itself (:func:`allreduce_grads`). With mean losses and
equal shards both give the gradients of the full member minibatches.

BatchNorm statistics are synchronised per member across ranks, so that every BatchNorm layer normalises with the
statistics of the member's whole minibatch M_k, as on one GPU (standard DDP would use the B / world images of each
rank). During a step of :class:`shared.LatePhase` under torch.distributed every member-aware BatchNorm (late and
shared, stacked and member mode) calls :func:`batch_norm_over_ranks`; before the release, :func:`sync_batchnorm`
converts a plain model's nn.BatchNorm layers into :class:`SyncedBatchNorm` (and :func:`plain_batchnorm` back).
For slice k (a member's local shard; all of the input in member mode) and channel c, with n_r values on rank r:

    N = sum_r n_r,   mu = (1/N) sum_r sum_i x_i,   var = (1/N) sum_r sum_i x_i^2 - mu^2   (biased),
    y = gamma_kc (x - mu) / sqrt(var + eps) + beta_kc,

and the running statistics as nn.BatchNorm updates them from the whole minibatch (unbiased var N / (N - 1)).
Running buffers then stay equal on all ranks; they also follow rank 0 at the start of every step (DDP's
``broadcast_buffers``), on both paths. In a single process nothing of this runs: the layers use nn.BatchNorm's kernels.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable

from .errors import LatePhaseError

BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    backend defaults to nccl with CUDA, gloo otherwise; ``timeout`` (seconds) bounds every collective (default:
    torch's). Returns False (and does nothing) outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        dist.init_process_group(backend=backend, **kwargs)
    return True


def shard(batch: torch.Tensor, K: int, rank: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's part of a global stacked batch: for each member k, rows [k B + rank b, k B + (rank + 1) b) with
    B = len(batch) / K and b = B / world, stacked along dim 0 (K b rows)."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    n = batch.shape[0]
    if n % K or (n // K) % world:
        raise LatePhaseError(f"a stacked batch of {n} does not split into K={K} member minibatches of equal shards "
                             f"over {world} ranks; use a per-member batch divisible by the world size")
    B = n // K
    b = B // world
    part = batch.reshape(K, B, *batch.shape[1:])[:, rank * b:(rank + 1) * b].reshape(K * b, *batch.shape[1:])
    return part.contiguous(memory_format=_dense_format(batch))  # NHWC stays NHWC (reshape copies to NCHW)


def broadcast_module(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless buffers_only) and buffers to every rank, in place."""
    tensors = list(module.buffers()) if buffers_only else list(module.parameters()) + list(module.buffers())
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


def allreduce_grads(params) -> None:
    """Average the gradients of ``params`` over ranks: g <- (1/world) sum_ranks g (one flat all-reduce per dtype)."""
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    by_type: dict = {}
    for g in grads:
        by_type.setdefault((g.dtype, g.device), []).append(g)
    for group in by_type.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in group:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# ----------------------------------------------------------------------------- BatchNorm statistics over ranks

@contextlib.contextmanager
def synced_statistics(batchnorms: Sequence):
    """During this block (the forward and backward passes of one step) the given member-aware BatchNorm layers take
    their training-mode statistics over each member's whole minibatch on all ranks, the single-process protocol
    (``LateBatchNorm.sync``). Outside steps, e.g. BatchNorm re-estimation on one rank, they stay per process."""
    for m in batchnorms:
        m.sync = True
    try:
        yield
    finally:
        for m in batchnorms:
            m.sync = False


def _dense_format(x: torch.Tensor):
    """The memory format x is dense in (channels_last for NHWC/NDHWC tensors, else contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _group_size(group) -> int:
    """Ranks in ``group`` (None: the default group); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _BatchNormOverRanks(torch.autograd.Function):
    """Batch normalisation of the K equal slices of x (dim 0) with batch statistics over every rank of ``group``; see
    :func:`batch_norm_over_ranks` for the equations. Forward: one all-gather of (count, mean, M2) per slice and
    channel; backward: one all-reduce of (sum_i dy_i xhat_i, sum_i dy_i) per slice and channel."""

    @staticmethod
    def forward(ctx, x, weight, bias, K, eps, stats, group):
        with torch.autocast(x.device.type, enabled=False):
            return _BatchNormOverRanks._forward(ctx, x, weight, bias, K, eps, stats, group)

    @staticmethod
    def _forward(ctx, x, weight, bias, K, eps, stats, group):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        b, C = x.shape[0] // K, x.shape[1]
        x5 = x.unflatten(0, (K, b))
        n = b * (x[:1].numel() // C) if b else 0  # values per channel in each local slice
        local = torch.zeros((3, K, C), dtype=torch.float64, device=x.device)  # count, mean, M2 per slice, channel
        local[0] = n
        if n:
            if x.dtype == acc:
                var, mean = torch.var_mean(x5, (1, *range(3, x5.dim())), correction=0)
            else:  # low precision: moments of each slice in float32 (one slice copied at a time)
                moments = [torch.var_mean(x5[k].to(acc), (0, *range(2, x.dim())), correction=0) for k in range(K)]
                var, mean = torch.stack([v for v, _ in moments]), torch.stack([m for _, m in moments])
            local[1], local[2] = mean, var * n
        parts = [torch.empty_like(local) for _ in range(_group_size(group))]
        dist.all_gather(parts, local, group=group)
        counts, means, m2 = torch.stack(parts).unbind(1)  # (ranks, K, C) each
        N = counts.sum(0)
        mu = (counts * means).sum(0) / N
        var = (m2.sum(0) + (counts * (means - mu) ** 2).sum(0)) / N  # biased variance over all ranks
        if n <= 1 and bool((N[:, 0] <= 1).any()):  # every rank takes this branch together (n_r <= N)
            raise LatePhaseError(f"BatchNorm needs more than 1 value per channel in each member's minibatch when "
                                 f"training (got {int(N[:, 0].min())} over all ranks); use a larger minibatch")
        mean, var_acc = mu.to(acc), var.to(acc)
        invstd = torch.rsqrt(var_acc + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
        view = (K, 1, C) + (1,) * (x.dim() - 2)
        y = torch.empty_like(x)  # x's dtype and memory format
        torch.addcmul(shift.reshape(view), x5, scale.reshape(view), out=y.unflatten(0, (K, b)))
        with torch.no_grad():
            unbiased = var * (N / (N - 1))
            for k, (rm, rv, m) in enumerate(stats):
                if rm is not None:
                    rm.mul_(1 - m).add_(mu[k].to(rm.dtype), alpha=m)
                    rv.mul_(1 - m).add_(unbiased[k].to(rv.dtype), alpha=m)
        ctx.save_for_backward(x, weight, mean, var_acc, invstd, N.to(acc))
        ctx.K, ctx.eps, ctx.group = K, eps, group
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, mean, var, invstd, N = ctx.saved_tensors
        K, (w_dtype, b_dtype) = ctx.K, ctx.dtypes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        b, C = x.shape[0] // K, x.shape[1]
        gy = gy.contiguous(memory_format=_dense_format(x))
        ones = torch.ones(C, dtype=mean.dtype, device=x.device)
        sums = torch.zeros((2, K, C), dtype=mean.dtype, device=x.device)  # local sum dy xhat, sum dy per slice
        if b:
            for k in range(K):  # nn.BatchNorm's reduction kernel (eval form: xhat from the given mean and var)
                sl = slice(k * b, (k + 1) * b)
                _, sums[0, k], sums[1, k] = torch.ops.aten.native_batch_norm_backward(
                    gy[sl], x[sl], ones, mean[k], var[k], None, None, False, ctx.eps, [False, True, True])
        gx = None
        if need_x:
            total = sums.clone()
            dist.all_reduce(total, group=ctx.group)
            a = invstd if weight is None else invstd * weight.to(mean.dtype)
            slope = -a * invstd * total[0] / N  # gx = a dy + slope x + offset (N: (K, C) counts)
            offset = -a * total[1] / N - slope * mean
            view = (K, 1, C) + (1,) * (x.dim() - 2)
            gx = torch.empty_like(x)
            gx5 = gx.unflatten(0, (K, b))
            torch.addcmul(offset.reshape(view), x.unflatten(0, (K, b)), slope.reshape(view), out=gx5)
            gx5.addcmul_(gy.unflatten(0, (K, b)), a.reshape(view))
        gw = sums[0].to(w_dtype) if need_w else None
        gb = sums[1].to(b_dtype) if need_b else None
        return gx, gw, gb, None, None, None, None


_apply_eagerly = None  # _BatchNormOverRanks.apply behind torch.compiler.disable (see _opaque_to_compile)


def _opaque_to_compile() -> None:
    """Keep torch.compile out of the synchronised batch normalisation: a graph break, after which it runs eagerly with
    its collectives. Called where synchronisation is switched on (SyncedBatchNorm and LatePhase under
    torch.distributed), so that a single process never imports the compiler for it."""
    global _apply_eagerly
    if _apply_eagerly is None:
        _apply_eagerly = torch.compiler.disable(_BatchNormOverRanks.apply)


def batch_norm_over_ranks(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          K: int = 1, eps: float = 1e-5, stats: Sequence | None = None, group=None) -> torch.Tensor:
    """Training-mode batch normalisation of the K equal slices of x along dim 0 (slice k: rows k b..(k+1) b-1, e.g.
    this rank's shard of member k's minibatch), with each slice's batch statistics taken over all ranks of ``group``
    (None: the default process group). x is (K b, C, *spatial); ``weight``, ``bias`` are (K, C) or None. For slice k
    and channel c, with S_r, Q_r, n_r the sum of x, the sum of x^2 and the number of values on rank r:

        N = sum_r n_r,   mu_kc = (sum_r S_r) / N,   var_kc = (sum_r Q_r) / N - mu_kc^2   (biased),
        y = gamma_kc (x - mu_kc) / sqrt(var_kc + eps) + beta_kc.

    The ranks exchange (n_r, their mean m_r and M2_r = sum (x - m_r)^2) and combine them without cancellation,
    mu = sum_r n_r m_r / N and var = (sum_r M2_r + n_r (m_r - mu)^2) / N, the same quantities (S_r = n_r m_r,
    Q_r = M2_r + n_r m_r^2); moments are computed in float32 for low-precision inputs (float64 for float64) and the
    output keeps x's dtype and memory format. ``stats`` lists (running_mean, running_var, momentum m) per slice (a
    tensor may be None; the same tensors for several slices receive their updates in slice order), updated as
    nn.BatchNorm does from the whole minibatch: r_mean <- (1 - m) r_mean + m mu, r_var <- (1 - m) r_var +
    m var N / (N - 1) (m = 1 / num_batches_tracked gives the cumulative average; the caller counts the batches).

    Gradients are exact: with xhat = (x - mu) / sqrt(var + eps) and the sums over all ranks' values of the slice,

        dx = gamma / sqrt(var + eps) (dy - (1/N) sum dy - xhat (1/N) sum dy xhat),
        dgamma = sum_local dy xhat,   dbeta = sum_local dy,

    where the two sums in dx are all-reduced; dgamma and dbeta are this rank's shares, which the usual gradient
    averaging (DDP, :func:`allreduce_grads`) turns into the gradient of the mean loss. Every rank of the group must
    call it for the same layers in the same order (one all-gather forward, one all-reduce backward)."""
    if x.dim() < 2 or x.shape[0] % K:
        raise LatePhaseError(f"batch_norm_over_ranks needs an input (K b, C, ...) with K={K} equal slices along dim 0, "
                             f"got shape {tuple(x.shape)}")
    stats = [(None, None, 0.0)] * K if stats is None else list(stats)
    if len(stats) != K:
        raise LatePhaseError(f"stats must give (running_mean, running_var, momentum) for each of the K={K} slices")
    return (_apply_eagerly or _BatchNormOverRanks.apply)(x, weight, bias, K, eps, stats, group)


def _adopt(dst: nn.Module, src: nn.Module) -> nn.Module:
    """Give ``dst`` the Parameters, buffers and training flag of the BatchNorm ``src`` (the same tensor objects)."""
    for name in ("weight", "bias"):
        dst._parameters[name] = src._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        dst._buffers[name] = src._buffers.get(name)
    dst.training = src.training
    return dst


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """An nn.BatchNorm1d/2d/3d (``kind``) whose training-mode batch statistics are those of the whole minibatch over
    all ranks of ``process_group`` (None: the default group): :func:`batch_norm_over_ranks` with one slice, with
    nn.BatchNorm's momentum, cumulative average (momentum None) and num_batches_tracked. Outside training mode, or
    without a process group of more than one rank, it runs nn.BatchNorm's own forward. Holds the Parameters and
    buffers of the layer it was made from (the same tensors); :meth:`to_plain` gives them back to a ``kind`` layer.
    Unlike nn.SyncBatchNorm it runs on the CPU (gloo) as well as on GPUs."""

    def __init__(self, bn: nn.Module, process_group=None):
        if type(bn) not in BATCHNORM_TYPES:
            raise LatePhaseError(f"SyncedBatchNorm converts nn.BatchNorm1d/2d/3d, not {type(bn).__name__}")
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        _adopt(self, bn)
        self.kind = type(bn)
        self.process_group = process_group
        if _group_size(process_group) > 1:
            _opaque_to_compile()

    def _check_input_dim(self, input):
        self.kind._check_input_dim(self, input)

    def forward(self, x):
        if not (self.training and _group_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        m, rm, rv = (0.0 if self.momentum is None else self.momentum), None, None
        if self.track_running_stats:
            rm, rv = self.running_mean, self.running_var
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    m = 1.0 / float(self.num_batches_tracked)
        one = (lambda t: None if t is None else t.unsqueeze(0))
        return batch_norm_over_ranks(x, one(self.weight), one(self.bias), 1, self.eps, [(rm, rv, m)],
                                     self.process_group)

    def to_plain(self) -> nn.Module:
        """The ``kind`` layer (nn.BatchNorm1d/2d/3d) holding this layer's Parameters and buffers."""
        bn = self.kind(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                       device="meta")
        return _adopt(bn, self)


def _convert(module: nn.Module, fn) -> nn.Module:
    new = fn(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        new = _convert(child, fn)
        if new is not child:
            setattr(module, name, new)
    return module


def sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d of ``model`` (in place) by a :class:`SyncedBatchNorm` holding the same
    Parameters and buffers, so that in training mode under torch.distributed the batch statistics are those of the
    whole minibatch over all ranks (the single-process protocol). Returns the model (the new layer if ``model`` itself
    is a BatchNorm). Optimizers built on the model keep working: the Parameters are the same objects. Convert before
    DistributedDataParallel or torch.compile wrap the model."""
    return _convert(model, lambda m: SyncedBatchNorm(m, process_group) if type(m) in BATCHNORM_TYPES else None)


def plain_batchnorm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`sync_batchnorm`: every :class:`SyncedBatchNorm` becomes its nn.BatchNorm1d/2d/3d again,
    holding the same Parameters and buffers (the state carries over bit for bit). :class:`shared.LatePhase` does this
    itself at the release (its BatchNorm layers synchronise under torch.distributed on their own)."""
    return _convert(model, lambda m: m.to_plain() if isinstance(m, SyncedBatchNorm) else None)
