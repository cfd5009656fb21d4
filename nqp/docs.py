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

from . import closed_form as cf
from . import linear, plots
from .curves import learning_curve
from .errors import NQPError
from .methods import SGD, Ensemble, LatePhase, TailAverage
from .montecarlo import simulate, simulate_curve
from .problem import Problem
from .sweep import grid
from .theory import steady_state

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


BUDGET_METHODS = [
    ("SGD, lr dropped to lr at T0", "sgd", "tab:gray", "-"),
    ("SGD, K-times batch", "sgd_batch_K", "tab:olive", "-"),
    ("late-phase mean, gamma_theta = 1", ("latephase_mean", 1.0), "tab:blue", "-"),
    ("late-phase mean, gamma_theta = 1/K", ("latephase_mean", "1/K"), "tab:red", "-"),
    ("late-phase mean, gamma_theta = 0 (K copies from T0)", ("latephase_mean", 0.0), "tab:purple", "-"),
    ("late-phase members (avg), gamma_theta = 1/K", ("latephase_members", "1/K"), "tab:red", ":"),
    ("SGD, tail-averaged from T0", "sgd_swa", "tab:brown", "--"),
    ("late-phase mean, tail-averaged, gamma_theta = 1/K", ("latephase_swa", "1/K"), "tab:green", "--"),
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
    for name, key, col, ls in BUDGET_METHODS:
        y = table[name]
        ax.plot(etas, y, color=col, ls=ls, label=name)
        i = int(np.nanargmin(y))
        ax.plot(etas[i], y[i], "o", color=col, ms=4)
        rows.append((name, y[i], etas[i]))
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
    frontier = [("SGD", lambda e: SGD(e), lambda e: e, 1, "tab:gray"),
                (f"SGD, batch {K}", lambda e: SGD(e, batch=K), lambda e: e, K, "tab:olive"),
                ("late-phase mean, gamma_theta = 1", lambda e: LatePhase(K, e, e, 1.0), lambda e: e * (1 + K), K,
                 "tab:blue"),
                ("late-phase mean, gamma_theta = 1/K", lambda e: LatePhase(K, e, e, 1.0 / K), lambda e: 2 * e, K,
                 "tab:red")]
    for label, make, eta_eff, mpb, col in frontier:
        xs, ys = [], []
        for e in fine:
            rate = eta_eff(e) * hmin      # per-step contraction of the slowest mode: 1 - eta_eff h_min
            val = _excess(p, make(e)) if rate < 1 else np.nan
            if np.isfinite(val):
                xs.append(mpb / -np.log(1 - rate))
                ys.append(val)
        bx.plot(xs, ys, color=col, label=label, lw=2.5 if label == "SGD" else 1.2,
                ls="-" if label == "SGD" else "--")
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


def fig_multiplicative(path, b: Budget, vals: dict):
    plt = plots._plt()
    K, g = 4, 0.25
    lp = LatePhase(K, LR, LR, g, kind="multiplicative")
    noises = np.geomspace(1e-4, 1.0, 4 if b.quick else 9)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for key, mk, col, label in (("excess_loss_mean_model", "o", "tab:blue", "mean model"),
                                ("excess_loss_members", "s", "tab:orange", "members (avg)")):
        ratios, errs = [], []
        for i, s in enumerate(noises):
            p = Problem.from_values([1.0], [s], [1.0])
            pred = getattr(steady_state(p, lp), key)
            r = simulate(p, lp, steps=20000, burn_in=2000, runs=b.runs, seed=400 + i)
            ratios.append(getattr(r, key) / pred)
            errs.append(2 * getattr(r, key + "_stderr") / pred)
        ax.errorbar(noises, ratios, errs, fmt=mk + "-", color=col, label=label, ms=4)
    ax.axhline(1.0, color="k", ls=":", label="small-noise prediction")
    ax.set_xscale("log")
    ax.set_xlabel("noise variance s (optimum w* = 1, h = 1; runs of 20,000 minibatches)")
    ax.set_ylabel("simulated / predicted excess loss")
    ax.set_title(f"multiplicative model, K = {K}, gamma_theta = 1/K, lr = {LR}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    # Drift along theta * phi = const: time-averaged loss over longer and longer runs, against s * t.
    lengths = np.geomspace(4e3, 4e4 if b.quick else 4e5, 4 if b.quick else 6).astype(int) // K * K
    cmap = plt.get_cmap("viridis")
    drift = {}
    for j, s in enumerate((1e-3, 1e-2, 1e-1)):
        p = Problem.from_values([1.0], [s], [1.0])
        pred = steady_state(p, lp)
        col = cmap(j / 2)
        for key, mk, ls in (("excess_loss_mean_model", "o", "-"), ("excess_loss_members", "s", "--")):
            ratios, errs = [], []
            for i, T in enumerate(lengths):
                r = simulate(p, lp, steps=int(T), burn_in=400, runs=b.runs, seed=460 + 10 * j + i)
                ratios.append(getattr(r, key) / getattr(pred, key))
                errs.append(2 * getattr(r, key + "_stderr") / getattr(pred, key))
            drift[(s, key)] = ratios[-1]
            bx.errorbar(s * lengths, ratios, errs, fmt=mk + ls, color=col, ms=4,
                        label=f"{'mean' if 'mean' in key else 'members'}, s = {s:g}")
    bx.axhline(1.0, color="k", ls=":")
    bx.set_xscale("log")
    bx.set_xlabel("s x run length (minibatches after a burn-in of 400)")
    bx.set_ylabel("simulated (time average) / predicted")
    bx.set_title("slow drift along theta phi = w*: departure grows with s t")
    bx.legend(fontsize=7, ncol=2)
    bx.grid(alpha=0.3)
    vals["mult_long_mean"] = drift[(1e-1, "excess_loss_mean_model")]
    vals["mult_long_members"] = drift[(1e-1, "excess_loss_members")]
    return plots.save(fig, path)


def fig_heatmap(path, b: Budget, vals: dict):
    p = Problem.powerlaw(100, 1.0)
    res = grid(p, "additive", dict(K=10, gamma_theta=1.0, lr=LR, lr_theta=None, lr_phi=None, momentum=0.0),
               ("K", np.arange(1, 51.0)), ("gamma_theta", np.geomspace(1e-3, 1.0, 50)))
    vals["heatmap_max_gain"] = float(np.nanmax(res.gain))
    j, i = np.unravel_index(np.nanargmax(res.gain), res.gain.shape)
    vals["heatmap_argmax"] = (float(res.x[i]), float(res.y[j]))
    return plots.plot_heatmap("K", res.x, "gamma_theta", res.y, res.gain, path,
                              f"E_sgd / E_mean (d = 100, h_i = 1/i, lr = {LR}); blank: unstable", "gain over SGD")


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
    for KK, col in ((1, "tab:cyan"), (K, "tab:green"), (16, "tab:olive")):
        ax.plot(lt, edge - KK * lt, color=col, ls="--", label=f"closed form: lr_phi + {KK} lr_theta = 2 / h_max")
    ax.axhline(edge, color="tab:blue", ls="--", label="closed form: lr_phi = 2 / h_max")
    ax.set_xlim(lt[0], lt[-1])
    ax.set_ylim(lph[0], lph[-1])
    ax.set_xlabel("lr_theta (gamma_theta = 1)")
    ax.set_ylabel("lr_phi")
    ax.set_title("stability region (white: spectral radius = 1)")
    ax.legend(fontsize=7, loc="upper right")
    return plots.save(fig, path)


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
        "mult_long_mean": f"{vals.get('mult_long_mean', float('nan')):.2f}",
        "mult_long_members": f"{vals.get('mult_long_members', float('nan')):.2f}",
    }
    return out


def render(template: str, vals: dict, figdir_rel: str = "figures") -> str:
    tex = cf.latex()
    values = _values(vals)
    tables = {"baselines": _table_baselines, "budget": _table_budget}

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
        ("gain_heatmap", lambda: fig_heatmap(os.path.join(figdir, "gain_heatmap.png"), b, vals)),
        ("stability", lambda: fig_stability(os.path.join(figdir, "stability.png"), b, vals)),
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
    path = os.path.join(out, "theory.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, path)
    written.append(path)
    return written
