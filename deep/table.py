"""`python -m deep table RESULTS...`: aggregate results JSON files over seeds into markdown tables laid out like
the paper's, with the paper's numbers beside ours."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

# (row label, metric, baseline config, late-phase config, paper baseline, paper late-phase); metrics: accuracy (%),
# top1 (%), bpc (bits per character, lower is better). Paper numbers: mean ± std over 5 seeds where given.
PAPER_ROWS = [
    ("CIFAR-10, WRN-28-10, SGD", "accuracy", "cifar10_base", "cifar10_bn", (96.16, 0.12), (96.46, 0.15)),
    ("CIFAR-10, WRN-28-10, SWA", "accuracy", "cifar10_base_swa", "cifar10_bn_swa", (96.48, 0.04), (96.81, 0.07)),
    ("CIFAR-10, WRN-28-14, SWA", "accuracy", "cifar10_wrn14_base_swa", "cifar10_wrn14_bn_swa", None, (97.45, 0.10)),
    ("CIFAR-100, WRN-28-10, SGD", "accuracy", "cifar100_base", "cifar100_bn", (81.35, 0.16), (82.87, 0.22)),
    ("CIFAR-100, WRN-28-10, SWA", "accuracy", "cifar100_base_swa", "cifar100_bn_swa", (82.46, 0.09), (83.06, 0.08)),
    ("CIFAR-100, WRN-28-14, SWA", "accuracy", "cifar100_wrn14_base_swa", "cifar100_wrn14_bn_swa", None, (85.00, 0.25)),
    ("Fashion-MNIST, WRN-16-4, SGD", "accuracy", "fmnist_base", "fmnist_bn", None, None),
    ("ImageNet fine-tune, ResNet-50", "top1", "imagenet_resnet50_base", "imagenet_resnet50", (76.62, None),
     (76.87, None)),
    ("ImageNet fine-tune, ResNet-152", "top1", "imagenet_resnet152_base", "imagenet_resnet152", (78.37, None),
     (78.77, None)),
    ("ImageNet fine-tune, DenseNet-161", "top1", "imagenet_densenet161_base", "imagenet_densenet161", (78.17, None),
     (78.31, None)),
    ("enwik8, LSTM-500, SGD (bits/char)", "bpc_test", "enwik8_lstm_base", "enwik8_lstm_lp", (1.695, None),
     (1.633, None)),
    ("enwik8, LSTM-500, SWA (bits/char)", "bpc_test", "enwik8_lstm_base_swa", "enwik8_lstm_lp_swa", (1.626, None),
     (1.615, None)),
]


class TableError(ValueError):
    """Unreadable or incompatible results files."""


def load_results(paths) -> list[dict]:
    out = []
    for p in paths:
        files = [os.path.join(p, f) for f in sorted(os.listdir(p)) if f.endswith(".json")] if os.path.isdir(p) else [p]
        for f in files:
            try:
                with open(f) as fh:
                    d = json.load(fh)
            except (OSError, json.JSONDecodeError) as e:
                raise TableError(f"cannot read results file {f}: {e}") from None
            if not isinstance(d, dict) or "models" not in d or "config" not in d:
                if os.path.isdir(p):
                    continue  # other JSON files in a run folder
                raise TableError(f"{f} is not a results file (no 'config'/'models'); pass results.json files")
            d["_file"] = f
            out.append(d)
    if not out:
        raise TableError("no results files found; pass results.json files or run folders")
    return out


def _stat(vals):
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return m, sd, len(vals)


def _fmt(stat, digits=2):
    if stat is None:
        return "—"
    m, sd, n = stat
    s = f"{m:.{digits}f}"
    if sd is not None:
        s += f" ± {sd:.{digits}f}"
    return s + (f" (n={n})" if n else "")


def _paper(p, digits=2):
    if p is None:
        return "—"
    m, sd = p
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def group(results) -> dict:
    by = defaultdict(list)
    for r in results:
        by[r["config"]["name"]].append(r)
    return by


def metric_of(r, model: str, metric: str):
    m = r["models"].get(model)
    if not isinstance(m, dict):
        return None
    return m.get(metric)


def render(results) -> str:
    by = group(results)
    lines = ["| setting | paper: base | ours: base | paper: late-phase | ours: late-phase (averaged) | "
             "ours: late-phase ensemble |", "|---|---:|---:|---:|---:|---:|"]
    used = set()
    for label, metric, base, late, p_base, p_late in PAPER_ROWS:
        if base not in by and late not in by:
            continue
        used |= {base, late}
        digits = 3 if metric.startswith("bpc") else 2
        ours_b = _stat([metric_of(r, "averaged", metric) for r in by.get(base, [])])
        ours_l = _stat([metric_of(r, "averaged", metric) for r in by.get(late, [])])
        ours_e = _stat([metric_of(r, "ensemble", metric) for r in by.get(late, [])])
        lines.append(f"| {label} | {_paper(p_base, digits)} | {_fmt(ours_b, digits)} | {_paper(p_late, digits)} | "
                     f"{_fmt(ours_l, digits)} | {_fmt(ours_e, digits)} |")
    # Every metric of every config, averaged model / ensemble / mean member.
    lines += ["", "| config | model | accuracy (%) | NLL | ECE (%) | OOD AUROC entropy (%) | OOD AUROC max-softmax (%) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name in sorted(by):
        runs = by[name]
        for model in ("averaged", "ensemble", "members"):
            rows = []
            for r in runs:
                m = r["models"].get(model)
                if m is None:
                    continue
                rows.extend(m if isinstance(m, list) else [m])
            if not rows or "accuracy" not in rows[0]:
                continue
            oods = sorted({k for m in rows for k in m.get("ood", {})})
            ent = "; ".join(f"{o}: {_fmt(_stat([m['ood'][o]['auroc_entropy'] for m in rows if o in m.get('ood', {})]), 1)}"
                            for o in oods) or "—"
            msp = "; ".join(f"{o}: {_fmt(_stat([m['ood'][o]['auroc_max_softmax'] for m in rows if o in m.get('ood', {})]), 1)}"
                            for o in oods) or "—"
            label = "members (each)" if model == "members" else model
            lines.append(f"| {name} | {label} | {_fmt(_stat([m['accuracy'] for m in rows]))} | "
                         f"{_fmt(_stat([m['nll'] for m in rows]), 3)} | {_fmt(_stat([m['ece'] for m in rows]))} | "
                         f"{ent} | {msp} |")
    seeds = {name: sorted({r.get("seed") for r in runs}) for name, runs in by.items()}
    lines += ["", "Seeds: " + "; ".join(f"{k}: {v}" for k, v in sorted(seeds.items()))]
    return "\n".join(lines)
