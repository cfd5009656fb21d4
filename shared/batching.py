"""Stacked member minibatches from an ordinary data loader.

An outer step of Algorithm 1 consumes K minibatches, one per member, stacked along dim 0 (member k owns rows
k B..(k+1) B-1). :func:`stack_batches` builds those steps from any iterable of minibatches, so the clock is unchanged:
t still counts the loader's minibatches.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .errors import LatePhaseError


def _cat(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise LatePhaseError(f"stack_batches: a minibatch holds a {type(first).__name__}; batches must be tensors or "
                         f"tuples, lists or dicts of tensors")


def _rows(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return _rows(batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values())))


def stack_batches(loader: Iterable, K: int) -> Iterator:
    """Group every K consecutive minibatches of ``loader`` into one stacked batch for :meth:`shared.LatePhase.step`:
    the i-th item holds minibatches iK..iK+K-1 concatenated along dim 0 (member k gets the (iK+k)-th), with the same
    structure as a minibatch (a tensor, or a tuple/list/dict of tensors).

    Members need minibatches of equal size: a group that contains a shorter minibatch (the last one of a loader
    without ``drop_last``) and an incomplete group at the end are left out, as ``drop_last`` does.

    Example::

        loader = torch.utils.data.DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True)
        for x, y in shared.stack_batches(loader, K=10):      # 10 * 128 images per outer step
            lp.step(x, y, F.cross_entropy)
    """
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise LatePhaseError(f"K must be an integer >= 1, got {K!r}")
    group: list = []
    for batch in loader:
        group.append(batch)
        if len(group) == K:
            if len({_rows(b) for b in group}) == 1:
                yield _cat(group)
            group = []
