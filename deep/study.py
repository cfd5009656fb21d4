"""`python -m deep study SPEC --out DIR`: multi-seed, multi-arm experiments with paired statistics and plots.

A study is a set of arms (a preset and overrides each), a list of seeds and a baseline arm. Every arm x seed is one
ordinary run of the trainer in DIR/ARM/seedS/: finished runs are skipped, interrupted ones resumed, so a study can
span several sittings. Arms whose first epochs are identical -- same seed and every field that shapes the plain
epochs equal, see :func:`deep.trainer.shareable` (e.g. the base model and late-phase arms released at the same T0,
with SWA starting later) -- share them: the first such arm of a seed keeps its state after those epochs (trunk.pt) and
the others start from it. A forked run is bit-identical to the same run trained from scratch (tested), so sharing
saves time without changing any result. Several processes share a study -- local workers, a second ``study`` on the
same DIR, SLURM jobs -- each taking the next ready run under its folder's lock (deep.launch).

The report (DIR/report.md, DIR/report.json, DIR/*.png) gives, under one BatchNorm rule for every arm (default
``reestimated``, valid for SWA arms too; ``stored`` is reported as well):

* per arm, the mean and 95 % confidence interval over seeds (Student t, n - 1 degrees of freedom) of accuracy, NLL,
  ECE and OOD AUROC of the averaged model, the ensemble and the members (each seed's mean over its members);
* per arm, the paired difference to the baseline arm on the shared seeds: d_s = metric(arm, s) - metric(base, s),
  mean, 95 % CI (mean +- t_{0.975, n-1} sd(d) / sqrt(n)) and the sign count (seeds with d_s > 0);
* learning curves of every arm (mean over seeds of the quick test metric and of the loss per epoch) and reliability
  diagrams (pooled over seeds).

SPEC is a named study (``python -m deep study --list``) or a JSON file::

    {"name": "my_study", "seeds": [0, 1, 2, 3, 4], "baseline": "base",
     "arms": {"base": {"config": "fmnist_cpu_base"},
              "late": {"config": "fmnist_cpu_bn", "overrides": {"gamma_theta": "1/K"}},
              "full": {"config": "fmnist_cpu_all", "seeds": [0, 1]},
              "ens": {"ensemble_of": "base", "size": 4}}}

An arm's own ``seeds`` (a subset of the study's; never the baseline's) run a costly arm on fewer seeds: it is paired
with the baseline on those, and the report names it. A deep ensemble (``ensemble_of``) trains nothing: seed s is the
ensemble of ``size`` runs of that arm from seed s on (cyclically; one ensemble when size equals its seeds).
An optional top-level ``"eval_every": N`` (or ``--eval-every N``) evaluates every training arm's per-epoch test
metrics every N epochs (and at its last epoch); it changes no weight, so the runs and the report are the same.
An optional ``"contrasts": [["late", "full"], ...]`` adds paired differences between two arms other than the baseline
to the report (d_s = metric(first, s) - metric(second, s), averaged models, on the seeds both have). The report
also pairs the logged per-epoch test accuracy (``paired_curves``: every arm with the baseline, and each contrast),
the intervals a claim about the curves' shapes needs.

A spec file is checked whole before the first run: unknown keys (with the closest valid one), repeated keys, arm
names that are not plain folder names (letters, digits, ``_ . -``), seeds outside 0..2**32 - 1 (the range of
``--seed``), a non-integer ensemble size or an ensemble's own ``seeds`` are one line each. A study reports only runs
that are what its spec says: each finished run's stored config (evaluation-only fields aside) and seed must be its
arm's -- otherwise the study refuses to start, naming the arm, seed and field, and ``--report-only`` names the run in
the report and leaves it out. NaN metrics are noted and left out of the mean and n, and a deep ensemble missing a
run's predictions is listed as not finished. Nothing in DIR is followed through a symbolic link (deep.untrusted).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field

from shared.checkpoint import atomic_write

from .config import SEED_MAX, check_seed, get_config, upgrade
from .errors import ConfigError, DeepError
from .trainer import EVAL_FIELDS, prediction_passes, shareable, write_json
from .untrusted import loads, read_bytes, read_json, subfolder, torch_load, write_png

METRICS = ("accuracy", "nll", "ece")
# "mc_dropout": an MC-dropout arm's prediction averaged over its stochastic test passes ("averaged" is its
# deterministic network, dropout off), so both appear side by side in the tables.
MODELS = ("averaged", "ensemble", "members", "mc_dropout")


@dataclass(frozen=True)
class Arm:
    """One arm: a preset and field overrides (see deep.config); or, with ``ensemble_of``, a deep ensemble assembled
    from ``size`` runs of another arm (no training of its own: K x that arm's cost). ``seeds``: a subset of the
    study's seeds for an arm too costly to run on all of them (empty: all); the report says each arm's n."""
    name: str
    config: str = ""
    overrides: dict = field(default_factory=dict)
    ensemble_of: str | None = None
    size: int = 0
    seeds: tuple = ()

    def seeds_in(self, spec: "StudySpec") -> tuple:
        """The seeds this arm runs on (a deep ensemble: those of the arm it assembles)."""
        if self.ensemble_of is not None:
            return next(a for a in spec.arms if a.name == self.ensemble_of).seeds_in(spec)
        return self.seeds or spec.seeds

    def resolved(self):
        return get_config(self.config, **{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in self.overrides.items()})


@dataclass(frozen=True)
class StudySpec:
    name: str
    arms: tuple
    seeds: tuple
    baseline: str
    rule: str = "reestimated"
    description: str = ""
    eval_every: int | None = None  # every training arm's per-epoch test metrics every N epochs (None: the arm's own)
    contrasts: tuple = ()  # (arm, other) pairs: paired differences arm - other in the report, beside those to baseline

    def validate(self) -> "StudySpec":
        """The spec, checked whole before any run starts (a mistake in the last arm costs nothing)."""
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise ConfigError(f"study {self.name!r}: name and description must be strings")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool)
                                            or self.eval_every < 1):
            raise ConfigError(f"study {self.name!r}: eval_every must be an integer >= 1 (epochs between test "
                              f"evaluations), got {self.eval_every!r}")
        if not self.arms or not self.seeds:
            raise ConfigError(f"study {self.name}: needs at least one arm and one seed")
        names = [a.name for a in self.arms]
        for n in names:
            if not isinstance(n, str) or not ARM_NAME.match(n):
                raise ConfigError(f"study {self.name}: the arm name {n!r} is not a plain folder name (letters, digits, "
                                  f"_ . -, starting with a letter or digit, at most 64); rename the arm")
        if len(set(names)) != len(names):
            raise ConfigError(f"study {self.name}: arm names must be unique, got {names}")
        if self.baseline not in names:
            raise ConfigError(f"study {self.name}: the baseline {self.baseline!r} is not one of its arms {names}")
        for pair in self.contrasts:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(p in names for p in pair)
                    and pair[0] != pair[1]):
                raise ConfigError(f"study {self.name}: a contrast is a pair of two different arms of the study "
                                  f"({', '.join(names)}), e.g. [\"{names[-1]}\", \"{names[0]}\"]; got {pair!r}")
        _check_seeds(self.seeds, f"study {self.name}: seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study {self.name}: seeds must be distinct integers >= 0, got {list(self.seeds)}")
        for a in self.arms:
            _check_seeds(a.seeds, f"study {self.name}: arms.{a.name}.seeds")
            if not isinstance(a.overrides, dict) or not isinstance(a.config, str):
                raise ConfigError(f"study {self.name}: arm {a.name}: config must be a preset name and overrides an "
                                  f"object of config fields")
            if a.ensemble_of is not None and (not isinstance(a.size, int) or isinstance(a.size, bool)):
                raise ConfigError(f"study {self.name}: the size of the deep ensemble {a.name} must be an integer, "
                                  f"got {a.size!r}")
        if self.rule not in ("stored", "reestimated"):
            raise ConfigError(f"study {self.name}: rule must be stored or reestimated, got {self.rule!r}")
        trained = {a.name for a in self.arms if a.ensemble_of is None}
        for a in self.arms:
            if len(set(a.seeds)) != len(a.seeds) or not set(a.seeds) <= set(self.seeds) or (
                    a.seeds and a.ensemble_of is not None):
                raise ConfigError(f"study {self.name}: the seeds of arm {a.name} must be distinct seeds of the study "
                                  f"{list(self.seeds)} (a deep ensemble takes those of its arm), got {list(a.seeds)}")
        for a in self.arms:
            if a.ensemble_of is not None and (a.ensemble_of not in trained or
                                              not 2 <= a.size <= len(a.seeds_in(self))):
                raise ConfigError(f"study {self.name}: the deep ensemble {a.name} needs ensemble_of = a trained arm "
                                  f"and 2 <= size <= its seeds, got {a.ensemble_of!r}, {a.size}")
        if self.baseline not in trained:
            raise ConfigError(f"study {self.name}: the baseline must be a trained arm, not {self.baseline!r}")
        if next(a for a in self.arms if a.name == self.baseline).seeds:
            raise ConfigError(f"study {self.name}: the baseline {self.baseline} runs on every seed of the study "
                              f"(every arm is paired with it)")
        kinds = set()
        for a in self.arms:
            if a.ensemble_of is None:
                try:
                    kinds.add(a.resolved().KIND)  # validates every arm's config
                except ConfigError as e:
                    raise ConfigError(f"study {self.name}: arm {a.name}: {e}") from None
        if len(kinds) != 1:
            raise ConfigError(f"study {self.name}: all arms must be of one kind, got {sorted(kinds)}")
        return self


# An arm's name is a folder of the study: a plain name, never a path (no "..", "/", "" or ".").
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
SPEC_KEYS = ("name", "description", "seeds", "baseline", "rule", "arms", "eval_every", "contrasts")
ARM_KEYS = ("config", "overrides", "seeds")
ENSEMBLE_KEYS = ("ensemble_of", "size")


def _check_seeds(seeds, field: str) -> None:
    """Every seed through the check of --seed, the message naming the spec's field."""
    for i, s in enumerate(seeds):
        try:
            check_seed(s)
        except ConfigError:
            raise ConfigError(f"{field}[{i}] must be an integer in 0..{SEED_MAX}, got {s!r}") from None


def _check_keys(d, valid: tuple, where: str) -> None:
    """A DeepError naming the first key of object ``d`` that is not in ``valid``, with the closest valid one."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, 1, 0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {k!r}{hint}; valid keys: {', '.join(valid)}")


def parse_spec(d, default_name: str) -> StudySpec:
    """The StudySpec of a parsed JSON spec ``d`` (see the module doc), every key and type checked; validated."""
    _check_keys(d, SPEC_KEYS, "the spec")
    for k in ("seeds", "baseline", "arms"):
        if k not in d:
            raise ConfigError(f"not a study spec: it has no {k!r} (it needs seeds, baseline and arms; see python -m "
                              f"deep study --help)")
    if not isinstance(d["arms"], dict) or not isinstance(d["seeds"], list):
        raise ConfigError("the spec's arms must be an object (name -> arm) and its seeds a list of integers")
    arms = []
    for name, a in d["arms"].items():
        where = f"arms.{name}"
        if isinstance(a, dict) and "ensemble_of" in a:
            if "seeds" in a:
                raise ConfigError(f"{where}: a deep ensemble takes the seeds of its arm {a['ensemble_of']!r}; drop its "
                                  f"'seeds'")
            _check_keys(a, ENSEMBLE_KEYS, where)
            if not isinstance(a["ensemble_of"], str):
                raise ConfigError(f"{where}.ensemble_of must be an arm's name, got {a['ensemble_of']!r}")
            arms.append(Arm(name, ensemble_of=a["ensemble_of"], size=a.get("size", 0)))
            continue
        _check_keys(a, ARM_KEYS, where)
        if "config" not in a:
            raise ConfigError(f"{where} has no 'config' (a preset name) and is not a deep ensemble (ensemble_of)")
        overrides, seeds = a.get("overrides", {}), a.get("seeds", [])
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}.overrides must be an object of config fields, got {overrides!r}")
        if not isinstance(seeds, list):
            raise ConfigError(f"{where}.seeds must be a list of seeds of the study, got {seeds!r}")
        arms.append(Arm(name, a["config"], dict(overrides), seeds=tuple(seeds)))
    return StudySpec(d.get("name", default_name), tuple(arms), tuple(d["seeds"]), d["baseline"],
                     d.get("rule", "reestimated"), d.get("description", ""), d.get("eval_every"),
                     _contrasts(d.get("contrasts", []))).validate()


def _contrasts(value) -> tuple:
    """The spec's contrasts as a tuple of pairs (their arms are checked by StudySpec.validate)."""
    if not isinstance(value, list) or not all(isinstance(p, list) for p in value):
        raise ConfigError(f"the spec's contrasts must be a list of [arm, other arm] pairs, got {value!r}")
    return tuple(tuple(p) for p in value)


def _paper_study(name: str, dataset: str) -> StudySpec:
    """The paper's comparison for one CIFAR data set (WRN-28-10): base vs late-phase, with and without SWA."""
    return StudySpec(
        name=name, seeds=(0, 1, 2, 3, 4), baseline="base",
        description=f"The paper's {dataset} arms (needs the data and a GPU: 200 epochs of WRN-28-10 each).",
        arms=(Arm("base", f"{dataset}_base"), Arm("late_phase", f"{dataset}_bn"),
              Arm("swa", f"{dataset}_base_swa"), Arm("late_phase_swa", f"{dataset}_bn_swa")))


def _arms_study(name: str, prefix: str, seeds: tuple, description: str, fewer: dict | None = None) -> StudySpec:
    """The paper's other arms (deep.config.ARM_TWINS) beside the base model and late-phase BatchNorm + head, with a
    deep ensemble of K base runs assembled from the seeds; ``fewer``: arm -> its seeds, for the costly arms."""
    k = min(get_config(f"{prefix}_bn").K, len(seeds))
    fewer = fewer or {}
    arms = (Arm("base", f"{prefix}_base"), Arm("late_phase", f"{prefix}_bn"),
            Arm("full_ensemble", f"{prefix}_all"), Arm("hypernetwork", f"{prefix}_hyper"),
            Arm("batchensemble", f"{prefix}_batchensemble"), Arm("mc_dropout", f"{prefix}_mcdropout"),
            Arm("late_phase_T0_0", f"{prefix}_t0"))
    return StudySpec(name=name, seeds=seeds, baseline="base", description=description,
                     arms=tuple(dataclasses.replace(a, seeds=fewer.get(a.name, ())) for a in arms) +
                     (Arm("deep_ensemble", ensemble_of="base", size=k),))


STUDIES = {
    "cifar10": _paper_study("cifar10", "cifar10"),
    "cifar100": _paper_study("cifar100", "cifar100"),
    "cifar10_arms": _arms_study("cifar10_arms", "cifar10", (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
                                "The paper's other arms on CIFAR-10 (WRN-28-10, needs the data and a GPU)."),
    "cifar100_arms": _arms_study("cifar100_arms", "cifar100", (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
                                 "The paper's other arms on CIFAR-100 (WRN-28-10, needs the data and a GPU)."),
    # Fashion-MNIST on two CPU cores: about 5 minutes a run, the arms sharing the first T0 = 4 epochs per seed.
    "fmnist_cpu": StudySpec(
        name="fmnist_cpu", seeds=(0, 1, 2, 3, 4), baseline="base",
        description="Base vs late-phase BatchNorm + head (gamma_theta = 1 and 1/K), SWA and late-phase + SWA, "
                    "with a deep ensemble of 4 base runs; CPU-sized (cnn-16-48x2-96x2, 7 epochs).",
        arms=(Arm("base", "fmnist_cpu_base"), Arm("late_phase", "fmnist_cpu_bn"),
              Arm("late_phase_inv_K", "fmnist_cpu_bn", {"gamma_theta": "1/K"}),
              Arm("swa", "fmnist_cpu_base_swa"), Arm("late_phase_swa", "fmnist_cpu_bn_swa"),
              Arm("deep_ensemble", ensemble_of="base", size=4))),
    # The base and late-phase arms are those of fmnist_cpu (same presets and seeds: ~5 min a run); the new arms,
    # 5-10 min a run each on two CPU cores, on four of its seeds.
    "fmnist_cpu_arms": _arms_study(
        "fmnist_cpu_arms", "fmnist_cpu", (0, 1, 2, 3, 4),
        "The other arms on the CPU-sized Fashion-MNIST family, paired with the base model of the same seed: "
        "base, late-phase BN + head and the deep ensemble of 4 base runs on 5 seeds (those of fmnist_cpu), the "
        "late-phase full ensemble, hypernetwork, BatchEnsemble, MC dropout and late-phase from T0 = 0 on 4.",
        fewer={a: (0, 1, 2, 3) for a in ("full_ensemble", "hypernetwork", "batchensemble", "mc_dropout",
                                         "late_phase_T0_0")}),
    # The paper's schedule shape on Fashion-MNIST (deep.config: the fmnist_paper_shape presets), with the ablations
    # that separate the ensemble of phi from theta's changed dynamics; every arm shares its seed's first T0 = 36 epochs.
    "fmnist_paper_shape": StudySpec(
        # 8 seeds: the pilot's paired standard deviation (late_phase - base, seeds 0 and 1) was 0.24 points, above
        # 0.15 (at 0.15, 5 seeds give a 95 % interval of +-0.19 points; at 0.24, 8 seeds give +-0.20)
        name="fmnist_paper_shape", seeds=tuple(range(8)), baseline="base",
        description="Fashion-MNIST in the paper's schedule shape (15,000 training images, 60 epochs, T0 = 36, lr "
                    "constant to epoch 30 then annealed per epoch to 0.001 at 54; batch 128 per member; 696 steps "
                    "per member after the release): base; late-phase BatchNorm + head with K = 4 and gamma_theta = 1 "
                    "or 1/K; the large-batch twin (after T0 no members: batches of K B, theta along K times its mean "
                    "gradient, phi along its mean gradient: Algorithm 1's mean-model dynamics without an ensemble); "
                    "late-phase with theta's weight decay x K after the release; a deep ensemble of 4 base runs.",
        arms=(Arm("base", "fmnist_paper_shape_base"), Arm("late_phase", "fmnist_paper_shape_bn"),
              Arm("late_phase_inv_K", "fmnist_paper_shape_bn", {"gamma_theta": "1/K"}),
              Arm("large_batch_twin", "fmnist_paper_shape_twin"),
              Arm("late_phase_wd_K", "fmnist_paper_shape_wdK"),
              Arm("deep_ensemble", ensemble_of="base", size=4)),
        # the block model's questions: the ensemble of phi against the mean model's dynamics without one; theta's
        # weight decay per example (the scale-invariant conv weights' effective learning rate); gamma_theta = 1/K
        contrasts=(("late_phase", "large_batch_twin"), ("late_phase_wd_K", "late_phase"),
                   ("late_phase_inv_K", "late_phase"))),
}


def load_spec(spec: str) -> StudySpec:
    """A named study or a JSON spec file (see the module doc)."""
    if spec in STUDIES:
        return STUDIES[spec].validate()
    if not os.path.isfile(spec):
        raise ConfigError(f"study {spec!r} is neither a named study ({', '.join(sorted(STUDIES))}) nor a JSON file")
    try:
        with open(spec, "rb") as f:
            d = loads(f.read())  # repeated keys (two arms of one name) are refused, not silently merged
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{spec}: not a study spec ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}); "
                          f"see python -m deep study --help for the format") from None
    try:
        return parse_spec(d, os.path.splitext(os.path.basename(spec))[0])
    except ConfigError as e:
        raise ConfigError(f"{spec}: {e}") from None


