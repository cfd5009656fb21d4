"""`python -m deep table RESULTS...`: aggregate results JSON files over seeds into markdown tables laid out like
the paper's, with the paper's numbers beside ours.

Every number is shown under one BatchNorm rule (:mod:`deep.evaluate`), named in the table: by default the reference
protocol's for each config (SWA configs: statistics re-estimated from training data; the others: the stored
statistics), or the rule given with ``--bn-rule``. Runs without BatchNorm have one rule (stored)."""
from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict

from .errors import DeepError

# (row label, metric, baseline config, late-phase config, paper baseline, paper late-phase); metrics: accuracy (%,
# top-1), bpc (bits per character, lower is better). Paper numbers: mean ± std over 5 seeds where given.
PAPER_ROWS = [
    ("CIFAR-10, WRN-28-10, SGD", "accuracy", "cifar10_base", "cifar10_bn", (96.16, 0.12), (96.46, 0.15)),
    ("CIFAR-10, WRN-28-10, SWA", "accuracy", "cifar10_base_swa", "cifar10_bn_swa", (96.48, 0.04), (96.81, 0.07)),
    ("CIFAR-10, WRN-28-14, SWA", "accuracy", "cifar10_wrn14_base_swa", "cifar10_wrn14_bn_swa", None, (97.45, 0.10)),
    ("CIFAR-100, WRN-28-10, SGD", "accuracy", "cifar100_base", "cifar100_bn", (81.35, 0.16), (82.87, 0.22)),
    ("CIFAR-100, WRN-28-10, SWA", "accuracy", "cifar100_base_swa", "cifar100_bn_swa", (82.46, 0.09), (83.06, 0.08)),
    ("CIFAR-100, WRN-28-14, SWA", "accuracy", "cifar100_wrn14_base_swa", "cifar100_wrn14_bn_swa", None, (85.00, 0.25)),
    ("Fashion-MNIST, WRN-16-4, SGD", "accuracy", "fmnist_base", "fmnist_bn", None, None),
    ("ImageNet fine-tune, ResNet-50", "accuracy", "imagenet_resnet50_base", "imagenet_resnet50", (76.62, None),
     (76.87, None)),
    ("ImageNet fine-tune, ResNet-152", "accuracy", "imagenet_resnet152_base", "imagenet_resnet152", (78.37, None),
     (78.77, None)),
    ("ImageNet fine-tune, DenseNet-161", "accuracy", "imagenet_densenet161_base", "imagenet_densenet161", (78.17, None),
     (78.31, None)),
    ("enwik8, LSTM-500, SGD (bits/char)", "bpc_test", "enwik8_lstm_base", "enwik8_lstm_lp", (1.695, None),
     (1.633, None)),
    ("enwik8, LSTM-500, SWA (bits/char)", "bpc_test", "enwik8_lstm_base_swa", "enwik8_lstm_lp_swa", (1.626, None),
     (1.615, None)),
]


def load_results(paths) -> list[dict]:
    """The results files among `paths` (results JSON files, or run folders whose results JSON files are taken), each
    read once (by real path) and checked (:func:`check_result`); raises TableError naming a bad file."""
    out, seen = [], set()
    for p in paths:
        files = [os.path.join(p, f) for f in sorted(os.listdir(p)) if f.endswith(".json")] if os.path.isdir(p) else [p]
        for f in files:
            real = os.path.realpath(f)
            if real in seen:
                print(f"note: {f} was given more than once; counted once", file=sys.stderr)
                continue
            seen.add(real)
            try:
                with open(f) as fh:
                    d = json.load(fh)
            except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8 text
                raise DeepError(f"cannot read results file {f}: {e}") from None
            if not isinstance(d, dict) or "models" not in d or "config" not in d:
                if os.path.isdir(p):
                    continue  # other JSON files in a run folder
                raise DeepError(f"{f} is not a results file (no 'config'/'models'); pass results.json files")
            problem = check_result(d)
            if problem:
                raise DeepError(f"{f} is not a valid results file: {problem}; pass results.json files written by "
                                 f"python -m deep")
            bad = sorted(non_finite(d["models"]))
            if bad:
                shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                print(f"note: {f} ({d['config']['name']}, seed {d.get('seed')}): {shown} not finite (a diverged run?); "
                      f"left out of the means and counts (n=)", file=sys.stderr)
            d["_file"] = f
            out.append(d)
    if not out:
        raise DeepError("no results files found; pass results.json files or run folders")
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_result(d: dict) -> str | None:
    """What is wrong with results dict `d` for the table (None if nothing): config.name a string, seed an integer
    (or absent), models an object of model -> {BatchNorm rule -> metrics object (or a list of them, one per
    member)}, metric values numbers or null, and ood an object of OOD set -> object of numbers."""
    if not isinstance(d["config"], dict) or not isinstance(d["config"].get("name"), str):
        return "'config' must be an object with a string 'name'"
    if d.get("seed") is not None and not (isinstance(d["seed"], int) and not isinstance(d["seed"], bool)):
        return f"'seed' must be an integer, got {d['seed']!r}"
    if not isinstance(d["models"], dict):
        return f"'models' must be an object (model name -> metrics), got {type(d['models']).__name__}"
    for model, by_rule in d["models"].items():
        if not isinstance(by_rule, dict) or not by_rule:
            return f"models.{model} must be an object of BatchNorm rule -> metrics"
        for rule, m in by_rule.items():
            for entry in (m if isinstance(m, list) else [m]):
                if not isinstance(entry, dict):
                    return f"models.{model}.{rule} must be an object of metrics (or a list of them)"
                for k, v in entry.items():
                    if k == "ood":
                        ok = isinstance(v, dict) and all(isinstance(o, dict) and all(
                            _is_number(x) or x is None for x in o.values()) for o in v.values())
                        if not ok:
                            return f"models.{model}.{rule}.ood must map OOD sets to objects of numbers"
                    elif not (_is_number(v) or v is None):
                        return f"models.{model}.{rule}.{k} must be a number, got {v!r}"
    return None


