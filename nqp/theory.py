"""Steady-state predictions and stability for every method (the main public API).

`steady_state(problem, method)` returns the stationary expected excess loss (t -> infinity) of the
mean model and the average member excess (1/K) sum_k E(w_k), summed over coordinates, in loss units.
Two exact paths: "closed" (sympy closed forms, :mod:`nqp.closed_form`) and "lyapunov" (discrete
Lyapunov equation on the literal step, :mod:`nqp.linear`); they agree to rounding (tested). For the
multiplicative model `steady_state` is the stationary state of the fast modes at a fixed balance b = theta^2/|w*|
(default: the balanced start b = 1), i.e. the prediction for times short against the balance's relaxation time;
`long_run(problem, method)` gives the t -> infinity state at the balance that the noise selects (:mod:`nqp.balance`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import closed_form as cf
from . import linear
from .errors import NQPError, UnstableError, overflow
from .methods import SGD, Ensemble, LatePhase, TailAverage
from .problem import Problem


# ----------------------------------------------------------------------------- stability

@dataclass(frozen=True)
class Condition:
    """One stability condition: `value` (max over coordinates) must be < `bound`."""

    expression: str
    value: float
    bound: float

    @property
    def ok(self) -> bool:
        return bool(self.value < self.bound)

    def to_dict(self) -> dict:
        return {"expression": self.expression, "value": self.value, "bound": self.bound, "ok": self.ok}


def _edge_text(momentum: float, nesterov: bool) -> str:
    v = cf.variant_of(momentum, nesterov)
    return {"plain": "2", "heavy": "2(1+momentum)", "nesterov": "2(1+momentum)/(1+2 momentum)"}[v]


def stability(problem: Problem, method) -> list[Condition]:
    """The stability conditions of `method` on `problem` (all must hold for a stationary state).

    SGD: lr h_i < edge(mu) for all i, edge = 2 (plain), 2(1+mu) (heavy ball), 2(1+mu)/(1+2mu)
    (Nesterov). Additive late-phase: the same for lr_phi and for lr_eff = lr_phi + K gamma_theta lr_theta
    (members' deviations and mean model). Multiplicative (linearised): the same with h_i |w*_i|.
    """
    from . import block
    if block.needs_block(problem, method):
        return block.stability(problem, method)
    if isinstance(method, (Ensemble, TailAverage)):
        return stability(problem, method.base)
    edge = cf.stability_edge(method.momentum, method.nesterov)
    tail = f" (edge {_edge_text(method.momentum, method.nesterov)})"
    h = problem.curvature
    if isinstance(method, SGD):
        return [Condition("lr * h" + tail, float(method.lr * h.max()), edge)]
    if method.kind == "multiplicative":
        if np.any(problem.optimum == 0):
            raise NQPError("the multiplicative model needs a nonzero optimum in every coordinate (`optimum`)")
        h = h * np.abs(problem.optimum)
        unit = " * |w*|"
    else:
        unit = ""
    return [
        Condition(f"lr_phi * h{unit}" + tail, float(method.lr_phi * h.max()), edge),
        Condition(f"(lr_phi + K*gamma_theta*lr_theta) * h{unit}" + tail, float(method.lr_eff * h.max()), edge),
    ]


def check_stable(problem: Problem, method) -> list[Condition]:
    """Raise UnstableError naming the violated bound; return the conditions otherwise."""
    conds = stability(problem, method)
    for c in conds:
        if not c.ok:
            raise UnstableError(f"unstable: max {c.expression.split(' (')[0]} = {c.value:.6g} must be < "
                                f"{c.bound:.6g}{' (' + c.expression.split(' (', 1)[1] if ' (' in c.expression else ''}"
                                f"; lower the learning rate(s)")
    return conds


def max_stable_lr(problem: Problem, method) -> dict:
    """The stability region along each learning rate, others fixed: the supremum of stable values."""
    from . import block
    if block.needs_block(problem, method):
        return block.max_stable_lr(problem, method)
    if isinstance(method, (Ensemble, TailAverage)):
        return max_stable_lr(problem, method.base)
    edge = cf.stability_edge(method.momentum, method.nesterov)
    h = problem.curvature
    if isinstance(method, LatePhase) and method.kind == "multiplicative":
        h = h * np.abs(problem.optimum)
    hmax = float(h.max())
    if isinstance(method, SGD):
        return {"lr": edge / hmax}
    Kg = method.K * method.gamma_theta
    out = {"lr_phi": min(edge / hmax, edge / hmax - Kg * method.lr_theta)}
    out["lr_theta"] = float("inf") if Kg == 0 else (edge / hmax - method.lr_phi) / Kg
    return out


# ----------------------------------------------------------------------------- predictions

@dataclass
class Prediction:
    """Stationary excess losses (loss units, summed over coordinates) and per-coordinate values.

    For the multiplicative model from :func:`long_run`: `balance` (the selected balance, :class:`nqp.balance.Balance`)
    and `short_time` (the prediction at the release balance, valid for t - T0 << the relaxation time)."""

    method: str
    path: str
    excess_loss_mean_model: float
    excess_loss_members: float
    mean_model_per_coordinate: np.ndarray = field(repr=False)
    members_per_coordinate: np.ndarray = field(repr=False)
    conditions: list = field(default_factory=list, repr=False)
    balance: object = field(default=None, repr=False)
    short_time: "Prediction | None" = field(default=None, repr=False)

    @property
    def relaxation_minibatches(self) -> float | None:
        """Slowest relaxation time of the balance (minibatches); None without a slow mode."""
        return None if self.balance is None else self.balance.summary()["relaxation_minibatches"]

    def to_dict(self, per_coordinate: bool = False) -> dict:
        out = {"method": self.method, "path": self.path,
               "excess_loss_mean_model": float(self.excess_loss_mean_model),
               "excess_loss_members": float(self.excess_loss_members),
               "stability": [c.to_dict() for c in self.conditions]}
        if self.balance is not None:
            out["balance"] = self.balance.summary()
            out["relaxation_minibatches"] = self.relaxation_minibatches
        if self.short_time is not None:
            short = self.short_time.to_dict(per_coordinate)
            short.pop("stability", None)
            short["valid_for"] = ("t - T0 << relaxation_minibatches: the fast modes at the release balance, before "
                                  "the balance relaxes")
            out["short_time"] = short
        if per_coordinate:
            out["mean_model_per_coordinate"] = self.mean_model_per_coordinate.tolist()
            out["members_per_coordinate"] = self.members_per_coordinate.tolist()
            if self.balance is not None:
                out["balance_per_coordinate"] = self.balance.selected.tolist()
                out["relaxation_minibatches_per_coordinate"] = self.balance.relaxation_minibatches.tolist()
        return out


def _pred(name, path, per_mean, per_mem, conds):
    return Prediction(name, path, float(per_mean.sum()), float(per_mem.sum()), per_mean, per_mem, conds)


def _latephase_rates(problem, method, balance=None):
    """Per-coordinate (lr_theta, lr_phi); for the multiplicative model linearised at the balance b (default 1)
    the additive model's rates (lr_theta |w*| / b, lr_phi |w*| b)."""
    if method.kind == "multiplicative":
        b = 1.0 if balance is None else np.asarray(balance, float)
        return method.lr_theta * np.abs(problem.optimum) / b, method.lr_phi * np.abs(problem.optimum) * b
    return method.lr_theta, method.lr_phi


def _closed(problem: Problem, method, balance=None):
    """Per-coordinate (mean model, members) stationary excess from the closed forms."""
    h, s = problem.curvature, problem.noise
    if isinstance(method, SGD):
        e = cf.sgd_excess(method.lr, h, s / method.batch, method.momentum, method.nesterov)
        return e, e
    if isinstance(method, LatePhase):
        lt, lp = _latephase_rates(problem, method, balance)
        return cf.additive_excess(method.K, method.gamma_theta, lt, lp, h, s, method.momentum, method.nesterov)
    if isinstance(method, Ensemble):
        e = _closed(problem, method.base)[0]
        return e / method.K, e
    # Tail average: mean model = SGD-like block (rho_eff), members add the deviation block (rho_phi).
    base, n = method.base, method.steps
    if base.momentum:
        raise NQPError("no closed form for tail averages with momentum; use path='lyapunov'")
    if isinstance(base, SGD):
        e = cf.sgd_excess(base.lr, h, s / base.batch)
        e = e * cf.tail_average_factor(1 - base.lr * h, n)
        return e, e
    lt, lp = _latephase_rates(problem, base, balance)
    e_mean, e_mem = cf.additive_excess(base.K, base.gamma_theta, lt, lp, h, s)
    lr_eff = lp + base.K * base.gamma_theta * lt
    avg_mean = e_mean * cf.tail_average_factor(1 - lr_eff * h, n)
    return avg_mean, avg_mean + (e_mem - e_mean) * cf.tail_average_factor(1 - lp * h, n)


def _lyapunov(problem: Problem, method, balance=None):
    if isinstance(method, (SGD, LatePhase)):
        st = linear.stationary(problem, method, balance=balance)
        return 0.5 * problem.curvature * st.var_mean, 0.5 * problem.curvature * st.var_members.mean(axis=1)
    if isinstance(method, Ensemble):
        e = _lyapunov(problem, method.base)[0]
        return e / method.K, e
    st = linear.stationary(problem, method.base, balance=balance)
    h = problem.curvature
    return (0.5 * h * linear.tail_average_variance(st, method.steps),
            0.5 * h * linear.tail_average_variance(st, method.steps, members=True).mean(axis=1))


def _is_multiplicative(method) -> bool:
    base = method.base if isinstance(method, (Ensemble, TailAverage)) else method
    return isinstance(base, LatePhase) and base.kind == "multiplicative"


def steady_state(problem: Problem, method, path: str = "closed", balance=None) -> Prediction:
    """Stationary expected excess loss of the mean model and the members' average (t -> infinity).

    path: "closed" (sympy closed forms; tail averages with momentum fall back to "lyapunov") or
    "lyapunov" (scipy's discrete Lyapunov solver on the literal step's Jacobians).
    Multiplicative model: the fast modes linearised at the fixed balance b = theta^2/|w*| (`balance`, one value or
    one per coordinate; default 1, the balanced start): the prediction for t - T0 << the relaxation time of the
    balance. For t -> infinity use :func:`long_run`.
    Raises UnstableError (with the violated bound) if no stationary state exists.
    """
    if path not in ("closed", "lyapunov"):
        raise NQPError(f"path must be 'closed' or 'lyapunov', got {path!r}")
    from . import block
    if block.needs_block(problem, method):   # the block model, or SGD / ensembles with weight decay or a full H
        if balance is not None:
            raise NQPError("a balance applies to the multiplicative model only")
        conds = block.check_stable(problem, method)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mean, mem, label = block.steady_state(problem, method, path)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(mem))):
            raise overflow("noise", "curvature", "optimum")
        return _pred(method.name, label, mean, mem, conds)
    conds = check_stable(problem, method)
    if balance is not None and not _is_multiplicative(method):
        raise NQPError("a balance applies to the multiplicative model only")
    if path == "closed" and isinstance(method, TailAverage) and method.base.momentum:
        path = "lyapunov"
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean, mem = (_closed if path == "closed" else _lyapunov)(problem, method, balance)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(mem))):
        raise overflow("noise", "curvature", "optimum")
    label = path
    if _is_multiplicative(method):
        label += (", small-noise linearisation at the balanced start (short time)" if balance is None
                  else ", small-noise linearisation at a given balance")
    return _pred(method.name, label, np.asarray(mean, float), np.asarray(mem, float), conds)