# ----------------------------------------------------------------------------- running

def _folder(out: str, arm: str, seed: int) -> str:
    return os.path.join(out, arm, f"seed{seed}")


def _trunk_plan(spec: StudySpec) -> dict:
    """arm -> (E, the arms that share their first E epochs): one family per late-phase arm with its own release epoch
    E = T0 > 0 (its lead), joined by every arm, late-phase or not, that :func:`deep.trainer.shareable` allows to start
    from the lead's state after E epochs, and the lead from its."""
    trained = [a for a in spec.arms if a.ensemble_of is None]
    cfgs = {a.name: a.resolved().to_dict() for a in trained}
    families: list[tuple[int, str, list]] = []
    for arm in trained:
        c = cfgs[arm.name]
        if c["phi"] and c["T0"] > 0 and not any(e == c["T0"] and _mutual(cfgs[lead], c, e) for e, lead, _ in families):
            families.append((c["T0"], arm.name, []))
    for arm in trained:
        for epochs, lead, members in families:
            if _mutual(cfgs[lead], cfgs[arm.name], epochs):
                members.append(arm.name)
                break
    return {name: (epochs, members) for epochs, _, members in families if len(members) > 1 for name in members}


def _mutual(a: dict, b: dict, epochs: int) -> bool:
    return shareable(a, b, epochs) is None and shareable(b, a, epochs) is None


