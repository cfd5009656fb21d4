"""Evaluation of trained classifiers under explicit BatchNorm rules: the averaged model, the true ensemble of the K
members and every member, each scored by :class:`deep.metrics.Scores` (accuracy, top-5, NLL, ECE, OOD AUROC).

BatchNorm rules (every model of a run is evaluated under the same rule, so base and late-phase compare fairly):

* ``stored``: the statistics the run ended with -- the base model its running statistics; the averaged late-phase
  model the mean of the members' running statistics; each member (and so the ensemble) its own; an SWA model the
  SWA average of the running statistics.
* ``reestimated``: statistics recomputed from training data (:func:`shared.update_bn`) for the evaluated weights
  themselves -- the base (or SWA) model, the averaged weights, each member.
* ``reference`` (averaged late-phase model only): the reference code's averaged model, whose BatchNorm layers output
  the mean of the K members' BatchNorm outputs, each member with its own statistics. In eval mode member k's layer is
  the affine map x -> a_k x + c_k (a_k = gamma_k / sqrt(var_k + eps), c_k = beta_k - a_k mean_k), so the mean output is
  one affine map (mean_k a_k) x + mean_k c_k, built here as a plain BatchNorm with those folded parameters.

Batches are given as zero-argument callables returning an iterator of (inputs, labels) on the device.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

import shared
from shared.core import maybe_autocast
from shared.modules import LateBatchNorm, late_modules

from .metrics import Scores

Batches = Callable[[], Iterator]
RULES = ("stored", "reestimated", "reference")


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), -1)


@torch.no_grad()
def predict_plain(model: nn.Module, test: Batches, ood: dict, autocast=None, passes: int = 1) -> dict:
    """Predicted probabilities of one plain network: {"test": (N, C), "labels": (N,), name: (N_name, C) per OOD set},
    float32 on the CPU (this rank's share under torch.distributed). ``passes`` > 1: Monte Carlo dropout -- the mean
    of ``passes`` forward passes with the dropout layers active (BatchNorm stays in eval mode)."""
    was = model.training
    model.eval()
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] if passes > 1 else []
    for m in dropouts:
        m.train()
    out: dict = {}
    try:
        for name, batches in {"test": test, **ood}.items():
            probs, labels = [], []
            for x, y in batches():
                with maybe_autocast(x.device, autocast):
                    p = sum(_probs(model(x)) for _ in range(passes)) / passes
                probs.append(p.cpu())
                labels.append(y.cpu())
            out[name] = torch.cat(probs)
            if name == "test":
                out["labels"] = torch.cat(labels)
    finally:
        model.train(was)
    return out


def summarize(predictions: dict, ood_names) -> dict:
    """The metrics (:class:`deep.metrics.Scores`) of predictions from :func:`predict_plain` (OOD sets
    ``ood_names``), reduced over ranks."""
    sets = {"test": Scores(), **{name: Scores() for name in ood_names}}
    sets["test"].add(predictions["test"], predictions["labels"])
    for name in ood_names:
        sets[name].add(predictions[name], None)
    for s in sets.values():
        s.reduce()
    return sets["test"].summary({name: sets[name] for name in ood_names})


def score_plain(model: nn.Module, test: Batches, ood: dict, autocast=None, passes: int = 1) -> dict:
    """Metrics of one plain network on the test set, with OOD AUROCs against every OOD set (name -> Batches)."""
    return summarize(predict_plain(model, test, ood, autocast, passes), list(ood))


@torch.no_grad()
def score_members(late_model: nn.Module, test: Batches, ood: dict, autocast=None) -> tuple[dict, list]:
    """(ensemble metrics, [member metrics]) of a late-phase model from one stacked eval forward per batch; the
    ensemble predicts p = (1/K) sum_k softmax(f_k)."""
    K = late_modules(late_model)[0][1].K
    ens = {"test": Scores(), **{name: Scores() for name in ood}}
    each = [{"test": Scores(), **{name: Scores() for name in ood}} for _ in range(K)]
    for name, batches in {"test": test, **ood}.items():
        labelled = name == "test"
        for x, y in batches():
            with maybe_autocast(x.device, autocast):
                pk = _probs(shared.ensemble_logits(late_model, x))
            ens[name].add(pk.mean(0), y if labelled else None)
            for k in range(K):
                each[k][name].add(pk[k], y if labelled else None)
    for sets in [ens] + each:
        for s in sets.values():
            s.reduce()
    summarize = (lambda sets: sets["test"].summary({name: sets[name] for name in ood}))  # noqa: E731
    return summarize(ens), [summarize(sets) for sets in each]


@torch.no_grad()
def reference_averaged(late_model: nn.Module) -> nn.Module:
    """The reference code's averaged model (see the module doc): a plain model, eval mode, with the members' mean
    weights, whose late-phase BatchNorm layers compute the mean of the members' eval-mode outputs."""
    plain = shared.collapse(late_model)
    for name, m in late_modules(late_model):
        if not (isinstance(m, LateBatchNorm) and m.late and m.running_mean is not None):
            continue
        a = torch.rsqrt(m.running_var + m.eps)
        if m.affine:
            a = a * torch.stack(list(m.weight))
        c = -a * m.running_mean
        if m.affine:
            c = c + torch.stack(list(m.bias))
        old = plain.get_submodule(name)
        bn = type(old)(old.num_features, eps=old.eps, momentum=old.momentum, affine=True,
                       device=a.device, dtype=a.dtype).eval()
        bn.running_var.fill_(1.0 - bn.eps)  # running mean 0: (x - 0) / sqrt(1 - eps + eps) = x
        bn.weight.copy_(a.mean(0))
        bn.bias.copy_(c.mean(0))
        parent, _, leaf = name.rpartition(".")
        setattr(plain.get_submodule(parent), leaf, bn)
    return plain


@torch.no_grad()
def phi_spread(late_model: nn.Module) -> float:
    """How far the members' late-phase weights have moved apart: the mean over members of the relative distance

        spread = (1/K) sum_k ||phi_k - phi_bar|| / ||phi_bar||,   phi_bar = (1/K) sum_k phi_k,

    the norms taken over all late-phase parameters of the model together (BatchNorm gamma/beta, head weights, ...;
    not the running statistics). 0 right after a release with sigma0 = 0."""
    layers = late_modules(late_model)
    K = layers[0][1].K
    stacked = [torch.stack([p.detach().double() for p in plist]) for _, m in layers for _, plist in m.phi_lists()]
    bars = [s.mean(0) for s in stacked]
    bar_sq = sum(float((b ** 2).sum()) for b in bars)
    dist = [sum(float(((s[k] - b) ** 2).sum()) for s, b in zip(stacked, bars)) ** 0.5 for k in range(K)]
    return sum(dist) / K / max(bar_sq ** 0.5, 1e-30)


@torch.no_grad()
def member_disagreement(late_model: nn.Module, test: Batches, autocast=None) -> dict:
    """Whether the members predict differently on the test set (each member with its own BatchNorm statistics, one
    stacked eval forward per batch): ``disagreement`` = the mean over member pairs k < l of the fraction of test
    examples whose top-1 classes differ, P(argmax f_k(x) != argmax f_l(x)), in %; and the ensemble's test accuracy
    (%), p = (1/K) sum_k softmax(f_k). Reduced over ranks under torch.distributed."""
    K = late_modules(late_model)[0][1].K
    differ = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.float64)
    n = torch.zeros((), dtype=torch.float64)
    pairs = [(k, j) for k in range(K) for j in range(k + 1, K)]
    for x, y in test():
        with maybe_autocast(x.device, autocast):
            pk = _probs(shared.ensemble_logits(late_model, x))
        top = pk.argmax(-1).cpu()  # (K, N)
        if pairs:
            differ += sum(float((top[k] != top[j]).sum()) for k, j in pairs) / len(pairs)
        correct += float((pk.mean(0).argmax(-1).cpu() == y.cpu()).sum())
        n += y.shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.stack([differ, correct, n])
        torch.distributed.all_reduce(both)
        differ, correct, n = both
    n = max(float(n), 1.0)
    return {"disagreement": 100.0 * float(differ) / n, "ensemble_accuracy": 100.0 * float(correct) / n}
