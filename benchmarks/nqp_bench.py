"""Cost of the nqp paths, measured side by side in one run on this machine.

    python benchmarks/nqp_bench.py            # full measurement (a few minutes on 2 cores)
    python benchmarks/nqp_bench.py --quick    # smaller, for a smoke test
    python benchmarks/nqp_bench.py --sweep-only   # just the sweeps' wall times, additive against multiplicative

- `python -m nqp predict` wall time (a fresh process, median of repeats), default and --method multiplicative;
- closed form: a 50 x 50 (K, gamma_theta) grid on a power-law spectrum, d = 10^4, vectorised (`nqp.sweep.grid`);
  the same grid for the multiplicative long run (a selected balance per grid point and coordinate), and both as
  `python -m nqp sweep` side by side: the multiplicative sweep's wall time over the additive one's (goal <= 5);
- Lyapunov: scipy's discrete Lyapunov solver on the literal step, per coordinate, on a sample of grid points and
  coordinates, extrapolated to the full grid (printed as an extrapolation);
- Monte Carlo: member-coordinate updates per second of the simulator on all cores, float64 and float32, additive and
  multiplicative, repeated alternately (the machine may be shared: the median and the best of the repeats are
  printed with the load average); and the float32 path's rounding error against the standard error, from runs of
  both precisions driven by the same normal variates;
- the block model (`--method block`): `predict` on a full curvature H (d <= 100, K <= 10: the Lyapunov solution of
  the literal step, reduced exactly to the mean and deviation subspaces), in process and as a fresh process, and its
  closed form on a diagonal problem of d = 10^4 beside the additive closed form. `--block-only` runs just this part.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the nqp next to this script

from nqp import LatePhase, Problem  # noqa: E402
from nqp import dynamics as dyn  # noqa: E402
from nqp import linear  # noqa: E402
from nqp.montecarlo import simulate  # noqa: E402
from nqp.sweep import grid  # noqa: E402

MC_GOAL = 1.5e8


def _predict_wall(args, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nqp", "predict", *args], check=True, capture_output=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(min(times))


def _sweep_wall(d, n, lr, reps):
    """Wall time of `python -m nqp sweep` over the n x n (K, gamma_theta) grid on the power law of dimension d, additive
    and --method multiplicative (the long run), alternately; the best of reps each (files written to a temporary
    folder)."""
    import tempfile

    args = ["sweep", "--dim", str(d), "--spectrum", "powerlaw", "--x", "K", f"1:{n}:{n}",
            "--y", "gamma_theta", f"0.001:1:{n}:log", "--lr", str(lr)]
    out = {"additive": [], "multiplicative": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(reps):
            for m, times in out.items():
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "nqp", *args, "--method", m, "--out", os.path.join(tmp, m)],
                               check=True, capture_output=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                times.append(time.perf_counter() - t)
    return {m: min(v) for m, v in out.items()}


def _mc(problem, lp, dtype, steps, runs, seed):
    r = simulate(problem, lp, steps=steps * lp.K, burn_in=0, runs=runs, seed=seed, dtype=dtype)
    return r.updates_per_second, r


def _float32_error(runs: int, steps: int):
    """Time-averaged member excess of a multiplicative run in float64 and in float32 on the same normal variates
    (generated in float64, rounded to float32): returns (|difference| / standard error, difference, stderr)."""
    p = Problem.from_values([1.0, 0.3], [0.3, 0.3], [1.0, -2.0])
    lp = LatePhase(4, 0.05, 0.05, 0.25, kind="multiplicative")
    rng = np.random.default_rng(0)
    out = {}
    states = {dt: dyn.fixed_point(p, lp, shape=(runs,), dtype=dt, balance=0.5) for dt in (np.float64, np.float32)}
    coeffs = {dt: dyn.Coeffs(*(a.astype(dt) for a in (p.curvature, np.sqrt(p.noise), p.optimum)))
              for dt in (np.float64, np.float32)}
    acc = {dt: np.zeros(runs) for dt in states}
    for _ in range(steps):
        xi = rng.standard_normal((runs, lp.K, p.dim))
        for dt, st in states.items():
            dyn.latephase_step(st, xi.astype(dt), coeffs[dt], lp)
            w = dyn.members(st, lp).astype(float) - p.optimum
            acc[dt] += 0.5 * np.einsum("rkd,rkd,d->r", w, w, p.curvature) / lp.K
    for dt in acc:
        out[dt] = acc[dt] / steps
    diff = float(np.mean(out[np.float32] - out[np.float64]))
    se = float(out[np.float64].std(ddof=1) / np.sqrt(runs))
    return abs(diff) / se, diff, se


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def block_bench(quick: bool) -> dict:
    """Seconds per block-model prediction (median of repeats), side by side with the additive closed form."""
    import tempfile

    from nqp import Block
    from nqp import block as blk
    from nqp.theory import steady_state

    def fresh(p, m):
        blk._cache.clear()          # every repeat builds the reduced systems again
        return steady_state(p, m)

    reps = 3 if quick else 7
    rng = np.random.default_rng(0)
    out = {"full_H": []}
    for d in (20, 50, 100):
        Q = rng.standard_normal((d, d))
        H = Q @ Q.T / d + 0.1 * np.eye(d)
        H /= np.linalg.eigvalsh(H).max()
        p = Problem.from_values(np.ones(d), 1.0, 1.0).with_matrices(H, H)
        for K in (2, 10):
            for share in (0.1, 0.5, 1.0):
                for mom in (0.0, 0.9):
                    phi = tuple(range(int(round(share * d))))
                    m = Block(K, 0.05, 0.05, 1.0 / K, mom, mom > 0, phi, 5e-4)
                    sec = _median_time(lambda: fresh(p, m), reps)
                    out["full_H"].append({"d": d, "K": K, "phi_share": share, "momentum": mom, "seconds": sec})
    big = Problem.powerlaw(1000 if quick else 10_000, 1.0)
    phi = tuple(range(0, big.dim, 10))
    out["diagonal_d"] = big.dim
    out["diagonal_block_s"] = _median_time(lambda: steady_state(big, Block(10, 0.02, 0.02, 1.0, 0.9, True, phi, 5e-4)),
                                           reps)
    out["diagonal_additive_s"] = _median_time(lambda: steady_state(big, LatePhase(10, 0.02, 0.02, 1.0, 0.9, True)),
                                              reps)
    with tempfile.TemporaryDirectory() as tmp:
        d = 100
        Q = rng.standard_normal((d, d))
        H = Q @ Q.T / d + 0.1 * np.eye(d)
        np.save(os.path.join(tmp, "H.npy"), H / np.linalg.eigvalsh(H).max())
        out["predict_full_H_wall_s"] = _predict_wall(
            ["--method", "block", "--phi-coords", *map(str, range(10)), "--hessian", os.path.join(tmp, "H.npy"),
             "--K", "10", "--momentum", "0.9", "--nesterov", "--lr", "0.05", "--weight-decay", "5e-4"], reps)
    return out


def print_block(b: dict) -> None:
    worst = max(b["full_H"], key=lambda r: r["seconds"])
    print(f"\nblock model, full H (Lyapunov of the literal step), d in (20, 50, 100), K in (2, 10), phi share "
          f"(0.1, 0.5, 1), momentum (0, 0.9): median {np.median([r['seconds'] for r in b['full_H']]):.3g} s, slowest "
          f"{worst['seconds']:.3g} s (d = {worst['d']}, K = {worst['K']}, phi share {worst['phi_share']}, momentum "
          f"{worst['momentum']}); goal well under 1 s -> {'met' if worst['seconds'] < 0.5 else 'NOT met'}")
    med, best = b["predict_full_H_wall_s"]
    print(f"`python -m nqp predict --method block --hessian` (d = 100, K = 10, 10 phi coordinates, Nesterov 0.9, "
          f"gamma_theta scan and baselines): {med:.2f} s wall (median; best {best:.2f} s)")
    ratio = b["diagonal_block_s"] / b["diagonal_additive_s"]
    print(f"diagonal d = {b['diagonal_d']}: block closed form {b['diagonal_block_s'] * 1e3:.3g} ms, additive closed "
          f"form {b['diagonal_additive_s'] * 1e3:.3g} ms (ratio {ratio:.2f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--block-only", action="store_true", help="measure only the block model")
    ap.add_argument("--sweep-only", action="store_true",
                    help="measure only `python -m nqp sweep`, additive against multiplicative (the long run)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args()
    if a.sweep_only:
        sw = _sweep_wall(1000 if a.quick else 10_000, 50, 0.02, 1 if a.quick else 3)
        print(f"nqp sweep benchmark -- {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, numpy {np.__version__}; load average {os.getloadavg()[0]:.1f}")
        print(f"`python -m nqp sweep` 50 x 50 (K, gamma_theta), power law d = {1000 if a.quick else 10_000}, wall "
              f"(best of repeats, alternating): additive {sw['additive']:.2f} s, multiplicative (long run) "
              f"{sw['multiplicative']:.2f} s: ratio {sw['multiplicative'] / sw['additive']:.2f}; goal <= 5 -> "
              f"{'met' if sw['multiplicative'] <= 5 * sw['additive'] else 'NOT met'}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(sw, f, indent=1)
        return
    if a.block_only:
        b = block_bench(a.quick)
        print(f"nqp block benchmark -- {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, numpy {np.__version__}; load average {os.getloadavg()[0]:.1f}")
        print_block(b)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(b, f, indent=1)
        return
    d = 1000 if a.quick else 10_000
    n = 50
    lr = 0.02
    problem = Problem.powerlaw(d, 1.0)
    Ks = np.arange(1, n + 1, dtype=float)
    gammas = np.geomspace(1e-3, 1.0, n)
    base = dict(K=10, gamma_theta=1.0, lr=lr, lr_theta=None, lr_phi=None, momentum=0.0, nesterov=False)
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "numpy": np.__version__, "date": time.strftime("%Y-%m-%d"),
            "load_average_start": os.getloadavg()[0]}

    reps = 3 if a.quick else 7
    info["predict_wall_s"] = _predict_wall([], reps)
    info["predict_multiplicative_wall_s"] = _predict_wall(["--method", "multiplicative"], reps)

    t = time.perf_counter()
    from nqp.codegen import source
    source()                                  # what `python -m nqp.codegen` derives (sympy, once)
    info["sympy_derivation_s"] = time.perf_counter() - t
    times, times_mult = [], []
    for _ in range(3):       # alternately, side by side (the machine may be shared): the best of each
        t = time.perf_counter()
        res = grid(problem, "additive", base, ("K", Ks), ("gamma_theta", gammas))
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        grid(problem, "multiplicative", base, ("K", Ks), ("gamma_theta", gammas), balance="long-run")
        times_mult.append(time.perf_counter() - t)
    info["closed_form_grid_s"] = min(times)
    info["stable_points"] = int(res.stable.sum())
    info["closed_form_grid_multiplicative_long_run_s"] = min(times_mult)
    info["sweep_cli_wall_s"] = _sweep_wall(d, n, lr, 1 if a.quick else 3)

    sample_K = [1, 13, 25, 38, 50]
    n_coord = 200 if a.quick else 1000
    sub = Problem(problem.curvature[:: d // n_coord][:n_coord], problem.noise[:n_coord], problem.optimum[:n_coord])
    t = time.perf_counter()
    for K in sample_K:
        linear.stationary(sub, LatePhase(K, lr, lr, 0.5 / K))
    t_lyap_sample = time.perf_counter() - t
    info["lyapunov_measured_s"] = t_lyap_sample
    info["lyapunov_measured_on"] = f"{len(sample_K)} grid points (K = {sample_K}) x {n_coord} coordinates"
    info["lyapunov_grid_extrapolated_s"] = t_lyap_sample / (len(sample_K) * n_coord) * (n * n * d)

    mc_steps, mc_runs, mc_reps = (300, 4, 2) if a.quick else (1000, 8, 5)
    settings = {"additive": LatePhase(10, lr, lr, 0.1),
                "multiplicative": LatePhase(10, lr, lr, 0.1, kind="multiplicative")}
    ups = {(k, dt): [] for k in settings for dt in ("float64", "float32")}
    rel_se = None
    for rep in range(mc_reps):
        for k, lp in settings.items():
            for dt in ("float64", "float32"):
                u, r = _mc(problem, lp, dt, mc_steps, mc_runs, rep)
                ups[(k, dt)].append(u)
                if k == "additive" and dt == "float64":
                    rel_se = r.excess_loss_mean_model_stderr / r.excess_loss_mean_model
                    info["mc_point_s"] = r.seconds
    info["mc_updates_per_s"] = {f"{k}/{dt}": {"median": float(np.median(v)), "best": float(max(v))}
                                for (k, dt), v in ups.items()}
    info["mc_budget"] = (f"{mc_runs} runs x {mc_steps * 10} minibatches (K = 10) on d = {d}, all cores, "
                         f"{mc_reps} repeats alternating; relative std. error of one run {rel_se:.2%}")
    z32, diff32, se32 = _float32_error(*((64, 2000) if a.quick else (128, 10000)))
    info["float32_error_in_stderr"] = z32
    info["float32_error"] = {"difference": diff32, "stderr": se32}
    info["block"] = block_bench(a.quick)
    info["load_average_end"] = os.getloadavg()[0]

    print(f"nqp cost benchmark -- {info['date']}, {info['machine']}, Python {info['python']}, numpy {info['numpy']}; "
          f"load average {info['load_average_start']:.1f} at the start, {info['load_average_end']:.1f} at the end")
    med, best = info["predict_wall_s"]
    medm, bestm = info["predict_multiplicative_wall_s"]
    print(f"\n`python -m nqp predict`: {med:.2f} s wall (median of {reps}; best {best:.2f} s); "
          f"--method multiplicative: {medm:.2f} s (best {bestm:.2f} s); goal < 0.5 s -> "
          f"{'met' if med < 0.5 and medm < 0.5 else 'NOT met'}")
    print(f"sympy derivation of the closed forms (once, in `python -m nqp.codegen`): {info['sympy_derivation_s']:.2f} s")
    print(f"\ngrid: {n} x {n} (K = 1..50, gamma_theta = 1e-3..1 geometric), d = {d}, power-law h_i = 1/i, lr = {lr} "
          f"({info['stable_points']} of {n * n} points stable)")
    rows = [("closed form, additive", info["closed_form_grid_s"], "measured: whole grid"),
            ("closed form, multiplicative long run", info["closed_form_grid_multiplicative_long_run_s"],
             "measured: whole grid (b* per point and coordinate)"),
            ("Lyapunov (scipy, literal step)", info["lyapunov_grid_extrapolated_s"],
             f"extrapolated from {t_lyap_sample:.2f} s on {info['lyapunov_measured_on']}")]
    print(f"{'path':38s} {'grid cost (s)':>14s}  note")
    for name, sec, note in rows:
        print(f"{name:38s} {sec:14.4g}  {note}")
    sw = info["sweep_cli_wall_s"]
    ratio = sw["multiplicative"] / sw["additive"]
    print(f"`python -m nqp sweep` on this grid, wall (best of repeats, alternating): additive {sw['additive']:.2f} s, "
          f"--method multiplicative (long run) {sw['multiplicative']:.2f} s: ratio {ratio:.2f}; goal <= 5 -> "
          f"{'met' if ratio <= 5 else 'NOT met'} (in process: ratio "
          f"{info['closed_form_grid_multiplicative_long_run_s'] / info['closed_form_grid_s']:.1f})")
    print(f"\nMonte Carlo, member-coordinate updates/s ({info['mc_budget']}):")
    print(f"{'':16s} {'float64 median':>15s} {'float64 best':>13s} {'float32 median':>15s} {'float32 best':>13s}")
    for k in settings:
        m64, m32 = info["mc_updates_per_s"][f"{k}/float64"], info["mc_updates_per_s"][f"{k}/float32"]
        print(f"{k:16s} {m64['median']:15.3g} {m64['best']:13.3g} {m32['median']:15.3g} {m32['best']:13.3g}")
    best32 = max(v["best"] for kk, v in info["mc_updates_per_s"].items() if kk.endswith("float32"))
    print(f"goal >= {MC_GOAL:.2g} on 2 cores -> {'met' if best32 >= MC_GOAL else 'NOT met'} (best float32 "
          f"{best32:.3g})")
    print(f"float32 rounding error (same normal variates as float64, members' time-averaged excess): "
          f"{z32:.3g} standard errors ({diff32:.3g} against a standard error of {se32:.3g})")
    print_block(info["block"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