def run_study(spec: StudySpec, out: str, data_dir: str = "data", device: str | None = None, quiet: bool = False,
              stream=None, runner=None, eval_every: int | None = None) -> dict:
    """Run every arm x seed of ``spec`` that has no results yet (resuming or forking where it can), then write the
    report; returns the report. ``runner(cfg, seed, folder, resume, fork, trunk_epoch)`` trains one run (default:
    the trainer of the config's kind). The runs are taken one by one in :func:`study_runs` order by
    :func:`deep.launch.work`, so another study process on the same ``out`` shares them (deep.launch).
    ``eval_every``: the per-epoch test metrics of every run every N epochs (and at its last epoch) instead of the
    arms' own setting (:func:`with_eval_every`)."""
    import sys

    from .launch import work
    say = (lambda text: None) if quiet else (lambda text: print(f"[study {spec.name}] {text}",
                                                                file=stream or sys.stdout, flush=True))
    work(with_eval_every(spec, eval_every), out, data_dir=data_dir, device=device, quiet=quiet, stream=stream,
         runner=runner, say=say)
    report = make_report(spec, out)
    say(f"report: {os.path.join(out, 'report.md')}")
    return report


def _mismatch(arm: Arm, seed: int, config, stored_seed) -> str | None:
    """How a run's stored config and seed differ from what ``arm`` of the spec asks for (evaluation-only fields,
    deep.trainer.EVAL_FIELDS, aside), or None."""
    if stored_seed != seed or isinstance(stored_seed, bool):
        return f"seed {stored_seed!r} where the spec says {seed}"
    if not isinstance(config, dict):
        return f"a config that is not an object ({type(config).__name__})"
    cfg = arm.resolved()
    want = json.loads(json.dumps(cfg.to_dict()))  # as stored: tuples are lists
    # a field the run's version did not have yet holds its default, and older sentinels read as today's (as
    # RunConfig.from_dict reads them)
    config = {**json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(cfg)
                                       if f.default is not dataclasses.MISSING})), **upgrade(config)}
    diff = sorted(k for k in set(want) | set(config) if k not in EVAL_FIELDS and config.get(k) != want.get(k))
    if not diff:
        return None
    k = diff[0]
    more = f" (and {len(diff) - 1} more field(s): {', '.join(diff[1:4])})" if len(diff) > 1 else ""
    return f"{k} {config.get(k)!r} where the spec says {want.get(k)!r}{more}"


