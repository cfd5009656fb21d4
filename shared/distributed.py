"""Distributed data parallel helpers (torchrun / torch.distributed).

Layout: each rank holds, for every member k, its shard of member k's minibatch M_k; the local stacked batch is the K
local shards stacked along dim 0 (K * B / world samples). The vectorized path wraps the model in
DistributedDataParallel (gradients averaged over ranks during the single backward); the sequential path runs the K
passes without DDP and then averages the accumulated gradients itself (:func:`allreduce_grads`). With mean losses and
equal shards both give the gradients of the full member minibatches. BatchNorm statistics are computed per rank, as in
standard DDP; buffers follow rank 0 at the start of every step (DDP's ``broadcast_buffers``), on both paths.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import LatePhaseError


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
    backend defaults to nccl with CUDA, gloo otherwise. Returns False (and does nothing) outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
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
    return batch.reshape(K, B, *batch.shape[1:])[:, rank * b:(rank + 1) * b].reshape(K * b, *batch.shape[1:])


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
