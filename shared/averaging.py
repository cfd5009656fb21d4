"""The end of late-phase training: weight averaging (collapse), ensembles and BatchNorm re-estimation.

These functions take any model carrying member-aware layers (``LatePhase.model``, or the SWA-averaged copy from
:class:`shared.swa.SWA`).

* :func:`collapse` -- one plain ``nn.Module`` of the original architecture with phi_bar = (1/K) sum_k phi_k
  (the "spatial average in weight space"); no late-phase overhead at inference.
* :func:`ensemble_logits` / :func:`ensemble_probs` -- the K members as an ensemble: per-member outputs (K, N, ...)
  from one stacked forward in eval mode, and the average of their predicted probabilities
  p(y|x) = (1/K) sum_k softmax(f_k(x)).
* One BatchNorm rule for all of them: the stored running statistics by default (with K = 1 the ensemble is the
  collapsed model), or, given a ``loader``, statistics re-estimated from its data (torch.optim.swa_utils.update_bn).
* :func:`update_bn` -- recompute BatchNorm statistics from data: of a plain model, or of every member of a
  late-phase model (e.g. after SWA), vectorized by feeding K stacked copies of each batch.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from .errors import LatePhaseError
from .modules import LateBatchNorm, late_modules, member_mode


def _late(model: nn.Module):
    mods = late_modules(model)
    if not mods:
        raise LatePhaseError("the model has no late-phase layers; pass LatePhase(...).model (or the SWA model)")
    return mods


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def collapse(model: nn.Module, loader: Iterable | None = None, members: Sequence[int] | None = None,
             device=None) -> nn.Module:
    """A plain copy of ``model`` with every member-aware layer replaced by its original class holding
    phi_bar = (1/|S|) sum_{k in S} phi_k over the members S (default: all K), returned in eval mode (ready to
    evaluate; call ``.train()`` to train it further).

    BatchNorm (the rule :func:`ensemble_logits` follows too): without ``loader``, the stored statistics -- the members'
    mean running mean and mean running variance; with ``loader``, re-estimated by one pass over its data
    (:func:`update_bn`: cumulative average over the loader's batches). gamma_bar, beta_bar either way. Head: W_bar,
    b_bar. Rank-1: W o (r_bar s_bar^T) folded into the original Linear/Conv. Hypernetwork: W_bar = sum_j T_j c_bar_j
    (the members' mean weight) in the original layer. Custom: the original module with phi_bar. ``model`` itself is
    not changed. With a single member (``members=[k]``) the result is exactly member k's network.

    Example::

        final = shared.collapse(lp.model, train_loader)     # = lp.collapse(train_loader)
    """
    mods = _late(model)
    K = mods[0][1].K
    members = list(range(K)) if members is None else [int(k) for k in members]
    if not members or any(not 0 <= k < K for k in members):
        raise LatePhaseError(f"members must be a non-empty list of indices in 0..{K - 1}, got {members}")
    if isinstance(loader, str):
        raise LatePhaseError(f"collapse(model, loader): the BatchNorm rule is the loader (None: the stored "
                             f"statistics; a loader: re-estimated from its data), got the string {loader!r}")
    plain = copy.deepcopy(model)
    for name, m in late_modules(plain):
        _replace(plain, name, m.to_plain(members))
    if loader is not None:
        with torch.no_grad():
            update_bn(loader, plain, device)
    return plain.eval()


def _stacked_copies(x: torch.Tensor, K: int) -> torch.Tensor:
    """K copies of a batch stacked along dim 0 (keeps channels_last)."""
    return torch.cat([x] * K)


def _per_member(out, K: int, N: int):
    """(K N, ...) -> (K, N, ...) for every tensor of a (possibly structured) output whose dim 0 is K N."""
    if isinstance(out, torch.Tensor):
        return out.reshape(K, N, *out.shape[1:]) if out.dim() and out.shape[0] == K * N else out
    if isinstance(out, (tuple, list)):
        return type(out)(_per_member(o, K, N) for o in out)
    if isinstance(out, dict):
        return {k: _per_member(v, K, N) for k, v in out.items()}
    return out


@torch.no_grad()
def ensemble_logits(model: nn.Module, x: torch.Tensor, loader: Iterable | None = None, device=None):
    """Per-member outputs f_k(x), shape (K, N, ...), computed in eval mode by one forward in stacked mode of K copies
    of ``x``; a structured output (tuple, list or dict of tensors) keeps its structure with every batch tensor
    reshaped to (K, N, ...). The model's training flag and modes are restored afterwards.

    BatchNorm, the rule of :func:`collapse`: without ``loader`` every member's stored running statistics; with
    ``loader`` every member's statistics re-estimated from its data (:func:`update_bn` on a copy of the model, one
    pass per call: for many batches re-estimate once, ``shared.update_bn(loader, lp.model)``, and call without)."""
    if loader is not None:
        model = copy.deepcopy(model)
        update_bn(loader, model, device)
    K = _late(model)[0][1].K
    was_training = model.training
    model.eval()
    try:
        with member_mode(model, None, rows=K * x.shape[0]):
            out = model(_stacked_copies(x, K))
    finally:
        model.train(was_training)
    return _per_member(out, K, x.shape[0])


@torch.no_grad()
def ensemble_probs(model: nn.Module, x: torch.Tensor, loader: Iterable | None = None, dim: int = -1,
                   output: Callable | None = None, device=None) -> torch.Tensor:
    """The ensemble's predictive distribution p(y|x) = (1/K) sum_k softmax(f_k(x)) along ``dim`` (float32 or
    wider), shape (N, ...), under the BatchNorm rule of :func:`ensemble_logits` (``loader``). ``output`` picks the
    logits from a structured output (applied to the (K, N, ...) outputs of :func:`ensemble_logits`), e.g.
    ``output=lambda o: o["logits"]``."""
    logits = ensemble_logits(model, x, loader, device)
    if output is not None:
        logits = output(logits)
    if not isinstance(logits, torch.Tensor):
        raise LatePhaseError(f"the model returns a {type(logits).__name__}, not a tensor of logits; pass output=... "
                             f"to pick them, e.g. output=lambda o: o['logits']")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.softmax(logits, dim=dim).mean(0)


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, device=None, limit: int | None = None) -> None:
    """Recompute the BatchNorm running statistics of ``model`` from data, as torch.optim.swa_utils.update_bn does:
    reset, then a cumulative average (momentum None) over one pass of ``loader`` (at most ``limit`` batches). A plain
    model is fed each batch x as it is; a model with late-phase layers (e.g. ``lp.model`` or an SWA average of it) is
    fed K stacked copies of x, so member k's statistics come from its own phi_k (every member sees the same data).
    Batches are tensors or lists/tuples whose first element is the input. Under torch.distributed the statistics
    are then averaged over the ranks (each rank having fed its own share of the data).

    Example::

        shared.update_bn(train_loader, swa_model)     # every member's BatchNorm statistics of an SWA average
    """
    bns = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, LateBatchNorm))
           and m.running_mean is not None]
    if not bns:
        return
    mods = [m for _, m in late_modules(model)]
    K = mods[0].K if mods else 1
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            if mods:
                with member_mode(model, None, rows=K * x.shape[0]):
                    model(_stacked_copies(x, K))
            else:
                model(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        for m in bns:
            for t in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(t)
                t.div_(world)
