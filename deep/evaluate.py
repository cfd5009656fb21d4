"""Evaluation of trained classifiers: the averaged model, the true ensemble of the K members, and every member.

For each model: accuracy (%), mean NLL (nats), ECE (%, 15 bins), and OOD AUROC (%) with predictive-entropy and
max-softmax scores for every OOD set (see :mod:`deep.metrics`). The ensemble's prediction is the average of the
members' softmax probabilities; members are evaluated from the same stacked forward passes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

import shared

from . import metrics


def _autocast(device: torch.device, dtype):
    if dtype is None or device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def probs_of(model: nn.Module, loader, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N, C) float32 on the CPU and labels (N,) of a plain model over an eval loader."""
    was = model.training
    model.eval()
    out, labels = [], []
    try:
        for x, y in loader:
            with _autocast(x.device, autocast):
                logits = model(x)
            out.append(torch.softmax(logits.float(), -1).cpu())
            labels.append(y.cpu())
    finally:
        model.train(was)
    return torch.cat(out), torch.cat(labels)


@torch.no_grad()
def member_probs_of(late_model: nn.Module, loader, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member softmax probabilities (K, N, C) of a late-phase model (one stacked eval forward per batch)."""
    out, labels = [], []
    for x, y in loader:
        with _autocast(x.device, autocast):
            logits = shared.ensemble_logits(late_model, x)
        out.append(torch.softmax(logits.float(), -1).cpu())
        labels.append(y.cpu())
    return torch.cat(out, dim=1), torch.cat(labels)


def evaluate_plain(model: nn.Module, test_loader, ood_loaders: dict, autocast=None) -> dict:
    """Metrics of one plain network on the test set and OOD AUROCs against every OOD loader."""
    p, y = probs_of(model, test_loader, autocast)
    ood = {name: probs_of(model, ld, autocast)[0] for name, ld in ood_loaders.items()}
    return metrics.summary(p, y, ood)


def evaluate_members(late_model: nn.Module, test_loader, ood_loaders: dict, autocast=None) -> tuple[dict, list]:
    """(ensemble metrics, [member metrics]) of a late-phase model: ensemble p = (1/K) sum_k softmax(f_k)."""
    pk, y = member_probs_of(late_model, test_loader, autocast)
    ood_k = {name: member_probs_of(late_model, ld, autocast)[0] for name, ld in ood_loaders.items()}
    ensemble = metrics.summary(pk.mean(0), y, {n: v.mean(0) for n, v in ood_k.items()})
    members = [metrics.summary(pk[k], y, {n: v[k] for n, v in ood_k.items()}) for k in range(pk.shape[0])]
    return ensemble, members
