"""Training configurations: one typed dataclass, named presets, and flag overrides.

Presets are named as in the reference README (cifar10_bn, cifar10_bn_swa, cifar10_wrn14_bn_swa, cifar100_bn,
cifar100_bn_swa, cifar100_wrn14_bn_swa) with the reference hyperparameters; each has a baseline twin that
differs only by having no late-phase weights (`_bn` -> `_base`). Time: epochs count passes over the training
set; before T0 a step uses one minibatch of `batch_size`, after T0 an outer step uses K of them (each member sees
1/K of the data per epoch).
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, fields, replace


class ConfigError(ValueError):
    """A configuration value or name is invalid."""


FAMILIES = ("bn", "head", "rank1")
FLOAT32_MAX = 3.4028234663852886e38  # float values must fit the float32 parameters and optimizer arguments
OOD_NAMES = ("svhn", "cifar10", "cifar100")  # every OOD set of deep.data.OOD_SETS
IMAGE_SIDE = {"cifar10": 32, "cifar100": 32, "fashion_mnist": 28, "synthetic": 32}  # image height = width (pixels)


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    # --- data
    dataset: str = "cifar10"          # cifar10 | cifar100 | fashion_mnist | synthetic | enwik8
    ood: tuple[str, ...] = ()         # OOD test sets: svhn, cifar10, cifar100 (missing ones are skipped with a note)
    augment: bool = True              # pad-4 random crop + horizontal flip (images)
    cutout: int = 0                   # cutout square side in pixels (0: off), applied after normalisation
    train_subset: int = 0             # use only the first N training examples/characters (0: all)
    test_subset: int = 0              # evaluate on the first N test examples (enwik8: of valid and test)
    synthetic_size: int = 4096        # examples in the synthetic data set
    # --- model
    arch: str = "wrn-28-10"           # wrn-DEPTH-WIDTH | lstm
    # --- optimisation (t counts minibatches of batch_size)
    epochs: int = 200
    batch_size: int = 128             # per-member minibatch
    lr: float = 0.1                   # theta's learning rate (and phi's unless lr_phi is set)
    lr_phi: float = -1.0              # phi's learning rate; < 0 means: same as lr
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_phi: float = -1.0    # phi's weight decay; < 0 means: same as weight_decay
    grad_clip: float = 0.0            # global gradient-norm clip (0: off)
    # "annealing" schedule, stepped per epoch: lr until anneal_start, linear to anneal_end_lr at anneal_end, constant after
    anneal_start: int = 100
    anneal_end: int = 180
    anneal_end_lr: float = 0.001
    # --- late-phase weights (Algorithm 1)
    K: int = 10
    phi: tuple[str, ...] = ("bn", "head")   # late-phase families: bn, head, rank1; empty: no late-phase weights
    rank1_layers: tuple[str, ...] = ()      # module-name patterns that get rank-1 factors (family rank1)
    T0: int = 120                     # epoch at which the late-phase weights are released
    gamma_theta: float = 1.0          # theta <- U_theta(theta, gamma_theta * sum_k grad_theta L(M_k))
    sigma0: float = 0.0               # relative noise on the member copies at T0
    path: str = "vectorized"          # vectorized | sequential
    # --- SWA
    swa_start: int = -1               # epoch from which all weights are averaged once per epoch (< 0: off)
    swa_lr: float = 0.05              # constant learning rate during SWA
    # --- evaluation
    bn_update: str = "data"           # BatchNorm statistics of the averaged model: data (re-estimated) | mean
    eval_batch_size: int = 1000       # enwik8: rows (columns of the stream) evaluated side by side
    # --- enwik8 (character LSTM)
    text_split: tuple[int, ...] = ()  # (train, valid, test) bytes of the text file; empty: enwik8's 90M/5M/5M
    bptt: int = 100                   # truncated-BPTT window (characters)
    hidden_size: int = 500
    embedding_dim: int = 190
    # --- execution
    bf16: bool = True                 # bf16 autocast on CUDA (fp32 on the CPU)
    channels_last: bool = True        # channels_last memory format on CUDA
    compile: bool = False             # torch.compile the model
    workers: int = 0                  # unused by the GPU-resident pipeline; kept for ImageFolder data

    # ------------------------------------------------------------------ derived
    @property
    def late_phase(self) -> bool:
        return bool(self.phi) and self.K >= 1 and self.T0 < self.epochs

    @property
    def phi_lr(self) -> float:
        return self.lr if self.lr_phi < 0 else self.lr_phi

    @property
    def phi_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay_phi < 0 else self.weight_decay_phi

    @property
    def swa(self) -> bool:
        return self.swa_start >= 0

    def validate(self) -> "Config":
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)
        need(self.dataset in ("cifar10", "cifar100", "fashion_mnist", "synthetic", "enwik8"),
             f"unknown dataset {self.dataset!r}; choose cifar10, cifar100, fashion_mnist, synthetic or enwik8")
        for f in fields(self):
            v = getattr(self, f.name)
            need(not isinstance(v, float) or abs(v) <= FLOAT32_MAX,
                 f"{f.name} must be a finite number (float32: |x| <= 3.4e38), got {v}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0: off), got {self.grad_clip}")
        need(self.anneal_end_lr >= 0, f"anneal_end_lr must be >= 0, got {self.anneal_end_lr}")
        need(self.swa_lr >= 0, f"swa_lr must be >= 0, got {self.swa_lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(not (self.nesterov and self.momentum == 0), "nesterov needs momentum > 0")
        need(self.K >= 1, f"K must be >= 1, got {self.K}")
        need(all(f in FAMILIES for f in self.phi), f"phi families must be among {FAMILIES}, got {self.phi}")
        need("rank1" not in self.phi or self.rank1_layers, "phi family rank1 needs --rank1_layers (module names)")
        need(0 <= self.T0, f"T0 must be >= 0, got {self.T0}")
        need(self.gamma_theta >= 0, f"gamma_theta must be >= 0, got {self.gamma_theta}")
        need(self.sigma0 >= 0, f"sigma0 must be >= 0, got {self.sigma0}")
        need(self.path in ("vectorized", "sequential"), f"path must be vectorized or sequential, got {self.path!r}")
        need(self.bn_update in ("data", "mean"), f"bn_update must be data or mean, got {self.bn_update!r}")
        need(self.anneal_start <= self.anneal_end, "anneal_start must be <= anneal_end")
        need(not self.swa or self.swa_start < self.epochs, f"swa_start ({self.swa_start}) must be < epochs")
        for key in ("cutout", "train_subset", "test_subset", "workers"):
            need(getattr(self, key) >= 0, f"{key} must be >= 0, got {getattr(self, key)}")
        side = IMAGE_SIDE.get(self.dataset)
        need(side is None or self.cutout <= side,
             f"cutout must be <= the image side ({side} pixels for {self.dataset}), got {self.cutout}")
        unknown = [o for o in self.ood if o not in OOD_NAMES]
        need(not unknown, f"unknown OOD set(s) {', '.join(unknown)} in --ood; known: {', '.join(OOD_NAMES)}")
        need(len(self.text_split) in (0, 3) and all(isinstance(n, int) and n >= 2 for n in self.text_split),
             f"text_split must be three byte counts >= 2 (train valid test) or empty, got {self.text_split}")
        if self.arch != "lstm":
            parts = self.arch.split("-")
            need(len(parts) == 3 and parts[0] == "wrn" and parts[1].isdigit() and parts[2].isdigit()
                 and (int(parts[1]) - 4) % 6 == 0 and int(parts[1]) >= 10,
                 f"arch must be wrn-DEPTH-WIDTH with DEPTH = 6n + 4 (e.g. wrn-28-10) or lstm, got {self.arch!r}")
        need((self.arch == "lstm") == (self.dataset == "enwik8"), "the lstm arch goes with the enwik8 dataset")
        return self

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


# ----------------------------------------------------------------------------- presets

_CIFAR = dict(epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, K=10,
              phi=("bn", "head"), gamma_theta=1.0, sigma0=0.0)
_SGD = dict(T0=120, anneal_start=100, anneal_end=180, anneal_end_lr=0.001)
_SWA = dict(T0=100, anneal_start=80, anneal_end=144, anneal_end_lr=0.05, swa_start=161, swa_lr=0.05)
_WRN14 = dict(arch="wrn-28-14", epochs=300, T0=120, anneal_start=80, anneal_end=240, anneal_end_lr=0.05,
              swa_start=241, swa_lr=0.05, cutout=16)

_LATE = {
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
# enwik8 character LSTM (500 units, ~1.56 M parameters, no regularisation); rank-1 factors on both weight
# matrices of the LSTM cell; truncated BPTT.
_LSTM = dict(dataset="enwik8", arch="lstm", epochs=20, batch_size=32, bptt=100, lr=1.0, momentum=0.0,
             nesterov=False, weight_decay=0.0, grad_clip=1.0, anneal_start=10, anneal_end=20, anneal_end_lr=0.1,
             augment=False, K=10, gamma_theta=1.0, rank1_layers=("cell.input_proj", "cell.hidden_proj"),
             channels_last=False, bf16=False, eval_batch_size=100)
_LATE.update({
    # base: no rank-1 factors; rank1: factors from the start, one member (no ensembling); late-phase: K members from T0
    "enwik8_lstm_base": dict(_LSTM, phi=(), K=1, T0=0),
    "enwik8_lstm_rank1": dict(_LSTM, phi=("rank1",), K=1, T0=0),
    "enwik8_lstm_lp": dict(_LSTM, phi=("rank1",), K=10, T0=10),
    "enwik8_lstm_base_swa": dict(_LSTM, phi=(), K=1, T0=0, swa_start=15, swa_lr=0.1),
    "enwik8_lstm_rank1_swa": dict(_LSTM, phi=("rank1",), K=1, T0=0, swa_start=15, swa_lr=0.1),
    "enwik8_lstm_lp_swa": dict(_LSTM, phi=("rank1",), K=10, T0=10, swa_start=15, swa_lr=0.1),
})


def _baseline_name(name: str) -> str:
    return name.replace("_bn", "_base")


PRESETS: dict[str, Config] = {}
for _name, _kw in _LATE.items():
    PRESETS[_name] = Config(name=_name, **_kw)
    if "_bn" in _name:
        base = _baseline_name(_name)
        PRESETS[base] = Config(name=base, **{**_kw, "phi": (), "K": 1, "weight_decay_phi": -1.0})
PRESETS["synthetic_bench"] = Config(name="synthetic_bench", dataset="synthetic", arch="wrn-28-10", epochs=1,
                                    T0=0, synthetic_size=4096)


def get_config(name: str, **overrides) -> Config:
    """A preset with `overrides` applied and validated; unknown names or keys raise ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    known = {f.name for f in fields(Config)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown config key(s) {', '.join(bad)}; known keys: {', '.join(sorted(known))}")
    return replace(PRESETS[name], **overrides).validate()


# ----------------------------------------------------------------------------- flags

def _flag_type(tp):
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return (args[0] if args and args[0] in (int, float) else str), "*"
    if tp is bool:
        return _parse_bool, None
    return tp, None


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One optional flag per Config field (e.g. --epochs 10, --phi bn head, --nesterov false)."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("config overrides (any Config field)")
    for f in fields(Config):
        if f.name == "name":
            continue
        tp, nargs = _flag_type(hints[f.name])
        hint = hints[f.name]
        kw = dict(type=tp, default=None, metavar=f.name.upper(),
                  help=hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", ""))
        if nargs:
            kw["nargs"] = nargs
        group.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    out = {}
    for f in fields(Config):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            out[f.name] = tuple(v) if isinstance(v, list) else v
    return out


def describe() -> str:
    """One line per preset: name, dataset, arch, epochs, late-phase settings."""
    lines = []
    for name in sorted(PRESETS):
        c = PRESETS[name]
        lp = f"K={c.K} phi={'+'.join(c.phi)} T0={c.T0} gamma_theta={c.gamma_theta:g}" if c.late_phase else "no late-phase"
        swa = f", SWA from {c.swa_start}" if c.swa else ""
        lines.append(f"{name:26s} {c.dataset:13s} {c.arch:10s} {c.epochs:4d} epochs, {lp}{swa}")
    return "\n".join(lines)

