"""Command line: python -m nqp {predict,simulate,sweep,curve,docs}.

Invalid or unstable input exits with status 2 and one line on stderr saying what is wrong.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import numpy as np

from .console import Parser as _Parser
from .console import Stdout as _Stdout
from .console import StdoutError as _StdoutError
from .console import fail as _fail
from .console import silence_stdout as _silence_stdout
from .errors import NQPError
from .files import Outputs, check_writable
from .methods import Block, LatePhase, TailAverage, make_method
from .problem import Problem
from .resources import FLOAT, check_memory, check_threads

DEFAULT_DIM, DEFAULT_POWER = 10, 1.0   # the docs' standard setting (docs/theory.md §1)


# The library names its parameters in backticks (`lr_theta`, `T0`); the command line shows each as its flag.
FLAGS = {"T0": "--t0", "placement": "--phi", "window": "--swa-window"}


def flags(text: str) -> str:
    """A library message in the command line's words: each `parameter` becomes its flag (`lr_theta` -> --lr-theta,
    and the exceptions of FLAGS).

    >>> flags("`lr_phi` must be > 0, got 0; `T0` too")
    '--lr-phi must be > 0, got 0; --t0 too'
    """
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`",
                  lambda m: FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-")), text)


def _int_at_least(lo: int | None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            try:  # 1e6: an integer in scientific notation
                f = float(text)
                v = int(f) if math.isfinite(f) and f == int(f) else None
            except (ValueError, OverflowError):
                v = None
            if v is None:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v
    return parse


# Flags whose range is checked where the value is used (with a message naming the bound) are parsed with _int.
_int, _positive_int, _nonneg_int = _int_at_least(None), _int_at_least(1), _int_at_least(0)


def _out_folder(path: str) -> str:
    """An output folder: created if missing; an existing file there is a usage error."""
    if not path:
        raise NQPError("--out must name a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise NQPError(f"--out {path} exists and is not a folder; choose another --out")
    os.makedirs(path, exist_ok=True)
    return path


def _out_png(path: str) -> str:
    """An output PNG path: must end in .png and not be a folder."""
    if not path.lower().endswith(".png"):
        raise NQPError(f"--out {path!r} must end in .png (figures are written as PNG)")
    if os.path.isdir(path):
        raise NQPError(f"--out {path} is a folder; give a file name ending in .png")
    folder = os.path.dirname(path)
    if folder:
        _out_folder(folder)
    return path


# ----------------------------------------------------------------------------- flags

def _problem_flags(p):
    g = p.add_argument_group("problem (default: --spectrum powerlaw --dim 10 --power 1, noise 1, optimum 1: the docs' "
                                         "standard setting)")
    g.add_argument("--curvature", type=float, nargs="+", metavar="H", help="curvatures h_i > 0")
    g.add_argument("--noise", type=float, nargs="+", metavar="S", default=[1.0],
                   help="target-noise variances s_i >= 0 (one value broadcasts; default 1)")
    g.add_argument("--optimum", type=float, nargs="+", metavar="W", default=[1.0],
                   help="optimum w*_i (one value broadcasts; default 1)")
    g.add_argument("--spectrum", choices=["powerlaw"], help="generate h_i = i^-P, i = 1..D")
    g.add_argument("--dim", type=_int, metavar="D", help=f"dimension of the power-law spectrum (default {DEFAULT_DIM})")
    g.add_argument("--power", type=float, metavar="P", help=f"power-law exponent (default {DEFAULT_POWER:g})")
    g.add_argument("--hessian", metavar="FILE", help="full curvature H (d x d, symmetric positive definite; .npy or "
                                                     "text numpy.loadtxt reads); --method sgd or block")
    g.add_argument("--noise-cov", metavar="FILE", help="full target-noise covariance S (d x d, positive "
                                                       "semi-definite; .npy or text)")


def _method_flags(p, method_default="additive", gamma_default=1.0):
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["sgd", "additive", "multiplicative", "block"], default=method_default)
    g.add_argument("--phi-coords", type=_nonneg_int, nargs="+", metavar="I",
                   help="--method block: the 0-based coordinates that are late-phase weights phi (the others are "
                        "theta), as BatchNorm and the head are in a network")
    g.add_argument("--weight-decay", type=float, default=0.0, metavar="LAMBDA",
                   help="weight decay inside the gradient (torch convention); late-phase methods decay theta once "
                        "per outer step (sgd, block and additive; not multiplicative)")
    g.add_argument("--weight-decay-theta", type=float, default=None, metavar="LAMBDA",
                   help="--method block: theta's weight decay per outer step (default --weight-decay)")
    g.add_argument("--K", type=_int, default=None, help="number of late-phase members, or of the runs of --method sgd "
                                                        "--ensemble (default 10)")
    g.add_argument("--gamma-theta", type=float, default=None,
                   help=f"base-gradient scale: theta <- theta - lr_theta * gamma_theta * sum_k g_k "
                        f"(default {gamma_default:g}; 1/K averages the member gradients)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD step; default for both late-phase rates (0.1)")
    g.add_argument("--lr-theta", type=float, help="late-phase step of theta (default --lr)")
    g.add_argument("--lr-phi", type=float, help="late-phase step of each phi_k (default --lr)")
    g.add_argument("--momentum", type=float, default=0.0, help="momentum mu in [0, 1) (torch convention)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--batch", type=_int, default=1, help="SGD only: minibatches averaged per step")
    g.add_argument("--ensemble", action="store_true", help="SGD only: K independent runs averaged at the end")
    g.add_argument("--swa-window", type=_int, metavar="W",
                   help="tail-average the mean model over the last W minibatches")
    g.add_argument("--short-time", action="store_true",
                   help="multiplicative: the prediction at the balanced start theta = phi, valid for t - T0 short "
                        "against the relaxation time of the balance (default: the long run, at the balance the "
                        "noise selects)")


def build_problem(a) -> Problem:
    """The problem of the flags; --hessian gives the dimension and the curvature, --noise-cov the noise."""
    from .problem import load_matrix

    H = None if a.hessian is None else load_matrix(a.hessian, "--hessian")
    S = None if a.noise_cov is None else load_matrix(a.noise_cov, "--noise-cov")
    if S is not None and "--noise" in getattr(a, "given", ()):
        raise NQPError("give either --noise or --noise-cov, not both")
    if S is not None:
        a.noise = [1.0]  # replaced by S's diagonal
    if H is None:
        return _build_diag(a).with_matrices(None, S) if S is not None else _build_diag(a)
    if a.curvature or a.spectrum or a.dim is not None or a.power is not None:
        raise NQPError("give either --hessian or --curvature / --spectrum, not both")
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise NQPError(f"--hessian must be a square matrix, got shape {H.shape}")
    if len(a.noise) not in (1, H.shape[0]) or len(a.optimum) not in (1, H.shape[0]):
        raise NQPError(f"--hessian is {H.shape[0]} x {H.shape[0]}: give --noise and --optimum one value each or "
                       f"{H.shape[0]}")
    return Problem.from_values(np.ones(H.shape[0]), _vec(a.noise), _vec(a.optimum)).with_matrices(H, S)


def _build_diag(a) -> Problem:
    if a.spectrum and a.curvature:
        raise NQPError("give either --curvature or --spectrum powerlaw, not both")
    if not a.spectrum and (a.dim is not None or a.power is not None) and a.curvature:
        raise NQPError("--dim/--power apply to --spectrum powerlaw")
    if a.curvature:
        return Problem.from_values(a.curvature, a.noise, a.optimum)
    dim = DEFAULT_DIM if a.dim is None else a.dim
    return Problem.powerlaw(dim, DEFAULT_POWER if a.power is None else a.power, _vec(a.noise), _vec(a.optimum))


def _vec(v):
    return v[0] if len(v) == 1 else v


def method_params(a, gamma_default=1.0) -> dict:
    if a.method == "sgd" and a.gamma_theta is not None:
        raise NQPError("--gamma-theta applies to late-phase methods (--method additive/multiplicative)")
    if a.method == "sgd" and a.K is not None and not a.ensemble:
        raise NQPError("--K applies to late-phase methods and to --method sgd --ensemble (K runs averaged)")
    a.K = 10 if a.K is None else a.K
    return dict(K=a.K, gamma_theta=gamma_default if a.gamma_theta is None else a.gamma_theta, lr=a.lr,
                lr_theta=a.lr_theta, lr_phi=a.lr_phi, momentum=a.momentum, nesterov=a.nesterov,
                batch=a.batch, ensemble=a.ensemble, swa_window=a.swa_window, phi_coords=a.phi_coords,
                weight_decay=a.weight_decay, weight_decay_theta=a.weight_decay_theta)


def _finite(a):
    for k in ("lr", "lr_theta", "lr_phi", "momentum", "gamma_theta", "weight_decay", "weight_decay_theta"):
        v = getattr(a, k, None)
        if v is not None and not math.isfinite(v):
            raise NQPError(f"--{k.replace('_', '-')} must be finite, got {v}")


# ----------------------------------------------------------------------------- output helpers

def _table(rows, cols) -> str:
    cells = [[c for c, _ in cols]] + [[fmt(r) for _, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _g(v) -> str:
    return "unstable" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def _dump(obj):
    print(_json(obj, indent=2))


def _json(obj, indent=1) -> str:
    """JSON text with non-finite floats written as null (JSON has no NaN or infinity)."""
    def conv(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, np.generic):
            return conv(o.item())
        return o
    return json.dumps(conv(obj), indent=indent, allow_nan=False, default=str)


def _params_dict(m) -> dict:
    base = m.base if hasattr(m, "base") else m
    d = {k: v for k, v in base.__dict__.items()}
    if isinstance(m, TailAverage):
        d["swa_window"] = m.window
    if hasattr(m, "K") and not isinstance(base, LatePhase):
        d["K"] = m.K
    return d


# ----------------------------------------------------------------------------- commands

def _check_lyapunov_memory(a, problem) -> None:
    """The Lyapunov path holds an n x n covariance per coordinate, n = (K + 1) states (twice with momentum)."""
    n = ((a.K if a.method != "sgd" else 1) + 1) * (2 if a.momentum else 1)
    check_memory([(f"{problem.dim:,} covariances of {n} x {n}", FLOAT * problem.dim * n * n, "--K, --dim")],
                 "--lyapunov")


def _given(a, *flags) -> list:
    """The flags among ``flags`` that the command line gave explicitly."""
    return [f for f in flags if f in getattr(a, "given", ())]


def _check_short_time(a):
    if getattr(a, "short_time", False) and a.method != "multiplicative":
        raise NQPError("--short-time applies to --method multiplicative (the other methods have no slow balance)")


def _relaxation_text(pred) -> str:
    b = pred.balance.summary()
    sel = b["selected"]
    rng = f"{sel['min']:.4g}" if abs(sel["max"] - sel["min"]) <= 1e-4 * sel["max"] else \
        f"{sel['min']:.4g}..{sel['max']:.4g} (median {sel['median']:.4g})"
    if b["frozen"]:
        return ("multiplicative: theta is frozen (gamma_theta * lr_theta = 0), so the balance theta^2/|w*| stays at "
                "its release value 1 and the linearisation is the long run")
    tau = b["relaxation_minibatches"]
    return (f"multiplicative, long run: the noise selects the balance b* = theta^2/|w*| = {rng} (leading order "
            f"sqrt(gamma_theta lr_theta / lr_phi) = {b['leading_order']:.4g}); from the balanced start (b = 1) it "
            f"relaxes with a time of {tau:.3g} minibatches (slowest coordinate)" if tau is not None else
            f"multiplicative, long run: b* = theta^2/|w*| = {rng}")


def _is_multiplicative(method) -> bool:
    base = method.base if isinstance(method, TailAverage) else method
    return isinstance(base, LatePhase) and base.kind == "multiplicative"


def _short_time_dict(short, long) -> dict:
    """JSON of a short-time (balanced-start) prediction, labelled with the time over which it holds."""
    out = short.to_dict()
    out["relaxation_minibatches"] = long.relaxation_minibatches
    out["valid_for"] = ("t - T0 << relaxation_minibatches: the fast modes at the balanced start, before the balance "
                        "relaxes")
    out["long_run"] = {"excess_loss_mean_model": long.excess_loss_mean_model,
                       "excess_loss_members": long.excess_loss_members, "balance": long.balance.summary()}
    return out


def cmd_predict(a) -> int:
    from .methods import SGD
    from .theory import long_run

    problem = build_problem(a)
    path = "lyapunov" if a.lyapunov else "closed"
    _check_short_time(a)
    method = make_method(a.method, **method_params(a))
    if a.lyapunov:
        _check_lyapunov_memory(a, problem)
    pred = long_run(problem, method, path)
    shown = pred.short_time if a.short_time else pred
    sgd = SGD(a.lr, a.momentum, a.nesterov, weight_decay=a.weight_decay)
    out, rows = _predict_report(a, problem, method, sgd, pred, path)
    if a.json:
        _dump(out)
        return 0
    print(f"noisy quadratic problem: {problem.describe()}")
    print(f"stationary expected excess loss (summed over coordinates); solution: {shown.path}\n")
    _print_predict(a, out, rows, method, pred)
    return 0


def _prediction_dict(a, long) -> dict:
    """The long run (default), or with --short-time the balanced-start prediction labelled with its validity."""
    return _short_time_dict(long.short_time, long) if a.short_time else long.to_dict()


def _predict_report(a, problem, method, sgd, pred, path):
    """The JSON of `predict` and its table rows: the prediction, and for a late-phase method the fair baselines, the
    gamma_theta scan (when gamma_theta is not given), the conclusion and the same at other K (all computed by
    :mod:`nqp.theory`)."""
    from .theory import baselines, gamma_theta_scan, max_stable_lr, other_K

    shown = pred.short_time if a.short_time else pred
    out = {"problem": problem.describe(), **_prediction_dict(a, pred), "params": _params_dict(method),
           "max_stable": max_stable_lr(problem, method)}
    if not isinstance(method, (LatePhase, Block)):
        return out, [(method.name, json.dumps(_params_dict(method)), shown.excess_loss_mean_model,
                      shown.excess_loss_members)]
    b = out["baselines"] = baselines(problem, method, sgd, None)
    if a.gamma_theta is None and a.swa_window is None:
        out["gamma_theta_scan"] = []
        for r in gamma_theta_scan(problem, method, path):
            if "prediction" in r:
                r = {"gamma_theta": r["gamma_theta"], **_prediction_dict(a, r["prediction"])}
                r.pop("short_time", None)
            out["gamma_theta_scan"].append(r)
    rows = [("SGD", f"lr={a.lr:g}", b["sgd"].get("excess_loss_mean_model"), b["sgd"].get("excess_loss_members")),
            (f"SGD, batch x{a.K}", f"lr={a.lr:g}", b["sgd_batch_K"].get("excess_loss_mean_model"),
             b["sgd_batch_K"].get("excess_loss_members")),
            (f"ensemble of {a.K} SGD runs", f"lr={a.lr:g}, {a.K}x cost",
             b["ensemble_K"].get("excess_loss_mean_model"), b["ensemble_K"].get("excess_loss_members"))]
    for r in out.get("gamma_theta_scan") or [{"gamma_theta": method.gamma_theta, **shown.to_dict()}]:
        rows.append((f"late-phase {a.method}, K={a.K}",
                     f"gamma_theta={r['gamma_theta']:.4g}, lr_theta={method.lr_theta:g}, lr_phi={method.lr_phi:g}",
                     r.get("excess_loss_mean_model"), r.get("excess_loss_members")))
    out["conclusion"] = conclusion(rows[1:3], rows[3:])
    here = [v for v in (b["sgd_batch_K"].get("excess_loss_mean_model"),
                        b["ensemble_K"].get("excess_loss_mean_model")) if v is not None]
    best = min(here) if here else None
    out["other_K"] = other_K(problem, method, sgd, path, {
        "K": a.K, "excess_loss_mean_model": shown.excess_loss_mean_model, "best_baseline": best,
        "ratio": shown.excess_loss_mean_model / best if best else None})
    return out, rows


def _print_predict(a, out, rows, method, pred) -> None:
    """The table of `predict`, the other K, the multiplicative model's balance and the conclusion, for a reader."""
    e_sgd = out.get("baselines", {}).get("sgd", {}).get("excess_loss_mean_model")
    cols = [("method", lambda r: r[0]), ("settings", lambda r: r[1]),
            ("mean model", lambda r: _g(r[2])), ("members (avg)", lambda r: _g(r[3]))]
    if e_sgd:
        cols.append(("mean / SGD", lambda r: "-" if r[2] is None else f"{r[2] / e_sgd:.4f}"))
    print(_table(rows, cols))
    if out.get("other_K"):
        print("\nthe same at other K (mean model; baseline: the better of SGD with a K-times batch and the "
              "average of K runs):")
        print(_table(out["other_K"], [("K", lambda r: str(r["K"])),
                                      ("late-phase", lambda r: _g(r["excess_loss_mean_model"])),
                                      ("best fair baseline", lambda r: _g(r["best_baseline"])),
                                      ("late-phase / baseline", lambda r: "-" if r["ratio"] is None
                                       else f"{r['ratio']:.4f}")]))
    if a.momentum:
        print(f"\nmomentum {a.momentum:g}{' (Nesterov)' if a.nesterov else ''} on every optimizer")
    if _is_multiplicative(method):
        print("\n" + _relaxation_text(pred))
        if a.short_time:
            print("shown: the short-time prediction at the balanced start theta = phi (b = 1), valid while t - T0 is "
                  f"short against that time; long run: mean model {pred.excess_loss_mean_model:.6g}, members "
                  f"{pred.excess_loss_members:.6g}")
        else:
            st = pred.short_time
            print(f"short-time prediction (t - T0 << the relaxation time, balanced start; --short-time): mean model "
                  f"{st.excess_loss_mean_model:.6g}, members {st.excess_loss_members:.6g}")
        print("check with `python -m nqp simulate` (same flags)")
    if "conclusion" in out:
        print("\n" + out["conclusion"])     # the last line: what to conclude