def long_run(problem: Problem, method, path: str = "closed") -> Prediction:
    """The t -> infinity expected excess losses. For the multiplicative model (also inside a tail average): the
    fast modes' stationary state at the noise-selected balance b* (:func:`nqp.balance.select`), with `balance`
    (b* per coordinate, its leading order and relaxation time) and `short_time` (:func:`steady_state` at the
    release balance b = 1) attached. Every other method has no slow mode: its long run is :func:`steady_state`."""
    if not _is_multiplicative(method):
        return steady_state(problem, method, path)
    from . import balance as bal

    base = method.base if isinstance(method, TailAverage) else method
    if path == "closed" and isinstance(method, TailAverage) and base.momentum:
        path = "lyapunov"  # no closed form for tail averages with momentum: as steady_state does
    short = steady_state(problem, method, path)       # also checks stability at the release
    sel = bal.select(problem, base, path)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean, mem = (_closed if path == "closed" else _lyapunov)(problem, method, sel.selected)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(mem))):
        raise overflow("noise", "curvature", "optimum")
    label = f"{short.path.split(',')[0]}, long run at the noise-selected balance"
    if sel.frozen:
        label += " (theta frozen: the release balance)"
    pred = _pred(method.name, label, np.asarray(mean, float), np.asarray(mem, float), short.conditions)
    pred.balance, pred.short_time = sel, short
    return pred