def non_finite(models: dict, prefix: str = "") -> list[str]:
    """The metric paths (model.rule.metric, member index, ood set) whose values are NaN or infinite."""
    out = []
    for k, v in (models.items() if isinstance(models, dict) else enumerate(models)):
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            out += non_finite(v, path)
        elif _is_number(v) and not math.isfinite(v):
            out.append(f"{path} = {v}")
    return out


def default_rule(config: dict) -> str:
    """The BatchNorm rule of the reference protocol for a config: re-estimated statistics for SWA configs, the stored
    ones otherwise."""
    return "reestimated" if (config.get("swa_start") or 0) > 0 else "stored"


def entries(r: dict, model: str, rule: str | None):
    """The metrics of ``model`` in result ``r`` under ``rule`` (None: the config's default rule): a dict, a list
    (members), or None. A model without the rule (no BatchNorm) falls back to its stored metrics."""
    by_rule = r["models"].get(model)
    if not isinstance(by_rule, dict):
        return None
    rule = rule or default_rule(r["config"])
    if rule not in by_rule and rule == "reference":
        rule = "stored"  # the reference rule exists for the averaged late-phase model only: the others are stored
    if rule not in by_rule and list(by_rule) == ["stored"]:
        rule = "stored"
    return by_rule.get(rule)


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


def metric_of(r, model: str, metric: str, rule: str | None = None):
    m = entries(r, model, rule)
    return m.get(metric) if isinstance(m, dict) else None


def _auroc(rows, score: str) -> str:
    """One table cell: the mean (± std) of OOD AUROC `score` over `rows` per OOD set."""
    oods = sorted({k for m in rows for k in m.get("ood", {})})
    per_set = {o: [m["ood"][o].get(score) for m in rows if o in m.get("ood", {})] for o in oods}
    return "; ".join(f"{o}: {_fmt(_stat(v), 1)}" for o, v in per_set.items()) or "—"


def _rule_label(rule: str | None, configs) -> str:
    if rule:
        return rule
    rules = sorted({default_rule(c) for c in configs})
    return " / ".join(rules) + " (the reference protocol's per config)"


def render(results, rule: str | None = None) -> str:
    by = group(results)
    lines = [f"BatchNorm statistics: {_rule_label(rule, [r['config'] for r in results])}", "",
             "| setting | paper: base | ours: base | paper: late-phase | ours: late-phase (averaged) | "
             "ours: late-phase ensemble |", "|---|---:|---:|---:|---:|---:|"]
    for label, metric, base, late, p_base, p_late in PAPER_ROWS:
        if base not in by and late not in by:
            continue
        digits = 3 if metric.startswith("bpc") else 2
        ours_b = _stat([metric_of(r, "averaged", metric, rule) for r in by.get(base, [])])
        ours_l = _stat([metric_of(r, "averaged", metric, rule) for r in by.get(late, [])])
        ours_e = _stat([metric_of(r, "ensemble", metric, rule) for r in by.get(late, [])])
        lines.append(f"| {label} | {_paper(p_base, digits)} | {_fmt(ours_b, digits)} | {_paper(p_late, digits)} | "
                     f"{_fmt(ours_l, digits)} | {_fmt(ours_e, digits)} |")
    # Every metric of every config, averaged model / ensemble / mean member.
    lines += ["", "| config | rule | model | accuracy (%) | NLL | ECE (%) | OOD AUROC entropy (%) | "
                  "OOD AUROC max-softmax (%) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in sorted(by):
        runs = by[name]
        shown = rule or default_rule(runs[0]["config"])
        for model in ("averaged", "ensemble", "members"):
            rows = []
            for r in runs:
                m = entries(r, model, rule)
                if m is None:
                    continue
                rows.extend(m if isinstance(m, list) else [m])
            if not rows or "accuracy" not in rows[0]:
                continue
            label = "members (each)" if model == "members" else model
            lines.append(f"| {name} | {shown} | {label} | {_fmt(_stat([m.get('accuracy') for m in rows]))} | "
                         f"{_fmt(_stat([m.get('nll') for m in rows]), 3)} | "
                         f"{_fmt(_stat([m.get('ece') for m in rows]))} | "
                         f"{_auroc(rows, 'auroc_entropy')} | {_auroc(rows, 'auroc_max_softmax')} |")
    seeds = {name: sorted({r.get("seed") for r in runs}, key=lambda s: (s is None, s or 0))
             for name, runs in by.items()}
    lines += ["", "Seeds: " + "; ".join(f"{k}: {v}" for k, v in sorted(seeds.items()))]
    return "\n".join(lines)