def conclusion(baseline_rows, latephase_rows) -> str:
    """One line: the best late-phase setting against the best fair baseline (the same minibatches per step: SGD with
    a K-times batch; or K times the cost: an ensemble of K runs), by the mean model's stationary excess."""
    def best(rows):
        ok = [r for r in rows if r[2] is not None and math.isfinite(r[2])]
        return min(ok, key=lambda r: r[2]) if ok else None
    lp, bl = best(latephase_rows), best(baseline_rows)
    if lp is None:
        return "conclusion: no late-phase setting shown is stable"
    if bl is None or lp[2] <= 0 or bl[2] <= 0:
        return f"conclusion: best late-phase setting {lp[1]} (mean model {lp[2]:.4g}); no fair baseline to compare"
    if abs(lp[2] / bl[2] - 1) < 1e-3:
        return (f"conclusion: the best late-phase setting ({lp[1]}) ties with the fair baseline {bl[0]} "
                f"({lp[2]:.4g} vs {bl[2]:.4g}): no gain from the members")
    if lp[2] < bl[2]:
        def val(name, text):
            m = re.search(rf"(?<![a-z_]){name}=([0-9.eE+-]+)", text)
            return float(m.group(1)) if m else None
        lr = val("lr", bl[1])
        slower = [f"{n} < {ref:g}" for n, v, ref in (("gamma_theta", val("gamma_theta", lp[1]), 1.0),
                                                     ("lr_theta", val("lr_theta", lp[1]), lr),
                                                     ("lr_phi", val("lr_phi", lp[1]), lr))
                  if v is not None and ref is not None and v < ref]
        caveat = (f"; but {', '.join(slower)} lowers a block's step per minibatch, which SGD at a lower lr gets too"
                  if slower else "")
        return (f"conclusion: late-phase ({lp[1]}) is best, its mean model's excess {lp[2]:.4g} is {bl[2] / lp[2]:.3g}x "
                f"below the best fair baseline ({bl[0]}: {bl[2]:.4g}){caveat}")
    return (f"conclusion: the fair baseline {bl[0]} is best ({bl[2]:.4g}); the best late-phase setting ({lp[1]}) is "
            f"{lp[2] / bl[2]:.3g}x above it")


