"""Evaluation metrics: accuracy, mean NLL, expected calibration error, OOD AUROC.

All functions take predicted class probabilities (N, C) (float, rows sum to 1) and integer labels (N,).
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def accuracy(probs, labels) -> float:
    """Fraction of argmax predictions equal to the label (0..1)."""
    p, y = _np(probs), _np(labels).astype(np.int64)
    return float((p.argmax(axis=1) == y).mean())


def nll(probs, labels) -> float:
    """Mean negative log-likelihood -1/N sum_n log p_n[y_n] (nats; probabilities clipped at 1e-12).
    For an ensemble pass the averaged probabilities (the log of the mean, not the mean of the logs)."""
    p, y = _np(probs), _np(labels).astype(np.int64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], EPS, None))))


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error with `bins` equal-width confidence bins on [0, 1]:
    ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|, confidence = max_c p_c (bin b holds (lo, hi])."""
    p, y = _np(probs), _np(labels).astype(np.int64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def entropy(probs) -> np.ndarray:
    """Predictive entropy -sum_c p_c log p_c per example (nats)."""
    p = _np(probs)
    return -(p * np.log(np.clip(p, EPS, None))).sum(axis=1)


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for separating OOD (positive) from in-distribution (negative) examples by a
    score that is larger for OOD: the Mann-Whitney statistic P(score_out > score_in) + 1/2 P(tie)."""
    from scipy.stats import rankdata
    a, b = _np(scores_in).ravel(), _np(scores_out).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("AUROC needs in-distribution and OOD scores")
    ranks = rankdata(np.concatenate([a, b]))
    r_out = ranks[a.size:].sum()
    return float((r_out - b.size * (b.size + 1) / 2) / (a.size * b.size))


def ood_auroc(probs_in, probs_out) -> dict:
    """OOD AUROC with two scores: predictive entropy and max-softmax (OOD as positive; for max-softmax a
    lower confidence means OOD, so the score is -max_c p_c)."""
    return {"auroc_entropy": auroc(entropy(probs_in), entropy(probs_out)),
            "auroc_max_softmax": auroc(-_np(probs_in).max(axis=1), -_np(probs_out).max(axis=1))}


def summary(probs, labels, ood: dict | None = None, bins: int = 15) -> dict:
    """accuracy (%), mean NLL (nats), ECE (%, `bins` bins) and OOD AUROCs (%) for one model's predictions."""
    out = {"accuracy": 100 * accuracy(probs, labels), "nll": nll(probs, labels), "ece": 100 * ece(probs, labels, bins)}
    if ood:
        out["ood"] = {name: {k: 100 * v for k, v in ood_auroc(probs, p_out).items()} for name, p_out in ood.items()}
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"metric {k} is not finite ({v}); the predictions contain NaN")
    return out