def baselines(problem: Problem, method, sgd: SGD, swa_window: int | None = None) -> dict:
    """Comparison baselines on the same footing as a late-phase method with K members:
    SGD, SGD with a K-times batch, an ensemble of K SGD runs, and (with swa_window minibatches)
    tail averaging of SGD and of the late-phase mean model. Unstable baselines are reported as such."""
    cands = {"sgd": sgd,
             "sgd_batch_K": SGD(sgd.lr, sgd.momentum, sgd.nesterov, batch=method.K, weight_decay=sgd.weight_decay),
             "ensemble_K": Ensemble(sgd, method.K)}
    if swa_window:
        cands["sgd_tail_average"] = TailAverage(sgd, swa_window)
        cands["latephase_tail_average"] = TailAverage(method, swa_window)
    out = {}
    for name, m in cands.items():
        try:
            out[name] = steady_state(problem, m).to_dict()
        except UnstableError as e:
            out[name] = {"method": m.name, "unstable": str(e)}
    return out


def gamma_theta_scan(problem: Problem, method, path: str = "closed") -> list[dict]:
    """The long run (:func:`long_run`) of a late-phase method at gamma_theta in {0, 1/K, 1/2, 1}, its other settings
    kept: one dict per value, {"gamma_theta": g, "prediction": Prediction} or {"gamma_theta": g, "unstable": why}.
    gamma_theta = 0 freezes the block model's theta (no stationary state): not scanned there.

    >>> [r["gamma_theta"] for r in gamma_theta_scan(Problem.powerlaw(3), LatePhase(4, 0.1, 0.1))]
    [0.0, 0.25, 0.5, 1.0]
    """
    from .methods import Block

    gammas = sorted({1.0 / method.K, 0.5, 1.0} | (set() if isinstance(method, Block) else {0.0}))
    out = []
    for g in gammas:
        try:
            out.append({"gamma_theta": g, "prediction": long_run(problem, method.with_(gamma_theta=g), path)})
        except NQPError as e:
            out.append({"gamma_theta": g, "unstable": str(e)})
    return out