def _linked(out: str, arm: str, seed: int) -> str | None:
    """Why a run folder of the study cannot be used because it (or its arm's folder) is a symbolic link."""
    for path in (os.path.join(out, arm), _folder(out, arm, seed)):
        if os.path.islink(path):
            return f"{path} is a symbolic link (a study never reads or writes through one)"
    return None


def _load_run(arm: Arm, seed: int, out: str) -> tuple:
    """(results, None) for a finished run of ``arm`` and ``seed`` in ``out`` that is what the spec says; (None, why)
    for one that is not or cannot be read; (None, None) for a run not finished."""
    from .table import check_result
    folder = _folder(out, arm.name, seed)
    path = os.path.join(folder, "results.json")
    linked = _linked(out, arm.name, seed)
    if linked:
        return None, linked
    if not os.path.lexists(path):
        return None, None
    try:
        r = read_json(path)
    except DeepError as e:
        return None, str(e)
    except (OSError, ValueError) as e:
        return None, f"{path} cannot be read ({getattr(e, 'strerror', None) or e})"
    if not isinstance(r, dict) or "models" not in r or "config" not in r:
        return None, f"{path} is not a run's results (no models or config)"
    problem = check_result(r)
    if problem:
        return None, f"{path} is damaged ({problem})"
    why = _mismatch(arm, seed, r["config"], r.get("seed"))
    return (None, f"{folder} was run with {why}") if why else (r, None)


def _check_existing(spec: StudySpec, out: str, arm: Arm, seed: int) -> None:
    """Refuse (one line) a run folder of the study whose finished run or checkpoint is not the spec's ``arm`` and
    ``seed`` -- e.g. the spec was edited since, or the folder was copied from another seed -- or is damaged."""
    folder = _folder(out, arm.name, seed)
    _, why = _load_run(arm, seed, out)
    if why is None and not os.path.exists(os.path.join(folder, "results.json")) and \
            os.path.exists(os.path.join(folder, "checkpoint.pt")):
        try:
            stored = read_json(os.path.join(folder, "config.json"))
            problem = _mismatch(arm, seed, stored.get("config"), stored.get("seed")) if isinstance(stored, dict) \
                else "a config.json that is not an object"
        except (OSError, ValueError, DeepError) as e:
            problem = f"an unreadable config.json ({getattr(e, 'strerror', None) or e})"
        why = f"{folder} was started with {problem}" if problem else None
    if why:
        raise DeepError(f"study {spec.name}, arm {arm.name}, seed {seed}: {why}; delete that run folder to run it "
                        f"again, or choose another --out")


def study_runs(spec: StudySpec) -> list:
    """Every (seed, arm) of ``spec`` that trains, in dependency order: seed by seed, the arms in the spec's order,
    so a seed's trunk-owning run (the first arm of its family, see :func:`_trunk_plan`) comes before the arms that
    fork it. Deep ensembles train nothing: the report assembles them."""
    return [(seed, arm) for seed in spec.seeds for arm in spec.arms
            if arm.ensemble_of is None and seed in arm.seeds_in(spec)]


def finished(out: str, arm: str, seed: int) -> bool:
    """Whether run ``arm`` x ``seed`` of the study in ``out`` is complete: its results, and its exports unless the
    checkpoint that could write them is gone (a run killed between the two by an earlier version, which wrote
    results.json first, is resumed to export again)."""
    folder = _folder(out, arm, seed)
    if not os.path.exists(os.path.join(folder, "results.json")):
        return False
    return (not os.path.exists(os.path.join(folder, "checkpoint.pt"))
            or os.path.exists(os.path.join(folder, "export", "models.json")))


def check_existing(spec: StudySpec, out: str) -> None:
    """Before the first run: refuse (one line) any run folder of ``out`` that holds a finished run or a checkpoint
    that is not what ``spec`` says (see :func:`_check_existing`)."""
    for seed, arm in study_runs(spec):
        _check_existing(spec, out, arm, seed)


def trunk_owner(spec: StudySpec, plan: dict, arm: Arm, seed: int) -> str | None:
    """The arm whose run of ``seed`` keeps the trunk that ``arm`` forks (the first arm of its family on that seed),
    or None when ``arm`` owns it or shares no epochs."""
    if arm.name not in plan:
        return None
    on_seed = [a.name for a in spec.arms if a.name in plan[arm.name][1] and seed in a.seeds_in(spec)]
    return on_seed[0] if on_seed[0] != arm.name else None


def run_one(spec: StudySpec, out: str, seed: int, arm: Arm, plan: dict | None = None, runner=None, say=None,
            **kw) -> bool:
    """Train run ``arm`` x ``seed`` of the study in ``out`` unless it is finished; returns whether it trained. It
    resumes its checkpoint, or forks a trunk of its family that exists, or trains from scratch, keeping its trunk
    for the others when it is in a family. ``plan``: :func:`_trunk_plan` (computed when None); ``say(how)``
    announces it; ``kw`` go to ``runner`` (default: the trainer of the config's kind)."""
    runner = runner or _train
    plan = _trunk_plan(spec) if plan is None else plan
    folder = _folder(out, arm.name, seed)
    if finished(out, arm.name, seed):
        return False
    subfolder(out, arm.name)  # a link here would put the run outside --out (checked again just before it)
    resume = os.path.exists(os.path.join(folder, "checkpoint.pt"))
    fork = trunk_epoch = None
    if arm.name in plan:
        epochs, members = plan[arm.name]
        trunks = [os.path.join(_folder(out, m, seed), "trunk.pt") for m in members if m != arm.name]
        fork = None if resume else next((t for t in trunks if os.path.exists(t)), None)
        if fork is None and not any(os.path.exists(t) for t in trunks):
            trunk_epoch = epochs  # a resumed run still before its epoch E keeps the trunk too
    how = "exporting again: results without exports" if resume and os.path.exists(
        os.path.join(folder, "results.json")) else "resuming" if resume else f"forking {os.path.dirname(fork)} at epoch {plan[arm.name][0]}" if fork \
        else "from scratch"
    if say is not None:
        say(how)
    cfg = arm.resolved()
    if spec.eval_every is not None:  # changes no weight (deep.trainer.EVAL_FIELDS)
        cfg = dataclasses.replace(cfg, eval_every=spec.eval_every).validate()
    runner(cfg, seed, folder, resume, fork, trunk_epoch, **kw)
    return True


