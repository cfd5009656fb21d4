"""`python -m deep plot RUN... --out fig.png`: learning curves and reliability diagrams of one or more runs.

Top row, per epoch: the training loss, the run's quick metric (test accuracy of the averaged model, or validation bits
per character) and theta's learning rate, every run overlaid, with the release (T0) and the SWA start marked. Bottom
row (classification runs with results): reliability diagrams -- accuracy against confidence per confidence bin -- of
the averaged model, the ensemble and the members, under the BatchNorm rule the table shows for each run.
"""
from __future__ import annotations

import os

from .errors import DeepError
from .untrusted import loads, read_bytes, read_json, write_png

METRICS = (("test_accuracy", "test accuracy of the averaged model (%)"),
           ("bpc_valid", "validation bits per character (averaged model)"))


def _read_run(folder: str) -> dict:
    """A run folder's log, stored config and results (if any), each checked: a damaged or hand-edited file is one
    DeepError line naming it (files are read without following links, deep.untrusted)."""
    from .table import check_result
    bad = f"{folder} is not a run folder with a readable log.jsonl and config.json"
    try:
        log = [loads(line) for line in read_bytes(os.path.join(folder, "log.jsonl")).splitlines() if line.strip()]
        stored = read_json(os.path.join(folder, "config.json"))
    except (OSError, ValueError, RecursionError):
        raise DeepError(bad) from None
    if not all(isinstance(e, dict) and _num(e.get("epoch")) is not None for e in log):
        raise DeepError(f"{os.path.join(folder, 'log.jsonl')} has lines that are not epoch entries (an object with a "
                        f"numeric epoch); it was damaged or edited")
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) or \
            not isinstance(stored["config"].get("name"), str):
        raise DeepError(f"{os.path.join(folder, 'config.json')} is not a run's config.json (an object with a config "
                        f"object holding a name)")
    problem = check_result({"config": stored["config"], "models": {}})
    if problem:
        raise DeepError(f"{os.path.join(folder, 'config.json')} is damaged ({problem})")
    results = None
    path = os.path.join(folder, "results.json")
    if os.path.lexists(path):
        try:
            results = read_json(path)
        except (OSError, ValueError):
            raise DeepError(f"{path} cannot be read as JSON; delete it or re-run `python -m deep evaluate`") from None
        problem = "not an object with config and models" if not isinstance(results, dict) or \
            "models" not in results or "config" not in results else check_result(results)
        if problem:
            raise DeepError(f"{path} is not a valid results file ({problem}); delete it or re-run `python -m deep "
                            f"evaluate`")
    from .config import upgrade  # older sentinels (-1 for "same as lr") read as today's, to compare runs alike
    return {"folder": folder, "log": [e for e in log if e.get("phase") != "pretrained"],
            "config": upgrade(stored["config"]),
            "seed": stored.get("seed"), "results": results}


