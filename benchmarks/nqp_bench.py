"""Cost of the three nqp paths on a 50 x 50 (K, gamma_theta) grid, power-law spectrum, d = 10^4.

    python benchmarks/nqp_bench.py            # full measurement (about a minute on 2 cores)
    python benchmarks/nqp_bench.py --quick    # smaller, for a smoke test

Measured side by side in one run on this machine:
- closed form: the whole grid (2,500 points x d coordinates), vectorised (`nqp.sweep.grid`);
- Lyapunov: scipy's discrete Lyapunov solver on the literal step, per coordinate, on a sample of grid
  points and coordinates (its cost per coordinate solve does not depend on which coordinate), then
  extrapolated to the full grid -- the extrapolation is printed as such;
- Monte Carlo: member-coordinate updates per second of the simulator (all cores), and the cost of one grid
  point at a fixed budget, extrapolated to the grid.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from nqp import LatePhase, Problem
from nqp import closed_form as cf
from nqp import linear
from nqp.montecarlo import simulate
from nqp.sweep import grid


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args()
    d = 1000 if a.quick else 10_000
    n = 50
    lr = 0.02
    problem = Problem.powerlaw(d, 1.0)
    Ks = np.arange(1, n + 1, dtype=float)
    gammas = np.geomspace(1e-3, 1.0, n)
    base = dict(K=10, gamma_theta=1.0, lr=lr, lr_theta=None, lr_phi=None, momentum=0.0, nesterov=False)

    t = time.perf_counter()
    cf.sgd_variance(0.1, 1.0, 1.0)  # sympy derivation + lambdify (once per process)
    t_derive = time.perf_counter() - t
    reps = 3 if a.quick else 5
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        res = grid(problem, "additive", base, ("K", Ks), ("gamma_theta", gammas))
        times.append(time.perf_counter() - t)
    t_closed = min(times)

    # Lyapunov on sampled grid points x sampled coordinates.
    sample_K = [1, 13, 25, 38, 50]
    n_coord = 200 if a.quick else 1000
    sub = Problem(problem.curvature[:: d // n_coord][:n_coord], problem.noise[:n_coord], problem.optimum[:n_coord])
    t = time.perf_counter()
    for K in sample_K:
        g = 0.5 / K  # a stable gamma_theta for every K
        linear.stationary(sub, LatePhase(K, lr, lr, g))
    t_lyap_sample = time.perf_counter() - t
    t_lyap_grid = t_lyap_sample / (len(sample_K) * n_coord) * (n * n * d)

    # Monte Carlo throughput and cost of one grid point.
    mc_steps, mc_runs = (500, 4) if a.quick else (2000, 8)
    lp = LatePhase(10, lr, lr, 0.1)
    r = simulate(problem, lp, steps=mc_steps * lp.K, burn_in=0, runs=mc_runs, seed=0)
    ups = r.updates_per_second
    t_mc_point = r.seconds
    rel_se = r.excess_loss_mean_model_stderr / r.excess_loss_mean_model

    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(), "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "grid": f"{n} x {n} (K = 1..50, gamma_theta = 1e-3..1 geometric), d = {d}, power-law h_i = 1/i, lr = {lr}",
        "stable_points": int(res.stable.sum()),
        "sympy_derivation_s": t_derive,
        "closed_form_grid_s": t_closed,
        "lyapunov_measured_s": t_lyap_sample,
        "lyapunov_measured_on": f"{len(sample_K)} grid points (K = {sample_K}) x {n_coord} coordinates",
        "lyapunov_grid_extrapolated_s": t_lyap_grid,
        "mc_updates_per_s": ups,
        "mc_point_s": t_mc_point,
        "mc_point_budget": f"{mc_runs} runs x {mc_steps * lp.K} minibatches (K = 10), no burn-in; "
                           f"relative std. error {rel_se:.2%}",
        "mc_grid_extrapolated_s": t_mc_point * n * n,
    }
    print(f"nqp cost benchmark -- {info['date']}, {info['machine']}, Python {info['python']}, numpy {info['numpy']}")
    print(f"grid: {info['grid']} ({info['stable_points']} of {n * n} points stable)\n")
    rows = [
        ("closed form (sympy -> numpy)", t_closed, "measured: whole grid"),
        ("Lyapunov (scipy, literal step)", t_lyap_grid, f"extrapolated from {t_lyap_sample:.2f} s on "
                                                        f"{info['lyapunov_measured_on']}"),
        ("Monte Carlo", t_mc_point * n * n, f"extrapolated from {t_mc_point:.2f} s per point "
                                            f"({info['mc_point_budget']})"),
    ]
    print(f"{'path':34s} {'grid cost (s)':>14s} {'x closed form':>14s}  note")
    for name, sec, note in rows:
        print(f"{name:34s} {sec:14.4g} {sec / t_closed:14.3g}  {note}")
    print(f"\nsympy derivation (once per process): {t_derive:.2f} s")
    print(f"closed-form grid: {t_closed:.3f} s (goal < 0.2 s) -> {'met' if t_closed < 0.2 else 'NOT met'}")
    print(f"Monte Carlo: {ups:.3g} member-coordinate updates/s (goal >= 5e7) -> {'met' if ups >= 5e7 else 'NOT met'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
