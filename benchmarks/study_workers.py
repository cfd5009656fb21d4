"""One study run twice side by side: in one process, then with ``--workers N``; prints both wall times, their ratio,
and whether the two reports agree number for number (timings aside).

    python benchmarks/study_workers.py --data-dir /usr/share/datasets/fashion-mnist --workers 2

The study: base vs late-phase BatchNorm + head on the CPU-sized Fashion-MNIST presets (fmnist_cpu_base,
fmnist_cpu_bn: the late-phase arm forks the base arm's first T0 = 4 epochs), shrunk to ``--train-subset`` training
images, on ``--seeds``. Each of the N workers gets 1/N of the CPU threads, and so does the one-process study
(OMP_NUM_THREADS): a CPU run's floating-point sums depend on its thread count, so only runs on equal threads can agree
number for number (``--one-process-threads`` gives it others, e.g. all of them, for its best wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def numbers(report):
    """The report without its timings (train seconds, images/s)."""
    if isinstance(report, dict):
        return {k: numbers(v) for k, v in report.items() if k not in ("train_seconds", "images_per_s")}
    if isinstance(report, list):
        return [numbers(v) for v in report]
    return report


def differences(a, b, path="") -> list:
    """(path, a, b) of every leaf where the two reports differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-subset", type=int, default=1500)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--one-process-threads", type=int, default=None,
                   help="CPU threads of the one-process study (default: those of one worker)")
    p.add_argument("--out", default=None, help="folder for the two studies (default: a temporary one)")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="study_workers_")
    small = {"train_subset": a.train_subset, "test_subset": a.test_subset, "bn_images": a.test_subset}
    spec = {"name": "fmnist_workers", "seeds": a.seeds, "baseline": "base",
            "arms": {"base": {"config": "fmnist_cpu_base", "overrides": small},
                     "late_phase": {"config": "fmnist_cpu_bn", "overrides": small}}}
    spec_path = os.path.join(out, "spec.json")
    os.makedirs(out, exist_ok=True)
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    walls, reports = {}, {}
    for name, flags in (("one_process", []), (f"workers_{a.workers}", ["--workers", str(a.workers)])):
        folder = os.path.join(out, name)
        cmd = [sys.executable, "-m", "deep", "study", spec_path, "--out", folder, "--data-dir", a.data_dir,
               "--device", "cpu", "--quiet", *flags]
        if flags:
            cmd.remove("--device"), cmd.remove("cpu")  # --workers takes the CPU (the threads split) itself
        env = dict(os.environ)
        if not flags:
            env["OMP_NUM_THREADS"] = str(a.one_process_threads or max(1, (os.cpu_count() or 1) // a.workers))
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        walls[name] = time.perf_counter() - start
        with open(os.path.join(folder, "report.json")) as f:
            reports[name] = numbers(json.load(f))
    diff = differences(*reports.values())
    seq, par = walls.values()
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d %H:%M"), "seeds": a.seeds, "runs": 2 * len(a.seeds),
                      "one_process_threads": int(a.one_process_threads or max(1, (os.cpu_count() or 1) //
                                                                                 a.workers)),
                      "wall_seconds": walls, "speedup": seq / par, "reports_equal": not diff,
                      "differences": diff[:10], "out": out}, indent=1))


if __name__ == "__main__":
    main()