def _num(v):
    """``v`` if it is a number (not a bool), else None: a hand-edited file may hold anything."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


LATE_FIELDS = ("K", "T0", "gamma_theta", "sigma0", "lr_phi", "weight_decay_phi", "weight_decay_theta",
               "batch_size_late", "rank1_layers", "path")


def _effective(cfg: dict) -> dict:
    """The fields that matter for a run: without late-phase weights, the late-phase settings do not."""
    from .config import SAME_AS, unset
    out = {k: v for k, v in cfg.items() if k != "name" and (cfg.get("phi") or k not in LATE_FIELDS)}
    for k, ref in SAME_AS.items():  # an unset field is the field it stands for: the legend shows the value used
        if k in out and unset(k, out[k]):
            out[k] = cfg.get(ref)
    out["phi"] = "+".join(cfg.get("phi") or []) or "none"
    return out


def _label(run: dict, others: list) -> str:
    """A short legend entry: the config name, the fields that differ between the plotted runs, and the seed."""
    mine, theirs = _effective(run["config"]), [_effective(o["config"]) for o in others]
    differ = [k for k in mine if k != "phi" and any(k in t and t[k] != mine[k] for t in theirs)]
    extra = ", ".join(f"{k}={mine[k]}" for k in differ[:4])
    return f"{run['config']['name']}" + (f" ({extra})" if extra else "") + f" s{run['seed']}"


def plot_runs(folders: list, out: str) -> None:
    """Write the figure of the module doc for the run folders ``folders`` to the PNG file ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from .table import default_rule, entries

    if not out.lower().endswith(".png"):
        raise DeepError(f"--out {out}: the figure is a PNG file; give a name ending in .png")
    runs = [_read_run(f) for f in folders]
    metric, metric_label = next(((k, lbl) for k, lbl in METRICS if any(k in e for r in runs for e in r["log"])),
                                (None, None))
    classifiers = [r for r in runs if r["results"] and "accuracy" in (entries(r["results"], "averaged", None) or {})]
    fig, axes = plt.subplots(2 if classifiers else 1, 3, figsize=(15, 8.5 if classifiers else 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    marks = {}  # what the drawn marks mean: named in the legend, only those drawn (in a panel they hid the curves)
    for i, run in enumerate(runs):
        color, label = colors[i % len(colors)], _label(run, runs)
        epochs = [e["epoch"] for e in run["log"]]
        cfg = run["config"]
        panels = [("loss", "training loss"), (metric, metric_label), ("lr", "theta's learning rate")]
        for ax, (key, title) in zip(axes[0], panels):
            # the epochs that have the value (test metrics are logged every eval_every epochs; a hand-edited log may
            # hold anything: only numbers are drawn)
            pts = [(x, _num(e.get(key))) for x, e in zip(epochs, run["log"]) if key and _num(e.get(key)) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=color, label=label)
            swa = [(x, _num(e.get("swa_test_accuracy"))) for x, e in zip(epochs, run["log"])
                   if key == "test_accuracy" and _num(e.get("swa_test_accuracy")) is not None]
            if swa:  # the SWA average the run delivers, beside the current weights
                ax.plot(*zip(*swa), "s:", ms=3, color=color)
                marks["squares: the SWA average (test accuracy)"] = {"ls": ":", "marker": "s"}
            ax.set_title(title or "")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if cfg.get("phi") and (_num(cfg.get("T0")) or 0) > 0:
                ax.axvline(cfg["T0"] + 0.5, color=color, ls="--", lw=1, alpha=0.7)
                marks["release of the late-phase weights (T0)"] = {"ls": "--"}
            if (_num(cfg.get("swa_start")) or 0) > 0:
                ax.axvline(cfg["swa_start"] - 0.5, color=color, ls=":", lw=1, alpha=0.7)
                marks["SWA start"] = {"ls": ":"}
        axes[0][2].set_yscale("log")
    if classifiers:
        for ax, model in zip(axes[1], ("averaged", "ensemble", "members")):
            ax.plot([0, 1], [0, 1], color="gray", lw=1)
            for i, run in enumerate(runs):
                if run not in classifiers:
                    continue
                m = entries(run["results"], model, None)
                if m is None:
                    continue
                rule = default_rule(run["config"])
                for j, one in enumerate(m if isinstance(m, list) else [m]):
                    rel = one.get("reliability")
                    try:
                        pts = [(c, a, f) for c, a, f in zip(rel["confidence"], rel["accuracy"], rel["fraction"])
                               if c is not None]
                    except (TypeError, KeyError):
                        continue  # no diagram (or a damaged one): not drawn
                    if not pts or not all(_num(x) is not None for p in pts for x in p):
                        continue
                    conf, acc, frac = zip(*pts)
                    color = colors[i % len(colors)]
                    ax.plot(conf, acc, "-", lw=1 if model == "members" else 1.5,
                            alpha=0.4 if model == "members" else 1.0, color=color,
                            label=f"{_label(run, runs)} [{rule}]" if j == 0 else None)
                    ax.scatter(conf, acc, s=[8 + 300 * f for f in frac], color=color, alpha=0.6, zorder=3)
            ax.set_title(f"reliability: {model}\n(marker area: share of examples)", fontsize=10)  # within the panel
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
    # One legend for all panels (a run has one colour everywhere), below them: inside a panel it hid the curves.
    handles, labels = [], []
    for ax in (axes[1][0], axes[0][0]) if classifiers else (axes[0][0],):
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            if not any(lbl.split(" [")[0] == seen.split(" [")[0] for seen in labels):
                handles.append(h)
                labels.append(lbl)
    for what, style in marks.items():  # each run's marks are in its colour; the legend names the style in gray
        handles.append(Line2D([], [], color="gray", lw=1, ms=3, **style))
        labels.append(what)
    rows = -(-len(labels) // 2)
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
    try:
        write_png(fig, out, dpi=110)  # atomically: a link at --out is replaced, its target untouched
    except OSError as e:
        raise DeepError(f"--out {out}: cannot write the figure ({e.strerror or e})") from None
    finally:
        plt.close(fig)
