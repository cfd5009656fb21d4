"""Vectorised grids of closed-form predictions over any two method parameters.

`grid` evaluates the stationary excess loss (closed forms of :mod:`nqp.closed_form`, summed over
coordinates) on a (y, x) grid, with the SGD comparator (same lr and momentum) and a stability mask,
in chunks so memory stays bounded. Unstable grid points are NaN.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import closed_form as cf
from .errors import NQPError, overflow
from .methods import make_method
from .resources import FLOAT, check_memory

PARAMS = ("K", "gamma_theta", "lr", "lr_theta", "lr_phi", "momentum", "weight_decay")


def parse_values(name: str, tokens) -> np.ndarray:
    """Numbers, or one range token 'start:stop:num' (linear) / 'start:stop:num:log' (geometric)."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    vals = []
    for tok in tokens:
        vals.extend(_token_values(name, tok))
    if not vals:
        raise NQPError(f"{name}: no values given")
    arr = np.asarray(vals, float)
    if not np.all(np.isfinite(arr)):
        raise NQPError(f"{name}: values must be finite, got {', '.join(f'{v:g}' for v in arr[~np.isfinite(arr)])}")
    return _integer_K(tokens, arr) if name == "K" else arr


def _token_values(name: str, tok) -> list:
    """The values of one token: a number, or a range 'start:stop:num' (linear) / 'start:stop:num:log'."""
    parts = str(tok).split(":")
    try:
        if len(parts) == 1:
            return [float(parts[0])]
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "log"):
            raise ValueError
        a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
        if n < 1:
            raise ValueError
    except ValueError:
        raise NQPError(f"{name}: cannot read {tok!r}; give numbers or start:stop:num[:log]") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise NQPError(f"{name}: range ends must be finite, got {tok}")
    check_memory([(f"{n:,} values of {name}", FLOAT * n, "the num of start:stop:num")], f"{name} {tok}")
    if len(parts) == 4:
        if a <= 0 or b <= 0:
            raise NQPError(f"{name}: a log range needs positive ends, got {tok}")
        return list(np.geomspace(a, b, n))
    return list(np.linspace(a, b, n))


def _integer_K(tokens, arr: np.ndarray) -> np.ndarray:
    """K values: given numbers must be integers, ranges are rounded to the integers they pass; unique, sorted."""
    given = [float(t) for t in tokens if ":" not in str(t)]
    if any(v != round(v) for v in given):
        raise NQPError(f"K values must be integers, got {', '.join(f'{v:g}' for v in given if v != round(v))}")
    arr = np.round(arr)  # a range is rounded to the integers it passes
    if np.any(arr < 1) or np.any(arr > 2 ** 31):
        raise NQPError("K values must be between 1 and 2^31")
    return np.unique(arr.astype(int)).astype(float)


