"""Build the theory documentation: every figure (PNG) and docs/theory.md from its template.

    python -m nqp docs --out docs            # full build (a few minutes on 2 cores)
    python -m nqp docs --out build/docs --quick  # small Monte Carlo budgets (CI smoke test)

The template (`theory_template.md`, shipped in this package) holds the prose; the build fills in the
sympy-generated formulas ({{tex:NAME}}), numbers computed from the closed forms ({{val:NAME}}),
generated tables ({{table:NAME}}) and figures ({{fig:NAME}}). Every figure is computed here: lines are
exact predictions, points are Monte Carlo estimates with +-2 standard errors. Seeds are fixed and the
simulator's results do not depend on the number of threads, so the build is deterministic.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from . import balance as bal
from . import closed_form as cf
from . import linear, plots
from .curves import learning_curve
from .errors import NQPError
from .files import write_atomic
from .methods import SGD, Ensemble, LatePhase, TailAverage
from .montecarlo import long_run_burn_in, simulate, simulate_curve
from .problem import Problem
from .sweep import grid
from .theory import long_run, steady_state

# The documentation's standard setting (stated in the text).
DOC_PROBLEM = dict(dim=10, power=1.0, noise=1.0, optimum=1.0)
LR = 0.1
K_DEFAULT = 10
T0 = 1000


@dataclass
class Budget:
    runs: int
    steps_per_member: int   # Monte Carlo minibatches per member (after burn-in)
    curve_runs: int
    quick: bool


def doc_problem() -> Problem:
    d = DOC_PROBLEM
    return Problem.powerlaw(d["dim"], d["power"], d["noise"], d["optimum"])


def _mc(problem, method, b: Budget, seed: int):
    steps = b.steps_per_member * method.minibatches_per_step
    return simulate(problem, method, steps=steps, runs=b.runs, seed=seed)


def _excess(problem, method, which="excess_loss_mean_model"):
    try:
        return getattr(steady_state(problem, method), which)
    except NQPError:
        return np.nan


# ----------------------------------------------------------------------------- figures

def fig_steady_vs_K(path, b: Budget, vals: dict):
    plt = plots._plt()
    p = doc_problem()
    Ks = np.arange(1, 41)
    e_sgd = _excess(p, SGD(LR))
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    settings = [("gamma_theta = 1 (sum)", lambda K: 1.0, "tab:blue"),
                ("gamma_theta = 0.5", lambda K: 0.5, "tab:green"),
                ("gamma_theta = 1/K (average)", lambda K: 1.0 / K, "tab:red")]
    mc_K = [1, 2, 4, 8, 16] if not b.quick else [1, 4]
    for i, (label, g, col) in enumerate(settings):
        mean = [_excess(p, LatePhase(int(K), LR, LR, g(K))) for K in Ks]
        mem = [_excess(p, LatePhase(int(K), LR, LR, g(K)), "excess_loss_members") for K in Ks]
        ax.plot(Ks, mean, color=col, label=f"mean model, {label}")
        ax.plot(Ks, mem, color=col, ls="--", label=f"members, {label}")
        if i != 1:
            for K in mc_K:
                r = _mc(p, LatePhase(K, LR, LR, g(K)), b, seed=100 + K + 1000 * i)
                ax.errorbar(K, r.excess_loss_mean_model, 2 * r.excess_loss_mean_model_stderr, fmt="o", color=col,
                            ms=4)
                ax.errorbar(K, r.excess_loss_members, 2 * r.excess_loss_members_stderr, fmt="s", color=col, ms=4,
                            mfc="none")
    ax.axhline(e_sgd, color="k", ls=":", label="SGD (same lr)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (members)")
    ax.set_ylabel("stationary expected excess loss")
    ax.set_title(f"steady state vs K (lr_theta = lr_phi = {LR}); points: simulation ±2 s.e.")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    vals["K_unstable_gamma1"] = int(min(K for K in Ks if np.isnan(_excess(p, LatePhase(int(K), LR, LR, 1.0)))))
    return plots.save(fig, path)


def fig_steady_vs_gamma(path, b: Budget, vals: dict):
    plt = plots._plt()
    p = doc_problem()
    gammas = np.geomspace(1e-3, 2.0, 80)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("viridis")
    Ks = [2, 5, 10, 20]
    for j, K in enumerate(Ks):
        col = cmap(j / (len(Ks) - 1))
        ax.plot(gammas, [_excess(p, LatePhase(K, LR, LR, g)) for g in gammas], color=col, label=f"mean, K={K}")
        ax.plot(gammas, [_excess(p, LatePhase(K, LR, LR, g), "excess_loss_members") for g in gammas], color=col,
                ls="--", label=f"members, K={K}")
        if K in (5, 10):
            for g in ([0.01, 0.1, 0.5] if not b.quick else [0.1]):
                r = _mc(p, LatePhase(K, LR, LR, g), b, seed=200 + K + int(1000 * g))
                ax.errorbar(g, r.excess_loss_mean_model, 2 * r.excess_loss_mean_model_stderr, fmt="o", color=col,
                            ms=4)
                ax.errorbar(g, r.excess_loss_members, 2 * r.excess_loss_members_stderr, fmt="s", color=col, ms=4,
                            mfc="none")
    ax.axhline(_excess(p, SGD(LR)), color="k", ls=":", label="SGD (same lr)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gamma_theta")
    ax.set_ylabel("stationary expected excess loss")
    ax.set_title("steady state vs gamma_theta; points: simulation ±2 s.e.")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)


# (label, series, colour, line style, line width): lines that coincide are drawn wide and pale beneath narrow ones.
BUDGET_METHODS = [
    ("SGD, lr dropped to lr at T0", "sgd", "tab:gray", "-", 1.5),
    ("SGD, K-times batch (wide; = gamma_theta = 0 on top)", "sgd_batch_K", "tab:olive", "-", 5.0),
    ("late-phase mean, gamma_theta = 1", ("latephase_mean", 1.0), "tab:blue", "--", 1.5),
    ("late-phase mean, gamma_theta = 1/K", ("latephase_mean", "1/K"), "tab:red", "-", 1.5),
    ("late-phase mean, gamma_theta = 0 (K copies from T0)", ("latephase_mean", 0.0), "tab:purple", "-", 1.5),
    ("late-phase members (avg), gamma_theta = 1/K", ("latephase_members", "1/K"), "tab:red", ":", 1.5),
    ("SGD, tail-averaged from T0", "sgd_swa", "tab:brown", "--", 1.5),
    ("late-phase mean, tail-averaged, gamma_theta = 1/K", ("latephase_swa", "1/K"), "tab:green", "--", 1.5),
]


def budget_table(p, K, budget, etas):
    """Expected excess loss after T0 + budget minibatches (SGD with lr 0.1 before T0), per method and lr."""
    out = {name: np.full(len(etas), np.nan) for name, *_ in BUDGET_METHODS}
    for i, eta in enumerate(etas):
        for g in (1.0, 1.0 / K, 0.0):
            try:
                c = learning_curve(p, LatePhase(K, eta, eta, g), SGD(LR), T0=T0, horizon=T0 + budget, points=3,
                                   swa_start=T0, sgd_after=SGD(eta))
            except NQPError:
                continue
            for name, key, *_ in BUDGET_METHODS:
                if isinstance(key, str):
                    out[name][i] = c.series[key][-1]
                else:
                    series, gk = key
                    if (gk == "1/K" and g == 1.0 / K) or gk == g:
                        out[name][i] = c.series[series][-1]
    return out


def fig_budget(path, b: Budget, vals: dict):
    plt = plots._plt()
    p = doc_problem()
    K, budget = K_DEFAULT, 3000
    etas = np.geomspace(5e-4, 1.9, 50 if b.quick else 120)
    table = budget_table(p, K, budget, etas)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    rows = []
    for name, key, col, ls, lw in BUDGET_METHODS:
        y = table[name]
        ax.plot(etas, y, color=col, ls=ls, lw=lw, alpha=0.35 if lw > 2 else 1.0, label=name)
        i = int(np.nanargmin(y))
        ax.plot(etas[i], y[i], "o", color=col, ms=4)
        rows.append((name.split(" (wide")[0], y[i], etas[i]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate after T0 (lr_theta = lr_phi = lr)")
    ax.set_ylabel(f"expected excess loss at T0 + {budget}")
    ax.set_title(f"same budget of minibatches (K = {K}); dots: best lr")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    # Frontier: stationary loss vs relaxation time of the slowest mode (minibatches per e-fold of the mean).
    hmin = p.curvature.min()
    fine = np.geomspace(1e-4, 1.99, 240)
    # (label, method, effective step, minibatches per step, colour, style, width): the three K-times-batch lines
    # coincide at small steps, so they are drawn from wide and pale to narrow and dotted
    frontier = [("SGD", lambda e: SGD(e), lambda e: e, 1, "tab:gray", "-", 2.5),
                (f"SGD, batch {K} (wide)", lambda e: SGD(e, batch=K), lambda e: e, K, "tab:olive", "-", 6.0),
                ("late-phase mean, gamma_theta = 1", lambda e: LatePhase(K, e, e, 1.0), lambda e: e * (1 + K), K,
                 "tab:blue", "--", 2.0),
                ("late-phase mean, gamma_theta = 1/K", lambda e: LatePhase(K, e, e, 1.0 / K), lambda e: 2 * e, K,
                 "tab:red", ":", 1.5)]
    for label, make, eta_eff, mpb, col, ls, lw in frontier:
        xs, ys = [], []
        for e in fine:
            rate = eta_eff(e) * hmin      # per-step contraction of the slowest mode: 1 - eta_eff h_min
            val = _excess(p, make(e)) if rate < 1 else np.nan
            if np.isfinite(val):
                xs.append(mpb / -np.log(1 - rate))
                ys.append(val)
        bx.plot(xs, ys, color=col, label=label, lw=lw, ls=ls, alpha=0.35 if lw > 5 else 1.0)
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("relaxation time of the slowest mode (minibatches)")
    bx.set_ylabel("stationary expected excess loss")
    bx.set_title("trade-off: noise floor vs speed (each line: lr varies)")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    vals["budget_rows"] = rows
    vals["budget"] = budget
    return plots.save(fig, path)


def fig_curves(path_sum, path_avg, b: Budget, vals: dict):
    p = doc_problem()
    out = []
    for path, g, tag in ((path_sum, 1.0, "gamma_theta = 1"), (path_avg, 1.0 / K_DEFAULT, "gamma_theta = 1/K")):
        lp = LatePhase(K_DEFAULT, LR, LR, g)
        kw = dict(T0=T0, horizon=4 * T0, w0=0.0, sigma0=0.0, swa_start=T0)
        c = learning_curve(p, lp, SGD(LR), points=300, **kw)
        mc = simulate_curve(p, lp, SGD(LR), points=40, runs=b.curve_runs, seed=300 + int(g * 100), **kw)
        out.append(plots.plot_curve(c, path, mc, title=f"switch to late-phase at T0 = {T0}: K = {K_DEFAULT}, "
                                                       f"{tag}, lr = {LR}; points: simulation ±2 s.e."))
    return out


# The multiplicative figures' setting: one coordinate h = 1, w* = 1, K = 4, gamma_theta = 1/K, lr = 0.1.
MULT = dict(K=4, gamma=0.25)


def _mult_method(K=MULT["K"], gamma=MULT["gamma"], lr=LR, momentum=0.0):
    return LatePhase(K, lr, lr, gamma, momentum, kind="multiplicative")


def fig_multiplicative(path, b: Budget, vals: dict):
    """Learning curves after the release against s (t - T0), for several s, with the balance ODE lines; the balance."""
    plt = plots._plt()
    lp = _mult_method()
    T0 = 400
    noises = (0.3, 0.1) if b.quick else (0.3, 0.1, 0.03)
    span = 2500.0 if b.quick else 5000.0            # s (t - T0) shown
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    cmap = plt.get_cmap("viridis")
    for j, s in enumerate(noises):
        p = Problem.from_values([1.0], [s], [1.0])
        col = cmap(j / max(1, len(noises) - 1) * 0.85)
        horizon = T0 + int(span / s) // lp.K * lp.K
        kw = dict(T0=T0, horizon=horizon, w0=1.0, sigma0=0.0)
        line = learning_curve(p, lp, SGD(LR), points=400, **kw)
        mc = simulate_curve(p, lp, SGD(LR), points=24, runs=b.curve_runs * 5, seed=500 + j, **kw)
        short = steady_state(p, lp)
        after = line.t >= T0
        x = s * (line.t[after] - T0)
        ok = mc.t > T0
        xm = s * (mc.t[ok] - T0)
        for key, mk, ls in (("excess_loss_mean_model", "o", "-"), ("excess_loss_members", "s", "--")):
            series = "latephase_mean" if "mean" in key else "latephase_members"
            ref = getattr(short, key)
            ax.plot(x, line.series[series][after] / ref, color=col, ls=ls,
                    label=f"{'mean model' if 'mean' in key else 'members'}, s = {s:g}")
            ax.errorbar(xm, mc.series[series][ok] / ref, 2 * mc.stderr[series][ok] / ref, fmt=mk, color=col, ms=3.5,
                        mfc="none" if "members" in key else col, elinewidth=0.8, capsize=0)
        bx.plot(x, line.balance[after, 0], color=col, label=f"ODE, s = {s:g}")
        bx.errorbar(xm, mc.balance[ok, 0], 2 * mc.balance_stderr[ok, 0], fmt="o", color=col, ms=3.5, elinewidth=0.8,
                    capsize=0)
    p = Problem.from_values([1.0], [noises[0]], [1.0])
    final = long_run(p, lp)
    for key, ls in (("excess_loss_mean_model", ":"), ("excess_loss_members", "-.")):
        ax.axhline(getattr(final, key) / getattr(final.short_time, key), color="k", ls=ls, lw=1,
                   label=f"long run, {'mean model' if 'mean' in key else 'members'}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xlabel("s (t - T0)  (noise variance x minibatches since the release)")
    ax.set_ylabel("expected excess loss / short-time prediction")
    fig.suptitle(f"multiplicative late-phase weights after the release: K = {lp.K}, gamma_theta = 1/K, lr = {LR}, "
                 f"h = w* = 1; lines: balance ODE, points: simulation (+-2 s.e.)", fontsize=10)
    ax.set_title("losses relative to the short-time prediction", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    bx.axhline(final.balance.selected[0], color="k", ls=":", lw=1, label="selected balance b*")
    bx.axhline(final.balance.leading_order, color="0.5", ls="--", lw=1, label="leading order sqrt(gamma_theta)")
    bx.set_xlabel("s (t - T0)")
    bx.set_ylabel("balance b = theta^2 / |w*|")
    bx.set_title("the balance", fontsize=10)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    vals["mult_tau_s"] = float(final.relaxation_minibatches * noises[0])
    return plots.save(fig, path)


def fig_balance(path, b: Budget, vals: dict):
    """The selected balance against the ratio of the rates, for several step sizes, with long-run simulations."""
    plt = plots._plt()
    K = MULT["K"]
    x = np.geomspace(1e-2, 1e2, 121)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    p_line = Problem.from_values([1.0], [1.0], [1.0])
    cmap = plt.get_cmap("plasma")
    steps = (0.01, 0.05, 0.1, 0.3)
    for j, a in enumerate(steps):
        col = cmap(j / len(steps))
        bs, lead = [], []
        for xi in x:
            lp = LatePhase(K, xi * a, a, 1.0, kind="multiplicative")
            try:
                bs.append(bal.select(p_line, lp).selected[0])
            except NQPError:
                bs.append(np.nan)
            lead.append(bal.leading_order(lp))
        bs, lead = np.array(bs), np.array(lead)
        ax.plot(x, bs, color=col, label=f"b*, lr_phi h |w*| = {a:g}")
        bx.plot(x, bs / lead - 1, color=col, label=f"lr_phi h |w*| = {a:g}")
    ax.plot(x, np.sqrt(x), "k--", lw=1, label="leading order sqrt(gamma_theta lr_theta / lr_phi)")
    # long-run simulations from the balanced start (burn-in from the balance ODE), s = 0.1
    mc_x = {0.1: (0.1, 1.0, 3.0), 0.3: (0.1, 1.0)} if b.quick else {0.1: (0.1, 0.3, 1.0, 3.0), 0.3: (0.1, 0.3, 1.0)}
    s = 0.1
    p = Problem.from_values([1.0], [s], [1.0])
    rows = []
    for a, xs in mc_x.items():
        col = cmap(steps.index(a) / len(steps))
        for i, xi in enumerate(xs):
            lp = LatePhase(K, xi * a, a, 1.0, kind="multiplicative")
            burn = long_run_burn_in(p, lp)
            r = simulate(p, lp, steps=max(20000, burn // 4) // K * K, burn_in=burn, runs=b.runs, seed=700 + 10 * i +
                         int(100 * a))
            lead = bal.leading_order(lp)
            pred = bal.select(p, lp).selected[0]
            ax.errorbar(xi, r.balance_mean[0], 2 * r.balance_mean_stderr[0], fmt="o", color=col, ms=4)
            bx.errorbar(xi, r.balance_mean[0] / lead - 1, 2 * r.balance_mean_stderr[0] / lead, fmt="o", color=col,
                        ms=4)
            rows.append((a, xi, pred, r.balance_mean[0], r.balance_mean_stderr[0], lead, burn))
    vals["balance_rows"] = rows
    vals["balance_mc_noise"] = s
    for axis in (ax, bx):
        axis.set_xscale("log")
        axis.set_xlabel("gamma_theta lr_theta / lr_phi")
        axis.grid(alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("selected balance b* = theta^2 / |w*|")
    ax.set_title("the selected balance", fontsize=10)
    ax.legend(fontsize=7)
    bx.axhline(0.0, color="k", lw=0.8)
    bx.set_ylabel("b* / leading order - 1")
    bx.set_title("its finite-step correction", fontsize=10)
    bx.legend(fontsize=7)
    fig.suptitle(f"noise-selected balance, K = {K}, h = w* = 1 (lines end where the balanced start is unstable); "
                 f"points: long-run simulations from the balanced start, s = {s:g}, +-2 s.e.", fontsize=10)
    return plots.save(fig, path)


def fig_mult_map(path, b: Budget, vals: dict):
    """The multiplicative model's long run over (K, gamma_theta): against SGD and against the additive model."""
    plt = plots._plt()
    from matplotlib.colors import TwoSlopeNorm
    p = Problem.powerlaw(100, 1.0)
    Ks = np.arange(1, 51.0) if not b.quick else np.arange(1, 51.0, 7)
    gammas = np.geomspace(1e-3, 1.0, 50 if not b.quick else 8)
    base = dict(K=10, gamma_theta=1.0, lr=LR, lr_theta=None, lr_phi=None, momentum=0.0)
    axes = (("K", Ks), ("gamma_theta", gammas))
    mult = grid(p, "multiplicative", base, *axes, balance="long-run")
    short = grid(p, "multiplicative", base, *axes, balance="release")
    add = grid(p, "additive", base, *axes)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13.5, 4.6))
    fig.subplots_adjust(wspace=0.3)
    panels = ((ax, mult.sgd / mult.mean_model, "E_sgd / E_mean (long run): > 1 the mean model beats SGD", np.inf),
              (bx, add.mean_model / mult.mean_model, "E_additive / E_multiplicative (mean models, long run)", 1.0))
    for axis, z, title, cap in panels:
        with np.errstate(divide="ignore", invalid="ignore"):
            lz = np.log10(z)
        zz = np.ma.masked_invalid(lz)
        lim = min(cap, float(np.nanmax(np.abs(lz))))      # the right panel's colours saturate at a factor 10
        cmap = plt.get_cmap("RdBu").with_extremes(bad="0.45")
        mesh = axis.pcolormesh(plots._edges(Ks), plots._edges(gammas), zz, cmap=cmap, shading="flat",
                               norm=TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim))
        axis.contour(Ks, gammas, lz, levels=[0.0], colors="k", linewidths=1)
        fig.colorbar(mesh, ax=axis, label="log10 ratio (0: equal, black line)" + ("; saturates at +-1" if cap < 9 else ""))
        axis.set_yscale("log")
        axis.set_xlabel("K")
        axis.set_ylabel("gamma_theta")
        axis.set_title(title, fontsize=9)
    ax.plot([], [], "s", color="0.45", label="unstable at the balanced start")
    ax.legend(fontsize=7, loc="lower right")
    with np.errstate(invalid="ignore"):
        ratio = mult.mean_model / short.mean_model
        gain = mult.sgd / mult.mean_model
    vals["map_ratio_range"] = (float(np.nanmin(ratio)), float(np.nanmax(ratio)))
    vals["map_max_gain"] = float(np.nanmax(gain))
    j, i = np.unravel_index(np.nanargmax(gain), gain.shape)
    vals["map_argmax"] = (float(Ks[i]), float(gammas[j]))
    vals["map_add_range"] = (float(np.nanmin(add.mean_model / mult.mean_model)),
                             float(np.nanmax(add.mean_model / mult.mean_model)))
    return plots.save(fig, path)


