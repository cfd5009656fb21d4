"""Long-run agreement of `python -m nqp predict --method multiplicative --json` with long Monte Carlo runs.

    python benchmarks/nqp_long_run.py            # every setting (a few minutes on 2 cores)
    python benchmarks/nqp_long_run.py --quick    # shorter runs (larger standard errors)

For each small-step setting (eta h |w*| <= 0.05 in every coordinate, momentum counted as eta / (1 - mu);
s <= 0.3 w*^2) it runs, as a user would,

    python -m nqp predict  <flags> --json
    python -m nqp simulate <flags> --steps N --runs R --seed S --json

(simulate starts at the balanced factorisation theta = phi and burns in over the balance's relaxation, chosen from the
balance ODE) and prints the long-run prediction, the simulation with its standard error, their relative difference
and its z-score, beside the short-time (balanced-start) prediction. Seeds are fixed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, flags (problem and method), minibatches averaged after the burn-in, seed
SETTINGS = [
    ("K=4, gamma=1/4, lr=0.05, s=0.3", "--method multiplicative --curvature 1 --noise 0.3 --optimum 1 --K 4 "
     "--gamma-theta 0.25 --lr 0.05", 400_000, 1),
    ("K=10, gamma=1/10, lr=0.05, s=0.3", "--method multiplicative --curvature 1 --noise 0.3 --optimum 1 --K 10 "
     "--gamma-theta 0.1 --lr 0.05", 1_000_000, 2),
    ("K=4, gamma=1, lr=0.05, s=0.1 (CIFAR convention)", "--method multiplicative --curvature 1 --noise 0.1 "
     "--optimum 1 --K 4 --gamma-theta 1 --lr 0.05", 200_000, 3),
    ("d=2, h=(1, 0.5), w*=(1, -2), s=0.3 w*^2, K=4, gamma=1/4, lr_theta=0.03, lr_phi=0.025",
     "--method multiplicative --curvature 1 0.5 --noise 0.3 1.2 --optimum 1 -2 --K 4 --gamma-theta 0.25 "
     "--lr-theta 0.03 --lr-phi 0.025", 400_000, 4),
    ("heavy ball mu=0.5, K=4, gamma=1/4, lr=0.025, s=0.3", "--method multiplicative --curvature 1 --noise 0.3 "
     "--optimum 1 --K 4 --gamma-theta 0.25 --lr 0.025 --momentum 0.5", 400_000, 5),
    ("Nesterov mu=0.5, K=4, gamma=1/4, lr=0.025, s=0.3", "--method multiplicative --curvature 1 --noise 0.3 "
     "--optimum 1 --K 4 --gamma-theta 0.25 --lr 0.025 --momentum 0.5 --nesterov", 400_000, 6),
]
RUNS = 64


def _cli(args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "nqp", *args.split(), "--json"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    return json.loads(r.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args()
    print(f"nqp long-run agreement -- {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, runs = {RUNS}")
    out = []
    for name, flags, steps, seed in SETTINGS:
        steps = steps // 10 if a.quick else steps
        pred = _cli(f"predict {flags}")
        t = time.perf_counter()
        sim = _cli(f"simulate {flags} --steps {steps} --runs {RUNS} --seed {seed}")
        row = {"setting": name, "flags": flags, "steps": sim["steps"], "burn_in": sim["burn_in"], "seed": seed,
               "runs": RUNS, "seconds": time.perf_counter() - t,
               "relaxation_minibatches": pred["relaxation_minibatches"],
               "balance_selected": pred["balance"]["selected"], "balance_simulated": sim["balance"]["time_average"]}
        for key in ("excess_loss_mean_model", "excess_loss_members"):
            p, m, se = pred[key], sim[key], sim[key + "_stderr"]
            row[key] = {"predicted": p, "simulated": m, "stderr": se, "relative_difference": m / p - 1,
                        "z": (m - p) / se, "short_time": pred["short_time"][key]}
        out.append(row)
        print(f"\n{name}\n  python -m nqp predict {flags} --json\n  python -m nqp simulate {flags} --steps {steps} "
              f"--runs {RUNS} --seed {seed} --json   (burn-in {sim['burn_in']}, relaxation time "
              f"{pred['relaxation_minibatches']:.3g} minibatches, {row['seconds']:.0f} s)")
        print(f"  {'':14s} {'predicted':>11s} {'simulated':>11s} {'std. err.':>9s} {'difference':>10s} {'z':>6s} "
              f"{'short time':>11s}")
        for key, label in (("excess_loss_mean_model", "mean model"), ("excess_loss_members", "members (avg)")):
            r = row[key]
            print(f"  {label:14s} {r['predicted']:11.5g} {r['simulated']:11.5g} {r['stderr']:9.2g} "
                  f"{100 * r['relative_difference']:+9.2f}% {r['z']:+6.2f} {r['short_time']:11.5g}")
        print(f"  balance theta^2/|w*|: selected {row['balance_selected']['median']:.4f}, simulated time average "
              f"{row['balance_simulated']['median']:.4f} (medians over coordinates)")
    worst = max(abs(r[k]["relative_difference"]) for r in out for k in ("excess_loss_mean_model",
                                                                         "excess_loss_members"))
    print(f"\nlargest relative difference: {100 * worst:.2f}% (criterion 1%) -> {'met' if worst < 0.01 else 'NOT met'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