def _train(cfg, seed, folder, resume, fork, trunk_epoch, data_dir="data", device=None, quiet=False, stream=None):
    from .finetune import FineTune
    from .images import ImageRun
    from .lm import LMRun
    run_cls = {"image": ImageRun, "text": LMRun, "finetune": FineTune}[cfg.KIND]
    subfolder(os.path.dirname(os.path.dirname(folder)), os.path.basename(os.path.dirname(folder)))
    if os.path.islink(folder):
        raise DeepError(f"{folder} is a symbolic link; a study never writes through one: delete it")
    run = run_cls(cfg, seed=seed, data_dir=data_dir, out=folder, device=device, resume=resume, progress=False,
                  quiet=quiet, stream=stream, export="averaged", trunk_epoch=trunk_epoch, fork=fork,
                  save_predictions=True, command=f"python -m deep study (arm {cfg.name}, seed {seed})")
    run.train()


# ----------------------------------------------------------------------------- statistics

def t_quantile(n: int) -> float:
    """t_{0.975, n - 1}: the two-sided 95 % quantile of Student's t with n - 1 degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list) -> dict:
    """{mean, ci95 (half-width), sd, n} of ``values`` (ci95 and sd None for n < 2)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return {"mean": m, "ci95": None, "sd": None, "n": n}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return {"mean": m, "ci95": t_quantile(n) * sd / math.sqrt(n), "sd": sd, "n": n}


