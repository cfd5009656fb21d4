"""`python -m deep finetune`: the ImageNet "super-late-phase" benchmark -- a pretrained torchvision classifier
(ResNet-50, ResNet-152, DenseNet-161 in the paper) fine-tuned for 20 epochs with late-phase BatchNorm.

Protocol (the reference ImageNet script's settings, without its accidents):

* Start from pretrained weights (``--weights paper``: torchvision's ImageNet-1k V1 weights, which the paper used;
  ``default``: torchvision's current default; or a local file; ``--download`` may fetch them into torchvision's
  cache). The late-phase weights are released at step 0
  (T0 = 0): every BatchNorm layer (gamma, beta, running statistics) gets K = 10 copies, the classifier head stays
  shared (theta).
* SGD with momentum 0.9 (no Nesterov), weight decay 1e-4, lr 0.001 for theta and phi. theta is stepped along
  gamma_theta sum_k grad_theta L(M_k) with gamma_theta = 1/K (the mean of the member gradients; the reference script
  divides theta's learning rate by K instead, which also divides theta's weight decay by K -- at lr 1e-3 and weight
  decay 1e-4 a negligible difference). After ``--lr-drop-epoch`` (10) epochs theta's learning rate is multiplied by
  0.1; phi's stays constant, as in the reference script.
* ``--batch-size`` (256) is the size of one member minibatch M_k (summed over all ranks), as the CIFAR runs count
  it: an outer step of Algorithm 1 consumes K minibatches (K * 256 images) and every member sees 1/K of the
  training set per epoch. ``--baseline`` (the ``imagenet_<arch>_base`` preset) is the paper's "base" column: the
  same fine-tuning with K = 1 (one BatchNorm copy, i.e. plain SGD with the same parameter groups and schedule, 256
  images per step).
* Gradient accumulation (``--accum A``): each member minibatch is split into A micro-batches; a micro-step runs the
  K members' micro-batches (stacked on the vectorized path, one after the other on the sequential path) and the
  losses are scaled by 1/A, so after A micro-steps every member's gradient is the mean over its whole minibatch and
  theta's is their sum; only then do the optimizers step (once). BatchNorm's batch statistics are then those of
  the member's micro-batch (256 / A images, synchronised over the ranks). The default A = 2 reproduces the
  reference script's BatchNorm batches: it runs each member minibatch of 256 as two forward passes of 128
  (``--batch_split 2``). Memory per forward: K * 256 / (A * ranks) images on the vectorized path, 256 / (A * ranks)
  on the sequential one.
* Evaluation on the validation set (never used for any choice: the last epoch is reported). Each epoch: top-1/top-5
  of the averaged model (phi_bar = mean_k phi_k, BatchNorm statistics = the members' mean running statistics; cheap)
  and of the ensemble (mean of the members' softmax probabilities, each member with its own statistics), and each
  member's top-1. At the end every model is evaluated under the BatchNorm rules of :mod:`deep.evaluate` (stored, and
  re-estimated from ``--bn-images`` training images; the reference's averaged outputs) with top-1, top-5, NLL and
  ECE (:mod:`deep.metrics`, streamed, so they also reduce over ranks).

Outputs in the run folder: config.json, log.jsonl (one line per epoch; epoch 0 is the pretrained model),
checkpoint.pt (complete state written atomically after every epoch; ``--resume`` continues bit-for-bit on the CPU:
data order and augmentation draws are functions of (seed, epoch, rank)) and results.json (config name
``imagenet_<arch>`` or ``imagenet_<arch>_base``, read by ``python -m deep table``).
Under torchrun every rank loads its own shard of each member minibatch (DistributedSampler-style) and gradients are
averaged over ranks; the validation set is sharded and the metric sums are reduced.
"""
from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.data import Subset

import shared

from .config import FinetuneConfig
from .data.imagenet import imagenet_datasets, imagenet_loader, loader_seed, train_transform, val_transform
from .errors import DataError, DeepError
from .evaluate import score_members, score_plain
from .models.torchvision_models import PAPER_ARCHS, build_pretrained
from .trainer import ClassifierRun


# ----------------------------------------------------------------------------- the accumulated outer step

