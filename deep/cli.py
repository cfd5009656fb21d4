"""Command line: python -m deep {train,finetune,table,bench,configs}.

User mistakes (an unknown config, flag or key, missing data or weights, a bad resume) exit with status 2 and one line;
flags are never abbreviated (``--T 3`` is an error, not ``--T0 3``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading

from nqp.console import Parser as _Parser
from nqp.console import Stdout as _Stdout
from nqp.console import StdoutError as _StdoutError
from nqp.console import fail as _fail
from nqp.console import silence_stdout as _silence_stdout
from shared.checkpoint import WriteError

from .config import (CONFIG_CLASSES, PRESETS, FinetuneConfig, ImageConfig, add_config_flags, check_seed, describe,
                     flag_name, show, get_config, overrides_from_args, with_overrides)
from .errors import ConfigError, DeepError
from .runfolder import check_out_value, default_out


def _user_errors():
    """Exception types that are the user's to fix (printed in one line, exit 2)."""
    from shared import LatePhaseError
    return (DeepError, LatePhaseError)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0; --resume: the run's)")
    p.add_argument("--data-dir", default="data", help="folder holding the datasets (default: data)")
    p.add_argument("--out", default=None, help="run folder (default: runs/CONFIG_seedSEED)")
    p.add_argument("--download", action="store_true", help="download missing datasets or weights (needs internet)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its stored config (flags given must "
                        "agree with it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no console lines (the log and results files are written)")
    p.add_argument("--json", action="store_true",
                   help="print the final models' metrics as JSON on stdout (console lines go to stderr)")
    p.add_argument("--export", choices=("all", "averaged", "none"), default="all",
                   help="final networks written to RUN/export/ as plain state_dicts: the averaged model and every "
                        "member (all, default), the averaged model only, or none")


def _summary(result: dict) -> dict:
    """The final metrics without the OOD details: {model: {rule: metrics or [metrics]}}."""
    def strip(m):
        return [strip(x) for x in m] if isinstance(m, list) else {k: v for k, v in m.items() if k not in
                                                                  ("ood", "ood_mean", "reliability")}
    return {name: {rule: strip(m) for rule, m in by_rule.items()} for name, by_rule in result["models"].items()}


def _stored_run(out: str) -> dict:
    if os.path.isfile(out):
        raise DeepError(f"--resume: --out {out} is a file, not a run folder; give the run's folder")
    path = os.path.join(out, "config.json")
    try:
        with open(path) as f:
            stored = json.load(f)
        CONFIG_CLASSES[stored["kind"]]
        if not isinstance(stored["config"], dict):
            raise TypeError("config")
        stored["seed"]
    except (FileNotFoundError, NotADirectoryError):
        raise DeepError(f"--resume: no run in {out} (no config.json); start the run without --resume") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise DeepError(f"--resume: {path} is not a run's config.json; choose the run's folder with --out") from None
    return stored


