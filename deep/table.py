"""`python -m deep table RESULTS...`: aggregate results JSON files over seeds into markdown tables laid out like
the paper's, with the paper's numbers beside ours.

Runs are grouped by their full effective config, not by name: runs of one preset with different overrides are
different rows, labelled with the overridden fields. Only runs that follow a paper preset's protocol exactly (no
overridden field except the execution ones, trained to the last epoch) appear beside the paper's numbers; the others
are listed with their overrides below. Repeated seeds within a group are reported on stderr, and so are results
whose metrics are not finite (they are left out of the means).

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
    """The results files among `paths` (results JSON files, or folders searched recursively for results.json), each
    read once (by real path) and checked (:func:`check_result`); raises DeepError naming a bad file."""
    from .config import upgrade
    out, seen = [], set()
    for p in paths:
        if os.path.isdir(p):
            files = sorted(os.path.join(root, "results.json") for root, _, names in os.walk(p)
                           if "results.json" in names)
        else:
            files = [p]
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
            d["config"] = upgrade(d["config"])  # older sentinels (-1 for "same as lr") read as today's
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
    for k in ("epochs", "swa_start", "T0", "K"):  # the fields the tables and plots compute with
        if d["config"].get(k) is not None and not _is_number(d["config"][k]):
            return f"config.{k} must be a number, got {d['config'][k]!r}"
    phi = d["config"].get("phi")
    if phi is not None and not (isinstance(phi, list) and all(isinstance(p, str) for p in phi)):
        return f"config.phi must be a list of family names, got {phi!r}"
    if d.get("epochs_trained") is not None and not _is_number(d["epochs_trained"]):
        return f"'epochs_trained' must be a number, got {d['epochs_trained']!r}"
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
                    if k in ("reliability", "ood_mean"):
                        continue
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


# fields that change how a run executes, not what it computes (kept out of the grouping and the protocol check)
EXECUTION_FIELDS = ("bf16", "channels_last", "compile", "path", "eval_batch_size", "workers")
LATE_FIELDS = ("K", "T0", "gamma_theta", "sigma0", "lr_phi", "weight_decay_phi", "rank1_layers")


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


def _preset_of(config: dict):
    """The preset a config derives from: its name's, or for a fine-tuning of another torchvision model
    (imagenet_ARCH[_base]) the ResNet-50 preset of the same kind (None if there is none)."""
    from .config import PRESETS
    name = config.get("name", "")
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("imagenet_"):
        return PRESETS["imagenet_resnet50" + ("_base" if name.endswith("_base") else "")]
    return None


def _effective(config: dict) -> dict:
    """The fields that determine what a run computes: without the execution fields and, for a run without late-phase
    weights, without the late-phase settings."""
    return {k: v for k, v in config.items() if k != "name" and k not in EXECUTION_FIELDS
            and (config.get("phi") or k not in LATE_FIELDS)}


def overrides(config: dict) -> dict:
    """The effective fields of ``config`` that differ from its preset (see :func:`_preset_of`; {} when there is no
    preset to compare with)."""
    preset = _preset_of(config)
    if preset is None:
        return {}
    base = preset.to_dict()
    return {k: v for k, v in _effective(config).items() if base.get(k) != v}


def _complete(r: dict) -> bool:
    trained = r.get("epochs_trained")
    return trained is None or trained >= r["config"].get("epochs", 0)


def follows_paper(r: dict) -> bool:
    """Whether a result follows its preset's protocol exactly: a preset name, no overrides, trained to the end."""
    from .config import PRESETS
    return r["config"].get("name") in PRESETS and not overrides(r["config"]) and _complete(r)


def _label(name: str, config: str, complete: bool) -> str:
    """The config name with its overridden fields, e.g. fmnist_bn (K=4, arch=wrn-10-2)."""
    fields = overrides({"name": name, **json.loads(config)})
    text = name + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())) + ")" if fields else "")
    return text + ("" if complete else " [interrupted]")


def group(results) -> dict:
    """(name, effective config as JSON, complete) -> the results of one effective config; repeated seeds are noted on
    stderr."""
    by = defaultdict(list)
    for r in results:
        by[(r["config"]["name"], json.dumps(_effective(r["config"]), sort_keys=True), _complete(r))].append(r)
    for key, runs in by.items():
        seeds = [r.get("seed") for r in runs]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=lambda s: (s is None, s or 0))
        if repeated:
            files = ", ".join(r["_file"] for r in runs if r.get("seed") in repeated)
            print(f"note: {_label(*key)}: seed(s) {repeated} appear more than once ({files}); every run counts, so "
                  f"check that these are different runs", file=sys.stderr)
    return by