BURN_IN_UPDATES_CAP = 5e9    # member-coordinate updates the automatic long-run burn-in may spend (about a minute
                             # at the 0.8-1.2e8 updates/s measured on two cores; beyond it the user chooses)


def cmd_simulate(a) -> int:
    from .montecarlo import simulate
    from .theory import long_run, steady_state

    problem = build_problem(a)
    _check_short_time(a)
    check_threads(a.threads)
    method = make_method(a.method, **method_params(a))
    mult = _is_multiplicative(method)
    per_run = 2 + (2 * problem.dim if mult else 0)  # running sums (and the balance's per coordinate)
    check_memory([(f"--runs {a.runs:,} runs", FLOAT * max(a.runs, 0) * per_run, "--runs")], "the simulation")
    if a.start != "balanced" and not mult:
        raise NQPError("--start applies to --method multiplicative")
    if a.short_time and a.start != "balanced":
        raise NQPError("--short-time compares with the balanced start; drop --start selected")
    pred = steady_state(problem, method) if (a.short_time or not mult) else long_run(problem, method)
    burn_in, needed, note = _simulate_burn_in(a, problem, method, pred)
    res = simulate(problem, method, steps=a.steps, burn_in=burn_in, runs=a.runs, seed=a.seed, threads=a.threads,
                   progress=not a.json and sys.stderr.isatty(), start=a.start,
                   dtype=np.float32 if a.float32 else np.float64)
    out = {"problem": problem.describe(), "method": method.name, "params": _params_dict(method), **res.to_dict(),
           "prediction": pred.to_dict()}
    if needed is not None:
        out["burn_in_for_long_run"] = needed
    if note:
        out["warning"] = note
    for key in ("excess_loss_mean_model", "excess_loss_members"):
        se = getattr(res, key + "_stderr")
        out[key + "_z"] = (getattr(res, key) - getattr(pred, key)) / se if se > 0 else None
    if a.json:
        _dump(out)
        return 0
    _print_simulate(a, problem, res, pred, out, mult)
    return 0