def accumulated_step(lp: shared.LatePhase, micro_batches: Iterable, loss_fn: Callable, accum: int,
                     prepare: Callable | None = None, grad_clip: float = 0.0) -> torch.Tensor:
    """One outer step of Algorithm 1 from ``accum`` micro-steps, as nanoGPT accumulates; returns the K member losses
    (detached, shape (K,)): each member's mean loss over its whole minibatch.

    ``micro_batches`` yields ``accum`` pairs (x, y), each holding the K members' micro-batches stacked along dim 0
    (slice k = member k's next micro-batch); they are consumed one at a time, so only one is in memory.
    :meth:`shared.LatePhase.forward_backward` adds each micro-step's gradients of loss / accum to ``.grad``, so
    afterwards phi_k.grad = grad_phi_k of member k's mean loss over its whole minibatch and theta.grad = the sum over
    members of those -- one step on the whole minibatches when the per-sample losses do not interact (BatchNorm's
    batch statistics are the micro-batch's, over all ranks). Then the gradients are clipped (``grad_clip``) and
    :meth:`shared.LatePhase.update` steps and clears them. ``prepare(x, y)`` moves a micro-batch to the device."""
    losses, done = 0, 0
    for x, y in itertools.islice(micro_batches, accum):
        x, y = prepare(x, y) if prepare is not None else (x, y)
        losses = losses + lp.forward_backward(x, y, lambda out, t: loss_fn(out, t) / accum)
        done += 1
    if done != accum:
        raise DeepError(f"an outer step needs {accum} micro-batches, got {done}")
    if grad_clip:
        lp.clip_grad_norm_(grad_clip)
    lp.update()
    return losses


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
        raise DeepError(f"the {cfg.arch} weights {weights!r} classify {out} classes but the data has "
                        f"{num_classes} class folders; fine-tuning keeps the pretrained classifier, so use the "
                        f"full ImageNet train/ and val/ folders (or --weights none or a weights file with "
                        f"{num_classes} classes)")
    return model


# ----------------------------------------------------------------------------- the run

