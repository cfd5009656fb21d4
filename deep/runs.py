"""Bookkeeping shared by the three trainers (images, enwik8, ImageNet fine-tuning): atomic JSON/log files, resume
checks, provenance."""
from __future__ import annotations

import json
import os
import platform

import torch

SCHEMA = "late-phase-results/1"


def write_json_atomic(path: str, obj) -> None:
    """Write `obj` as JSON to a temporary file, fsync it, then rename it over `path` (never a half-written file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_log(out: str, log: list) -> None:
    """Rewrite `out`/log.jsonl atomically with one JSON line per epoch (so it always matches the checkpoint)."""
    tmp = os.path.join(out, "log.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in log))
    os.replace(tmp, os.path.join(out, "log.jsonl"))


def settings_change(saved: dict, saved_seed, mine: dict, seed) -> str | None:
    """A description of the first differences between a checkpoint's settings and this run's, or None if equal
    (lists and tuples compare alike)."""
    norm = lambda d: {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}  # noqa: E731
    saved, mine = norm(saved), norm(mine)
    diff = sorted(k for k in mine if saved.get(k) != mine[k])
    if not diff and saved_seed == seed:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} -> {mine[k]!r}" for k in diff[:4]) or f"seed {saved_seed} -> {seed}"


def hardware(device: torch.device) -> dict:
    """Provenance of the measurements: device, torch and Python versions, CPU, threads (and the GPU's name)."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None