def _simulate_burn_in(a, problem, method, pred):
    """(burn-in, the burn-in the long run needs or None, a warning or None): a multiplicative run from the balanced
    start needs the balance to relax (nqp.montecarlo.long_run_burn_in); refused beyond BURN_IN_UPDATES_CAP."""
    from .montecarlo import long_run_burn_in

    if not (_is_multiplicative(method) and not a.short_time and a.start == "balanced"):
        return a.burn_in, None, None
    needed = long_run_burn_in(problem, method)
    if a.burn_in is None:
        cost = float(a.runs) * problem.dim * (method.K + 1) * needed  # theta and the K phi_k
        if cost > BURN_IN_UPDATES_CAP:
            raise NQPError(
                f"from the balanced start the balance theta^2/|w*| relaxes with a time of "
                f"{pred.relaxation_minibatches:.3g} minibatches; reaching the long run (to 1e-3) needs a burn-in "
                f"of {needed:.3g} minibatches, {cost:.2g} member-coordinate updates; use --start selected (start "
                f"at the noise-selected balance), --burn-in N, or --short-time (compare with the balanced start)")
        return needed, needed, None
    if a.burn_in < needed:
        return a.burn_in, needed, (
            f"--burn-in {a.burn_in} is shorter than the {needed} minibatches the balance needs to reach the long "
            f"run from the balanced start: the estimate may lie between the short-time and the long-run values")
    return a.burn_in, needed, None


