"""Run configurations: typed frozen dataclasses, named presets, and the command-line flags generated from them.

One mechanism for every trainer. :class:`RunConfig` holds what all runs share (optimisation, Algorithm 1, SWA,
evaluation, execution); :class:`ImageConfig` (CIFAR, Fashion-MNIST, synthetic), :class:`TextConfig` (the enwik8
character LSTM) and :class:`FinetuneConfig` (ImageNet fine-tuning) add their own fields. Every field is a flag of the
same name with dashes (``batch_size`` -> ``--batch-size``; ``T0`` -> ``--T0``), typed by the field, validated in one
place (:meth:`RunConfig.validate`); unknown and abbreviated flags are errors.

Time: epochs count passes over the training set; before the release (epoch T0) a step uses one minibatch of
``batch_size``, after it an outer step uses K of them (each member sees 1/K of the data per epoch). Epochs are
numbered 1..epochs where a field names one (``swa_start``); ``T0`` counts the plain epochs before the release.

Presets are named as in the reference README (cifar10_bn, cifar10_bn_swa, cifar10_wrn14_bn_swa, cifar100_bn,
cifar100_bn_swa, cifar100_wrn14_bn_swa) with the reference hyperparameters; each has a baseline twin (`_bn` ->
`_base`) that differs only by having no late-phase weights (``phi = ()``).
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, fields, replace

from . import families
from .errors import ConfigError

FAMILIES = families.NAMES  # the --phi names (deep.families.REGISTRY)
FLOAT32_MAX = 3.4028234663852886e38  # float values must fit the float32 parameters and optimizer arguments
OOD_NAMES = ("svhn", "cifar10", "cifar100", "digits")  # every OOD set of deep.data.OOD_SETS
IMAGE_SIDE = {"cifar10": 32, "cifar100": 32, "fashion_mnist": 28, "synthetic": 32}  # image height = width (pixels)


ONE_OVER_K = "1/K"  # gamma_theta's value for theta along the members' mean gradient

# Configs stored before None and "1/K" held -1 (any negative number) in these fields for "the same as lr /
# weight_decay" and for 1/K; :func:`upgrade` reads them so, so older run folders resume, fork and compare alike.
LEGACY_NEGATIVE = {"lr_phi": None, "weight_decay_phi": None, "weight_decay_theta": None, "gamma_theta": ONE_OVER_K}


def upgrade(stored: dict) -> dict:
    """A stored config dict (config.json, a checkpoint's or a results file's config) in today's representation: a
    negative number in a field of LEGACY_NEGATIVE becomes that field's None or "1/K"; everything else is kept."""
    out = dict(stored)
    for key, now in LEGACY_NEGATIVE.items():
        v = out.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            out[key] = now
    return out


SEED_MAX = 2 ** 32 - 1  # seeds feed torch, numpy and derived per-epoch generators: keep them in 32 bits


NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _has_type(v, hint) -> bool:
    """Whether value ``v`` has the config field type ``hint`` (int, float, bool, str, tuple[X, ...], X | None,
    float | str)."""
    if isinstance(hint, types.UnionType):
        return any(v is None if a is type(None) else _has_type(v, a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(v, tuple) and all(_has_type(x, item) for x in v)
    if hint is bool:
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if hint is int:
        return isinstance(v, numbers.Integral)
    if hint is float:
        return isinstance(v, numbers.Real)
    return isinstance(v, hint)


def _kind(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join("null" if a is type(None) else _kind(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_kind(typing.get_args(hint)[0]).split(' ', 1)[1]}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _finite32(v) -> bool:
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= FLOAT32_MAX
    except OverflowError:
        return False


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_seed(seed) -> int:
    """``seed`` as an int if it is a run seed (an integer in 0..2**32 - 1), else ConfigError naming the range."""
    _need(isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX,
          f"--seed must be an integer in 0..{SEED_MAX}, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class RunConfig:
    """What every run shares. ``lr_phi`` / ``weight_decay_phi`` None mean: the same as ``lr`` / ``weight_decay``;
    they apply to the member copies after the release only (before it every parameter is in one optimizer), as
    ``weight_decay_theta`` (None: ``weight_decay``) and ``batch_size_late`` (0: ``batch_size``) apply to theta's
    optimizer and to each member's minibatch after the release (see :attr:`theta_weight_decay`,
    :attr:`late_batch_size`)."""
    name: str = "custom"
    dataset: str = "cifar10"
    arch: str = "wrn-28-10"
    # --- optimisation (t counts minibatches of batch_size)
    epochs: int = 200
    batch_size: int = 128             # per-member minibatch
    lr: float = 0.1                   # theta's learning rate (and phi's unless lr_phi is set)
    lr_phi: float | None = None       # the members' learning rate after the release; None: same as lr
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_phi: float | None = None    # the members' weight decay after the release; None: weight_decay
    weight_decay_theta: float | None = None  # theta's weight decay after the release; None: weight_decay
    grad_clip: float = 0.0            # clip by the norm of the (mean member's) gradient; 0: off
    # --- late-phase weights (Algorithm 1)
    K: int = 10
    phi: tuple[str, ...] = ("bn", "head")   # late-phase families (deep.families): bn, head, rank1, hyper, all; none
    rank1_layers: tuple[str, ...] = ()      # module-name patterns that get rank-1 factors (family rank1)
    T0: int = 120                     # plain epochs before the release of the late-phase weights
    gamma_theta: float | str = 1.0    # theta <- U_theta(theta, gamma_theta * sum_k grad_theta L(M_k)); or "1/K"
    gamma_theta_scales: str = "gradient"  # gradient | lr: gamma_theta on theta's gradient, or on its lr (and so on
                                          # its weight decay: the reference ImageNet script)
    phi_momentum: str = "inherit"     # inherit | zero: the members' optimizer state at the release (zero: reference)
    batch_size_late: int = 0          # each member's minibatch B' after the release; 0: batch_size
    sigma0: float = 0.0               # relative noise on the member copies at the release
    path: str = "vectorized"          # vectorized | sequential
    # --- SWA
    swa_start: int = 0                # first epoch (1..epochs) whose weights are averaged, once per epoch; 0: off
    swa_lr: float = 0.05              # constant learning rate from swa_start on
    # --- evaluation
    train_subset: int = 0             # use only the first N training examples (0: all)
    test_subset: int = 0              # evaluate on the first N test examples (0: all)
    eval_batch_size: int = 1000
    eval_every: int = 1               # the per-epoch test metrics of log.jsonl every N epochs (and the last epoch)
    bn_images: int = 0                # training examples for BatchNorm re-estimation (0: one pass over all)
    # --- execution
    bf16: bool = True                 # bf16 autocast on CUDA (the reference is fp32: --bf16 false to match it)
    channels_last: bool = True        # channels_last (NHWC) images and weights; on the CPU too (+23 % for cnn-16-48x2-96x2)
    compile: bool = False             # torch.compile the model (see the README for what it speeds up)

    KIND = "run"

    # ------------------------------------------------------------------ derived
    @property
    def late_phase(self) -> bool:
        return bool(self.phi)

    @property
    def phi_lr(self) -> float:
        return self.lr if self.lr_phi is None else self.lr_phi

    @property
    def phi_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay_phi is None else self.weight_decay_phi

    @property
    def theta_weight_decay(self) -> float:
        """lambda_theta, theta's weight decay after the release. torch's SGD decays inside each step of theta's
        optimizer, theta <- theta - eta (gamma_theta sum_k g_k + lambda_theta theta), i.e. once per outer step of K
        minibatches: per example theta gets lambda_theta / K of the base model's decay lambda per example
        (lambda_theta = K lambda, the ``late_phase_wd_K`` arm, restores the base model's decay per example)."""
        return self.weight_decay if self.weight_decay_theta is None else self.weight_decay_theta

    @property
    def late_batch_size(self) -> int:
        """B', each member's minibatch after the release (an outer step draws K B' examples). With K = 1 and
        gamma_theta = K0, B' = K0 B this is the "large-batch twin" of a late-phase run with K0 members: theta steps
        eta (K0 mean_{K0 B} grad_theta + lambda theta), phi steps eta (mean_{K0 B} grad_phi + lambda phi), which is
        what Algorithm 1 does to theta and to phi-bar = mean_k phi_k per outer step, without an ensemble."""
        return self.batch_size_late or self.batch_size

    @property
    def swa(self) -> bool:
        return self.swa_start > 0

    @property
    def theta_scale(self) -> float:
        """gamma_theta as a number: "1/K" is 1 / K (theta steps along the members' mean gradient)."""
        return 1.0 / self.K if self.gamma_theta == ONE_OVER_K else float(self.gamma_theta)

    @property
    def members(self) -> int:
        """Members after the release (1 for a run without late-phase weights)."""
        return self.K if self.late_phase else 1

    def lr_factor(self, epoch: float, part: str = "theta") -> float:
        """Multiplier of ``part``'s ("theta" or "phi") base learning rate at (0-based, possibly fractional) epoch
        ``epoch``: the one schedule of a run (the trainer sets every param group's lr from it before every step)."""
        return 1.0

    def lr_epoch(self, epoch: int, step: int, steps: int) -> float:
        """Where :meth:`lr_factor` is read for step ``step`` (0-based) of the ``steps`` of epoch ``epoch``: the epoch
        itself (the schedule moves at epoch boundaries) unless a config anneals per step."""
        return epoch

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Check every field's type and range once (raises ConfigError with one line naming the field and the
        fix)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v, hint = getattr(self, f.name), hints[f.name]
            _need(_has_type(v, hint), f"{f.name} must be {_kind(hint)}, got {v!r}")
            if float in (typing.get_args(hint) or (hint,)) and isinstance(v, numbers.Real) and not isinstance(v, bool):
                text = str(v) if len(str(v)) <= 24 else f"{str(v)[:12]}... ({len(str(v))} digits)"
                _need(_finite32(v), f"{f.name} must be a finite number (float32: |x| <= 3.4e38), got {text}")
        _need(bool(NAME_RE.fullmatch(self.name)), f"name must be letters, digits, '.', '_' or '-' (it names the run "
                                                  f"folder), got {self.name!r}")
        for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "K"):
            _need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip", "sigma0", "swa_lr", "T0", "train_subset",
                    "test_subset", "bn_images", "batch_size_late"):
            _need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        _need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        self._validate_after_release()
        _need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _need(not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0 (or --nesterov false)")
        for problem in families.problems(self.phi, self.rank1_layers):
            _need(False, problem)
        _need(all(p.strip() for p in self.rank1_layers), "rank1_layers must be module-name patterns, not empty")
        _need(self.gamma_theta_scales in ("gradient", "lr"),
              f"gamma_theta_scales must be gradient or lr, got {self.gamma_theta_scales!r}")
        _need(self.phi_momentum in ("inherit", "zero"),
              f"phi_momentum must be inherit or zero, got {self.phi_momentum!r}")
        _need(len(set(self.phi)) == len(self.phi), f"phi names a family twice: {' '.join(self.phi)}")
        _need(self.late_phase or (self.batch_size_late == 0 and self.weight_decay_theta is None),
              "batch_size_late and weight_decay_theta apply after the release of late-phase weights; this run has "
              "none (phi none): drop them, or give --phi")
        _need(self.path in ("vectorized", "sequential"), f"path must be vectorized or sequential, got {self.path!r}")
        _need(not self.late_phase or self.T0 < self.epochs,
              f"T0 ({self.T0}) must be < epochs ({self.epochs}) for a late-phase run: the members would never train; "
              f"lower --T0, raise --epochs, or pass --phi none for a run without late-phase weights")
        _need(0 <= self.swa_start <= self.epochs, f"swa_start ({self.swa_start}) must be an epoch in 1..{self.epochs} "
                                                  f"(0: no SWA)")
        _need(not self.swa or self.swa_lr > 0, f"swa_lr must be > 0 when SWA is on (swa_start {self.swa_start}), "
                                               f"got {self.swa_lr}")
        _need(not (self.swa and self.late_phase) or self.swa_start > self.T0,
              f"swa_start ({self.swa_start}) must come after the release at T0: the first late-phase epoch is "
              f"{self.T0 + 1}; use --swa-start {self.T0 + 1} or later")
        return self

    def _validate_after_release(self) -> None:
        """The fields that may be unset (None: the same as lr / weight_decay) and gamma_theta (a number or 1/K)."""
        _need(self.lr_phi is None or self.lr_phi > 0,
              f"lr_phi must be > 0, got {self.lr_phi} (leave it out for the members' lr to be lr)")
        for key in ("weight_decay_phi", "weight_decay_theta"):
            _need(getattr(self, key) is None or getattr(self, key) >= 0,
                  f"{key} must be >= 0, got {getattr(self, key)} (leave it out for weight_decay)")
        _need(self.gamma_theta == ONE_OVER_K or (not isinstance(self.gamma_theta, str) and self.gamma_theta >= 0),
              f"gamma_theta must be a number >= 0 or {ONE_OVER_K} (the members' mean gradient), got "
              f"{self.gamma_theta!r}")

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config stored by :meth:`to_dict` (lists back to tuples; older sentinels read by :func:`upgrade`);
        unknown keys are an error."""
        _need(isinstance(d, dict), f"a stored {cls.KIND} config must be an object of fields, got {type(d).__name__}")
        d = upgrade(d)
        known = {f.name for f in fields(cls)}
        bad = sorted(map(str, set(d) - known))
        _need(not bad, f"unknown config key(s) {', '.join(bad)} for {cls.KIND} runs")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class _Annealing:
    # "annealing" schedule, stepped per epoch: lr until anneal_start, linear to anneal_end_lr at anneal_end, constant
    # after; from swa_start on, the constant swa_lr.
    anneal_start: int = 100
    anneal_end: int = 180
    anneal_end_lr: float = 0.001
    anneal_per_step: bool = False     # interpolate the annealing within epochs (per step) instead of per epoch

    def lr_epoch(self, epoch: int, step: int, steps: int) -> float:
        """Annealing per step reads the schedule at epoch + step / steps; per epoch, at the epoch."""
        return epoch + step / steps if self.anneal_per_step else epoch


def annealing_lr(epoch: int, base_lr: float, start: int, end: int, end_lr_ratio: float) -> float:
    """The reference code's "annealing" schedule at `epoch` (0-based; fractional for annealing per step):

        lr(e) = base_lr                                          for e < start
              = base_lr (1 - (1 - r) (e - start) / (end - start)) for start <= e < end
              = base_lr r                                        for e >= end,
    with r = end_lr_ratio (the end learning rate as a fraction of the base learning rate)."""
    if epoch < start:
        return base_lr
    if epoch >= end or end == start:
        return base_lr * end_lr_ratio
    frac = (epoch - start) / (end - start)
    return base_lr * (1.0 - (1.0 - end_lr_ratio) * frac)


def _annealing_factor(cfg, epoch: int) -> float:
    """The annealing schedule (anneal_end_lr given for the base lr ``lr``) as a multiplier of every base learning
    rate, then the constant swa_lr / lr from epoch swa_start (1-based; 0-based epoch swa_start - 1) on."""
    if cfg.swa and epoch >= cfg.swa_start - 1:
        return cfg.swa_lr / cfg.lr
    return annealing_lr(epoch, 1.0, cfg.anneal_start, cfg.anneal_end, cfg.anneal_end_lr / cfg.lr)


def _validate_annealing(cfg) -> None:
    _need(cfg.anneal_end_lr >= 0, f"anneal_end_lr must be >= 0, got {cfg.anneal_end_lr}")
    _need(0 <= cfg.anneal_start <= cfg.anneal_end, f"anneal_start ({cfg.anneal_start}) must be in 0..anneal_end "
                                                   f"({cfg.anneal_end})")


@dataclass(frozen=True)
class ImageConfig(_Annealing, RunConfig):
    """Image classification (CIFAR-10/100, Fashion-MNIST, synthetic) with a WRN."""
    ood: tuple[str, ...] = ()         # OOD test sets: svhn, cifar10, cifar100, digits (missing: skipped with a note)
    ood_folders: tuple[str, ...] = () # OOD image folders, NAME=PATH or PATH (e.g. LSUN-resize, TinyImageNet-resize)
    augment: bool = True              # random crop (padding `pad`) + horizontal flip
    pad: int = 4                      # random-crop padding in pixels (0: flips only)
    cutout: int = 0                   # cutout square side in pixels (0: off), applied after normalisation
    synthetic_size: int = 4096        # examples in the synthetic data set
    dropout: float = 0.0              # dropout rate between the two convolutions of every block (WRN) or layer
    mc_samples: int = 0               # MC dropout at test: this many stochastic passes (0: off; needs dropout > 0)

    KIND = "image"
    DATASETS = ("cifar10", "cifar100", "fashion_mnist", "synthetic")

    def ood_folder_paths(self) -> list[tuple[str, str]]:
        """(name, path) of every OOD image folder: NAME=PATH, or PATH named by its last component."""
        out = []
        for entry in self.ood_folders:
            name, sep, path = entry.partition("=")
            if not sep:
                name, path = entry.rstrip("/").rsplit("/", 1)[-1], entry
            out.append((name, path))
        return out

    def lr_factor(self, epoch: int, part: str = "theta") -> float:
        return _annealing_factor(self, epoch)

    def validate(self) -> "ImageConfig":
        _need(self.dataset in self.DATASETS, f"unknown dataset {self.dataset!r}; choose one of "
                                             f"{', '.join(self.DATASETS)}")
        super().validate()
        _validate_annealing(self)
        _need(self.cutout >= 0, f"cutout must be >= 0, got {self.cutout}")
        _need(0 <= self.pad < IMAGE_SIDE[self.dataset], f"pad must be in 0..{IMAGE_SIDE[self.dataset] - 1}, got "
                                                        f"{self.pad}")
        _need(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _need(self.mc_samples >= 0, f"mc_samples must be >= 0, got {self.mc_samples}")
        _need(not self.mc_samples or self.dropout > 0, f"mc_samples {self.mc_samples} needs dropout > 0 (MC dropout "
                                                       f"samples the dropout masks at test time)")
        _need(self.synthetic_size >= 1, f"synthetic_size must be >= 1, got {self.synthetic_size}")
        side = IMAGE_SIDE[self.dataset]
        _need(self.cutout <= side, f"cutout must be <= the image side ({side} pixels for {self.dataset}), got "
                                   f"{self.cutout}")
        unknown = [o for o in self.ood if o not in OOD_NAMES]
        _need(not unknown, f"unknown OOD set(s) {', '.join(unknown)} in --ood; known: {', '.join(OOD_NAMES)} "
                           f"(image folders: --ood-folders NAME=PATH)")
        names = [n for n, _ in self.ood_folder_paths()]
        _need(len(set(names)) == len(names) and not set(names) & set(self.ood),
              f"OOD set names must be distinct, got {', '.join(list(self.ood) + names)}")
        for name, path in self.ood_folder_paths():
            _need(bool(name) and bool(path), f"--ood-folders entries are NAME=PATH or PATH, got {name}={path}")
        parts = self.arch.split("-")
        if parts[0] == "cnn":
            from .models.cnn import parse_plan
            try:
                plan = parse_plan(self.arch)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            _need(len(plan) <= int(math.log2(IMAGE_SIDE[self.dataset])), f"arch {self.arch}: {len(plan)} stages "
                  f"halve {IMAGE_SIDE[self.dataset]}-pixel images below one pixel; use fewer stages")
        else:
            _need(len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit()
                  and (int(parts[1]) - 4) % 6 == 0 and int(parts[1]) >= 10 and int(parts[2]) >= 1,
                  f"arch must be wrn-DEPTH-WIDTH with DEPTH = 6n + 4 >= 10 and WIDTH >= 1 (e.g. wrn-28-10), or "
                  f"cnn-STAGE-... with stages W or WxN (e.g. cnn-32-64-128), got {self.arch!r}")
        return self


@dataclass(frozen=True)
class TextConfig(_Annealing, RunConfig):
    """The enwik8 character LSTM (500 units, ~1.56 M parameters, no regularisation) with rank-1 late-phase
    weights; truncated BPTT."""
    text_split: tuple[int, ...] = ()  # (train, valid, test) bytes of the text file; empty: enwik8's 90M/5M/5M
    bptt: int = 100                   # truncated-BPTT window (characters)
    hidden_size: int = 500
    embedding_dim: int = 190

    KIND = "text"

    def lr_factor(self, epoch: int, part: str = "theta") -> float:
        return _annealing_factor(self, epoch)

    def validate(self) -> "TextConfig":
        _need(self.dataset == "enwik8", f"text runs read enwik8 (or a text with --text-split), got {self.dataset!r}")
        _need(self.arch == "lstm", f"text runs train the character LSTM (arch lstm), got {self.arch!r}")
        _need(isinstance(self.phi, tuple) and set(self.phi) <= {"rank1"},
              f"the enwik8 LSTM has rank-1 late-phase weights only (phi rank1 or none), got "
              f"{' '.join(map(str, self.phi)) if isinstance(self.phi, tuple) else self.phi!r}")
        super().validate()
        _validate_annealing(self)
        _need(self.batch_size_late == 0, "batch_size_late is implemented for image runs only; drop it")
        _need(not self.compile, "compile is not supported for the enwik8 LSTM (its state changes shape at T0)")
        _need(len(self.text_split) in (0, 3) and all(n >= 2 for n in self.text_split),
              f"text_split must be three byte counts >= 2 (train valid test) or empty, got {self.text_split}")
        for key in ("bptt", "hidden_size", "embedding_dim"):
            _need(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        return self


@dataclass(frozen=True)
class FinetuneConfig(RunConfig):
    """ImageNet "super-late-phase" fine-tuning of a pretrained torchvision classifier: late-phase BatchNorm from
    step 0 (T0 = 0), theta's learning rate times lr_drop from epoch lr_drop_epoch (0-based) on, phi's constant."""
    weights: str = "paper"            # paper (IMAGENET1K_V1) | default | another torchvision name | a file | none
    accum: int = 2                    # micro-batches per member minibatch (the reference: 2 passes of 128)
    lr_drop_epoch: int = 10
    lr_drop: float = 0.1
    crop: int = 224
    resize: int = 256
    workers: int = 8                  # data-loading processes per rank

    KIND = "finetune"

    @property
    def members(self) -> int:
        return self.K

    def lr_factor(self, epoch: int, part: str = "theta") -> float:
        return self.lr_drop if part == "theta" and epoch >= self.lr_drop_epoch else 1.0

    def validate(self, world: int = 1) -> "FinetuneConfig":
        _need(self.dataset == "imagenet", f"fine-tuning reads ImageNet, got {self.dataset!r}")
        super().validate()
        _need(self.phi == ("bn",) and self.T0 == 0, "fine-tuning releases late-phase BatchNorm at step 0 (phi bn, "
                                                    "T0 0)")
        _need(not self.swa, "SWA is not part of the fine-tuning protocol (swa_start 0)")
        _need(not self.name.endswith("_base") or self.K == 1,
              f"{self.name} is the baseline (one member); --K {self.K} would make it a late-phase run: drop "
              f"--baseline to fine-tune with {self.K} members")
        _need(self.batch_size_late == 0, "batch_size_late is implemented for image runs only; drop it")
        _need(self.accum >= 1, f"accum must be >= 1, got {self.accum}")
        _need(self.batch_size % (self.accum * world) == 0,
              f"batch_size {self.batch_size} (one member minibatch, all ranks together) must split into accum "
              f"{self.accum} micro-batches on each of {world} rank(s): use a multiple of {self.accum * world}")
        _need(0 < self.lr_drop <= 1, f"lr_drop must be in (0, 1] (theta's lr is multiplied by it), got {self.lr_drop}")
        _need(self.lr_drop_epoch >= 0, f"lr_drop_epoch must be >= 0, got {self.lr_drop_epoch}")
        _need(self.crop >= 1 and self.resize >= self.crop, f"resize ({self.resize}) must be >= crop ({self.crop}) "
                                                           f">= 1")
        _need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        return self


CONFIG_CLASSES = {cls.KIND: cls for cls in (ImageConfig, TextConfig, FinetuneConfig)}


# ----------------------------------------------------------------------------- presets

_CIFAR = dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, K=10,
              phi=("bn", "head"), gamma_theta=1.0, sigma0=0.0, phi_momentum="zero")  # members start at zero momentum
_SGD = dict(T0=120, anneal_start=100, anneal_end=180, anneal_end_lr=0.001)
_SWA = dict(T0=100, anneal_start=80, anneal_end=144, anneal_end_lr=0.05, swa_start=161, swa_lr=0.05)
_WRN14 = dict(arch="wrn-28-14", epochs=300, T0=120, anneal_start=80, anneal_end=240, anneal_end_lr=0.05,
              swa_start=241, swa_lr=0.05, cutout=16)

_IMAGES = {
    "cifar10_bn": dict(_CIFAR, **_SGD, dataset="cifar10", ood=("svhn", "cifar100")),
    "cifar10_bn_swa": dict(_CIFAR, **_SWA, dataset="cifar10", ood=("svhn", "cifar100")),
    "cifar10_wrn14_bn_swa": dict(_CIFAR, **_WRN14, dataset="cifar10", ood=("svhn", "cifar100")),
    "cifar100_bn": dict(_CIFAR, **_SGD, dataset="cifar100", ood=("svhn", "cifar10"), weight_decay_phi=5e-3),
    "cifar100_bn_swa": dict(_CIFAR, **_SWA, dataset="cifar100", ood=("svhn", "cifar10")),
    "cifar100_wrn14_bn_swa": dict(_CIFAR, **_WRN14, dataset="cifar100", ood=("svhn", "cifar10")),
    # Fashion-MNIST: real images reachable everywhere (Debian package dataset-fashion-mnist); minutes on a GPU.
    "fmnist_bn": dict(_CIFAR, dataset="fashion_mnist", arch="wrn-16-4", epochs=15, T0=9, anneal_start=6,
                      anneal_end=13, anneal_end_lr=0.001),
}
# enwik8 character LSTM; rank-1 factors on both weight matrices of the LSTM cell; truncated BPTT. These
# hyperparameters are this project's choices (the paper gives the model and the results only).
_LSTM = dict(dataset="enwik8", arch="lstm", epochs=20, batch_size=32, bptt=100, lr=1.0, momentum=0.0,
             nesterov=False, weight_decay=0.0, grad_clip=1.0, anneal_start=10, anneal_end=20, anneal_end_lr=0.1,
             K=10, gamma_theta=1.0, rank1_layers=("cell.input_proj", "cell.hidden_proj"), channels_last=False,
             bf16=False, eval_batch_size=100)
_TEXT = {
    # base: no rank-1 factors; rank1: factors from the start, one member (no ensembling); lp: K members from T0
    "enwik8_lstm_base": dict(_LSTM, phi=(), K=1, T0=0),
    "enwik8_lstm_rank1": dict(_LSTM, phi=("rank1",), K=1, T0=0),
    "enwik8_lstm_lp": dict(_LSTM, phi=("rank1",), K=10, T0=10),
    "enwik8_lstm_base_swa": dict(_LSTM, phi=(), K=1, T0=0, swa_start=15, swa_lr=0.1),
    "enwik8_lstm_rank1_swa": dict(_LSTM, phi=("rank1",), K=1, T0=0, swa_start=15, swa_lr=0.1),
    "enwik8_lstm_lp_swa": dict(_LSTM, phi=("rank1",), K=10, T0=10, swa_start=15, swa_lr=0.1),
}
# ImageNet fine-tuning (the reference ImageNet script): late-phase BatchNorm at step 0, K = 10, 20 epochs, SGD with
# momentum 0.9 (no Nesterov), weight decay 1e-4, lr 0.001, theta along the mean member gradient (gamma_theta = 1/K),
# theta's lr x0.1 from epoch 10; the _base twin is the same fine-tuning with one member. As that script does,
# gamma_theta = 1/K divides theta's learning rate (and so its weight decay) by K, and the members start at zero
# momentum.
PAPER_ARCHS = ("resnet50", "resnet152", "densenet161")
_FINETUNE = dict(dataset="imagenet", epochs=20, batch_size=256, lr=0.001, momentum=0.9, nesterov=False,
                 weight_decay=1e-4, K=10, phi=("bn",), T0=0, gamma_theta=ONE_OVER_K, gamma_theta_scales="lr",
                 phi_momentum="zero", eval_batch_size=128, bn_images=51200)


def _baseline_name(name: str) -> str:
    return name.replace("_bn", "_base")


PRESETS: dict[str, RunConfig] = {}
for _name, _kw in _IMAGES.items():
    PRESETS[_name] = ImageConfig(name=_name, **_kw)
    PRESETS[_baseline_name(_name)] = ImageConfig(name=_baseline_name(_name), **{**_kw, "phi": ()})
# Fashion-MNIST sized for two CPU cores: a small BatchNorm CNN, 7 epochs annealed to 0 per step, flips only;
# late-phase BatchNorm + head with K = 4 from epoch 5 (three late epochs); SWA of epochs 6-7 at a constant lr.
_FMNIST_CPU = dict(dataset="fashion_mnist", arch="cnn-16-48x2-96x2", epochs=7, batch_size=128, lr=0.1, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, pad=0, anneal_start=0, anneal_end=7, anneal_end_lr=0.0,
                   anneal_per_step=True, K=4, phi=("bn", "head"), T0=4, gamma_theta=1.0, ood=("digits",),
                   eval_batch_size=1000, bn_images=10000)
PRESETS["fmnist_cpu_base"] = ImageConfig(name="fmnist_cpu_base", **{**_FMNIST_CPU, "phi": ()})
PRESETS["fmnist_cpu_bn"] = ImageConfig(name="fmnist_cpu_bn", **_FMNIST_CPU)
PRESETS["fmnist_cpu_base_swa"] = ImageConfig(name="fmnist_cpu_base_swa", **{**_FMNIST_CPU, "phi": (), "swa_start": 6,
                                                                           "swa_lr": 0.02})
PRESETS["fmnist_cpu_bn_swa"] = ImageConfig(name="fmnist_cpu_bn_swa", **{**_FMNIST_CPU, "swa_start": 6,
                                                                       "swa_lr": 0.02})
# The paper's other arms, as twins of a late-phase preset (same data, model, schedule and budget in epochs):
#   _all            late-phase full ensemble: every weight replicated from T0 (nothing shared)
#   _hyper          hypernetwork late-phase weights (template banks theta, coefficients phi) + BatchNorm
#   _batchensemble  BatchEnsemble (Wen et al. 2020): rank-1 factors on every layer + per-member BatchNorm, trained
#                   as K members from step 0, the factors started apart (sigma0 = 0.5)
#   _mcdropout      one network with dropout 0.1 after every block, 10 stochastic passes at test
#   _t0             late-phase BatchNorm + head from step 0 (T0 = 0)
ARM_TWINS = {
    "all": dict(phi=("all",)),
    "hyper": dict(phi=("hyper", "bn")),
    "batchensemble": dict(phi=("rank1", "bn"), rank1_layers=("*",), T0=0, sigma0=0.5),
    "mcdropout": dict(phi=(), dropout=0.1, mc_samples=10),
    "t0": dict(T0=0),
}
for _late in ("cifar10_bn", "cifar100_bn", "fmnist_cpu_bn"):
    for _arm, _kw in ARM_TWINS.items():
        _name = _late.replace("_bn", "_" + _arm)
        PRESETS[_name] = replace(PRESETS[_late], name=_name, **_kw)
# Fashion-MNIST in the paper's schedule shape (cifar10_bn: 200 epochs, T0 = 120, lr constant to 100, annealed to
# 0.001 at 180), sized for two CPU cores: 15,000 training images, 60 epochs, T0 = 36, lr constant to epoch 30 and
# annealed per epoch to 0.001 at epoch 54 in the reference's convention (annealing_lr: 0-based epochs 0-30 at lr,
# 54-59 at the floor: 6 epochs, 174 steps per member at 0.001), batch 128 per member, K = 4. After
# the release an epoch is 15000 // (4 x 128) = 29 outer steps: 24 x 29 = 696 steps per member (the paper: 3,120),
# each member seeing the data 24 / 4 = 6 times (the paper: 8). Evaluated every 3 epochs (the final epoch always).
# Twins of the late-phase preset (same data, schedule and release):
#   _twin  the large-batch twin: after T0 no members (K = 1) but batches of K B = 512, theta along gamma_theta = K
#          times its mean gradient, phi along its mean gradient, each with the decay step eta lambda per step: the
#          mean model's dynamics of Algorithm 1 (theta and phi-bar per outer step) without an ensemble
#   _wdK   late-phase with theta's weight decay x K after the release (per example, the base model's decay)
# The reference's release: the members (and the twin's phi) start at zero momentum; theta keeps its optimizer state.
_FMNIST_PAPER = dict(_FMNIST_CPU, epochs=60, T0=36, anneal_start=30, anneal_end=54, anneal_end_lr=0.001,
                     anneal_per_step=False, train_subset=15000, eval_every=3, phi_momentum="zero")
PRESETS["fmnist_paper_shape_base"] = ImageConfig(name="fmnist_paper_shape_base", **{**_FMNIST_PAPER, "phi": ()})
PRESETS["fmnist_paper_shape_bn"] = ImageConfig(name="fmnist_paper_shape_bn", **_FMNIST_PAPER)
PRESETS["fmnist_paper_shape_twin"] = replace(PRESETS["fmnist_paper_shape_bn"], name="fmnist_paper_shape_twin", K=1,
                                             gamma_theta=4.0, batch_size_late=4 * 128)
PRESETS["fmnist_paper_shape_wdK"] = replace(PRESETS["fmnist_paper_shape_bn"], name="fmnist_paper_shape_wdK",
                                            weight_decay_theta=4 * _FMNIST_PAPER["weight_decay"])
PRESETS["synthetic_bench"] = ImageConfig(name="synthetic_bench", dataset="synthetic", arch="wrn-28-10", epochs=1,
                                         phi=(), T0=0, synthetic_size=4096)
for _name, _kw in _TEXT.items():
    PRESETS[_name] = TextConfig(name=_name, **_kw)
for _arch in PAPER_ARCHS:
    PRESETS[f"imagenet_{_arch}"] = FinetuneConfig(name=f"imagenet_{_arch}", arch=_arch, **_FINETUNE)
    PRESETS[f"imagenet_{_arch}_base"] = FinetuneConfig(name=f"imagenet_{_arch}_base", arch=_arch,
                                                       **{**_FINETUNE, "K": 1})


def get_config(name: str, **overrides) -> RunConfig:
    """A preset with `overrides` applied and validated; unknown names or keys raise ConfigError."""
    _need(name in PRESETS, f"unknown config {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return with_overrides(PRESETS[name], overrides)


def with_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """``cfg`` with ``overrides`` (field -> value) applied and validated."""
    known = {f.name for f in fields(cfg)}
    bad = sorted(set(overrides) - known)
    _need(not bad, f"unknown config key(s) {', '.join(bad)} for {cfg.KIND} runs; known keys: {', '.join(sorted(known))}")
    return replace(cfg, **overrides).validate()


# ----------------------------------------------------------------------------- flags

def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_gamma(text: str):
    """--gamma-theta: a number, or 1/K (theta along the members' mean gradient)."""
    if text.strip().upper() == ONE_OVER_K.upper():
        return ONE_OVER_K
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or {ONE_OVER_K}, got {text!r}") from None


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple = ("name",)) -> None:
    """One optional flag per field of config class ``cls`` (e.g. --epochs 10, --phi bn head, --phi none,
    --nesterov false); unset flags are None (the preset's or the stored config's value applies)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"config overrides (any field of {cls.KIND} configs)")
    for f in fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        kw = dict(default=None, metavar=f.name.upper(), dest=f"cfg_{f.name}", help=_type_name(hint))
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            kw.update(nargs="*", type=item if item in (int, float) else str)
        else:
            kw["type"] = {bool: _parse_bool, float | None: float, float | str: _parse_gamma}.get(hint, hint)
        group.add_argument(flag_name(f.name), **kw)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict:
    """The config fields given on the command line (``--phi none`` is the empty tuple)."""
    out = {}
    for f in fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            if isinstance(v, list):
                v = () if v == ["none"] else tuple(v)
            out[f.name] = v
    return out


# the fields whose unset value (None; 0 for batch_size_late) stands for another field's value
SAME_AS = {"lr_phi": "lr", "weight_decay_phi": "weight_decay", "weight_decay_theta": "weight_decay",
           "batch_size_late": "batch_size"}


def unset(name: str, value) -> bool:
    """Whether ``value`` of the SAME_AS field ``name`` stands for the other field's value: None, or 0 for
    batch_size_late (no minibatch has 0 examples). A weight decay of 0 is a decay: none."""
    return value is None or (name == "batch_size_late" and value == 0)


def show(cfg: RunConfig) -> str:
    """``cfg`` a field a line for people (``python -m deep configs NAME``): an unset field of SAME_AS as "same as
    lr (0.1)", gamma_theta 1/K with its value; the JSON that config.json stores is :meth:`RunConfig.to_dict`."""
    width = max(len(f.name) for f in fields(cfg))
    lines = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in SAME_AS and unset(f.name, v):
            text = f"same as {SAME_AS[f.name]} ({getattr(cfg, SAME_AS[f.name])})"
        elif f.name == "gamma_theta" and v == ONE_OVER_K:
            text = f"1/K ({cfg.theta_scale:g} at K = {cfg.K})"
        elif isinstance(v, tuple):
            text = " ".join(map(str, v)) or "none"
        else:
            text = str(v).lower() if isinstance(v, bool) else str(v)
        lines.append(f"{f.name:{width}s}  {text}")
    return "\n".join(lines)


def describe() -> str:
    """One line per preset: name, dataset, arch, epochs, late-phase settings."""
    lines = []
    for name in sorted(PRESETS):
        c = PRESETS[name]
        gamma = c.gamma_theta if c.gamma_theta == ONE_OVER_K else f"{c.gamma_theta:g}"
        lp = (f"K={c.K} phi={'+'.join(c.phi)} T0={c.T0} gamma_theta={gamma}" if c.late_phase
              else "no late-phase")
        swa = f", SWA from epoch {c.swa_start}" if c.swa else ""
        if c.late_phase and c.batch_size_late:
            lp += f" B'={c.batch_size_late}"
        if c.late_phase and c.weight_decay_theta is not None:
            lp += f" lambda_theta={c.weight_decay_theta:g}"
        lines.append(f"{name:26s} {c.dataset:13s} {c.arch:11s} {c.epochs:4d} epochs, {lp}{swa}")
    lines += ["", "gamma_theta = 1 (the reference CIFAR setting) steps theta along the sum of the K member gradients: in "
                  "the noisy-quadratic theory the mean model's step becomes (lr_phi + K lr) instead of lr (docs/theory.md "
                  "section 3.1), so test accuracy dips right after the release before it recovers; gamma_theta = 1/K "
                  "(--gamma-theta 1/K) keeps the step at 2 lr.",
              "", "B' (--batch-size-late): each member's minibatch after the release; with K=1, gamma_theta=K0 and "
                  "B'=K0 B a run is the large-batch twin of a K0-member run: theta <- theta - lr (K0 g_theta + "
                  "lambda theta), phi <- phi - lr (g_phi + lambda phi) per step of K0 B examples. lambda_theta "
                  "(--weight-decay-theta): theta's weight decay after the release, applied once per outer step of K "
                  "minibatches (K lambda: the base model's decay per example)."]
    return "\n".join(lines)
