"""Predictions for the arms of the deep study, on a block problem standing for BatchNorm + head.

    python -m nqp arms                 # the table written into docs/theory.md (section 6) and docs/results.md
    python -m nqp arms --phi spread --json

The block problem: d coordinates with h_i = i^-1 and gradient-noise covariance equal to H (s_i = 1/h_i, the setting
of Zhang et al. 2019, under which a block's share of SGD's excess is its share of tr H), w* = 1. The late-phase
weights phi stand for BatchNorm gamma/beta and the classifier head. Where they sit in the spectrum is an assumption:
"stiffest" puts them on the `phi_count` largest curvatures (a classifier's Hessian has about one outlier per class,
carried mostly by the last layer: Papyan 2019, Sagun et al. 2017), "spread" on every (d/phi_count)-th coordinate (a
share of the curvature proportional to their number), "flattest" on the smallest.

The arms (K members, torch SGD with momentum and weight decay lambda, rate eta everywhere unless said):
base SGD; late-phase gamma_theta = 1; late-phase gamma_theta = 1/K; the large-batch twin (no members: theta steps
K eta on the mean of K minibatches with decay lambda/K, phi steps eta, K = 1 -- the late-phase gamma_theta = 1 mean
model's own dynamics); late-phase gamma_theta = 1 with theta's decay multiplied by K (theta then gets SGD's decay per
minibatch). Also shown: SGD with a K-times batch and an ensemble of K runs (the fair baselines).
"""
from __future__ import annotations

import math

import numpy as np

from .errors import NQPError
from .methods import SGD, Block, Ensemble
from .problem import Problem

PLACEMENTS = ("stiffest", "spread", "flattest")


def block_problem(dim: int = 100, phi_count: int = 10, placement: str = "stiffest"):
    """(problem, phi_coords): h_i = 1/i, s_i = 1/h_i (gradient noise covariance H), w* = 1."""
    if placement not in PLACEMENTS:
        raise NQPError(f"`placement` must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if not (1 <= phi_count < dim):
        raise NQPError(f"`phi_count` must be between 1 and `dim` - 1 ({dim - 1}), got {phi_count}")
    h = 1.0 / np.arange(1, dim + 1)
    problem = Problem.from_values(h, 1.0 / h, 1.0)
    if placement == "stiffest":
        phi = range(phi_count)
    elif placement == "flattest":
        phi = range(dim - phi_count, dim)
    else:
        phi = np.unique(np.round(np.linspace(0, dim - 1, phi_count)).astype(int))
    return problem, tuple(int(i) for i in phi)


def arms(phi, K: int = 10, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
         weight_decay: float = 5e-4) -> dict:
    """name -> method of every arm (see the module docstring)."""
    lam = weight_decay
    return {
        "base SGD": SGD(lr, momentum, nesterov, weight_decay=lam),
        "late-phase, gamma_theta = 1": Block(K, lr, lr, 1.0, momentum, nesterov, phi, lam),
        "late-phase, gamma_theta = 1/K": Block(K, lr, lr, 1.0 / K, momentum, nesterov, phi, lam),
        "large-batch twin": Block(1, K * lr, lr, 1.0, momentum, nesterov, phi, lam, batch=K,
                                  weight_decay_theta=lam / K),
        "late-phase, gamma_theta = 1, theta's decay x K": Block(K, lr, lr, 1.0, momentum, nesterov, phi, lam,
                                                                weight_decay_theta=K * lam),
        "SGD, K-times batch (fair baseline)": SGD(lr, momentum, nesterov, batch=K, weight_decay=lam),
        "ensemble of K runs (fair baseline, K x cost)": Ensemble(SGD(lr, momentum, nesterov, weight_decay=lam), K),
    }


def predict(problem, phi, methods: dict) -> list[dict]:
    """Per arm: the mean model's stationary excess, its theta and phi parts, the members' excess, the ratio to the
    first arm, and the slowest relaxation time in minibatches (-minibatches_per_step / log rho)."""
    from . import block
    from .theory import steady_state

    phi = np.asarray(phi, int)
    theta = np.setdiff1d(np.arange(problem.dim), phi)
    rows = []
    for name, m in methods.items():
        p = steady_state(problem, m)
        rho = block.spectral_radius(problem, m)       # SGD and ensembles as block models (K = 1, all phi)
        mpb = block.as_block(problem, m).minibatches_per_step
        tau = -mpb / math.log(rho) if 0 < rho < 1 else float("nan")
        rows.append({"arm": name, "excess_loss_mean_model": p.excess_loss_mean_model,
                     "theta_part": float(p.mean_model_per_coordinate[theta].sum()),
                     "phi_part": float(p.mean_model_per_coordinate[phi].sum()),
                     "excess_loss_members": p.excess_loss_members, "relaxation_minibatches": tau})
    base = rows[0]["excess_loss_mean_model"]
    for r in rows:
        r["vs_base"] = r["excess_loss_mean_model"] / base
    return rows


def table(rows) -> str:
    """A markdown table of :func:`predict`'s rows."""
    out = ["| arm | mean model | θ part | φ part | vs base | members (avg) | slowest relaxation (minibatches) |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['arm']} | {r['excess_loss_mean_model']:.4g} | {r['theta_part']:.4g} | {r['phi_part']:.4g} | "
                   f"{r['vs_base']:.3g} | {r['excess_loss_members']:.4g} | {r['relaxation_minibatches']:.3g} |")
    return "\n".join(out)


def shares(problem, phi) -> dict:
    """phi's share of tr H and of SGD's small-step excess (sum_i h_i^2 s_i)."""
    h, s = problem.curvature, problem.noise
    phi = np.asarray(phi, int)
    return {"curvature": float(h[phi].sum() / h.sum()), "noise": float((h * h * s)[phi].sum() / (h * h * s).sum())}


def order(rows, rtol: float = 1e-6) -> str:
    """The arms (not the fair baselines) from best to worst mean model; '=' joins equal values (to rtol)."""
    arms_only = sorted((r for r in rows if "fair baseline" not in r["arm"]), key=lambda r: r["excess_loss_mean_model"])
    text = arms_only[0]["arm"]
    for prev, r in zip(arms_only, arms_only[1:]):
        same = abs(r["excess_loss_mean_model"] - prev["excess_loss_mean_model"]) <= rtol * prev["excess_loss_mean_model"]
        text += (" = " if same else " < ") + r["arm"]
    return text