def _print_simulate(a, problem, res, pred, out, mult) -> None:
    """The simulated losses beside the prediction (z in standard errors), the balance, and any warning."""
    print(f"noisy quadratic problem: {problem.describe()}")
    start = f", start {res.start}" if mult else ""
    print(f"Monte Carlo: {res.runs} runs x {res.steps} minibatches after {res.burn_in} burn-in{start}, seed {res.seed}, "
          f"{res.dtype}, {res.seconds:.2f} s ({res.updates_per_second / 1e6:.1f} M member-coordinate updates/s)\n")
    rows = [("mean model", res.excess_loss_mean_model, res.excess_loss_mean_model_stderr,
             pred.excess_loss_mean_model, out["excess_loss_mean_model_z"]),
            ("members (avg)", res.excess_loss_members, res.excess_loss_members_stderr, pred.excess_loss_members,
             out["excess_loss_members_z"])]
    label = "long run" if (mult and not a.short_time) else ("short time" if mult else pred.path)
    print(_table(rows, [("quantity", lambda r: r[0]), ("simulated", lambda r: _g(r[1])),
                        ("std. error", lambda r: f"{r[2]:.2g}"), (f"predicted ({label})", lambda r: _g(r[3])),
                        ("z", lambda r: "-" if r[4] is None else f"{r[4]:+.2f}")]))
    if res.balance_mean is not None:
        i = int(np.argmax(np.abs(res.balance_mean - res.balance_start)))
        line = (f"\nbalance theta^2/|w*|: started at {res.balance_start[i]:.4g}, time average "
                f"{res.balance_mean[i]:.4g} +- {res.balance_mean_stderr[i]:.2g} (coordinate {i}, the one that moved most)")
        if pred.balance is not None:
            line += f"; selected b* {pred.balance.selected[i]:.4g}"
        print(line)
    if out.get("warning"):
        print(f"\nwarning: {out['warning']}")


def cmd_sweep(a) -> int:
    from .sweep import grid, parse_values

    problem = build_problem(a)
    base = method_params(a)
    for k in ("batch", "ensemble", "swa_window"):
        if base.pop(k) not in (1, False, None):
            raise NQPError(f"--{k.replace('_', '-')} is not supported by sweep")
    (xn, xv), (yn, yv) = _sweep_axes(a)
    _check_short_time(a)
    _out_folder(a.out)
    check_writable(a.out)  # before the work: a folder that takes no file fails now
    res = grid(problem, a.method, base, (xn, parse_values(xn, xv)), (yn, parse_values(yn, yv)),
               balance="release" if a.short_time else "long-run")
    d = {"problem": problem.describe(), "method": a.method, "base": base, **res.to_dict()}
    if a.method == "multiplicative":
        d["prediction"] = "short time (balanced start)" if a.short_time else "long run (noise-selected balance)"
    files = _write_sweep(a, problem, res, d, xn, yn)
    if a.json:
        _dump({**d, "files": files})
        return 0
    _print_sweep(res, xn, yn, files)
    return 0