def paired(arm: dict, base: dict) -> dict | None:
    """Paired differences d_s = arm[s] - base[s] over the seeds both have: mean_ci of d and the sign count."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return None
    d = [arm[s] - base[s] for s in seeds]
    return {**mean_ci(d), "positive": sum(x > 0 for x in d), "negative": sum(x < 0 for x in d), "seeds": seeds}


def _metric(models: dict, model: str, rule: str, metric: str):
    """One number of a results dict: members averaged over the members; OOD AUROCs as ``ood:SET:SCORE``; the mean
    over sets as ``ood:mean:SCORE`` (the reference's headline number)."""
    m = (models.get(model) or {}).get(rule)
    if m is None:
        return None
    rows = m if isinstance(m, list) else [m]
    if metric.startswith("ood:"):
        _, which, score = metric.split(":")
        vals = []
        for r in rows:
            oods = r.get("ood", {})
            if which == "mean":
                if not oods:
                    return None
                scores = [o.get(score) for o in oods.values()]
                if None in scores:
                    return None
                vals.append(sum(scores) / len(scores))
            elif (oods.get(which) or {}).get(score) is not None:
                vals.append(oods[which][score])
        return sum(vals) / len(vals) if vals else None
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    return sum(vals) / len(vals) if vals else None


def collect(spec: StudySpec, out: str, skipped: dict | None = None) -> dict:
    """arm -> seed -> results dict, for the finished runs that are what the spec says (:func:`_load_run`); a
    deep-ensemble arm's "seed" s is the ensemble of the runs of ``size`` consecutive seeds of its arm starting at s
    (cyclically, so ensembles overlap when size > 1; when size equals the number of seeds there is only the one
    ensemble, reported as n = 1). ``skipped`` (if given) receives arm -> seed -> why for the runs left out: not the
    spec's, damaged, or (deep ensembles) missing predictions."""
    found = {}
    skipped = {} if skipped is None else skipped
    for arm in spec.arms:
        if arm.ensemble_of is not None:
            continue
        for seed in arm.seeds_in(spec):
            r, why = _load_run(arm, seed, out)
            if r is not None:
                found.setdefault(arm.name, {})[seed] = r
            elif why:
                skipped.setdefault(arm.name, {})[seed] = why
    for arm in spec.arms:
        if arm.ensemble_of is not None:
            # size == the number of seeds: every cyclic window holds the same runs, so there is one ensemble, not n
            # copies of it (which would report a zero-width confidence interval).
            seeds = arm.seeds_in(spec)
            for i in range(len(seeds) if arm.size < len(seeds) else 1):
                r, why = _deep_ensemble(out, arm, seeds, i, found.get(arm.ensemble_of, {}))
                if r is not None:
                    found.setdefault(arm.name, {})[seeds[i]] = r
                elif why:
                    skipped.setdefault(arm.name, {})[seeds[i]] = why
    return found


def _deep_ensemble(out: str, arm: Arm, seeds: tuple, start: int, runs: dict) -> tuple:
    """(results, None) of a deep ensemble of the runs of seeds start..start+size-1 (cyclically) of arm.ensemble_of:
    mean of their predicted probabilities (predictions.pt) under every rule, scored like one model; cost: the sum.
    (None, why) when a finished run lacks its predictions (or they are damaged); (None, None) while runs are missing."""
    from .evaluate import summarize
    seeds = [seeds[(start + j) % len(seeds)] for j in range(arm.size)]
    if not all(s in runs for s in seeds):
        return None, None
    preds = []
    for s in seeds:
        path = os.path.join(_folder(out, arm.ensemble_of, s), "predictions.pt")
        try:
            preds.append(torch_load(read_bytes(path)))
        except FileNotFoundError:
            return None, (f"{path} is missing (delete that run's results.json and run the study again: it is "
                          f"evaluated again from its checkpoint)")
        except Exception as e:  # noqa: BLE001 -- a damaged file of any kind: one line, the arm left out
            return None, f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    try:
        models = {}
        for rule in preds[0]:
            keys = [k for k in preds[0][rule] if k != "labels"]
            mean = {k: sum(p[rule][k].float() for p in preds) / len(preds) for k in keys}
            mean["labels"] = preds[0][rule]["labels"]
            models.setdefault("averaged", {})[rule] = summarize(mean, [k for k in keys if k != "test"])
    except Exception as e:  # noqa: BLE001 -- predictions of different shapes, not tensors, ...: damaged
        return None, (f"the predictions.pt files of {arm.ensemble_of} seeds {seeds} do not fit together "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    costs = [runs[s].get("cost") if isinstance(runs[s].get("cost"), dict) else {} for s in seeds]
    return {"models": models, "train_seconds": sum(_number(runs[s].get("train_seconds")) or 0 for s in seeds),
            "images_per_s": {}, "ensemble_seeds": seeds,
            "cost": {"training_flops": sum(_number(c.get("training_flops")) or 0 for c in costs) or None,
                     "parameters": sum(_number(c.get("parameters")) or 0 for c in costs) or None}}, None


def _number(v):
    """``v`` if it is a finite number (not a bool), else None: hand-edited results may hold anything."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _part(r: dict, key: str) -> dict:
    """r[key] if it is an object, else {} (hand-edited results may hold anything)."""
    v = r.get(key)
    return v if isinstance(v, dict) else {}


def make_report(spec: StudySpec, out: str) -> dict:
    """report.json, report.md and the plots of the finished runs of ``spec`` in ``out``: only runs that are what the
    spec says (the others are named in the report and left out), NaN or infinite metrics noted and left out of the
    mean and n (as deep.table does)."""
    skipped: dict = {}
    results = collect(spec, out, skipped)
    if not results:
        why = [f"{a} seed {s}: {w}" for a, by_seed in skipped.items() for s, w in by_seed.items()]
        raise DeepError(f"no finished runs of study {spec.name} in {out}" + (f" that are what the spec says ("
                                                                            f"{why[0]})" if why else ""))
    oods = sorted({o for runs in results.values() for r in runs.values()
                   for o in _part(_part(_part(r, "models"), "averaged").get("stored") or {}, "ood")})
    metrics = list(METRICS) + [f"ood:{o}:auroc_entropy" for o in oods] + (["ood:mean:auroc_entropy"] if oods else [])
    report = {"study": spec.name, "description": spec.description, "baseline": spec.baseline, "rule": spec.rule,
              "seeds": list(spec.seeds), "arms": {}, "paired": {}, "contrasts": {},
              "left_out": {a: {str(s): w for s, w in by_seed.items()} for a, by_seed in skipped.items()}}
    base_flops = [_number(_part(r, "cost").get("training_flops")) for r in results.get(spec.baseline, {}).values()]
    base_flops = [f for f in base_flops if f]
    for arm in spec.arms:
        runs = results.get(arm.name, {})
        cfg = (next(a for a in spec.arms if a.name == arm.ensemble_of) if arm.ensemble_of else arm).resolved()
        flops = [_number(_part(r, "cost").get("training_flops")) for r in runs.values()]
        seconds = [v for r in runs.values() if (v := _number(r.get("train_seconds"))) is not None]
        entry = {"config": arm.config or f"deep ensemble of {arm.size} {arm.ensemble_of} runs",
                 "overrides": arm.overrides, "seeds": sorted(runs), "planned_seeds": list(arm.seeds_in(spec)),
                 "metrics": {}, "not_finite": [],
                 "train_seconds": mean_ci(seconds) if seconds else None,
                 "images_per_s": {p: [_number(_part(r, "images_per_s").get(p)) for r in runs.values()] for p in
                                  ("pre", "late")},
                 "late_phase": cfg.late_phase and not arm.ensemble_of, "K": cfg.K if cfg.late_phase else None,
                 "T0": cfg.T0 if cfg.late_phase else None, "phi": list(cfg.phi) if cfg.late_phase else None,
                 "dropout": cfg.dropout, "mc_samples": cfg.mc_samples,
                 "test_passes": {"averaged": arm.size} if arm.ensemble_of else prediction_passes(cfg),
                 "gamma_theta": cfg.theta_scale if cfg.late_phase else None, "ensemble_of": arm.ensemble_of,
                 "batch_size_late": cfg.late_batch_size if cfg.late_phase else None,
                 "weight_decay_theta": cfg.theta_weight_decay if cfg.late_phase else None,
                 "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
                 "size": arm.size or None,
                 "parameters": next((_number(_part(r, "cost").get("parameters")) for r in runs.values()), None),
                 "relative_training_flops": (sum(f for f in flops if f) / max(len([f for f in flops if f]), 1)) /
                 (sum(base_flops) / len(base_flops)) if base_flops and any(flops) else None}
        for rule in (spec.rule, "stored"):
            for model in MODELS:
                for metric in metrics:
                    per_seed = {s: v for s, r in runs.items()
                                if (v := _metric(r["models"], model, rule, metric)) is not None}
                    bad = sorted(s for s, v in per_seed.items() if not math.isfinite(v))
                    entry["not_finite"] += [f"seed {s}: {model} {metric} ({rule})" for s in bad]
                    per_seed = {s: v for s, v in per_seed.items() if s not in bad}  # as deep.table: out of mean and n
                    if per_seed:
                        entry["metrics"].setdefault(rule, {}).setdefault(model, {})[metric] = {
                            **mean_ci(list(per_seed.values())), "per_seed": per_seed}
        report["arms"][arm.name] = entry
    base = report["arms"][spec.baseline]["metrics"]
    for arm in spec.arms:
        if arm.name != spec.baseline:
            mine = report["arms"][arm.name]["metrics"]
            for rule, by_model in mine.items():
                for model in by_model:
                    d = _paired_metrics({rule: by_model}, model, base).get(rule)
                    if d:
                        report["paired"].setdefault(arm.name, {}).setdefault(rule, {})[model] = d
    for first, second in spec.contrasts:
        d = _paired_metrics(report["arms"][first]["metrics"], "averaged", report["arms"][second]["metrics"])
        if d:
            report["contrasts"][f"{first} - {second}"] = d
    logs = _logs(spec, out, results)  # read once, for the paired curves and the plots
    report["paired_curves"] = {"metric": "test_accuracy", "model": "averaged", **paired_curves(spec, logs)}
    write_json(os.path.join(out, "report.json"), _json_safe(report))
    figures = _plots(spec, out, results, logs)
    atomic_write(os.path.join(out, "report.md"), render_report(report, figures))  # a link there is replaced
    return report


def _paired_metrics(mine: dict, model: str, other: dict) -> dict:
    """rule -> metric -> :func:`paired` of ``mine``'s ``model`` against ``other``'s averaged model (arm metrics as
    in report.json: rule -> model -> metric -> stats with per_seed), where both have the metric."""
    out: dict = {}
    for rule, by_model in mine.items():
        for metric, stats in by_model.get(model, {}).items():
            ref = other.get(rule, {}).get("averaged", {}).get(metric)
            d = paired(stats["per_seed"], ref["per_seed"]) if ref else None
            if d:
                out.setdefault(rule, {})[metric] = d
    return out


def _what(a: dict) -> str:
    """One cell naming what an arm trains."""
    if a["ensemble_of"]:
        return f"deep ensemble of {a['size']} `{a['ensemble_of']}` runs"
    bits = []
    if a["late_phase"]:
        bits.append(f"late-phase {'+'.join(a.get('phi') or [])} K={a['K']}, gamma_theta={a['gamma_theta']:g}, "
                    f"T0={a.get('T0')}")
        if a.get("batch_size_late") not in (None, a.get("batch_size")):
            bits.append(f"minibatch {a['batch_size_late']} after T0")
        if a.get("weight_decay_theta") not in (None, a.get("weight_decay")):
            bits.append(f"theta's weight decay {a['weight_decay_theta']:g} after T0")
    if a.get("dropout"):
        bits.append(f"dropout {a['dropout']:g}" + (f", {a['mc_samples']} passes at test" if a.get("mc_samples")
                                                   else ""))
    return "; ".join(bits) or "no late phase"


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _cell(stats: dict | None, digits: int) -> str:
    if not stats:
        return "—"
    if stats["ci95"] is None:
        return f"{stats['mean']:.{digits}f} (n={stats['n']})"
    return f"{stats['mean']:.{digits}f} ± {stats['ci95']:.{digits}f} (n={stats['n']})"


def _digits(metric: str) -> int:
    return 3 if metric == "nll" else 2


def render_report(report: dict, figures: list) -> str:
    rule, base = report["rule"], report["baseline"]
    arms = report["arms"]
    lines = [f"# Study {report['study']}", ""]
    if report["description"]:
        lines += [report["description"], ""]
    fewer = [f"`{n}` {a['planned_seeds']}" for n, a in arms.items()
             if not a["ensemble_of"] and a.get("planned_seeds", report["seeds"]) != report["seeds"]]
    missing = [f"`{n}` ({len(a['seeds'])} of {len(a.get('planned_seeds') or [])})" for n, a in arms.items()
               if not a["ensemble_of"] and len(a["seeds"]) < len(a.get("planned_seeds") or [])]
    if fewer:
        lines += ["Arms on fewer seeds (their cost): " + ", ".join(fewer) + ".", ""]
    if missing:
        lines += ["Not finished yet: " + ", ".join(missing) + " runs.", ""]
    left = report.get("left_out", {})
    ensembles = [f"`{n}` seed {s} ({why})" for n, a in arms.items() if a["ensemble_of"]
                 for s, why in left.get(n, {}).items()]
    if ensembles:
        lines += ["Not finished yet (deep ensembles): " + "; ".join(ensembles) + ".", ""]
    wrong = [f"`{n}` seed {s}: {why}" for n, a in arms.items() if not a["ensemble_of"]
             for s, why in left.get(n, {}).items()]
    if wrong:
        lines += ["Left out, not the runs this spec asks for (or damaged): " + "; ".join(wrong) + ".", ""]
    bad = [f"`{n}` {x}" for n, a in arms.items() for x in a.get("not_finite", [])]
    if bad:
        lines += ["Not finite (a diverged run?), left out of the means and n: " + ", ".join(bad) + ".", ""]
    lines += [f"Seeds {report['seeds']}; baseline arm `{base}`; BatchNorm statistics `{rule}` for every model "
              f"(deep.evaluate); numbers are mean ± 95 % CI over seeds (Student t); members: each seed's mean over "
              f"its members. Accuracy and ECE in %, NLL in nats, AUROC (predictive entropy, OOD positive) in %.", ""]
    for r in dict.fromkeys([rule, "stored"]):
        metrics = sorted({m for a in arms.values() for mod in a["metrics"].get(r, {}).values() for m in mod},
                         key=lambda m: (m.startswith("ood"), m))
        if not metrics:
            continue
        lines += [f"## Per arm ({r})", "", "| arm | model | " + " | ".join(_name(m) for m in metrics) + " |",
                  "|---|---|" + "---:|" * len(metrics)]
        for name, a in arms.items():
            for model, ms in a["metrics"].get(r, {}).items():
                lines.append(f"| {name} | {model} | " + " | ".join(_cell(ms.get(m), _digits(m)) for m in metrics)
                             + " |")
        lines += ["", f"## Paired differences to `{base}` (averaged model) ({r})", "",
                  "d = arm − base per seed: mean ± 95 % CI, and the seeds with d > 0 / d < 0.", "",
                  "| arm | model | " + " | ".join(_name(m) for m in metrics) + " |",
                  "|---|---|" + "---:|" * len(metrics)]
        lines += [f"| {name} | {model} | {_paired_cells(ms, metrics)} |"
                  for name, by_rule in report["paired"].items() for model, ms in by_rule.get(r, {}).items()]
        contrasts = {pair: by_rule[r] for pair, by_rule in report.get("contrasts", {}).items() if r in by_rule}
        if contrasts:
            lines += ["", f"## Paired contrasts between arms (averaged models) ({r})", "",
                      "d = first − second arm per seed: mean ± 95 % CI, and the seeds with d > 0 / d < 0.", "",
                      "| first − second | " + " | ".join(_name(m) for m in metrics) + " |",
                      "|---|" + "---:|" * len(metrics)]
            lines += [f"| {pair} | {_paired_cells(ms, metrics)} |" for pair, ms in contrasts.items()]
        lines.append("")
    lines += _curve_table(report)
    lines += ["## Cost", "", "Training FLOPs relative to the baseline arm (3 x 2 x forward multiply-accumulates per "
              "example x examples trained on; a deep ensemble sums its runs).", "",
              "| arm | what | parameters | training FLOPs vs base | test passes per example | train seconds per run | "
              "images/s before / after the release |", "|---|---|---:|---:|---|---:|---|"]
    for name, a in arms.items():
        rates = a["images_per_s"]
        fmt = (lambda xs: ", ".join(f"{x:.0f}" for x in xs if x) or "—")  # noqa: E731
        rel = f"{a['relative_training_flops']:.2f}x" if a["relative_training_flops"] else "—"
        params = f"{a['parameters']:,}" if a["parameters"] else "—"
        passes = ", ".join(f"{m} {n}" for m, n in (a.get("test_passes") or {}).items()) or "—"
        lines.append(f"| {name} | {_what(a)} | {params} | {rel} | {passes} | {_cell(a['train_seconds'], 0)} | "
                     f"{fmt(rates.get('pre', []))} / {fmt(rates.get('late', []))} |")
    if any(a["ensemble_of"] for a in arms.values()):
        lines += ["", "Deep-ensemble arms: seed s is the ensemble of the runs of `size` consecutive seeds from s "
                      "(cyclically), so their samples overlap and their confidence intervals are optimistic."]
    lines += [""] + [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
    return "\n".join(lines) + "\n"


def _curve_table(report: dict, columns: int = 8) -> list:
    """report.md's rows of the paired per-epoch differences (report.json: paired_curves; at most ``columns`` epochs,
    evenly spaced, the last always: the JSON has them all)."""
    pc = report.get("paired_curves") or {}
    curves = {**(pc.get("arms") or {}), **(pc.get("contrasts") or {})}
    if not curves:
        return []
    epochs = sorted({r["epoch"] for rows in curves.values() for r in rows})
    if len(epochs) > columns:
        step = (len(epochs) - 1) / (columns - 1)
        epochs = sorted({epochs[round(i * step)] for i in range(columns)})
    lines = [f"## Paired differences to `{report['baseline']}` per epoch: test accuracy (%), averaged model", "",
             "d = arm − base (or first − second arm) per seed at each epoch, as logged during training (the stored "
             "BatchNorm statistics): mean ± 95 % CI, and the seeds with d > 0 / d < 0; from the first epoch at which "
             "the runs differ.", "",
             "| arm | n | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|---:|" + "---:|" * len(epochs)]
    for name, rows in curves.items():
        at = {r["epoch"]: r for r in rows}
        cells = ["—" if (d := at.get(e)) is None else f"{_cell(d, 2).rsplit(' (', 1)[0]}, +{d['positive']}/−"
                 f"{d['negative']}" for e in epochs]
        lines.append(f"| {name} | {max(r['n'] for r in rows)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _paired_cells(by_metric: dict, metrics: list) -> str:
    """The table cells of paired differences: mean ± CI (n), and the seeds with d > 0 / d < 0."""
    return " | ".join("—" if (d := by_metric.get(m)) is None else
                      f"{_cell(d, _digits(m))}, +{d['positive']}/−{d['negative']}" for m in metrics)


def _name(metric: str) -> str:
    if metric.startswith("ood:"):
        _, which, _score = metric.split(":")
        return f"AUROC {which}"
    return metric


def _plots(spec: StudySpec, out: str, results: dict, logs: dict) -> list:
    """Learning curves (mean over seeds per arm; ``logs`` as :func:`_logs`) and pooled reliability diagrams; returns
    the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # test accuracy, training loss, and (late-phase arms) whether the members diverge at all: their disagreement on
    # the test set and the spread of their late-phase weights
    swa = any(arm.ensemble_of is None and arm.resolved().swa for arm in spec.arms)
    panels = (("test_accuracy", "test accuracy (%), averaged model", "SWA arms: the SWA average" if swa else None),
              ("loss", "training loss", None),
              ("members_disagreement", "members' disagreement on the test set (%)", "mean over member pairs"),
              ("phi_spread", "spread of phi: mean_k |phi_k - phi_bar| / |phi_bar|", None))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    axes = axes.ravel()
    marks = {}
    logged = {key: _logged(logs, key) for key, _title, _note in panels}
    for i, arm in enumerate(spec.arms):
        color = colors[i % len(colors)]
        for ax, (key, _title, _note) in zip(axes, panels):
            series = list(logged[key].get(arm.name, {}).values())
            if not series:
                continue
            # the epochs every seed has the value at (test metrics are logged every eval_every epochs)
            epochs = sorted(set.intersection(*(set(v) for v in series)))
            if not epochs:
                continue
            rows = [[v[e] for e in epochs] for v in series]
            mean = [sum(c) / len(c) for c in zip(*rows)]
            ax.plot(epochs, mean, "o-", ms=3, color=color, label=f"{arm.name} (n={len(rows)})")
            ax.fill_between(epochs, [min(c) for c in zip(*rows)], [max(c) for c in zip(*rows)], color=color,
                            alpha=0.15)
        if not any(arm.name in by_arm for by_arm in logged.values()):  # no curve drawn: no release line either
            continue
        cfg = arm.resolved()
        for ax in axes:
            if cfg.late_phase and cfg.T0:
                ax.axvline(cfg.T0 + 0.5, color=color, ls="--", lw=1, alpha=0.6)
                marks["--"] = "release of the late-phase weights (T0)"
            if cfg.swa:
                ax.axvline(cfg.swa_start - 0.5, color=color, ls=":", lw=1, alpha=0.6)
                marks[":"] = "SWA start"
    for ax, (key, title, note) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        foot = "mean over seeds, band: min-max" + (f"; {note}" if note else "")
        if not ax.lines:
            foot = "no late-phase arm with K > 1 logged it" if key in ("members_disagreement", "phi_spread") \
                else "not logged"
        ax.text(0.01, 0.01, foot, transform=ax.transAxes, fontsize=8, color="gray", va="bottom")
    handles, labels = axes[0].get_legend_handles_labels()
    for ls, what in marks.items():  # name the vertical lines (each arm's, in its colour)
        handles.append(Line2D([], [], color="gray", ls=ls, lw=1))
        labels.append(what)
    # one legend below the panels (an arm has one colour everywhere): inside a panel it hid curves and footnotes
    ncol = min(4, len(handles)) or 1
    rows = -(-len(handles) // ncol)
    if handles:  # no curve at all (damaged logs): no empty legend
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.03 * rows + 0.01 if handles else 0, 1, 1))
    curves = os.path.join(out, "curves.png")
    write_png(fig, curves, dpi=110)  # atomically: a link there is replaced, its target untouched
    plt.close(fig)

    shown = [m for m in MODELS if any(_pooled_bins(results.get(a.name, {}), m, spec.rule) for a in spec.arms)]
    shown = shown or ["averaged"]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.6), squeeze=False)
    axes = axes[0]
    for ax, model in zip(axes, shown):
        ax.plot([0, 1], [0, 1], color="gray", lw=1)
        for i, arm in enumerate(spec.arms):
            bins = _pooled_bins(results.get(arm.name, {}), model, spec.rule)
            if bins:
                ax.plot([b[0] for b in bins], [b[1] for b in bins], "o-", ms=3, color=colors[i % len(colors)],
                        label=arm.name)
        ax.set_title(f"reliability: {model} ({spec.rule})", fontsize=10)
        ax.text(0.99, 0.01, "pooled over seeds", transform=ax.transAxes, fontsize=8, color="gray", ha="right")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    if axes[0].get_legend_handles_labels()[0]:  # no curve at all (damaged logs): no empty legend
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    reliability = os.path.join(out, "reliability.png")
    write_png(fig, reliability, dpi=110)
    plt.close(fig)
    return [curves, reliability]