class FineTune(ClassifierRun):
    """One fine-tuning run on the trainer of :mod:`deep.trainer` (see the module doc)."""

    METRIC = ("test_accuracy", "top-1 {:.2f}%")

    def __init__(self, cfg: FinetuneConfig, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        if not kwargs.get("resume"):
            self.log.append({"epoch": 0, "phase": "pretrained", **self._quick(self.model, None)})

    def load_data(self) -> None:
        cfg = self.cfg.validate(self.world)  # the checks that depend on the number of ranks
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        train, val = imagenet_datasets(self.data_dir, train_transform(cfg.crop), val_transform(cfg.resize, cfg.crop))
        self.num_classes = _classes(train)
        self.train_data, self.val_data = _subset(train, cfg.train_subset), _subset(val, cfg.test_subset)
        self.micro = cfg.batch_size // (cfg.accum * self.world)  # one member's micro-batch on one rank
        cpus = os.cpu_count() or 1
        if cfg.workers > cpus:
            raise DeepError(f"--workers {cfg.workers} (data-loading processes per rank) is more than the {cpus} CPUs "
                            f"here; use --workers {cpus} or fewer")
        if self.steps_per_epoch(cfg.K) < 1:
            raise DataError(f"the training set has {len(self.train_data)} images, fewer than one outer step needs "
                            f"({cfg.K} member minibatch(es) of --batch-size {cfg.batch_size}); use more data or a "
                            f"smaller --batch-size")

    def memory_needs(self) -> list:
        """From the architecture on the meta device (no weights read, nothing allocated)."""
        cfg = self.cfg
        with torch.device("meta"):
            probe = build_pretrained(cfg.arch, None, num_classes=self.num_classes)
        self._check_batchnorm(probe)  # before the probe's forward: that error is the one to fix first
        params = sum(p.numel() for p in probe.parameters())
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in probe.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear))]
        try:
            with torch.no_grad():
                probe.eval()(torch.empty(1, 3, cfg.crop, cfg.crop, device="meta"))
        except RuntimeError as e:  # e.g. a pooling window larger than the feature map of a small crop
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeepError(f"--crop {cfg.crop} is too small for {cfg.arch} ({line}); use a larger --crop") from None
        finally:
            for h in hooks:
                h.remove()
        element = 2 if self.amp else 4
        step = (cfg.K if cfg.path == "vectorized" else 1) * self.micro
        evals = max(min(cfg.eval_batch_size, len(self.val_data)), 1)
        image = 3 * cfg.crop * cfg.crop
        return [(f"the {cfg.arch} weights ({params:,} parameters) with gradients and momentum",
                 4 * (2 + (cfg.momentum > 0)) * params, "--arch"),
                (f"the activations of {step} images of {cfg.crop}x{cfg.crop} per micro-step",
                 element * step * (image + sum(outputs)), "--batch-size, --accum, --K, --crop"),
                (f"evaluation batches of {evals} images", element * evals * (image + 2 * max(outputs, default=0)),
                 "--eval-batch-size, --crop")]

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg, self.num_classes, self.download)
        model = model.to(self.device, memory_format=self.memory_format)
        self._check_batchnorm(model)
        return model

    def _check_batchnorm(self, model: nn.Module) -> None:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise DeepError(f"{self.cfg.arch} has no BatchNorm layer; late-phase BatchNorm fine-tuning needs one "
                            f"(e.g. {', '.join(PAPER_ARCHS)})")

    def example_input(self):
        return torch.zeros(1, 3, self.cfg.crop, self.cfg.crop, device=self.device).to(
            memory_format=self.memory_format), 1

    # ------------------------------------------------------------------ data
    def _loader(self, dataset, batch_size: int, train: bool, seed: int = 0, epoch: int = 0):
        return imagenet_loader(dataset, batch_size, train, seed, epoch, self.rank, self.world, self.cfg.workers,
                               self.device.type == "cuda")

    def _prepare(self, x, y):
        x = x.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    def steps_per_epoch(self, members: int) -> int:
        per_rank = math.ceil(len(self.train_data) / self.world)
        return per_rank // (members * self.micro) // self.cfg.accum

    def epoch_batches(self, epoch: int, members: int):
        torch.manual_seed(loader_seed(self.seed, epoch, self.rank))  # augmentation draws in this process
        micro = iter(self._loader(self.train_data, members * self.micro, True, self.seed, epoch))
        for _ in range(self.steps_per_epoch(members)):
            # one outer step's batch: its cfg.accum micro-batches, read lazily (one in memory at a time) from the
            # epoch's loader; accumulated_step consumes exactly these before the next step's batch starts
            yield itertools.islice(micro, self.cfg.accum)

    def examples(self, batch) -> int:
        return self.cfg.accum * self.cfg.K * self.micro * self.world

    def late_step(self, batch) -> torch.Tensor:
        losses = accumulated_step(self.lp, batch, self.loss_fn, self.cfg.accum, self._prepare, self.cfg.grad_clip)
        self.steps += self.lp.K
        return losses.mean()

    # ------------------------------------------------------------------ evaluation
    def test_batches(self):
        for x, y in self._loader(self.val_data, self.cfg.eval_batch_size, False):
            yield self._prepare(x, y)

    def bn_batches(self):
        """cfg.bn_images training images (training transform) on all ranks together, in eval-sized batches."""
        torch.manual_seed(self.seed + 7919)  # the augmentation draws of the re-estimation pass
        batch = self.cfg.eval_batch_size
        loader = self._loader(self.train_data, batch, True, self.seed + 7919)
        limit = math.ceil(self.cfg.bn_images / (batch * self.world)) if self.cfg.bn_images else len(loader)
        for i, (x, y) in enumerate(loader):
            if i >= limit:
                break
            yield self._prepare(x, y)[0]

    def _quick(self, model, late) -> dict:
        """top-1/top-5 of the averaged model (members' mean statistics) and, with members, the ensemble and each
        member's top-1, for the log."""
        avg = score_plain(model, self.test_batches, {}, self.amp)
        out = {"test_accuracy": avg["accuracy"], "test_top5": avg.get("top5")}
        if late is not None and self.cfg.K > 1:
            ens, members = score_members(late, self.test_batches, {}, self.amp)
            out.update(ensemble_accuracy=ens["accuracy"], ensemble_top5=ens.get("top5"),
                       members_accuracy=[m["accuracy"] for m in members])
        return out

    def epoch_metrics(self) -> dict:
        return self._quick(shared.collapse(self.lp.model), self.lp.model)

    def build_spec(self) -> dict:
        return {"builder": "torchvision.models.get_model", "name": self.cfg.arch,
                "kwargs": {"num_classes": self.num_classes}}

    def result_extra(self) -> dict:
        return {"pretrained": {k: v for k, v in self.log[0].items() if k.startswith("test_")},
                "train_images": len(self.train_data), "val_images": len(self.val_data),
                "num_classes": self.num_classes}