def _sweep_axes(a):
    """((x name, x value tokens), (y name, y value tokens)) of --x and --y (defaults: K 1..50, gamma_theta)."""
    xn, *xv = a.x or ["K", "1:50:50"]
    yn, *yv = a.y or ["gamma_theta", "0.02:1:6:log"]
    xn, yn = xn.replace("-", "_"), yn.replace("-", "_")
    if not xv or not yv:
        raise NQPError("--x and --y take a parameter name followed by values")
    for axis, name in (("--x", xn), ("--y", yn)):
        flag = "--K" if name == "K" else "--" + name.replace("_", "-")
        if _given(a, flag):
            raise NQPError(f"{flag} is swept by {axis}; drop {flag} (or sweep another parameter)")
    return (xn, xv), (yn, yv)


def _write_sweep(a, problem, res, d, xn, yn) -> dict:
    """sweep.json, sweep.csv and the two plots, all or none; returns their paths."""
    from . import plots

    files = {"json": os.path.join(a.out, "sweep.json"), "csv": os.path.join(a.out, "sweep.csv")}
    header = [xn, yn, "excess_loss_mean_model", "excess_loss_members", "excess_loss_sgd", "gain_over_sgd", "stable"]
    if res.baseline is not None:
        header += ["excess_loss_best_baseline", "gain_over_best_baseline"]
    lines = [",".join(header)] + [",".join(str(r[k]) for k in header) for r in res.rows()]
    tag = (", long run" if not a.short_time else ", short time") if a.method == "multiplicative" else ""
    if res.baseline is not None:
        title = (f"{a.method}{tag}: gain over the best fair baseline (K-times batch or K-run ensemble, "
                 f"E_baseline / E_mean)\n{problem.describe()}")
        heat, heat_label = res.gain_over_baseline, "E_baseline / E_mean"
    else:
        title = f"{a.method}{tag}: gain over SGD (E_sgd / E_mean); {problem.describe()}"
        heat, heat_label = res.gain, "E_sgd / E_mean"
    sgd_ref = float(np.nanmean(res.sgd)) if np.all(res.sgd == res.sgd[0, 0]) else None
    with Outputs() as out:  # all four files or none: a failure leaves the earlier set and no temporary file
        out.write_text(files["json"], _json(d))
        out.write_text(files["csv"], "\n".join(lines) + "\n")
        files["heatmap"] = plots.plot_heatmap(xn, res.x, yn, res.y, heat, os.path.join(a.out, "sweep_gain.png"),
                                              title, heat_label, outputs=out)
        files["lines"] = plots.plot_lines(xn, res.x, yn, res.y, {"mean model": res.mean_model,
                                          "members": res.members}, os.path.join(a.out, "sweep_lines.png"),
                                          f"{a.method}: stationary excess loss", hline=sgd_ref, outputs=out)
    return files


def _print_sweep(res, xn, yn, files) -> None:
    """How many points are stable, the best ratio over the fair baseline and over SGD, and the files written."""
    finite = np.isfinite(res.gain)
    best = np.unravel_index(np.argmax(np.where(finite, res.gain, -np.inf)), res.gain.shape) if finite.any() else None
    print(f"sweep of {xn} x {yn}: {res.stable.sum()} of {res.stable.size} points stable")
    if best is None and res.stable.any():
        print("no gain over SGD is defined (SGD's stationary loss is 0 or unstable at every point, e.g. --noise 0)")
    gb = res.gain_over_baseline
    if gb is not None and np.isfinite(gb).any():
        j, i = np.unravel_index(np.nanargmax(np.where(np.isfinite(gb), gb, np.nan)), gb.shape)
        verdict = "beats" if gb[j, i] > 1 + 1e-9 else ("ties with" if gb[j, i] > 1 - 1e-9 else "never beats")
        print(f"the late-phase mean model {verdict} the best fair baseline (SGD with a K-times batch, or the average "
              f"of K runs): best ratio E_baseline / E_mean = {gb[j, i]:.4g} at {xn}={res.x[i]:g}, {yn}={res.y[j]:g}")
    if best is not None:
        j, i = best
        print(f"largest gain over single-batch SGD: {res.gain[j, i]:.4g} at {xn}={res.x[i]:g}, {yn}={res.y[j]:g}"
              + (" (a K-times batch alone divides the noise by K)" if gb is not None else ""))
    for v in files.values():
        print(f"wrote {v}")


# The simulated curve advances runs x dim x (K + 2) coordinates (theta, the K phi_k and SGD beside them) per minibatch;
# 1.7-2.1e8 of them a second were measured on two cores (dim 100, K 10, 200 runs, horizons 2e4 and 6e4). Beyond
# CURVE_UPDATES_CAP (about an hour there) the request is refused: fewer --runs, a shorter --horizon or a smaller
# problem give the same picture.
CURVE_UPDATES_PER_S = 1.5e8
CURVE_UPDATES_CAP = 5e11
CURVE_NOTE_SECONDS = 10.0  # longer simulations say their estimate up front and, off a terminal, print progress lines


def _curve_cost(a, problem) -> float:
    """The estimated seconds of ``curve --simulate``, said up front when long; refused beyond CURVE_UPDATES_CAP."""
    updates = float(a.runs) * problem.dim * (a.K + 2) * a.horizon
    seconds = updates / CURVE_UPDATES_PER_S
    if updates > CURVE_UPDATES_CAP:
        raise NQPError(f"--simulate up to --horizon {a.horizon} with --runs {a.runs} on {problem.dim} coordinates "
                       f"and K={a.K} is {updates:.2g} coordinate updates, about {seconds / 3600:.1f} h on two cores, "
                       f"beyond the bound of {CURVE_UPDATES_CAP:.0e}; lower --runs or --horizon (or --dim)")
    if seconds > CURVE_NOTE_SECONDS:
        print(f"note: --simulate: {updates:.2g} coordinate updates, roughly {_duration(seconds)} (measured rate on "
              f"two cores; fewer --runs or a shorter --horizon take less)", file=sys.stderr, flush=True)
    return seconds


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"


