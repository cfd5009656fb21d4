"""`python -m deep finetune`: the ImageNet "super-late-phase" benchmark -- a pretrained torchvision classifier
(ResNet-50, ResNet-152, DenseNet-161 in the paper) fine-tuned for 20 epochs with late-phase BatchNorm.

Protocol (the reference ImageNet script's settings, without its accidents):

* Start from pretrained weights (``--weights paper``: torchvision's ImageNet-1k V1 weights, which the paper used;
  ``default``: torchvision's current default; or a local file). The late-phase weights are released at step 0
  (T0 = 0): every BatchNorm layer (gamma, beta, running statistics) gets K = 10 copies, the classifier head stays
  shared (theta).
* SGD with momentum 0.9 (no Nesterov), weight decay 1e-4, lr 0.001 for theta and phi. theta is stepped along
  gamma_theta sum_k grad_theta L(M_k) with gamma_theta = 1/K (the mean of the member gradients; the reference script
  divides theta's learning rate by K instead, which also divides theta's weight decay by K -- at lr 1e-3 and weight
  decay 1e-4 a negligible difference). After ``--lr-drop-epoch`` (10) epochs theta's learning rate is multiplied by
  0.1; phi's stays constant, as in the reference script.
* ``--batch-size`` (256) is the size of one member minibatch M_k (summed over all ranks), as the CIFAR runs count
  it: an outer step of Algorithm 1 consumes K minibatches (K * 256 images) and every member sees 1/K of the
  training set per epoch. ``--baseline`` is the paper's "base" column: the same fine-tuning with K = 1 (one BatchNorm
  copy, i.e. plain SGD with the same parameter groups and schedule, 256 images per step).
* Gradient accumulation (``--accum A``): each member minibatch is split into A micro-batches; a micro-step runs the
  K members' micro-batches (stacked on the vectorized path, one after the other on the sequential path) and the
  losses are scaled by 1/A, so after A micro-steps every member's gradient is the mean over its whole minibatch and
  theta's is their sum; only then do the optimizers step (once). BatchNorm's batch statistics are then those of
  the member's micro-batch (256 / A images, synchronised over the ranks). Memory per forward: K * 256 / (A * ranks)
  images on the vectorized path, 256 / (A * ranks) on the sequential one.
* Evaluation on the validation set (never used for any choice: the last epoch is reported). Each epoch: top-1/top-5
  of the averaged model (phi_bar = mean_k phi_k, BatchNorm statistics = the members' mean running statistics; cheap)
  and of the ensemble (mean of the members' softmax probabilities, each member with its own statistics), and each
  member's top-1. At the end the averaged model's BatchNorm statistics are re-estimated from ``--bn-images`` training
  images (``--bn-update data``, the default; ``mean`` keeps the members' mean) and the final models get top-1,
  top-5, NLL and ECE (:mod:`deep.metrics` definitions; streamed, so they also reduce over ranks).

Outputs in the run folder: config.json, log.jsonl (one line per epoch; epoch 0 is the pretrained model),
checkpoint.pt (complete state written atomically after every epoch; ``--resume`` continues bit-for-bit on the CPU:
data order and augmentation draws are functions of (seed, epoch, rank)) and results.json (schema
late-phase-results/1, config name ``imagenet_<arch>`` or ``imagenet_<arch>_base``, read by ``python -m deep table``).
Under torchrun every rank loads its own shard of each member minibatch (DistributedSampler-style) and gradients are
averaged over ranks; the validation set is sharded and the metric sums are reduced.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import shared
from shared import distributed as dist_utils

from .config import FLOAT32_MAX
from .data.errors import DataError
from .data.imagenet import EpochSampler, imagenet_datasets, train_transform, val_transform
from .models.torchvision_models import PAPER_ARCHS, build_pretrained
from .runs import (SCHEMA, Trainer, hardware, load_checkpoint, restore,
                   save_checkpoint, setup, sync, write_json_atomic)

FORMAT = "deep-finetune/1"
ECE_BINS = 15


class FinetuneError(ValueError):
    """A fine-tuning run cannot start or resume (one actionable line)."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (compared on --resume)."""
    arch: str = "resnet50"
    weights: str = "paper"
    baseline: bool = False
    epochs: int = 20
    K: int = 10
    lr: float = 0.001
    gamma_theta: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256
    accum: int = 1
    lr_drop_epoch: int = 10
    lr_drop: float = 0.1
    path: str = "vectorized"
    crop: int = 224
    resize: int = 256
    train_subset: int = 0
    val_subset: int = 0
    bn_update: str = "data"
    bn_images: int = 51200
    eval_batch_size: int = 128
    bf16: bool = True
    channels_last: bool = True

    @property
    def name(self) -> str:
        return f"imagenet_{self.arch}" + ("_base" if self.baseline else "")

    @property
    def members(self) -> int:
        return self.K

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}

    def validate(self, world: int = 1) -> "FinetuneConfig":
        def need(ok, msg):
            if not ok:
                raise FinetuneError(msg)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            need(not isinstance(v, float) or abs(v) <= FLOAT32_MAX,
                 f"--{f.name.replace('_', '-')} must be a finite number (float32: |x| <= 3.4e38), got {v}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.K >= 1, f"--K must be >= 1, got {self.K}")
        need(not self.baseline or self.K == 1, "the baseline has one member (K = 1)")
        need(self.lr > 0 and self.gamma_theta >= 0, "--lr must be > 0 and --gamma-theta >= 0")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.accum >= 1, f"--accum must be >= 1, got {self.accum}")
        need(self.batch_size >= 1 and self.batch_size % (self.accum * world) == 0,
             f"--batch-size {self.batch_size} (one member minibatch, all ranks together) must split into "
             f"--accum {self.accum} micro-batches on each of {world} rank(s): use a multiple of "
             f"{self.accum * world}")
        need(0 < self.lr_drop <= 1, f"--lr-drop must be in (0, 1] (theta's lr is multiplied by it), got {self.lr_drop}")
        need(self.lr_drop_epoch >= 0, f"--lr-drop-epoch must be >= 0, got {self.lr_drop_epoch}")
        need(self.path in ("vectorized", "sequential"), f"--path must be vectorized or sequential, got {self.path!r}")
        need(self.bn_update in ("data", "mean"), f"--bn-update must be data or mean, got {self.bn_update!r}")
        need(self.crop >= 1 and self.resize >= self.crop, "--resize must be >= --crop >= 1")
        for key in ("train_subset", "val_subset", "bn_images"):
            need(getattr(self, key) >= 0, f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        need(self.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
        return self


# ----------------------------------------------------------------------------- the accumulated outer step

def accumulated_step(lp: shared.LatePhase, micro_batches: Iterable, loss_fn: Callable, accum: int,
                     prepare: Callable | None = None) -> torch.Tensor:
    """One outer step of Algorithm 1 from ``accum`` micro-steps; returns the K member losses (detached, shape (K,)).

    ``micro_batches`` yields ``accum`` pairs (x, y), each holding the K members' micro-batches stacked along dim 0
    (slice k = member k's next micro-batch, as :meth:`shared.LatePhase.step` expects); they are consumed one at a
    time, so only one micro-batch is in memory. Each micro-step's losses are scaled by 1/accum and its gradients added
    up, so afterwards phi_k.grad = grad_phi_k of the mean loss over member k's whole minibatch and theta.grad = the
    sum over members of those means -- exactly what one step on the whole minibatches gives when the per-sample
    losses do not interact (BatchNorm's batch statistics are the micro-batch's, over all ranks). Then the
    optimizers step once (:meth:`shared.LatePhase.update`). ``prepare(x, y)`` moves a micro-batch to the device.
    """
    scaled = (lambda out, y: loss_fn(out, y) / accum) if accum > 1 else loss_fn
    params = [p for p in lp.model.parameters() if p.requires_grad]
    sums: list = [None] * len(params)
    losses = None
    done = 0
    for x, y in micro_batches:
        if prepare is not None:
            x, y = prepare(x, y)
        member_losses = lp.forward_backward(x, y, scaled)  # zeroes the gradients first
        losses = member_losses if losses is None else losses + member_losses
        if accum > 1:
            for i, p in enumerate(params):
                if p.grad is not None:
                    if sums[i] is None:
                        sums[i] = p.grad
                    else:
                        sums[i].add_(p.grad)
        done += 1
        if done == accum:
            break
    if done != accum:
        raise FinetuneError(f"an outer step needs {accum} micro-batches, got {done}")
    if accum > 1:
        for p, g in zip(params, sums):
            p.grad = g
    lp.update()
    return losses  # the sum of the micro-steps' scaled losses: each member's mean loss over its minibatch


# ----------------------------------------------------------------------------- streamed metrics

class MetricSums:
    """Sufficient statistics of top-1, top-5, mean NLL and ECE (deep.metrics' definitions: 15 equal-width confidence
    bins (lo, hi], probabilities clipped at 1e-12) over batches of predicted probabilities; reducible over ranks."""

    def __init__(self, device, bins: int = ECE_BINS):
        self.bins = bins
        self.edges = torch.from_numpy(np.linspace(0.0, 1.0, bins + 1)).to(device)
        # [n, top1 hits, top5 hits, NLL sum, per-bin counts, per-bin confidence sums, per-bin hits]
        self.sums = torch.zeros(4 + 3 * bins, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        p = probs.to(torch.float64)
        labels = labels.to(p.device)
        conf, pred = p.max(1)
        hit = (pred == labels).double()
        top5 = (p.topk(min(5, p.shape[1]), 1).indices == labels[:, None]).any(1).double()
        nll = -p.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12).log()
        b = (torch.bucketize(conf, self.edges, right=False) - 1).clamp(0, self.bins - 1)
        s, n = self.sums, self.bins
        s[0] += p.shape[0]
        s[1] += hit.sum()
        s[2] += top5.sum()
        s[3] += nll.sum()
        s[4:4 + n].index_add_(0, b, torch.ones_like(conf))
        s[4 + n:4 + 2 * n].index_add_(0, b, conf)
        s[4 + 2 * n:].index_add_(0, b, hit)

    def reduce(self) -> None:
        """Sum over the ranks of torch.distributed (no-op in one process)."""
        if dist_utils.is_distributed():
            dist.all_reduce(self.sums)

    def summary(self) -> dict:
        s, n = self.sums.cpu(), self.bins
        total = float(s[0])
        if total == 0:
            raise FinetuneError("no validation images were evaluated")
        counts, conf, hits = s[4:4 + n], s[4 + n:4 + 2 * n], s[4 + 2 * n:]
        used = counts > 0
        ece = float((counts[used] / total * (hits[used] / counts[used] - conf[used] / counts[used]).abs()).sum())
        top1 = 100 * float(s[1]) / total
        out = {"top1": top1, "top5": 100 * float(s[2]) / total, "accuracy": top1, "nll": float(s[3]) / total,
               "ece": 100 * ece}
        for k, v in out.items():
            if not math.isfinite(v):
                raise FinetuneError(f"metric {k} is not finite ({v}); the predictions contain NaN")
        return out


# ----------------------------------------------------------------------------- helpers

def _subset(dataset, n: int, seed: int = 0):
    """A fixed random subset of n samples (the same for every run seed), in index order."""
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(order.tolist()))


def _classes(dataset) -> int:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def _output_features(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def build_model(cfg: FinetuneConfig, num_classes: int, allow_download: bool = True) -> nn.Module:
    """The torchvision model with the requested weights ("none": random, for tests), checked against the data."""
    weights = cfg.weights
    if weights.lower() == "none":
        return build_pretrained(cfg.arch, None, num_classes=num_classes)
    if Path(weights).expanduser().is_file():
        return build_pretrained(cfg.arch, weights, num_classes=num_classes)
    model = build_pretrained(cfg.arch, weights, allow_download=allow_download)
    out = _output_features(model)
    if out is not None and out != num_classes:
        raise FinetuneError(f"the {cfg.arch} weights {weights!r} classify {out} classes but the data has "
                            f"{num_classes} class folders; fine-tuning keeps the pretrained classifier, so use the "
                            f"full ImageNet train/ and val/ folders (or --weights none or a weights file with "
                            f"{num_classes} classes)")
    return model


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2 ** 63)


# ----------------------------------------------------------------------------- the run

class FineTune(Trainer):
    """One fine-tuning run: data, pretrained model, late-phase BatchNorm, the epoch loop, evaluation, checkpoints."""

    def __init__(self, cfg: FinetuneConfig, data_dir: str, seed: int = 0, out: str | None = None,
                 resume: bool = False, device: str | None = None, workers: int = 8, progress: bool = True,
                 allow_download: bool = True, command: str | None = None):
        cfg.validate()  # before setup creates the run folder (the checks that depend on the ranks follow)
        setup(self, cfg.name, int(seed), out, device, resume, command, FinetuneError)
        self.cfg, self.seed, self.workers, self.progress = cfg.validate(self.world), int(seed), workers, progress
        cuda = self.device.type == "cuda"
        self.amp = torch.bfloat16 if (cuda and cfg.bf16) else None
        self.memory_format = torch.channels_last if (cuda and cfg.channels_last) else torch.contiguous_format
        if cuda:
            torch.backends.cudnn.benchmark = True

        train, val = imagenet_datasets(data_dir, train_transform(cfg.crop), val_transform(cfg.resize, cfg.crop))
        self.num_classes = _classes(train)
        self.train_data, self.val_data = _subset(train, cfg.train_subset), _subset(val, cfg.val_subset)
        K, A = cfg.members, cfg.accum
        self.micro = cfg.batch_size // (A * self.world)  # one member's micro-batch on one rank
        per_rank = math.ceil(len(self.train_data) / self.world)
        self.steps_per_epoch = per_rank // (K * self.micro) // A
        if self.steps_per_epoch < 1:
            raise DataError(f"the training set has {len(self.train_data)} images, fewer than one outer step needs "
                            f"({K} member minibatch(es) of --batch-size {cfg.batch_size}); use more data or a smaller "
                            f"--batch-size")

        torch.manual_seed(self.seed)
        model = build_model(cfg, self.num_classes, allow_download).to(self.device, memory_format=self.memory_format)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise FinetuneError(f"{cfg.arch} has no BatchNorm layer; late-phase BatchNorm fine-tuning needs one "
                                f"(e.g. {', '.join(PAPER_ARCHS)})")
        if self.distributed:
            dist_utils.broadcast_module(model)
        self.log: list = []
        self.epoch = 0
        if not resume:
            entry = {"epoch": 0, "phase": "pretrained", "averaged": self._eval_plain(model)}
            self.log.append(entry)
        drop_epoch, drop = cfg.lr_drop_epoch, cfg.lr_drop
        theta_schedule = (lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: drop if e >= drop_epoch else 1.0))
        opt = shared.sgd(cfg.lr, cfg.momentum, False, cfg.weight_decay)
        self.lp = shared.LatePhase(model, K, [shared.BatchNorm()],
                                   gamma_theta=cfg.gamma_theta,
                                   theta_optimizer=opt, phi_optimizer=opt, theta_scheduler=theta_schedule,
                                   path=cfg.path, T0=0, check_finite_every=0, autocast=self.amp)
        self._begin(resume)

    # ------------------------------------------------------------------ data
    def _loader(self, dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False) -> DataLoader:
        """Batches of this rank's shard: shuffled by (seed, epoch) and padded like DistributedSampler for training,
        order[rank::world] (every image once) otherwise; worker seeds from (seed, epoch, rank)."""
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=self.world, rank=self.rank,
                               pad=shuffle)
        sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, self.rank))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda", drop_last=drop_last, generator=generator)

    def _prepare(self, x, y):
        x = x.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _eval_plain(self, model: nn.Module) -> dict:
        sums = MetricSums(self.device)
        was = model.training
        model.eval()
        for x, y in self._loader(self.val_data, self.cfg.eval_batch_size, shuffle=False):
            x, y = self._prepare(x, y)
            with self._autocast():
                logits = model(x)
            sums.add(torch.softmax(logits.float(), 1), y)
        model.train(was)
        sums.reduce()
        return sums.summary()

    @torch.no_grad()
    def _eval_members(self) -> tuple[dict, list]:
        """(ensemble metrics, [member metrics]) from one stacked eval forward of the K members per batch."""
        K = self.cfg.members
        ens, members = MetricSums(self.device), [MetricSums(self.device) for _ in range(K)]
        for x, y in self._loader(self.val_data, self.cfg.eval_batch_size, shuffle=False):
            x, y = self._prepare(x, y)
            with self._autocast():
                logits = shared.ensemble_logits(self.lp.model, x)
            probs = torch.softmax(logits.float(), -1)
            ens.add(probs.mean(0), y)
            for k in range(K):
                members[k].add(probs[k], y)
        for s in [ens] + members:
            s.reduce()
        return ens.summary(), [m.summary() for m in members]

    @torch.no_grad()
    def _reestimate_bn(self, model: nn.Module) -> None:
        """BatchNorm statistics of a plain model from cfg.bn_images training images (training transform), as
        torch.optim.swa_utils.update_bn: reset, cumulative average over the batches; averaged over ranks."""
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        torch.manual_seed(self.seed + 7919)  # the augmentation draws of the re-estimation pass
        batch = self.cfg.eval_batch_size
        loader = self._loader(self.train_data, batch, shuffle=True, seed=self.seed + 7919)
        limit = math.ceil(self.cfg.bn_images / (batch * self.world)) if self.cfg.bn_images else len(loader)
        was = model.training
        model.train()
        for i, (x, y) in enumerate(loader):
            if i >= limit:
                break
            x, _ = self._prepare(x, y)
            with self._autocast():
                model(x)
        model.train(was)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            if self.distributed:
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t.div_(self.world)

    # ------------------------------------------------------------------ training
    def run_epoch(self) -> dict:
        cfg, lp = self.cfg, self.lp
        K, A = cfg.members, cfg.accum
        torch.manual_seed(_epoch_seed(self.seed, self.epoch, self.rank))  # augmentation draws in this process
        loader = self._loader(self.train_data, K * self.micro, shuffle=True, seed=self.seed, epoch=self.epoch,
                              drop_last=True)
        n = self.steps_per_epoch
        bar = self._progress(n)
        lp.model.train()
        total = torch.zeros((), device=self.device)
        lr_theta = lp.optimizers[0].param_groups[0]["lr"]
        lr_phi = lp.phi_optimizers[0].param_groups[0]["lr"]
        sync(self.device)
        t_start = time.perf_counter()
        batches = iter(loader)
        check_every = 1 if self.device.type == "cpu" else 50
        for step in range(n):
            losses = accumulated_step(lp, batches, F.cross_entropy, A, self._prepare)
            total += losses.mean()
            if (step + 1) % check_every == 0 and not bool(torch.isfinite(total)):
                raise FinetuneError(f"non-finite loss in epoch {self.epoch + 1}, outer step {step + 1} of "
                                    f"{cfg.name}; lower --lr or check the data")
            bar.update(1)
        sync(self.device)
        seconds = time.perf_counter() - t_start
        bar.close()
        if not bool(torch.isfinite(total)):
            raise FinetuneError(f"non-finite loss in epoch {self.epoch + 1} of {cfg.name}; lower --lr or check the "
                                f"data")
        if self.distributed:
            dist.all_reduce(total)
            total /= self.world
        lp.step_schedulers()
        self.epoch += 1
        t_eval = time.perf_counter()
        entry = {"epoch": self.epoch, "phase": "late" if not cfg.baseline else "base", "t": lp.t,
                 "outer_steps": lp.outer_step, "lr_theta": lr_theta, "lr_phi": lr_phi, "loss": float(total) / n,
                 "images_per_s": n * A * K * self.micro * self.world / seconds, "seconds": seconds}
        entry["averaged"] = self._eval_plain(lp.collapse(bn="mean"))
        if K > 1:
            ensemble, members = self._eval_members()
            entry["ensemble"] = ensemble
            entry["members_top1"] = [m["top1"] for m in members]
            entry["members_top5"] = [m["top5"] for m in members]
        entry["eval_seconds"] = time.perf_counter() - t_eval
        self.log.append(entry)
        if self.rank == 0:
            self._checkpoint()
        return entry

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        save_checkpoint(self, FORMAT, world_size=self.world)

    def _resume(self) -> None:
        restore(self, load_checkpoint(self, FORMAT, "a fine-tuning", FinetuneError, world=self.world))

    # ------------------------------------------------------------------ the whole run
    def evaluate(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        averaged = self.lp.collapse(bn="mean")
        models = {"averaged_bn_mean": self._eval_plain(averaged)}
        if cfg.bn_update == "data":
            self._reestimate_bn(averaged)
            models["averaged"] = self._eval_plain(averaged)
        else:
            models["averaged"] = models["averaged_bn_mean"]
        if cfg.members > 1:
            models["ensemble"], models["members"] = self._eval_members()
        trained = [e for e in self.log if e["epoch"] > 0]
        rates = sorted(e["images_per_s"] for e in trained)
        result = {
            "schema": SCHEMA, "config": cfg.to_dict(), "seed": self.seed, "command": self.command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "hardware": hardware(self.device),
            "world_size": self.world, "models": models, "pretrained": self.log[0].get("averaged"),
            "train_seconds": sum(e["seconds"] for e in trained), "eval_seconds": time.perf_counter() - t_start,
            "images_per_s": rates[len(rates) // 2] if rates else None,
            "train_images": len(self.train_data), "val_images": len(self.val_data),
            "num_classes": self.num_classes,
        }
        if self.rank == 0:
            write_json_atomic(os.path.join(self.out, "results.json"), result)
        return result


# ----------------------------------------------------------------------------- command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("--arch", default=d.arch,
                   help=f"torchvision classification model with BatchNorm (paper: {', '.join(PAPER_ARCHS)})")
    p.add_argument("--data-dir", required=True,
                   help="ImageNet root: train/<wnid>/ and val/<wnid>/ folders, or the ILSVRC2012 tar files with the "
                        "devkit")
    p.add_argument("--weights", default=d.weights,
                   help="paper (torchvision's IMAGENET1K_V1, as in the paper; default), default (torchvision's "
                        "current default), another torchvision weights name, a local state_dict file, or none "
                        "(random initialisation)")
    p.add_argument("--no-download", action="store_true",
                   help="never download weights (use torchvision's cache or a file)")
    p.add_argument("--baseline", action="store_true",
                   help="no late-phase weights: fine-tune the plain model the same way (the paper's base column)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--K", type=int, default=d.K, help="members (late-phase BatchNorm copies; default 10)")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of theta and phi (default 0.001)")
    p.add_argument("--gamma-theta", type=float, default=None,
                   help="theta steps along gamma_theta * sum_k grad_theta L(M_k) (default 1/K)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="one member minibatch, summed over ranks (default 256); an outer step uses K of them")
    p.add_argument("--accum", type=int, default=d.accum,
                   help="gradient-accumulation micro-steps per outer step (each member minibatch in this many parts)")
    p.add_argument("--lr-drop-epoch", type=int, default=d.lr_drop_epoch,
                   help="theta's lr is multiplied by --lr-drop after this many epochs (default 10; phi's is constant)")
    p.add_argument("--lr-drop", type=float, default=d.lr_drop, help="factor in (0, 1] (default 0.1)")
    p.add_argument("--path", choices=("vectorized", "sequential"), default=d.path,
                   help="members stacked in one forward (default) or one after the other (less memory)")
    p.add_argument("--crop", type=int, default=d.crop, help="training/validation crop (default 224)")
    p.add_argument("--resize", type=int, default=d.resize, help="validation resize of the short side (default 256)")
    p.add_argument("--train-subset", type=int, default=0, help="use a fixed random subset of N training images")
    p.add_argument("--val-subset", type=int, default=0, help="evaluate on a fixed random subset of N images")
    p.add_argument("--bn-update", choices=("data", "mean"), default=d.bn_update,
                   help="final averaged model's BatchNorm statistics: re-estimated from training images (default) "
                        "or the members' mean")
    p.add_argument("--bn-images", type=int, default=d.bn_images,
                   help="training images for the re-estimation (default 51200; 0: all)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="validation batch per rank (the ensemble forward stacks K copies; default 128)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast on CUDA (default on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format on CUDA (default on)")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per rank (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run folder (default: runs/imagenet_ARCH[_base]_seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(a: argparse.Namespace) -> FinetuneConfig:
    K = 1 if a.baseline else a.K
    gamma = a.gamma_theta if a.gamma_theta is not None else 1.0 / max(K, 1)
    return FinetuneConfig(arch=a.arch, weights=str(a.weights), baseline=a.baseline, epochs=a.epochs, K=K,
                          lr=a.lr, gamma_theta=gamma, momentum=a.momentum, weight_decay=a.weight_decay,
                          batch_size=a.batch_size, accum=a.accum, lr_drop_epoch=a.lr_drop_epoch, lr_drop=a.lr_drop,
                          path=a.path, crop=a.crop, resize=a.resize, train_subset=a.train_subset,
                          val_subset=a.val_subset, bn_update=a.bn_update, bn_images=a.bn_images,
                          eval_batch_size=a.eval_batch_size, bf16=a.bf16, channels_last=a.channels_last)


def main(a: argparse.Namespace) -> int:
    """Run `python -m deep finetune` for parsed arguments; prints the final models' metrics as JSON."""
    cfg = config_from_args(a)
    if a.workers < 0:
        raise FinetuneError(f"--workers must be >= 0, got {a.workers}")
    run = FineTune(cfg, a.data_dir, seed=a.seed, out=a.out, resume=a.resume, device=a.device, workers=a.workers,
                   progress=not a.no_progress and sys.stderr.isatty(), allow_download=not a.no_download)
    result = run.train()
    if run.rank == 0:
        summary = {name: m for name, m in result["models"].items() if isinstance(m, dict)}
        print(json.dumps({"config": cfg.name, "seed": a.seed, "models": summary}, indent=1))
    return 0