def _read_log(path: str) -> list | None:
    """The entries of a run's log.jsonl, or None (that run's curve is not drawn) when the file is missing, a link or
    damaged: not JSON lines, or entries without a numeric epoch."""
    try:
        log = [loads(line) for line in read_bytes(path).splitlines() if line.strip()]
    except (OSError, ValueError, DeepError, RecursionError):
        return None
    if not all(isinstance(e, dict) and _number(e.get("epoch")) is not None for e in log):
        return None
    return log


def _values(log: list, key: str) -> dict:
    """epoch -> the number ``key`` holds in a run's log.jsonl entries; test accuracy is the model the run delivers
    (an SWA arm's SWA average from its start on, ``swa_test_accuracy``). Epochs without a number are absent."""
    out = {}
    for e in log:
        if e.get("phase") == "pretrained":
            continue
        v = e.get("swa_test_accuracy", e.get(key)) if key == "test_accuracy" else e.get(key)
        if _number(v) is not None:  # a hand-edited log may hold anything: only numbers count
            out[e["epoch"]] = v
    return out


def _logs(spec: StudySpec, out: str, results: dict) -> dict:
    """arm -> seed -> log.jsonl entries, for the finished runs of the training arms whose log is readable."""
    found: dict = {}
    for arm in spec.arms:
        for seed in results.get(arm.name, {}) if arm.ensemble_of is None else ():
            log = _read_log(os.path.join(_folder(out, arm.name, seed), "log.jsonl"))
            if log is not None:
                found.setdefault(arm.name, {})[seed] = log
    return found