def _config_class(argv: list) -> type:
    """The config class whose fields are the flags of ``train``: the preset's (--config), or the stored run's
    (--resume --out). Anything wrong here is reported later by the full parse."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    a, _ = pre.parse_known_args(argv[1:])
    if a.config in PRESETS:
        return type(PRESETS[a.config])
    if a.resume and a.out:
        try:
            return CONFIG_CLASSES[_stored_run(a.out)["kind"]]
        except DeepError:
            pass
    return ImageConfig


def resolve(a: argparse.Namespace, cls: type, base=None):
    """(config, seed) of a train/finetune command: a preset (or ``base``) with the flags given applied, or for
    --resume the stored config, refusing only flags that contradict it."""
    given = overrides_from_args(a, cls)
    if a.out is not None:
        a.out = check_out_value(a.out)
    if a.resume:
        if a.out is None:
            if a.config is None and base is None:
                raise DeepError("--resume needs --out (the run folder) or the --config and --seed it was started with")
            name = base.name if base is not None else a.config
            a.out = default_out(name, a.seed or 0)
        stored = _stored_run(a.out)
        try:
            cfg = CONFIG_CLASSES[stored["kind"]].from_dict(stored["config"])
        except (ConfigError, TypeError) as e:
            raise DeepError(f"--resume: {os.path.join(a.out, 'config.json')} holds no valid config ({e}); resume "
                            f"with the run's own config.json, or start a new run") from None
        try:
            seed = check_seed(stored["seed"])
        except ConfigError as e:
            raise DeepError(f"--resume: {os.path.join(a.out, 'config.json')} holds no valid seed ({e}); resume "
                            f"with the run's own config.json, or start a new run") from None
        wanted = base.name if base is not None else a.config
        clash = [f"config: {cfg.name} -> {wanted}"] if wanted not in (None, cfg.name) else []
        clash += [f"seed: {seed} -> {a.seed}"] if a.seed not in (None, seed) else []
        if "eval_every" in given:  # how often the epochs are evaluated changes no weight: a resumed run may change it
            cfg = dataclasses.replace(cfg, eval_every=given.pop("eval_every"))
        clash += [f"{k}: {getattr(cfg, k)!r} -> {v!r}" for k, v in given.items() if getattr(cfg, k) != v]
        if clash:
            raise DeepError(f"--resume with different settings ({', '.join(clash[:4])}); drop those flags to "
                            f"continue the run, or start a new one in another --out")
        try:
            return cfg.validate(), seed
        except ConfigError as e:
            raise DeepError(f"--resume: {os.path.join(a.out, 'config.json')} holds no valid config ({e}); resume "
                            f"with the run's own config.json, or start a new run") from None
    if base is None:
        if a.config is None:
            raise ConfigError("train needs --config NAME (python -m deep configs lists them) or --resume --out RUN")
        return get_config(a.config, **given), a.seed or 0
    return with_overrides(base, given), a.seed or 0


def _run(a: argparse.Namespace, cfg, seed: int) -> int:
    from .finetune import FineTune
    from .images import ImageRun
    from .lm import LMRun
    run_cls = {"image": ImageRun, "text": LMRun, "finetune": FineTune}[cfg.KIND]
    out = a.out if a.out is not None else default_out(cfg.name, seed)
    try:
        with run_cls(cfg, seed=seed, data_dir=a.data_dir, out=out, device=a.device, resume=a.resume,
                     progress=not (a.no_progress or a.quiet) and sys.stderr.isatty(), download=a.download,
                     quiet=a.quiet, stream=sys.stderr if a.json else sys.stdout, export=a.export) as run:
            result = run.train()
    except KeyboardInterrupt as e:
        checkpoint = os.path.join(out, "checkpoint.pt")
        how = (f"continue it with --resume --out {out}" if os.path.isfile(checkpoint) else
               "no epoch was checkpointed yet: start the run again")
        raise Interrupted(f"{e.args[0] if e.args else 'interrupted'}; {how}") from None
    if run.rank == 0 and a.json:
        print(json.dumps({"config": cfg.name, "seed": seed, "models": _summary(result)}, indent=1))
    return 0


def cmd_train(a, cls) -> int:
    return _run(a, *resolve(a, cls))


def cmd_finetune(a, cls) -> int:
    arch = a.cfg_arch or "resnet50"
    suffix = "_base" if a.baseline else ""
    preset = PRESETS[f"imagenet_resnet50{suffix}"]
    base = dataclasses.replace(preset, arch=arch, name=f"imagenet_{arch}{suffix}")
    a.config = None
    return _run(a, *resolve(a, cls, base))


# The run-folder checks are shared with train --resume; their advice names train's flags, which evaluate has not.
_EVALUATE_WORDING = ((re.compile(r"^--resume with different settings \("), "the run's config.json and checkpoint.pt "
                      "disagree ("),
                     (re.compile(r"; resume with the run's own settings$"), "; the run folder was edited: evaluate an "
                      "unedited copy"),
                     (re.compile(r"^--resume: "), ""),
                     (re.compile(r"evaluate again with --resume"), "evaluate again"),
                     (re.compile(r"start the run without --resume$"), "give the folder of a run of python -m deep "
                      "train that has finished an epoch"),
                     (re.compile(r"delete it to start afresh, or choose another --out$"), "this run cannot be "
                      "evaluated"),
                     (re.compile(r"choose the run's folder with --out$"), "give the run's folder"),
                     (re.compile(r"([,:;]) (or )?choose another --out$"), r"\1 \2give another run folder"),
                     (re.compile(r"^--out "), "the run folder "))


def _evaluate_wording(message: str) -> str:
    for pattern, repl in _EVALUATE_WORDING:
        message = pattern.sub(repl, message)
    return message


def cmd_evaluate(a, cls) -> int:
    """Re-evaluate a finished or interrupted run from its folder alone (its stored config and checkpoint)."""
    try:
        return _evaluate(a)
    except DeepError as e:
        raise type(e)(_evaluate_wording(_one_line(e))) from None


# The files of a run folder that evaluate must never replace (its --name writes beside them).
RUN_FILES = ("config.json", "results.json", "log.jsonl", "checkpoint.pt", "trunk.pt", "predictions.pt", "lock",
             "export")


def _check_evaluate_name(name) -> None:
    """--name: a plain .json file name in the run folder, not one of the run's own files (a re-evaluation written
    over checkpoint.pt or results.json would destroy the run or change what it reports)."""
    if name is None:
        return
    if not name.endswith(".json") or os.path.basename(name) != name or name.startswith(".") or \
            any(ord(c) < 32 for c in name):
        raise DeepError(f"--name {name!r}: give a plain file name ending in .json (it is written in the run folder)")
    if name in RUN_FILES:
        raise DeepError(f"--name {name}: that is the run's own file; choose another name, e.g. results_again.json")


def _evaluate(a) -> int:
    _check_evaluate_name(a.name)
    from .finetune import FineTune
    from .images import ImageRun
    from .lm import LMRun
    from .trainer import ClassifierRun, has_batchnorm
    stored = _stored_run(a.run)
    try:
        cfg = CONFIG_CLASSES[stored["kind"]].from_dict(stored["config"]).validate()
    except (ConfigError, TypeError) as e:
        raise DeepError(f"{os.path.join(a.run, 'config.json')} holds no valid config ({e}); give the folder of a run "
                        f"of python -m deep train") from None
    run_cls = {"image": ImageRun, "text": LMRun, "finetune": FineTune}[cfg.KIND]
    if a.ood is not None or a.ood_folders is not None:
        if cfg.KIND != "image":
            raise DeepError(f"--ood and --ood-folders apply to image runs; {cfg.name} is a {cfg.KIND} run")
        cfg = with_overrides(cfg, {k: tuple(v) for k, v in (("ood", a.ood), ("ood_folders", a.ood_folders))
                                   if v is not None})
        for name, path in cfg.ood_folder_paths():
            if not os.path.isdir(path):
                raise DeepError(f"--ood-folders {name}={path}: no such folder; give a folder of images")
    run = run_cls(cfg, seed=stored["seed"], data_dir=a.data_dir, out=a.run, device=a.device, resume=True,
                  progress=False, quiet=a.quiet, stream=sys.stderr if a.json else sys.stdout, evaluate_only=True)
    with run:
        return _evaluate_run(a, cfg, stored, run, isinstance(run, ClassifierRun), has_batchnorm)


def _evaluate_run(a, cfg, stored, run, classifier: bool, has_batchnorm) -> int:
    if a.ood is not None or a.ood_folders is not None:
        asked = (a.ood or []) + [n for n, _ in cfg.ood_folder_paths()]
        missing = [f"{k} ({run.ood_missing[k]})" for k in asked if k in getattr(run, "ood_missing", {})]
        if missing:  # a results file named after a set it does not hold would be a silent wrong answer
            raise DeepError(f"the OOD set(s) asked for cannot be read: {'; '.join(missing)}; fix --ood/--ood-folders")
    if a.bn_rule and classifier:
        late = run.lp.model if run.lp is not None else None
        bn = has_batchnorm(late if late is not None else run.model)
        usable = [r for r in a.bn_rule if (bn or r == "stored") and (r != "reference" or late is not None)]
        if not usable:
            why = ("the reference rule is that of the averaged late-phase model, and this run has no late-phase "
                   "weights (yet)" if late is None and bn else "this model has no BatchNorm: its only rule is stored")
            raise DeepError(f"--bn-rule {' '.join(a.bn_rule)}: nothing to evaluate: {why}; choose --bn-rule stored"
                            + (" or reestimated" if bn else ""))
    sets = list(cfg.ood) + [n for n, _ in cfg.ood_folder_paths()] if a.ood is not None or a.ood_folders else []
    name = a.name or "results_" + "_".join(a.bn_rule or ("all",)) + (f"_ood-{'-'.join(sets)}" if sets else "") + \
        ".json"
    result = run.evaluate(a.bn_rule, filename=name)
    if run.rank == 0 and a.json:
        print(json.dumps({"config": cfg.name, "seed": stored["seed"], "models": _summary(result)}, indent=1))
    return 0


def cmd_plot(a, cls) -> int:
    from .plots import plot_runs
    plot_runs(a.runs, a.out)
    print(a.out)
    return 0


def cmd_study(a, cls) -> int:
    from .study import STUDIES, load_spec
    if a.list:
        for name, spec in sorted(STUDIES.items()):
            arms = ", ".join(f"{arm.name}=ensemble of {arm.size} {arm.ensemble_of} runs" if arm.ensemble_of else
                             f"{arm.name}={arm.config}" + (f"{arm.overrides}" if arm.overrides else "")
                             for arm in spec.arms)
            print(f"{name}: seeds {list(spec.seeds)}; baseline {spec.baseline}; arms {arms}. {spec.description}")
        return 0
    if a.spec is None or a.out is None:
        raise ConfigError("study needs SPEC (a named study or a JSON file; --list names them) and --out DIR")
    a.out = check_out_value(a.out)
    from .launch import study_command
    return study_command(a, load_spec(a.spec))


def cmd_table(a, cls) -> int:
    from .table import load_results, render
    try:
        results = load_results(a.results)
    except RecursionError:  # JSON nested deeper than the parser's recursion limit: not a results file
        raise DeepError(f"a file among {' '.join(a.results)} is nested too deeply to be a results file; pass "
                        f"results.json files written by python -m deep") from None
    print(render(results, a.bn_rule))
    return 0


def cmd_configs(a, cls) -> int:
    if a.name:
        cfg = get_config(a.name)
        print(json.dumps(cfg.to_dict(), indent=1) if a.json else show(cfg))
    else:
        print(describe())
    return 0


def cmd_bench(a, cls) -> int:
    from .bench import main as bench_main
    return bench_main(a)


def make_parser(train_cls: type = ImageConfig) -> argparse.ArgumentParser:
    p = _Parser(prog="python -m deep", description="Deep benchmarks of late-phase weights.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train and evaluate one config (results.json in --out)")
    t.add_argument("--config", default=None, help="preset name (python -m deep configs lists them)")
    _run_arguments(t)
    add_config_flags(t, train_cls)
    t.set_defaults(func=cmd_train, cls=train_cls)

    f = sub.add_parser("finetune", help="ImageNet late-phase BatchNorm fine-tuning of a pretrained torchvision model "
                                        "(the imagenet_ARCH presets)")
    f.add_argument("--baseline", action="store_true",
                   help="no late-phase weights: fine-tune with one member (the paper's base column)")
    _run_arguments(f)
    add_config_flags(f, FinetuneConfig)
    f.set_defaults(func=cmd_finetune, cls=FinetuneConfig)

    ev = sub.add_parser("evaluate", help="re-evaluate a finished or interrupted run from its folder (no retyping); "
                                         "writes a results file beside the original")
    ev.add_argument("run", help="the run folder (holding config.json and checkpoint.pt)")
    ev.add_argument("--bn-rule", nargs="+", choices=("stored", "reestimated", "reference"), default=None,
                    help="BatchNorm rules to evaluate (default: all)")
    ev.add_argument("--ood", nargs="*", default=None, help="OOD sets instead of the run's (image runs)")
    ev.add_argument("--ood-folders", nargs="*", default=None,
                    help="OOD image folders instead of the run's, NAME=PATH or PATH (e.g. LSUN-resize)")
    ev.add_argument("--data-dir", default="data", help="folder holding the datasets (default: data)")
    ev.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ev.add_argument("--name", default=None, help="results file name in the run folder (default: "
                                                 "results_RULES[_ood-SETS].json)")
    ev.add_argument("--quiet", action="store_true", help="no console lines")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    ev.set_defaults(func=cmd_evaluate, cls=None)

    pl = sub.add_parser("plot", help="learning curves and reliability diagrams of one or more runs (PNG)")
    pl.add_argument("runs", nargs="+", help="run folders (holding log.jsonl and results.json)")
    pl.add_argument("--out", required=True, help="the PNG file to write")
    pl.set_defaults(func=cmd_plot, cls=None)

    st = sub.add_parser("study", help="every arm x seed of a study (resumable; shared first epochs where exact) and "
                                      "its report with paired statistics and plots")
    st.add_argument("spec", nargs="?", help="a named study (--list) or a JSON spec file")
    st.add_argument("--out", default=None, help="the study folder (runs in OUT/ARM/seedS, report in OUT)")
    st.add_argument("--data-dir", default="data", help="folder holding the datasets (default: data)")
    st.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    st.add_argument("--quiet", action="store_true", help="no console lines")
    st.add_argument("--report-only", action="store_true", help="only (re)write the report of the finished runs")
    st.add_argument("--eval-every", type=int, default=None, metavar="N",
                    help="the per-epoch test metrics of every run every N epochs (the last epoch and the final "
                         "evaluation always run; default: each arm's eval_every)")
    st.add_argument("--list", action="store_true", help="list the named studies")
    from .launch import add_arguments as launch_arguments  # --workers, --devices, --launcher slurm, --status
    launch_arguments(st)
    st.set_defaults(func=cmd_study, cls=None)

    tb = sub.add_parser("table", help="aggregate results.json files over seeds into markdown tables")
    tb.add_argument("results", nargs="+", help="results.json files or run folders")
    tb.add_argument("--bn-rule", choices=("stored", "reestimated", "reference"), default=None,
                    help="BatchNorm rule of the numbers shown (default: the reference protocol's for each config: "
                         "reestimated for SWA configs, stored otherwise)")
    tb.set_defaults(func=cmd_table, cls=None)

    c = sub.add_parser("configs", help="list the presets, or print one (a field a line; --json: as JSON)")
    c.add_argument("name", nargs="?")
    c.add_argument("--json", action="store_true", help="print the preset as the JSON config.json stores")
    c.set_defaults(func=cmd_configs, cls=None)

    from .bench import add_arguments as bench_args
    b = sub.add_parser("bench", help="images/s of plain SGD vs late-phase (vectorized, sequential), side by side")
    bench_args(b)
    b.set_defaults(func=cmd_bench, cls=None)
    return p


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with the line saying what became of the run."""