@dataclass
class SweepResult:
    x_name: str
    x: np.ndarray
    y_name: str
    y: np.ndarray
    mean_model: np.ndarray   # (ny, nx), NaN where unstable
    members: np.ndarray
    sgd: np.ndarray          # SGD at the same lr / momentum
    stable: np.ndarray       # bool
    baseline: np.ndarray | None = None   # the best fair baseline: SGD with a K-times batch or a K-run ensemble

    @property
    def gain(self) -> np.ndarray:
        """E_sgd / E_mean: > 1 where the late-phase mean model beats SGD."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sgd / self.mean_model

    @property
    def gain_over_baseline(self) -> np.ndarray | None:
        """E_baseline / E_mean: > 1 where the mean model beats the best fair baseline at the same K."""
        if self.baseline is None:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.baseline / self.mean_model

    def rows(self):
        for j, yv in enumerate(self.y):
            for i, xv in enumerate(self.x):
                yield {self.x_name: float(xv), self.y_name: float(yv),
                       "excess_loss_mean_model": float(self.mean_model[j, i]),
                       "excess_loss_members": float(self.members[j, i]),
                       "excess_loss_sgd": float(self.sgd[j, i]),
                       "gain_over_sgd": float(self.gain[j, i]), "stable": bool(self.stable[j, i]),
                       **({} if self.baseline is None else {
                           "excess_loss_best_baseline": float(self.baseline[j, i]),
                           "gain_over_best_baseline": float(self.gain_over_baseline[j, i])})}

    def to_dict(self) -> dict:
        return {"x": {"name": self.x_name, "values": self.x.tolist()},
                "y": {"name": self.y_name, "values": self.y.tolist()},
                "points": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                           for r in self.rows()]}


def grid(problem, method: str, base: dict, x: tuple, y: tuple, chunk_elements: int = 1 << 18,
         balance: str = "release") -> SweepResult:
    """Closed-form stationary excess over the (y, x) grid; `base` holds the other parameters
    (K, gamma_theta, lr, lr_theta, lr_phi, momentum, nesterov). lr_theta/lr_phi follow lr unless set.
    The multiplicative model: balance "release" linearises at the balanced start (rates x |w*|, the short-time
    prediction), "long-run" at the noise-selected balance b* of every grid point (:func:`nqp.balance.select_grid`)."""
    (xn, xv), (yn, yv) = x, y
    _check_axes(method, balance, xn, yn)
    if method == "block" or base.get("weight_decay") or "weight_decay" in (xn, yn) or problem.hessian is not None:
        return _grid_exact(problem, method, base, (xn, xv), (yn, yv))
    if method == "multiplicative" and np.any(problem.optimum == 0):
        raise NQPError("the multiplicative model needs a nonzero optimum in every coordinate (`optimum`)")
    # Validate every grid value once by building the method at the axis extremes.
    for xi in (xv.min(), xv.max()):
        for yi in (yv.min(), yv.max()):
            make_method(method, **_point(base, {xn: xi, yn: yi}))
    shape = (len(yv), len(xv))
    P = _grid_params(base, (xn, xv), (yn, yv))
    nest = bool(base.get("nesterov", False))
    h, s = problem.curvature, problem.noise
    h_step = h * np.abs(problem.optimum) if method == "multiplicative" else h
    with np.errstate(over="ignore"):
        weights = 0.5 * h * s                  # E_i = 1/2 h_i s_i g(a_i, mu)
    mu = P["momentum"]
    edge = np.array([cf.stability_edge(m, nest) for m in mu])
    sgd = _summed(P["lr"], h, weights, mu, nest, chunk_elements)
    sgd[~(P["lr"] * h.max() < edge)] = np.nan
    if method == "sgd":
        stable = P["lr"] * h.max() < edge
        mean = mem = sgd.copy()
    else:
        K = P["K"]
        lr_eff = P["lr_phi"] + K * P["gamma_theta"] * P["lr_theta"]
        stable = (P["lr_phi"] * h_step.max() < edge) & (lr_eff * h_step.max() < edge)
        if method == "multiplicative" and balance == "long-run":
            mean, mem = _long_run(problem, P, nest, stable, chunk_elements)
        else:
            # Mean model: SGD with lr_eff and noise s/K; deviations: lr_phi and noise s (1 - 1/K).
            mean = _summed(lr_eff, h_step, weights, mu, nest, chunk_elements) / K
            mem = mean + _summed(P["lr_phi"], h_step, weights, mu, nest, chunk_elements) * (1 - 1 / K)
    if np.any(stable & ~(np.isfinite(mean) & np.isfinite(mem))) or np.any(np.isinf(sgd)):
        raise overflow("noise", "curvature", "optimum")
    mean = np.where(stable, mean, np.nan)
    mem = np.where(stable, mem, np.nan)
    # The fair baselines at each point's K: SGD with a K-times batch and the average of K runs both have 1/K of
    # SGD's stationary variance (no weight decay: V is proportional to the noise).
    baseline = None if method == "sgd" else (sgd / P["K"]).reshape(shape)
    return SweepResult(xn, xv, yn, yv, mean.reshape(shape), mem.reshape(shape), sgd.reshape(shape),
                       stable.reshape(shape), baseline)


def _check_axes(method: str, balance: str, xn: str, yn: str) -> None:
    if balance not in ("release", "long-run"):
        raise NQPError(f"balance must be 'release' or 'long-run', got {balance!r}")
    for n in (xn, yn):
        if n not in PARAMS:
            raise NQPError(f"cannot sweep {n!r}; choose from {', '.join(PARAMS)}")
    if xn == yn:
        raise NQPError("`x` and `y` must name different parameters")
    if method == "sgd" and {xn, yn} & {"K", "gamma_theta", "lr_theta", "lr_phi"}:
        raise NQPError("with `method` sgd only lr and momentum can be swept")


def _grid_params(base: dict, x: tuple, y: tuple) -> dict:
    """Every parameter of PARAMS as a flat array over the (y, x) grid (NaN where not given; lr_theta and lr_phi
    follow lr unless given or swept)."""
    (xn, xv), (yn, yv) = x, y
    P = {k: np.asarray(base.get(k) if base.get(k) is not None else np.nan, float) for k in PARAMS}
    P[xn] = xv[None, :]
    P[yn] = yv[:, None]
    if base.get("lr_theta") is None and "lr_theta" not in (xn, yn):
        P["lr_theta"] = P["lr"]
    if base.get("lr_phi") is None and "lr_phi" not in (xn, yn):
        P["lr_phi"] = P["lr"]
    shape = (len(yv), len(xv))
    n = shape[0] * shape[1]  # the parameters and four results per grid point live at once (coordinates in chunks)
    check_memory([(f"{n:,} grid points ({shape[1]:,} x {shape[0]:,})", FLOAT * n * (len(PARAMS) + 4), "`x`, `y`")],
                 "the sweep")
    return {k: np.broadcast_to(v, shape).reshape(-1) for k, v in P.items()}


def _long_run(problem, P, nesterov, stable, chunk_elements):
    """Summed long-run losses of the multiplicative model at every stable grid point: the additive model's closed
    forms with the rates lr_theta |w*| / b*, lr_phi |w*| b* at the selected balance b* of each point and coordinate."""
    from types import SimpleNamespace

    from . import balance as bal

    n, d = P["K"].size, problem.dim
    h, s, w = problem.curvature, problem.noise, np.abs(problem.optimum)
    # blocks of about 16k (points x coordinates): large enough that numpy's per-call overhead is small beside the
    # arithmetic (the root finder makes ~100 calls a block), small enough that its dozens of temporaries stay in the
    # core's cache. Measured on this project's 2-core AMD EPYC (1 MiB L2 a core), the 50 x 50 x 10^4 sweep's long run:
    # 4k 4.1 s, 8k 2.8 s, 16k 1.7 s, 32k 1.7 s, 256k 2.3 s (benchmarks/nqp_bench.py --sweep-only for the whole CLI)
    cols = max(1, min(d, chunk_elements, 1 << 14))
    rows = max(1, min(chunk_elements, 1 << 14) // cols)
    starts = range(0, d, cols)
    part_mean, part_mem = np.zeros((n, len(starts))), np.zeros((n, len(starts)))
    jobs = []
    for m in np.unique(P["momentum"]):
        idx = np.flatnonzero((P["momentum"] == m) & stable)
        jobs += [(idx[i:i + rows], float(m), k) for i in range(0, len(idx), rows) for k in range(len(starts))]

    def work(job):
        j, m, k = job
        c = slice(starts[k], starts[k] + cols)
        col = {key: P[key][j][:, None] for key in ("K", "gamma_theta", "lr_theta", "lr_phi")}
        sub = SimpleNamespace(curvature=h[c], noise=s[c], optimum=problem.optimum[c])
        b = bal.select_grid(sub, col["K"], col["gamma_theta"], col["lr_theta"], col["lr_phi"], m, nesterov and m > 0)
        with np.errstate(all="ignore"):
            e_mean, e_mem = cf.additive_excess(col["K"], col["gamma_theta"], col["lr_theta"] * w[c] / b,
                                               col["lr_phi"] * w[c] * b, h[c], s[c], m, nesterov and m > 0)
        part_mean[j, k], part_mem[j, k] = e_mean.sum(axis=1), e_mem.sum(axis=1)

    _run(work, jobs)
    mean, mem = np.full(n, np.nan), np.full(n, np.nan)
    mean[stable], mem[stable] = part_mean[stable].sum(axis=1), part_mem[stable].sum(axis=1)   # a fixed order
    return mean, mem


def _summed(rates, h_step, weights, mu, nesterov, chunk_elements):
    """S(rate, mu) = sum_i weights_i g(rate h_step_i, mu) for every grid point (closed form g of
    :func:`nqp.closed_form.variance_factor`), evaluated once per distinct (rate, mu): chunked outer
    products on all cores, then a BLAS matrix-vector product."""
    keys, inverse = np.unique(np.stack([rates, mu], axis=1), axis=0, return_inverse=True)
    out = np.empty(len(keys))
    rows = max(1, chunk_elements // h_step.size)
    jobs = []
    for m in np.unique(keys[:, 1]):
        idx = np.flatnonzero(keys[:, 1] == m)
        jobs += [(idx[i:i + rows], m) for i in range(0, len(idx), rows)]

    def work(job):
        idx, m = job
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out[idx] = cf.variance_factor(np.multiply.outer(keys[idx, 0], h_step), m, nesterov) @ weights

    _run(work, jobs)
    return out[inverse.reshape(-1)]


def _run(work, jobs) -> None:
    """work(job) for every job, on all cores when there are several (numpy releases the GIL in its loops)."""
    if len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(work, jobs))
    else:
        for j in jobs:
            work(j)


def _grid_exact(problem, method: str, base: dict, x: tuple, y: tuple) -> SweepResult:
    """The grid point by point with :func:`nqp.theory.steady_state` (the block model, weight decay, a full H: closed
    form for diagonal H, else Lyapunov). The comparator is SGD at the same lr, momentum and weight decay."""
    from .methods import SGD, Ensemble
    from .theory import steady_state

    (xn, xv), (yn, yv) = x, y
    shape = (len(yv), len(xv))
    check_memory([(f"{shape[0] * shape[1]:,} grid points", FLOAT * shape[0] * shape[1] * 4, "`x`, `y`")], "the sweep")
    mean, mem, sgd = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    baseline = None if method == "sgd" else np.full(shape, np.nan)
    stable = np.zeros(shape, bool)
    for j, yy in enumerate(yv):
        for i, xx in enumerate(xv):
            p = _point(base, {xn: xx, yn: yy})
            m = make_method(method, **p)
            try:
                pred = steady_state(problem, m)
                mean[j, i], mem[j, i], stable[j, i] = pred.excess_loss_mean_model, pred.excess_loss_members, True
            except NQPError:
                pass
            one = SGD(p.get("lr", 0.1), p.get("momentum", 0.0), bool(p.get("nesterov")),
                      weight_decay=p.get("weight_decay", 0.0))
            try:
                sgd[j, i] = steady_state(problem, one).excess_loss_mean_model
                if baseline is not None:
                    K = int(p["K"])
                    big = SGD(one.lr, one.momentum, one.nesterov, K, one.weight_decay)
                    baseline[j, i] = min(steady_state(problem, big).excess_loss_mean_model,
                                         steady_state(problem, Ensemble(one, K)).excess_loss_mean_model)
            except NQPError:
                pass
    return SweepResult(xn, xv, yn, yv, mean, mem, sgd, stable, baseline)


def _point(base: dict, override: dict) -> dict:
    p = {k: base.get(k) for k in ("K", "gamma_theta", "lr", "lr_theta", "lr_phi", "momentum", "nesterov",
                                  "phi_coords", "weight_decay", "weight_decay_theta")}
    p = {k: v for k, v in p.items() if v is not None}
    p.update(override)
    if "K" in p:
        p["K"] = int(round(p["K"]))
    if p.get("momentum", 0) == 0 and p.get("nesterov"):
        p["nesterov"] = False
    return p