def cmd_curve(a) -> int:
    from . import plots
    from .curves import learning_curve
    from .methods import SGD

    problem = build_problem(a)
    if a.method == "sgd":
        raise NQPError("curve compares SGD with a late-phase method: use --method additive, multiplicative or block")
    if a.swa_window is not None:
        raise NQPError("curve uses --swa-start (running average from that minibatch), not --swa-window")
    method = make_method(a.method, **method_params(a))
    sgd = SGD(a.lr, a.momentum, a.nesterov, weight_decay=a.weight_decay)
    path = "lyapunov" if a.lyapunov else "closed"
    extra = _given(a, "--runs", "--seed", "--threads")
    if extra and not a.simulate:
        raise NQPError(f"{', '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} to --simulate (the Monte Carlo "
                       f"points); add --simulate or drop {'them' if len(extra) > 1 else 'it'}")
    check_threads(a.threads)
    check_memory([(f"--points {a.points:,} evaluation times", FLOAT * max(a.points, 0) * 4, "--points")], "the curve")
    if a.lyapunov:
        _check_lyapunov_memory(a, problem)
    _out_png(a.out)
    check_writable(os.path.dirname(a.out) or ".")
    _check_short_time(a)
    curve = learning_curve(problem, method, sgd, T0=a.t0, horizon=a.horizon, w0=_vec(a.w0), sigma0=a.sigma0,
                           points=a.points, swa_start=a.swa_start, path=path,
                           balance="release" if a.short_time else "ode")
    mc = None
    if a.simulate:
        from .montecarlo import simulate_curve
        seconds = _curve_cost(a, problem)
        tty = sys.stderr.isatty()
        mc = simulate_curve(problem, method, sgd, T0=a.t0, horizon=a.horizon, w0=_vec(a.w0), sigma0=a.sigma0,
                            points=min(a.points, 60), swa_start=a.swa_start, runs=a.runs, seed=a.seed,
                            threads=a.threads, progress=(not a.json and tty) or (
                                "lines" if not tty and seconds > CURVE_NOTE_SECONDS else False))
    png = plots.plot_curve(curve, a.out, mc)
    out = {"problem": problem.describe(), "params": _params_dict(method), "png": png, **curve.to_dict()}
    if mc is not None:
        out["simulation"] = {"runs": a.runs, "seed": a.seed, **mc.to_dict()}
    if a.json:
        _dump(out)
        return 0
    last = {k: v[-1] for k, v in curve.series.items()}
    print(f"learning curve, {problem.describe()}; late-phase from T0={a.t0}, K={a.K}")
    print(_table(sorted(last.items(), key=lambda kv: kv[1]),
                 [("series", lambda r: r[0]), (f"E at t={curve.t[-1]}", lambda r: _g(r[1]))]))
    print(f"wrote {png}")
    return 0


def cmd_arms(a) -> int:
    from . import arms

    problem, phi = arms.block_problem(a.dim, a.phi_count, a.phi)
    methods = arms.arms(phi, a.K, a.lr, a.momentum, a.nesterov, a.weight_decay)
    rows = arms.predict(problem, phi, methods)
    sh = arms.shares(problem, phi)
    out = {"problem": problem.describe(), "phi_coords": list(phi), "phi_share": sh,
           "settings": {"K": a.K, "lr": a.lr, "momentum": a.momentum, "nesterov": a.nesterov,
                        "weight_decay": a.weight_decay}, "arms": rows, "order": arms.order(rows)}
    if a.json:
        _dump(out)
        return 0
    print(f"block problem: {problem.describe()}, s_i = 1/h_i (gradient noise covariance H); phi = {a.phi} "
          f"{a.phi_count} coordinates: {sh['curvature']:.0%} of tr H and of SGD's small-step excess")
    print(f"K={a.K}, lr={a.lr:g}, momentum={a.momentum:g}{' (Nesterov)' if a.nesterov else ''}, "
          f"weight decay={a.weight_decay:g}; stationary expected excess loss (exact)\n")
    print(_table(rows, [("arm", lambda r: r["arm"]), ("mean model", lambda r: _g(r["excess_loss_mean_model"])),
                        ("theta part", lambda r: _g(r["theta_part"])), ("phi part", lambda r: _g(r["phi_part"])),
                        ("vs base", lambda r: f"{r['vs_base']:.3g}"),
                        ("members (avg)", lambda r: _g(r["excess_loss_members"])),
                        ("relaxation (minibatches)", lambda r: f"{r['relaxation_minibatches']:.3g}")]))
    out["order"] = arms.order(rows)
    print(f"\norder (mean model, best first): {out['order']}")
    return 0