def other_K(problem: Problem, method, sgd: SGD, path: str = "closed", own: dict | None = None) -> list[dict]:
    """The late-phase mean model's long-run excess at K in {2, K, 2K} (K = 1 left out) beside the best fair baseline
    at that K: the better of SGD with a K-times batch and the average of K runs of `sgd` (None where unstable).
    Rows {"K", "excess_loss_mean_model", "best_baseline", "ratio" (late-phase / baseline)}; `own`, when given, is the
    row at the method's own K, already computed.

    >>> [r["K"] for r in other_K(Problem.powerlaw(3), LatePhase(4, 0.1, 0.1, 0.25), SGD(0.1))]
    [2, 4, 8]
    """
    def mean_of(m):
        try:
            return long_run(problem, m, path).excess_loss_mean_model
        except NQPError:
            return None

    rows = []
    for k in sorted({2, method.K, 2 * method.K} - {1}):
        if k == method.K and own is not None:
            rows.append(own)
            continue
        lp = mean_of(method.with_(K=k))
        base = [v for v in (mean_of(SGD(sgd.lr, sgd.momentum, sgd.nesterov, k, sgd.weight_decay)),
                            mean_of(Ensemble(sgd, k))) if v is not None]
        b = min(base) if base else None
        rows.append({"K": k, "excess_loss_mean_model": lp, "best_baseline": b,
                     "ratio": None if (lp is None or not b) else lp / b})
    return rows