def _terminate(signum, frame):
    raise KeyboardInterrupt("terminated (SIGTERM)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _terminate)  # a clean end: locks released, no temporary files
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        cls = _config_class(argv) if argv[:1] == ["train"] else ImageConfig
        a = make_parser(cls).parse_args(argv)
        rc = a.func(a, a.cls)
        sys.stdout.flush()
        return rc
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (_fail(str(e.code)) if e.code else 0)
    except KeyboardInterrupt as e:
        return _fail(str(e) if isinstance(e, Interrupted) else (e.args[0] if e.args else "interrupted"))
    except _user_errors() as e:
        return _fail(_one_line(e))
    except BrokenPipeError:  # the reader of stdout went away (e.g. | head): nothing left to say
        _silence_stdout()
        return 0
    except _StdoutError as e:
        return _fail(f"cannot write the output to stdout: {e.args[0]}")
    except WriteError as e:
        return _fail(str(e))
    except OSError as e:  # a path the user gave that the OS refuses (no such file, permission, a folder, ...)
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else _one_line(e))
    except (MemoryError, RuntimeError) as e:
        line = _out_of_memory(e)
        if line is None:
            raise
        return _fail(line)
    finally:
        sys.stdout = stdout
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (CPU or CUDA), naming the bytes asked for; None for other errors."""
    text = str(e)
    if isinstance(e, MemoryError):
        return "out of memory (the run's data or model do not fit); lower --batch-size, --K or the model size"
    cpu = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)
    if cpu:
        return (f"out of CPU memory: an allocation of {int(cpu.group(1)) / 2 ** 30:.1f} GiB failed; lower "
                f"--batch-size, --eval-batch-size, --K or the model size")
    gpu = re.search(r"CUDA out of memory\. Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if gpu or "out of memory" in text.lower() and type(e).__name__ == "OutOfMemoryError":
        size = gpu.group(1) if gpu else "memory"
        return (f"out of GPU memory: an allocation of {size} failed; lower --batch-size, --eval-batch-size, --K or "
                f"the model size (or --accum for fine-tuning)")
    return None


def _one_line(e: BaseException) -> str:
    """The first line of `e`'s message (its type name if empty); for an error re-raised from a DataLoader worker
    ("Caught X in DataLoader worker process N. Original Traceback ..."), the original message."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(e).__name__


__all__ = ["main", "make_parser", "resolve", "flag_name"]