def metric_of(r, model: str, metric: str, rule: str | None = None):
    m = entries(r, model, rule)
    return m.get(metric) if isinstance(m, dict) else None


def _mean(values, what: str, digits: int = 2) -> str:
    """The mean ± std (n) cell of ``values``; non-finite values are left out (each was noted, naming its file, when
    the results were read)."""
    return _fmt(_stat(values), digits)


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


def _kind(runs) -> str | None:
    for r in runs:
        m = entries(r, "averaged", None)
        if isinstance(m, dict):
            return "accuracy" if "accuracy" in m else "bpc" if "bpc_test" in m else None
    return None


def _rows(runs, rule):
    """(model label, [metrics of every run (every member)]) for the averaged model, the ensemble and the members."""
    out = []
    for model in ("averaged", "ensemble", "members"):
        rows = []
        for r in runs:
            m = entries(r, model, rule)
            if m is not None:
                rows.extend(m if isinstance(m, list) else [m])
        if rows:
            out.append(("members (each)" if model == "members" else model, rows))
    return out


def render(results, rule: str | None = None) -> str:
    by = group(results)
    paper = {key[0]: runs for key, runs in by.items() if all(follows_paper(r) for r in runs)}
    lines = [f"BatchNorm statistics: {_rule_label(rule, [r['config'] for r in results])}", "",
             "| setting | paper: base | ours: base | paper: late-phase | ours: late-phase (averaged) | "
             "ours: late-phase ensemble |", "|---|---:|---:|---:|---:|---:|"]
    for label, metric, base, late, p_base, p_late in PAPER_ROWS:
        if base not in paper and late not in paper:
            continue
        digits = 3 if metric.startswith("bpc") else 2

        def cell(name, model):
            return _mean([metric_of(r, model, metric, rule) for r in paper.get(name, [])], f"{name} {model}",
                         digits)
        lines.append(f"| {label} | {_paper(p_base, digits)} | {cell(base, 'averaged')} | {_paper(p_late, digits)} | "
                     f"{cell(late, 'averaged')} | {cell(late, 'ensemble')} |")
    if len(lines) == 4:
        lines[2:] = ["No run follows a paper preset's protocol exactly, so none is shown beside the paper's numbers."]
    lines += ["", "Beside the paper's numbers: only runs that follow a preset's protocol exactly. Below: every run, "
                  "grouped by its effective config (overridden fields in parentheses)."]
    groups = sorted(by.items())
    classification = [(k, v) for k, v in groups if _kind(v) == "accuracy"]
    if classification:
        lines += ["", "| config | rule | model | accuracy (%) | NLL | ECE (%) | OOD AUROC entropy (%) | "
                      "OOD AUROC max-softmax (%) |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for key, runs in classification:
            shown = rule or default_rule(runs[0]["config"])
            for model, rows in _rows(runs, rule):
                what = f"{_label(*key)} {model}"
                lines.append(f"| {_label(*key)} | {shown} | {model} | "
                             f"{_mean([m.get('accuracy') for m in rows], what)} | "
                             f"{_mean([m.get('nll') for m in rows], what, 3)} | "
                             f"{_mean([m.get('ece') for m in rows], what)} | "
                             f"{_auroc(rows, 'auroc_entropy')} | {_auroc(rows, 'auroc_max_softmax')} |")
    text = [(k, v) for k, v in groups if _kind(v) == "bpc"]
    if text:
        lines += ["", "| config | model | bits/char valid | bits/char test |", "|---|---|---:|---:|"]
        for key, runs in text:
            for model, rows in _rows(runs, rule):
                what = f"{_label(*key)} {model}"
                lines.append(f"| {_label(*key)} | {model} | {_mean([m.get('bpc_valid') for m in rows], what, 3)} | "
                             f"{_mean([m.get('bpc_test') for m in rows], what, 3)} |")
    seeds = {_label(*key): sorted({r.get("seed") for r in runs}, key=lambda s: (s is None, s or 0))
             for key, runs in by.items()}
    lines += ["", "Seeds: " + "; ".join(f"{k}: {v}" for k, v in sorted(seeds.items()))]
    return "\n".join(lines)