def _logged(logs: dict, key: str) -> dict:
    """arm -> seed -> :func:`_values` of ``key`` in ``logs`` (as :func:`_logs`)."""
    return {arm: {seed: _values(log, key) for seed, log in by_seed.items()} for arm, by_seed in logs.items()}


def paired_curves(spec: StudySpec, logs: dict) -> dict:
    """{"arms": arm -> rows, "contrasts": "first - second" -> rows}: the paired per-epoch differences (arm - baseline,
    and the spec's contrasts; the same seed) of the logged test accuracy (%) of the averaged model, each row {epoch,
    mean, ci95, sd, n, positive, negative}, at the epochs every paired seed logged, from the first epoch at which any
    seed's two runs differ (before a release the arms share their trunk). What a claim about the curves' shapes
    needs: per-epoch intervals, not the overlap of two bands. ``logs``: arm -> seed -> log entries (:func:`_logs`)."""
    logs = _logged(logs, "test_accuracy")

    def rows(first: str, second: str) -> list:
        mine, other = logs.get(first, {}), logs.get(second, {})
        seeds = sorted(set(mine) & set(other))
        if not seeds:
            return []
        found = []
        for e in sorted(set.intersection(*(set(mine[s]) & set(other[s]) for s in seeds))):
            d = paired({s: mine[s][e] for s in seeds}, {s: other[s][e] for s in seeds})
            d.pop("seeds")
            found.append({"epoch": e, **d})
        start = next((i for i, r in enumerate(found) if r["positive"] or r["negative"]), len(found))
        return found[start:]
    arms = {a.name: r for a in spec.arms if a.name != spec.baseline and (r := rows(a.name, spec.baseline))}
    contrasts = {f"{a} - {b}": r for a, b in spec.contrasts if (r := rows(a, b))}
    return {"arms": arms, "contrasts": contrasts}


def _pooled_bins(runs: dict, model: str, rule: str) -> list:
    """(mean confidence, accuracy) per confidence bin, pooled over runs (and members) by example counts."""
    totals: dict = {}
    for r in runs.values():
        m = _part(r["models"], model).get(rule)
        for one in (m if isinstance(m, list) else [m] if m else []):
            rel = one.get("reliability") if isinstance(one, dict) else None
            try:
                rows = list(zip(rel["fraction"], rel["confidence"], rel["accuracy"]))
                if not all(_number(f) is not None and (c is None or _number(c) is not None and _number(a) is not None)
                           for f, c, a in rows):
                    continue  # a hand-edited or damaged diagram: not drawn
            except (TypeError, KeyError):
                continue
            for b, (f, c, a) in enumerate(rows):
                if c is not None:
                    w, sc, sa = totals.get(b, (0.0, 0.0, 0.0))
                    totals[b] = (w + f, sc + f * c, sa + f * a)
    return [(sc / w, sa / w) for b, (w, sc, sa) in sorted(totals.items()) if w > 0]


def with_eval_every(spec: StudySpec, n: int | None) -> StudySpec:
    """``spec`` with the per-epoch test metrics of every training arm every ``n`` epochs (None: unchanged). It
    changes no weight (deep.trainer.EVAL_FIELDS), so runs resume, fork and match the spec across it, and the report
    is the same."""
    return spec if n is None else dataclasses.replace(spec, eval_every=n).validate()
