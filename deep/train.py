"""Training of the image benchmarks (CIFAR-10/100, Fashion-MNIST, synthetic) with late-phase weights.

Protocol (the reference code's, without its accidents). Epochs count passes over the training set. Until epoch T0
the whole network trains with SGD on minibatches of `batch_size`. At T0 the late-phase weights are released
(:class:`shared.LatePhase`: K members, per-member optimizers, the pre-T0 momentum carried over) and every outer step
of Algorithm 1 consumes K minibatches, stacked into one batch of K * batch_size (member k owns slice k), so each
member sees 1/K of the data per epoch. The learning rate follows the "annealing" schedule per epoch
(:mod:`deep.schedule`); from `swa_start` all weights (theta and every phi_k) are averaged once per epoch at a
constant learning rate. Baseline configs have no late-phase weights and train the same way throughout.

Outputs in the run folder: config.json, log.jsonl (one line per epoch), checkpoint.pt (complete state, written
atomically at the end of every epoch; `resume=True` continues bit-for-bit on the CPU) and results.json.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

import shared
from shared import distributed as dist_utils

from . import evaluate
from .config import Config, ConfigError
from .data import GPULoader, load_dataset, load_ood_sets
from .models import wrn
from .runs import (SCHEMA, Trainer, hardware, load_checkpoint, median, restore,
                   save_checkpoint, setup, sync, write_json_atomic)
from .schedule import lr_factor

class TrainError(ValueError):
    """A run cannot start or resume (one actionable line)."""


# ----------------------------------------------------------------------------- small helpers

def families(cfg: Config) -> list:
    """The late-phase weight families named by cfg.phi."""
    out = []
    for name in cfg.phi:
        if name == "bn":
            out.append(shared.BatchNorm())
        elif name == "head":
            out.append(shared.Head())
        else:
            out.append(shared.Rank1(*cfg.rank1_layers))
    return out


def phi_parameters(model: nn.Module, fams: list) -> list:
    """The parameters that become late-phase at T0 (before the release they get phi's lr and weight decay)."""
    out, seen = [], set()
    for fam in fams:
        if isinstance(fam, shared.Rank1):
            continue  # rank-1 factors do not exist before the release
        for sel in fam.select(model):
            for p in (sel.module.get_parameter(n) for n in sel.params):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def build_model(cfg: Config, num_classes: int, in_channels: int) -> nn.Module:
    _, depth, width = cfg.arch.split("-")
    return wrn(int(depth), int(width), num_classes, in_channels)


# ----------------------------------------------------------------------------- the run

class Run(Trainer):
    """One training run: data, model, optimizers and the epoch loop, with checkpoints and resume."""

    def __init__(self, cfg: Config, seed: int = 0, data_dir: str = "data", out: str | None = None,
                 download: bool = False, device: str | None = None, progress: bool = True, resume: bool = False,
                 command: str | None = None):
        if cfg.dataset == "enwik8":
            raise ConfigError("enwik8 configs train a language model: they are run by deep.lm (python -m deep train "
                              "dispatches them)")
        self.cfg, self.seed, self.progress = cfg.validate(), int(seed), progress
        setup(self, cfg.name, self.seed, out, device, resume, command, TrainError)
        cuda = self.device.type == "cuda"
        self.malloc = None
        if self.device.type == "cpu":
            from .bench import keep_freed_memory
            self.malloc = keep_freed_memory()  # large stacked batches: avoid re-mapping activations every step
        self.amp = torch.bfloat16 if (cuda and cfg.bf16) else None
        self.channels_last = cuda and cfg.channels_last

        torch.manual_seed(self.seed)
        self._load_data(data_dir, download)
        self.model = build_model(cfg, self.train_data.num_classes, self.train_data.images.shape[1]).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.distributed:
            dist_utils.broadcast_module(self.model)
        if cfg.compile:
            self.model.compile()  # in place: parameter names and state_dict keys stay the same
        self.fams = families(cfg) if cfg.late_phase else []
        self._build_pre_optimizer()
        self.lp = None
        self.swa = None
        self.log: list = []
        self.epoch = 0
        self._begin(resume)

    # ------------------------------------------------------------------ data
    def _load_data(self, data_dir, download):
        cfg = self.cfg
        opts = {"size": cfg.synthetic_size} if cfg.dataset == "synthetic" else {}
        train = load_dataset(cfg.dataset, data_dir, "train", download, **opts)
        test = load_dataset(cfg.dataset, data_dir, "test", download,
                            **({"size": max(cfg.synthetic_size // 4, 1)} if cfg.dataset == "synthetic" else {}))
        if cfg.train_subset:
            train = _subset(train, cfg.train_subset)
        if cfg.test_subset:
            test = _subset(test, cfg.test_subset)
        self.train_data, self.test_data = train, test
        if train.source and self.rank == 0:
            print(f"note: {cfg.dataset} not found under --data-dir {data_dir}; reading it from {train.source}",
                  file=sys.stderr)
        self.ood, self.ood_missing = ({}, {})
        if cfg.ood:
            found, missing = load_ood_sets(train, data_dir, download=download)
            self.ood = {k: (_subset(v, cfg.test_subset) if cfg.test_subset else v) for k, v in found.items()
                        if k in cfg.ood}
            self.ood_missing = {k: v for k, v in missing.items() if k in cfg.ood}
            for k in cfg.ood:
                if k not in self.ood and k not in self.ood_missing:
                    self.ood_missing[k] = f"{k} is not an OOD set of {cfg.dataset}"
            if self.rank == 0:
                for k, why in self.ood_missing.items():
                    print(f"note: OOD set {k} skipped: {why}", file=sys.stderr)
        K = cfg.K if cfg.late_phase else 1
        kw = dict(train=True, device=self.device, seed=self.seed, mean=train.mean, std=train.std,
                  pad=4 if cfg.augment else 0, flip=cfg.augment, cutout=cfg.cutout,
                  channels_last=self.channels_last)
        self.pre_loader = GPULoader(train, cfg.batch_size, **kw)
        self.late_loader = GPULoader(train, K * cfg.batch_size, **kw) if cfg.late_phase else None
        # Loader for BatchNorm re-estimation (one pass over the augmented training data, batches of batch_size).
        self.bn_loader = GPULoader(train, cfg.batch_size, **{**kw, "seed": self.seed + 1})
        ev = dict(device=self.device, mean=train.mean, std=train.std, channels_last=self.channels_last)
        self.test_loader = GPULoader(test, cfg.eval_batch_size, **ev)
        self.ood_loaders = {k: GPULoader(v, cfg.eval_batch_size, **ev) for k, v in self.ood.items()}

    # ------------------------------------------------------------------ optimizers
    def _build_pre_optimizer(self):
        cfg = self.cfg
        phi = phi_parameters(self.model, self.fams)
        ids = {id(p) for p in phi}
        theta = [p for p in self.model.parameters() if id(p) not in ids]
        groups = [{"params": theta, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        if phi:
            groups.append({"params": phi, "lr": cfg.phi_lr, "weight_decay": cfg.phi_weight_decay})
        self.opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda e: lr_factor(cfg, e))

    def release(self):
        """T0: build the late-phase members (Algorithm 1 from here on)."""
        cfg = self.cfg
        t0 = cfg.T0
        sched = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(cfg, e + t0)))
        gen = torch.Generator().manual_seed(self.seed + 12345)
        self.lp = shared.LatePhase(
            self.model, cfg.K, self.fams, gamma_theta=cfg.gamma_theta, sigma0=cfg.sigma0,
            theta_optimizer=shared.sgd(cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay),
            phi_optimizer=shared.sgd(cfg.phi_lr, cfg.momentum, cfg.nesterov, cfg.phi_weight_decay),
            theta_scheduler=sched, phi_scheduler=sched, path=cfg.path, T0=self.t,
            inherit_optimizer_state=self.opt if self.t > 0 else None, generator=gen, autocast=self.amp)
        if cfg.compile:
            self.lp.model.compile()  # recompile after the surgery (late-phase layers replaced the originals)
        self.opt = self.sched = None

    @property
    def t(self) -> int:
        """Minibatches of batch_size consumed so far."""
        if self.lp is not None:
            return self.lp.t
        return self.epoch * len(self.pre_loader)

    def _start_swa(self):
        cfg = self.cfg
        if self.lp is not None:
            self.swa = shared.SWA(self.lp, cfg.swa_lr, cfg.swa_lr * cfg.phi_lr / cfg.lr)
        else:
            self.swa = AveragedModel(self.model)

    # ------------------------------------------------------------------ epochs
    def _late_step(self, x, y):
        lp = self.lp
        if self.cfg.grad_clip:
            losses = lp.forward_backward(x, y, F.cross_entropy)
            lp.clip_grad_norm_(self.cfg.grad_clip)  # the mean member's gradient norm
            lp.update()
            return losses.mean()
        return lp.step(x, y, F.cross_entropy)

    def run_epoch(self):
        cfg = self.cfg
        if cfg.late_phase and self.lp is None and self.epoch >= cfg.T0:
            self.release()
        if cfg.swa and self.swa is None and self.epoch >= cfg.swa_start:
            self._start_swa()
        loader = self.late_loader if self.lp is not None else self.pre_loader
        K = loader.batch_size // cfg.batch_size
        n = len(loader)
        bar = self._progress(n)
        self.model.train()
        total = torch.zeros((), device=self.device)
        sync(self.device)
        t_start = time.perf_counter()
        for step in range(n):
            x, y = loader.batch(self.epoch, step)
            if self.distributed:
                x, y = dist_utils.shard(x, K), dist_utils.shard(y, K)
            loss = self._late_step(x, y) if self.lp is not None else self._plain_step(x, y)
            total += loss
            bar.update(1)
        sync(self.device)
        seconds = time.perf_counter() - t_start
        bar.close()
        if not torch.isfinite(total):  # one check per epoch: no host synchronisation per step
            raise TrainError(f"non-finite loss in epoch {self.epoch + 1} of {cfg.name}; lower the learning rate or "
                             f"check the data")
        if self.distributed and self.lp is None:
            dist_utils.broadcast_module(self.model, buffers_only=True)  # BatchNorm statistics follow rank 0
        lr = self._step_schedules()
        if self.swa is not None:
            self.swa.update() if self.lp is not None else self.swa.update_parameters(self.model)
        images = n * loader.batch_size
        entry = {"epoch": self.epoch + 1, "t": self.t if self.lp is None else self.lp.t,
                 "phase": "late" if self.lp is not None else "pre", "lr": lr,
                 "loss": float(total) / n, "images_per_s": images / seconds, "seconds": seconds,
                 "test_accuracy": self._quick_test_accuracy()}
        self.epoch += 1
        if self.lp is None:
            entry["t"] = self.t
        self.log.append(entry)
        if self.rank == 0:
            self._checkpoint()
        return entry

    @torch.no_grad()
    def _quick_test_accuracy(self) -> float:
        """Test accuracy (%) of the current weight-averaged model (members' mean BatchNorm statistics)."""
        model = self.lp.collapse(bn="mean") if self.lp is not None else self.model
        p, y = evaluate.probs_of(model, self.test_loader, self.amp)
        return 100.0 * float((p.argmax(1) == y).float().mean())

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self):
        save_checkpoint(self, "deep-run/1")

    def _resume(self):
        state = load_checkpoint(self, "deep-run/1", "a deep training", TrainError)
        restore(self, state, release=self._release_at_T0, start_swa=self._start_swa)

    def _release_at_T0(self):
        """Rebuild the members as they were released at epoch T0 (for resuming; the checkpoint then overwrites them)."""
        epoch, self.epoch = self.epoch, self.cfg.T0
        self.release()
        self.epoch = epoch

    # ------------------------------------------------------------------ the whole run
    def evaluate(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        models = {}
        if self.lp is not None:
            late_model = self.lp.model
            if self.swa is not None:
                late_model = self.swa.finalize(self.bn_loader)
            averaged = shared.collapse(late_model, self.bn_loader, cfg.bn_update)
            models["averaged"] = evaluate.evaluate_plain(averaged, self.test_loader, self.ood_loaders, self.amp)
            models["ensemble"], models["members"] = evaluate.evaluate_members(late_model, self.test_loader,
                                                                            self.ood_loaders, self.amp)
        else:
            model = self.model
            if self.swa is not None:
                model = self.swa.module
                update_bn(self.bn_loader, model)
            models["averaged"] = evaluate.evaluate_plain(model, self.test_loader, self.ood_loaders, self.amp)
        late_log = [e for e in self.log if e["phase"] == "late"]
        result = {
            "schema": SCHEMA, "config": cfg.to_dict(), "seed": self.seed, "command": self.command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "hardware": hardware(self.device),
            "world_size": self.world, "malloc": self.malloc, "models": models, "ood_missing": self.ood_missing,
            "train_seconds": sum(e["seconds"] for e in self.log),
            "eval_seconds": time.perf_counter() - t_start,
            "images_per_s": {"pre": median([e["images_per_s"] for e in self.log if e["phase"] == "pre"]),
                             "late": median([e["images_per_s"] for e in late_log])},
            "train_images": len(self.train_data), "test_images": len(self.test_data),
        }
        if self.rank == 0:
            write_json_atomic(os.path.join(self.out, "results.json"), result)
        return result


def _subset(data, n):
    import dataclasses
    n = min(n, len(data))
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n])


def train(cfg: Config, **kwargs) -> dict:
    """Train and evaluate one run (see :class:`Run`); returns the results dict (also written to results.json)."""
    return Run(cfg, **kwargs).train()