def cmd_docs(a) -> int:
    from .docs import build
    _out_folder(a.out)
    check_writable(a.out)
    for path in build(a.out, quick=a.quick, progress=sys.stderr.isatty()):
        print(f"wrote {path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m nqp", description="Exact and simulated loss of SGD and late-phase learning "
                                                   "on the noisy quadratic problem.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sp = sub.add_parser("predict", help="stationary expected loss, exact (default: K=10, several gamma_theta)")
    _problem_flags(sp)
    _method_flags(sp)
    sp.add_argument("--lyapunov", action="store_true", help="solve the Lyapunov equation instead of closed forms")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_predict)

    ss = sub.add_parser("simulate", help="Monte Carlo estimate with standard errors, beside the prediction")
    _problem_flags(ss)
    _method_flags(ss)
    ss.add_argument("--steps", type=_int, default=20000, help="minibatches averaged after burn-in")
    ss.add_argument("--burn-in", type=_nonneg_int, default=None,
                    help="minibatches discarded first (default: automatic)")
    ss.add_argument("--runs", type=_int, default=32, help="independent runs (>= 2)")
    ss.add_argument("--seed", type=_nonneg_int, default=0)
    ss.add_argument("--threads", type=_positive_int, default=None, help="worker threads (default: all cores)")
    ss.add_argument("--start", choices=["balanced", "selected"], default="balanced",
                    help="multiplicative: start at the balanced factorisation theta = phi (default; the automatic "
                         "burn-in then covers the relaxation of the balance) or at the noise-selected balance")
    ss.add_argument("--float32", action="store_true", help="simulate in single precision (faster)")
    ss.add_argument("--json", action="store_true")
    ss.set_defaults(func=cmd_simulate)

    sw = sub.add_parser("sweep", help="grid over two parameters -> CSV, JSON and PNG")
    _problem_flags(sw)
    _method_flags(sw)
    sw.add_argument("--x", nargs="+", metavar="ARG", help="NAME VALUES... (default: K 1:50:50)")
    sw.add_argument("--y", nargs="+", metavar="ARG", help="NAME VALUES... (default: gamma_theta 0.02:1:6:log)")
    sw.add_argument("--out", default="nqp_sweep", help="output folder (default nqp_sweep)")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(func=cmd_sweep)

    sc = sub.add_parser("curve", help="expected loss vs t with the switch at T0 -> PNG")
    _problem_flags(sc)
    _method_flags(sc)
    sc.add_argument("--t0", type=int, default=2000, help="minibatches of SGD before late-phase (default 2000)")
    sc.add_argument("--horizon", type=int, default=6000, help="last minibatch shown (default 6000)")
    sc.add_argument("--w0", type=float, nargs="+", default=[0.0], help="start weights (default 0)")
    sc.add_argument("--sigma0", type=float, default=0.0, help="std of the noise added to each phi_k at T0")
    sc.add_argument("--swa-start", type=int, default=None, help="also show the running average from this minibatch")
    sc.add_argument("--points", type=_int, default=300, help="evaluation times")
    sc.add_argument("--lyapunov", action="store_true", help="propagate the full (theta, phi_1..K) system")
    sc.add_argument("--simulate", action="store_true", help="overlay Monte Carlo points (±2 standard errors)")
    sc.add_argument("--runs", type=_int, default=200)
    sc.add_argument("--seed", type=_nonneg_int, default=0)
    sc.add_argument("--threads", type=_positive_int, default=None)
    sc.add_argument("--out", default="nqp_curve.png", help="PNG path (default nqp_curve.png)")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_curve)

    sa = sub.add_parser("arms", help="predictions for the deep study's arms on a block problem (BatchNorm + head)")
    sa.add_argument("--dim", type=_int, default=100, help="coordinates (h_i = 1/i, s_i = 1/h_i; default 100)")
    sa.add_argument("--phi", choices=["stiffest", "spread", "flattest"], default="stiffest",
                    help="where the late-phase coordinates sit in the spectrum (default stiffest: the head carries "
                         "the Hessian's class outliers)")
    sa.add_argument("--phi-count", type=_int, default=10, help="late-phase coordinates (default 10)")
    sa.add_argument("--K", type=_int, default=10)
    sa.add_argument("--lr", type=float, default=0.1)
    sa.add_argument("--momentum", type=float, default=0.9)
    sa.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    sa.add_argument("--weight-decay", type=float, default=5e-4)
    sa.add_argument("--json", action="store_true")
    sa.set_defaults(func=cmd_arms)

    sd = sub.add_parser("docs", help="regenerate the theory figures and docs/theory.md")
    sd.add_argument("--out", default="docs", help="docs folder (default docs)")
    sd.add_argument("--quick", action="store_true", help="small, fast build (CI check)")
    sd.set_defaults(func=cmd_docs)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        a = parser.parse_args(argv)
        a.given = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
        if hasattr(a, "lr"):
            _finite(a)
        # Overflow in a diverging run is detected and reported as one line (the result is checked), so numpy's
        # floating-point warnings would only repeat it.
        with np.errstate(all="ignore"):
            rc = a.func(a)
        sys.stdout.flush()
        return rc
    except SystemExit as e:
        return int(e.code or 0)
    except NQPError as e:
        return _fail(flags(str(e)))
    except BrokenPipeError:  # the reader of stdout went away (e.g. | head): nothing left to say
        _silence_stdout()
        return 0
    except _StdoutError as e:
        return _fail(f"cannot write the output to stdout: {e.args[0]}")
    except OSError as e:  # a path the user gave that the OS refuses
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"cannot write{where}: {e.strerror or e}; choose another --out")
    except MemoryError:
        return _fail("out of memory: lower --dim, --runs, --points or the sweep's grid")
    except KeyboardInterrupt:
        return _fail("interrupted")
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