def _mult_table(b: Budget, vals: dict):
    """Long run, short time and a long-run simulation from the balanced start, at the multiplicative setting."""
    rows = []
    vals["mult_runs"] = b.runs
    for K in (4, 10):
        lp = _mult_method(K=K, gamma=1.0 / K)
        p = Problem.from_values([1.0], [0.1], [1.0])
        pred = long_run(p, lp)
        burn = long_run_burn_in(p, lp)
        r = simulate(p, lp, steps=(40000 if b.quick else 200000) // K * K, burn_in=burn, runs=b.runs, seed=800 + K)
        rows.append((K, pred, r, burn))
    vals["mult_rows"] = rows


def fig_heatmap(path, b: Budget, vals: dict):
    p = Problem.powerlaw(100, 1.0)
    res = grid(p, "additive", dict(K=10, gamma_theta=1.0, lr=LR, lr_theta=None, lr_phi=None, momentum=0.0),
               ("K", np.arange(1, 51.0)), ("gamma_theta", np.geomspace(1e-3, 1.0, 50)))
    vals["heatmap_max_gain"] = float(np.nanmax(res.gain))
    j, i = np.unravel_index(np.nanargmax(res.gain), res.gain.shape)
    vals["heatmap_argmax"] = (float(res.x[i]), float(res.y[j]))
    return plots.plot_heatmap("K", res.x, "gamma_theta", res.y, res.gain, path,
                              f"E_sgd / E_mean (d = 100, h_i = 1/i, lr = {LR}); gray: unstable", "gain over SGD")


def fig_stability(path, b: Budget, vals: dict):
    plt = plots._plt()
    p = Problem.from_values([1.0])                 # h_max = 1 sets the scale
    lt = np.linspace(0.0, 0.6, 61 if b.quick else 121)
    lph = np.linspace(0.01, 2.4, 61 if b.quick else 121)
    K = 4
    rho = np.full((len(lph), len(lt)), np.nan)
    for j, y in enumerate(lph):
        for i, x in enumerate(lt):
            rho[j, i] = linear.spectral_radius(linear.linearize(p, LatePhase(K, x, y, 1.0))).max()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    mesh = ax.pcolormesh(lt, lph, np.minimum(rho, 1.5), cmap="magma_r", shading="auto")
    fig.colorbar(mesh, ax=ax, label=f"spectral radius of the literal step (K = {K}, capped at 1.5)")
    ax.contour(lt, lph, rho, levels=[1.0], colors="w", linewidths=2.5)
    edge = cf.stability_edge()
    # the two edges of this system (K = 4, gamma_theta = 1): the mean model's and the members' deviations'
    ax.plot(lt, edge - K * lt, color="tab:green", ls="--", lw=1.5,
            label=f"edge, closed form: lr_phi + {K} gamma_theta lr_theta = 2 / h_max (mean model)")
    ax.axhline(edge, color="tab:cyan", ls="--", lw=1.5, label="edge, closed form: lr_phi = 2 / h_max (members)")
    ax.set_xlim(lt[0], lt[-1])
    ax.set_ylim(lph[0], lph[-1])
    ax.set_xlabel("lr_theta (gamma_theta = 1)")
    ax.set_ylabel("lr_phi")
    ax.set_title(f"stability region, K = {K} (white contour: spectral radius = 1)")
    ax.legend(fontsize=7, loc="upper right")
    return plots.save(fig, path)


# ----------------------------------------------------------------------------- the block model

# The block figures' setting: the block problem of `python -m nqp arms` (d = 100, h_i = 1/i, s_i = 1/h_i, w* = 1),
# plain SGD with lr = LR, K = K_DEFAULT; phi placed on the stiffest / spread / flattest 10 coordinates.
BLOCK_PLACEMENTS = (("stiffest", "tab:red"), ("spread", "tab:blue"), ("flattest", "tab:green"))


def _block(placement="stiffest"):
    from .arms import block_problem
    return block_problem(100, 10, placement)


def _block_bound(p, phi, K, lr=LR):
    """SGD's excess minus phi's part of it times (1 - 1/K): the lowest mean-model excess late-phase learning with
    gamma_theta = 1 can reach (plain SGD or heavy ball, no weight decay)."""
    e = steady_state(p, SGD(lr)).mean_model_per_coordinate
    return float(e.sum() - e[list(phi)].sum() * (1 - 1 / K))


def fig_block_vs_K(path, b: Budget, vals: dict):
    from .methods import Block
    plt = plots._plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    Ks = np.arange(1, 31)
    shares = {}
    for placement, col in BLOCK_PLACEMENTS:
        p, phi = _block(placement)
        from .arms import shares as share_of
        shares[placement] = share_of(p, phi)["curvature"]
        lab = f"phi {placement} ({shares[placement]:.0%} of tr H)"
        ax.plot(Ks, [_excess(p, Block(int(K), LR, LR, 1.0, phi_coords=phi)) for K in Ks], color=col,
                label=f"gamma_theta = 1, {lab}")
        ax.plot(Ks, [_block_bound(p, phi, int(K)) for K in Ks], color=col, ls=":", lw=1,
                label="bound: E_sgd - E_sgd,phi (1 - 1/K)" if placement == "stiffest" else None)
    p, phi = _block("stiffest")
    ax.plot(Ks, [_excess(p, Block(int(K), LR, LR, 1.0 / K, phi_coords=phi)) for K in Ks], color="k", ls="--",
            label="gamma_theta = 1/K (any placement) = SGD with a K-times batch")
    ax.axhline(_excess(p, SGD(LR)), color="0.4", ls="-.", lw=1, label="SGD (batch 1)")
    for K in ([2, 10] if not b.quick else [4]):
        m = Block(K, LR, LR, 1.0, phi_coords=phi)
        r = simulate(p, m, steps=b.steps_per_member * m.minibatches_per_step, runs=b.runs, seed=700 + K)
        ax.errorbar(K, r.excess_loss_mean_model, 2 * r.excess_loss_mean_model_stderr, fmt="o", color="tab:red", ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (members)")
    ax.set_ylabel("mean model: stationary excess loss")
    ax.set_title(f"block model vs K (lr = {LR}); points: simulation ±2 s.e.", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    gammas = np.geomspace(1.0 / K_DEFAULT, 1.0, 30)
    theta = np.setdiff1d(np.arange(p.dim), phi)
    parts = [steady_state(p, Block(K_DEFAULT, LR, LR, g, phi_coords=phi)).mean_model_per_coordinate for g in gammas]
    sgd = steady_state(p, SGD(LR)).mean_model_per_coordinate
    bx.plot(gammas, [e[theta].sum() for e in parts], color="tab:purple", label="theta part (late-phase)")
    bx.plot(gammas, [e[list(phi)].sum() for e in parts], color="tab:orange", label="phi part (late-phase)")
    bx.axhline(sgd[theta].sum(), color="tab:purple", ls=":", label="theta part (SGD)")
    bx.axhline(sgd[list(phi)].sum(), color="tab:orange", ls=":", label="phi part (SGD)")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("gamma_theta")
    bx.set_ylabel("mean model's excess, per block")
    bx.set_title(f"each block vs gamma_theta, K = {K_DEFAULT}, phi stiffest", fontsize=10)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    vals["block_shares"] = shares
    vals["block_parts"] = {"sgd": (float(sgd[theta].sum()), float(sgd[list(phi)].sum())),
                           "g1": (float(parts[-1][theta].sum()), float(parts[-1][list(phi)].sum())),
                           "gK": (float(parts[0][theta].sum()), float(parts[0][list(phi)].sum()))}
    return plots.save(fig, path)


def fig_block_weight_decay(path, b: Budget, vals: dict):
    from .arms import arms
    plt = plots._plt()
    p, phi = _block("stiffest")
    lams = np.geomspace(1e-4, 0.3, 40)
    names = ["base SGD", "late-phase, gamma_theta = 1", "late-phase, gamma_theta = 1, theta's decay x K",
             "large-batch twin"]
    styles = {"base SGD": ("0.3", "-"), "late-phase, gamma_theta = 1": ("tab:red", "-"),
              "late-phase, gamma_theta = 1, theta's decay x K": ("tab:blue", "--"), "large-batch twin": ("k", ":")}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name in names:
        ys = [_excess(p, arms(phi, K_DEFAULT, LR, 0.0, False, lam)[name]) for lam in lams]
        col, ls = styles[name]
        ax.plot(lams, ys, color=col, ls=ls, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("weight decay lambda (per step, torch convention)")
    ax.set_ylabel("mean model: stationary excess loss")
    ax.set_title(f"weight decay once per outer step (K = {K_DEFAULT}, lr = {LR}, phi stiffest; h in [0.01, 1])",
                 fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)


def fig_block_curve(path, b: Budget, vals: dict):
    """After the release: gamma_theta = 1 and 1/K on the block problem, exact lines and simulated points."""
    from .block import learning_curve as block_curve
    from .block import simulate_curve as block_sim
    from .methods import Block
    plt = plots._plt()
    p, phi = _block("stiffest")
    kw = dict(T0=T0, horizon=6 * T0, w0=0.0, sigma0=0.0)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    base = None
    for g, tag, col in ((1.0, "gamma_theta = 1", "tab:red"), (1.0 / K_DEFAULT, "gamma_theta = 1/K", "tab:blue")):
        m = Block(K_DEFAULT, LR, LR, g, phi_coords=phi)
        c = block_curve(p, m, SGD(LR), points=300, **kw)
        base = c if base is None else base
        ax.plot(c.t, c.series["latephase_mean"], color=col, label=f"late-phase mean model, {tag}")
        mc = block_sim(p, m, SGD(LR), points=25, runs=max(8, b.curve_runs // 8), seed=900 + int(10 * g), **kw)
        ok = mc.t >= T0
        ax.errorbar(mc.t[ok], mc.series["latephase_mean"][ok], 2 * mc.stderr["latephase_mean"][ok], fmt="o", ms=3,
                    color=col, elinewidth=0.8)
    ax.plot(base.t, base.series["sgd"], color="0.4", label="SGD (continuing)")
    ax.plot(base.t, base.series["sgd_batch_K"], color="tab:olive", ls="--", label="SGD, K-times batch (from T0)")
    ax.axvline(T0, color="k", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("t (minibatches)")
    ax.set_ylabel("expected excess loss")
    ax.set_title(f"block model after the release at T0 = {T0} (K = {K_DEFAULT}, lr = {LR}, phi stiffest)\n"
                 f"lines exact; points: simulation ±2 s.e. of the late-phase mean models", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)


def _table_arms(vals):
    from . import arms
    out = []
    for placement in ("stiffest", "spread"):
        p, phi = arms.block_problem(100, 10, placement)
        rows = arms.predict(p, phi, arms.arms(phi))
        sh = arms.shares(p, phi)["curvature"]
        out.append(f"**phi {placement}** (`python -m nqp arms --phi {placement}`; phi holds {sh:.0%} of tr H and of "
                   f"SGD's small-step excess):\n\n" + arms.table(rows) + f"\n\nOrder: {arms.order(rows)}.")
    return "\n\n".join(out)


# ----------------------------------------------------------------------------- tables and rendering

def _table_baselines(vals):
    p = doc_problem()
    sgd = SGD(LR)
    rows = [("SGD", sgd), (f"SGD, batch x{K_DEFAULT}", SGD(LR, batch=K_DEFAULT)),
            (f"ensemble of {K_DEFAULT} independent SGD runs", Ensemble(sgd, K_DEFAULT)),
            ("SGD, tail average over 1000 minibatches", TailAverage(sgd, 1000))]
    for g, tag in ((1.0, "1"), (1.0 / K_DEFAULT, "1/K"), (0.0, "0")):
        rows.append((f"late-phase additive, gamma_theta = {tag}", LatePhase(K_DEFAULT, LR, LR, g)))
    rows.append(("late-phase (gamma_theta = 1/K), tail average over 1000",
                 TailAverage(LatePhase(K_DEFAULT, LR, LR, 1.0 / K_DEFAULT), 1000)))
    e_sgd = steady_state(p, sgd).excess_loss_mean_model
    lines = ["| method | mean model | members (avg) | mean / SGD |", "|---|---:|---:|---:|"]
    for name, m in rows:
        r = steady_state(p, m)
        lines.append(f"| {name} | {r.excess_loss_mean_model:.4g} | {r.excess_loss_members:.4g} | "
                     f"{r.excess_loss_mean_model / e_sgd:.3f} |")
    return "\n".join(lines)


def _table_budget(vals):
    lines = ["| method | best expected excess loss at T0 + %d | at lr |" % vals["budget"], "|---|---:|---:|"]
    for name, e, eta in sorted(vals["budget_rows"], key=lambda r: r[1]):
        lines.append(f"| {name} | {e:.4g} | {eta:.3g} |")
    return "\n".join(lines)


def _table_mult(vals):
    lines = ["| K | | mean model | members (avg) |", "|---|---|---:|---:|"]
    for K, pred, r, burn in vals["mult_rows"]:
        st = pred.short_time
        lines.append(f"| {K} | short-time prediction (balanced start) | {st.excess_loss_mean_model:.5g} | "
                     f"{st.excess_loss_members:.5g} |")
        lines.append(f"| | long run (b* = {pred.balance.selected[0]:.4f}; leading order {pred.balance.leading_order:.4f}) "
                     f"| {pred.excess_loss_mean_model:.5g} | {pred.excess_loss_members:.5g} |")
        lines.append(f"| | simulation, {r.steps} minibatches after a burn-in of {burn} | "
                     f"{r.excess_loss_mean_model:.5g} ± {r.excess_loss_mean_model_stderr:.2g} | "
                     f"{r.excess_loss_members:.5g} ± {r.excess_loss_members_stderr:.2g} |")
        lines.append(f"| | long run / short time | {pred.excess_loss_mean_model / st.excess_loss_mean_model:.3f} | "
                     f"{pred.excess_loss_members / st.excess_loss_members:.3f} |")
        lines.append(f"| | simulation / long run | {r.excess_loss_mean_model / pred.excess_loss_mean_model:.4f} | "
                     f"{r.excess_loss_members / pred.excess_loss_members:.4f} |")
    return "\n".join(lines)


def _table_balance(vals):
    lines = ["| lr_phi h w* | gamma_theta lr_theta / lr_phi | leading order | b* (theory) | simulation | burn-in |",
             "|---:|---:|---:|---:|---:|---:|"]
    for a, x, pred, mean, se, lead, burn in vals["balance_rows"]:
        lines.append(f"| {a:g} | {x:g} | {lead:.4f} | {pred:.4f} | {mean:.4f} ± {se:.1g} | {burn} |")
    return "\n".join(lines)


def _values(vals) -> dict:
    p = doc_problem()
    out = {
        "lr": f"{LR:g}", "K": str(K_DEFAULT), "T0": str(T0),
        "doc_problem": f"d = {DOC_PROBLEM['dim']}, h_i = 1/i, s_i = {DOC_PROBLEM['noise']:g}, "
                       f"w*_i = {DOC_PROBLEM['optimum']:g}",
        "K_unstable_gamma1": str(vals.get("K_unstable_gamma1", "")),
        "heatmap_max_gain": f"{vals.get('heatmap_max_gain', float('nan')):.3g}",
        "heatmap_argmax": "K = {:g}, gamma_theta = {:.3g}".format(*vals.get("heatmap_argmax", (np.nan, np.nan))),
        "sgd_doc": f"{steady_state(p, SGD(LR)).excess_loss_mean_model:.4g}",
        "mult_tau_s": f"{vals.get('mult_tau_s', float('nan')):.3g}",
        "mult_runs": str(vals.get("mult_runs", "")),
        "balance_mc_noise": f"s = {vals.get('balance_mc_noise', float('nan')):g}",
        "map_max_gain": f"{vals.get('map_max_gain', float('nan')):.3g}",
        "map_argmax": "K = {:g}, gamma_theta = {:.3g}".format(*vals.get("map_argmax", (np.nan, np.nan))),
        "map_add_min": f"{vals.get('map_add_range', (np.nan, np.nan))[0]:.3g}",
        "map_add_max": f"{vals.get('map_add_range', (np.nan, np.nan))[1]:.3g}",
        "map_ratio_min": f"{vals.get('map_ratio_range', (np.nan, np.nan))[0]:.3g}",
        "map_ratio_max": f"{vals.get('map_ratio_range', (np.nan, np.nan))[1]:.3g}",
    }
    parts = vals.get("block_parts", {})
    for k, (t, f) in parts.items():
        out[f"block_{k}_theta"], out[f"block_{k}_phi"] = f"{t:.3g}", f"{f:.3g}"
    for k, v in vals.get("block_shares", {}).items():
        out[f"block_share_{k}"] = f"{v:.0%}"
    return out


def render(template: str, vals: dict, figdir_rel: str = "figures") -> str:
    tex = cf.latex()
    values = _values(vals)
    tables = {"baselines": _table_baselines, "budget": _table_budget, "mult": _table_mult,
              "balance": _table_balance, "arms": _table_arms}

    def sub(m):
        kind, name = m.group(1), m.group(2)
        if kind == "tex":
            return "$$\n" + tex[name] + "\n$$"
        if kind == "itex":  # inline: the template supplies the math delimiters
            return tex[name]
        if kind == "fig":
            return f"![{name}]({figdir_rel}/{name}.png)"
        if kind == "val":
            return values[name]
        if kind == "table":
            return tables[name](vals)
        raise KeyError(m.group(0))

    return re.sub(r"\{\{(tex|itex|fig|val|table):([A-Za-z0-9_]+)\}\}", sub, template)


def build(out: str = "docs", quick: bool = False, progress: bool = False) -> list[str]:
    """Regenerate docs/figures/*.png and docs/theory.md. Returns the written paths."""
    b = Budget(runs=8, steps_per_member=300, curve_runs=16, quick=True) if quick else \
        Budget(runs=32, steps_per_member=3000, curve_runs=400, quick=False)
    figdir = os.path.join(out, "figures")
    os.makedirs(figdir, exist_ok=True)
    vals: dict = {}
    jobs = [
        ("steady_vs_K", lambda: fig_steady_vs_K(os.path.join(figdir, "steady_vs_K.png"), b, vals)),
        ("steady_vs_gamma", lambda: fig_steady_vs_gamma(os.path.join(figdir, "steady_vs_gamma.png"), b, vals)),
        ("budget", lambda: fig_budget(os.path.join(figdir, "budget.png"), b, vals)),
        ("curves", lambda: fig_curves(os.path.join(figdir, "curve_sum.png"), os.path.join(figdir, "curve_average.png"),
                                      b, vals)),
        ("multiplicative", lambda: fig_multiplicative(os.path.join(figdir, "multiplicative.png"), b, vals)),
        ("balance", lambda: fig_balance(os.path.join(figdir, "balance.png"), b, vals)),
        ("mult_map", lambda: fig_mult_map(os.path.join(figdir, "mult_map.png"), b, vals)),
        ("mult_table", lambda: _mult_table(b, vals) or []),
        ("gain_heatmap", lambda: fig_heatmap(os.path.join(figdir, "gain_heatmap.png"), b, vals)),
        ("stability", lambda: fig_stability(os.path.join(figdir, "stability.png"), b, vals)),
        ("block_vs_K", lambda: fig_block_vs_K(os.path.join(figdir, "block_vs_K.png"), b, vals)),
        ("block_weight_decay", lambda: fig_block_weight_decay(os.path.join(figdir, "block_weight_decay.png"), b,
                                                              vals)),
        ("block_curve", lambda: fig_block_curve(os.path.join(figdir, "block_curve.png"), b, vals)),
    ]
    written = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="docs", unit="figure")
    for name, job in jobs:
        r = job()
        written += r if isinstance(r, list) else [r]
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)
    if bar is not None:
        bar.close()
    template = resources.files("nqp").joinpath("theory_template.md").read_text()
    md = render(template, vals)
    written.append(write_atomic(os.path.join(out, "theory.md"), md))
    return written
