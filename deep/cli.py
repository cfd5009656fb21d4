"""Command line: python -m deep {train,finetune,table,bench,configs}.

User mistakes (unknown config or key, missing data or weights, a bad resume) exit with status 2 and one line.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, add_config_flags, describe, get_config, overrides_from_args


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(_fail(f"{message} (see {self.prog} --help)"))


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _user_errors():
    """Exception types that are the user's to fix (printed in one line, exit 2)."""
    from shared import LatePhaseError

    from .bench import BenchError
    from .data import DataError
    from .finetune import FinetuneError
    from .table import TableError
    from .train import TrainError
    errs = [BenchError, ConfigError, DataError, FinetuneError, LatePhaseError, TableError, TrainError]
    try:
        from .models.torchvision_models import ModelError
        errs.append(ModelError)
    except ImportError:
        pass
    return tuple(errs)


def cmd_train(a) -> int:
    cfg = get_config(a.config, **overrides_from_args(a))
    kw = dict(seed=a.seed, data_dir=a.data_dir, out=a.out, download=a.download, device=a.device,
              progress=not a.no_progress and sys.stderr.isatty(), resume=a.resume)
    if cfg.dataset == "enwik8":
        from .lm import train as train_lm
        result = train_lm(cfg, **kw)
    else:
        from .train import train
        result = train(cfg, **kw)
    models = result["models"]
    summary = {name: {k: v for k, v in m.items() if k != "ood"} for name, m in models.items() if isinstance(m, dict)}
    print(json.dumps({"config": cfg.name, "seed": a.seed, "models": summary}, indent=1))
    return 0


def cmd_finetune(a) -> int:
    from .finetune import main as finetune_main
    return finetune_main(a)


def cmd_table(a) -> int:
    from .table import load_results, render
    print(render(load_results(a.results)))
    return 0


def cmd_configs(a) -> int:
    if a.name:
        print(json.dumps(get_config(a.name).to_dict(), indent=1))
    else:
        print(describe())
    return 0


def cmd_bench(a) -> int:
    from .bench import main as bench_main
    return bench_main(a)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m deep", description="Deep benchmarks of late-phase weights.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train and evaluate one config (results.json in --out)")
    t.add_argument("--config", required=True, help="preset name (python -m deep configs lists them)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", default="data", help="folder holding the datasets (default: data)")
    t.add_argument("--out", default=None, help="run folder (default: runs/CONFIG_seedSEED)")
    t.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    from .finetune import add_arguments as finetune_args
    f = sub.add_parser("finetune", help="ImageNet late-phase BatchNorm fine-tuning of a pretrained torchvision model")
    finetune_args(f)
    f.set_defaults(func=cmd_finetune)

    tb = sub.add_parser("table", help="aggregate results.json files over seeds into markdown tables")
    tb.add_argument("results", nargs="+", help="results.json files or run folders")
    tb.set_defaults(func=cmd_table)

    c = sub.add_parser("configs", help="list the presets, or print one as JSON")
    c.add_argument("name", nargs="?")
    c.set_defaults(func=cmd_configs)

    from .bench import add_arguments as bench_args
    b = sub.add_parser("bench", help="images/s of plain SGD vs late-phase (vectorized, sequential), side by side")
    bench_args(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    try:
        a = make_parser().parse_args(argv)
        return a.func(a)
    except SystemExit as e:
        return int(e.code or 0)
    except KeyboardInterrupt:
        return _fail("interrupted (resume with --resume)")
    except _user_errors() as e:
        return _fail(_one_line(e))
    except OSError as e:  # a path the user gave that the OS refuses (no such file, permission, a folder, ...)
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else _one_line(e))


def _one_line(e: BaseException) -> str:
    """The first line of `e`'s message (its type name if empty); for an error re-raised from a DataLoader worker
    ("Caught X in DataLoader worker process N. Original Traceback ..."), the original message."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return lines[0] if lines else type(e).__name__
