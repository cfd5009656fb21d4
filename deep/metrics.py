"""Evaluation metrics of classifiers: accuracy, top-5, mean NLL, expected calibration error, OOD AUROC.

One path: :class:`Scores` accumulates batches of predicted class probabilities (N, C) (rows sum to 1) and integer
labels (N,) into sufficient statistics -- counts, hits, NLL sum, 15 confidence bins -- plus the per-example OOD scores
(predictive entropy and max-softmax), reducible over ranks; :func:`summary` scores whole arrays through it. The
functions below it define each metric on arrays.
"""
from __future__ import annotations

import math

import numpy as np
import torch

EPS = 1e-12
ECE_BINS = 15


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


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error with `bins` equal-width confidence bins on [0, 1]:
    ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|, confidence = max_c p_c (bin b holds (lo, hi])."""
    s = Scores(bins=bins)
    s.add(torch.as_tensor(_np(probs)), torch.as_tensor(_np(labels).astype(np.int64)))
    return s.summary()["ece"] / 100


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


class Scores:
    """Streamed metrics of one model on one data set.

    ``add(probs, labels)`` per batch (labels may be None for an OOD set: only its OOD scores are kept). ``summary()``
    gives accuracy (%), top5 (%, only with more than 5 classes), nll (nats), ece (%, ``bins`` bins), the
    reliability diagram (per bin: fraction of examples, mean confidence, accuracy) and, with ``ood``
    (name -> the Scores of an OOD set), the AUROC (%) of predictive entropy and of max-softmax (negated: a lower
    confidence means OOD) for each set, OOD as positive, and their mean over the sets (``ood_mean``, the reference's
    headline number). ``reduce()`` sums the statistics over torch.distributed
    ranks and gathers their OOD scores."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
        self.edges = torch.from_numpy(np.linspace(0.0, 1.0, bins + 1))
        # [n, top-1 hits, top-5 hits, NLL sum, per-bin counts, per-bin confidence sums, per-bin hits]
        self.sums = torch.zeros(4 + 3 * bins, dtype=torch.float64)
        self.classes = 0
        self.scores: list[torch.Tensor] = []  # (n, 2): entropy, -max p

    @torch.no_grad()
    def add(self, probs: torch.Tensor, labels: torch.Tensor | None) -> None:
        p = probs.detach().to("cpu", torch.float64)
        self.classes = p.shape[1]
        conf, pred = p.max(1)
        ent = -(p * p.clamp_min(EPS).log()).sum(1)
        self.scores.append(torch.stack([ent, -conf], 1))
        if labels is None:
            return
        labels = labels.to("cpu")
        hit = (pred == labels).double()
        top5 = (p.topk(min(5, p.shape[1]), 1).indices == labels[:, None]).any(1).double()
        nll_ = -p.gather(1, labels[:, None]).squeeze(1).clamp_min(EPS).log()
        b = (torch.bucketize(conf, self.edges, right=False) - 1).clamp(0, self.bins - 1)
        s, n = self.sums, self.bins
        s[0] += p.shape[0]
        s[1] += hit.sum()
        s[2] += top5.sum()
        s[3] += nll_.sum()
        s[4:4 + n].index_add_(0, b, torch.ones_like(conf))
        s[4 + n:4 + 2 * n].index_add_(0, b, conf)
        s[4 + 2 * n:].index_add_(0, b, hit)

    def reduce(self) -> None:
        """Sum the statistics over the ranks of torch.distributed and gather the OOD scores (no-op in one process)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        dist.all_reduce(self.sums)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._score_array())
        self.scores = [torch.cat(gathered)]

    def _score_array(self) -> torch.Tensor:
        return torch.cat(self.scores) if self.scores else torch.zeros(0, 2, dtype=torch.float64)

    def summary(self, ood: dict | None = None) -> dict:
        s, n = self.sums, self.bins
        total = float(s[0])
        if total == 0:
            raise ValueError("no labelled examples were scored")
        counts, conf, hits = s[4:4 + n], s[4 + n:4 + 2 * n], s[4 + 2 * n:]
        used = counts > 0
        ece_ = float((counts[used] / total * (hits[used] / counts[used] - conf[used] / counts[used]).abs()).sum())
        out = {"accuracy": 100 * float(s[1]) / total}
        if self.classes > 5:
            out["top5"] = 100 * float(s[2]) / total
        out.update(nll=float(s[3]) / total, ece=100 * ece_)
        # the reliability diagram: per confidence bin (lo, hi] the fraction of examples, their mean confidence and
        # their accuracy (None for an empty bin)
        out["reliability"] = {"fraction": (counts / total).tolist(),
                              "confidence": [float(c / n_) if n_ else None for c, n_ in zip(conf, counts)],
                              "accuracy": [float(h / n_) if n_ else None for h, n_ in zip(hits, counts)]}
        if ood:
            mine = self._score_array().numpy()
            out["ood"] = {}
            for name, other in ood.items():
                theirs = other._score_array().numpy()
                out["ood"][name] = {"auroc_entropy": 100 * auroc(mine[:, 0], theirs[:, 0]),
                                    "auroc_max_softmax": 100 * auroc(mine[:, 1], theirs[:, 1])}
            # the reference's headline number: the mean AUROC over the OOD sets used
            out["ood_mean"] = {score: sum(o[score] for o in out["ood"].values()) / len(out["ood"])
                               for score in ("auroc_entropy", "auroc_max_softmax")}
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"metric {k} is not finite ({v}); the predictions contain NaN")
        return out


def ood_auroc(probs_in, probs_out) -> dict:
    """OOD AUROC with two scores: predictive entropy and max-softmax (OOD as positive; for max-softmax a
    lower confidence means OOD, so the score is -max_c p_c)."""
    return {"auroc_entropy": auroc(entropy(probs_in), entropy(probs_out)),
            "auroc_max_softmax": auroc(-_np(probs_in).max(axis=1), -_np(probs_out).max(axis=1))}


def summary(probs, labels, ood: dict | None = None, bins: int = ECE_BINS) -> dict:
    """accuracy (%), top5 (%, more than 5 classes), mean NLL (nats), ECE (%, `bins` bins) and OOD AUROCs (%) of one
    model's predictions on whole arrays (``ood``: name -> OOD probabilities), through :class:`Scores`."""
    scores = Scores(bins)
    scores.add(torch.as_tensor(_np(probs)), torch.as_tensor(_np(labels).astype(np.int64)))
    others = {}
    for name, p in (ood or {}).items():
        others[name] = Scores(bins)
        others[name].add(torch.as_tensor(_np(p)), None)
    return scores.summary(others)
