"""The image benchmarks (CIFAR-10/100, Fashion-MNIST, synthetic) on the trainer of :mod:`deep.trainer`.

Data stay on the device (:class:`deep.data.GPULoader`: pad-4 random crop, flip, cutout and normalisation as batched
tensor ops); an outer step after the release is one batch of K * batch_size images (member k owns slice k). Under
torchrun every rank takes its shard of each member's minibatch (:func:`shared.distributed.shard`). Evaluation: the
models of :class:`deep.trainer.ClassifierRun` on the test set, with OOD AUROC against the config's OOD sets.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import torch
import torch.nn as nn

import shared
from shared import distributed as dist_utils

from .config import ImageConfig
from .data import DataError, GPULoader, load_dataset, load_ood_sets
from .evaluate import score_plain
from .models import image_model
from .models.wrn import WRNSize, wrn_size
from .system import check_memory
from .trainer import ClassifierRun


def _subset(data, n):
    n = min(n, len(data))
    return dataclasses.replace(data, images=data.images[:n], labels=data.labels[:n])


class ImageRun(ClassifierRun):
    """One image-classification run (see the module doc)."""

    def load_data(self) -> None:
        cfg: ImageConfig = self.cfg
        opts = {"size": cfg.synthetic_size} if cfg.dataset == "synthetic" else {}
        if cfg.dataset == "synthetic":  # generated in CPU memory: train + a quarter of it for the test set
            n = cfg.synthetic_size + max(cfg.synthetic_size // 4, 1)
            check_memory(torch.device("cpu"), [(f"{n:,} synthetic images of 3x32x32 bytes", n * 3 * 32 * 32,
                                                "--synthetic-size")])
        train = load_dataset(cfg.dataset, self.data_dir, "train", self.download, **opts)
        test = load_dataset(cfg.dataset, self.data_dir, "test", self.download,
                            **({"size": max(cfg.synthetic_size // 4, 1)} if cfg.dataset == "synthetic" else {}))
        if cfg.train_subset:
            train = _subset(train, cfg.train_subset)
        if cfg.test_subset:
            test = _subset(test, cfg.test_subset)
        self.train_data, self.test_data = train, test
        if train.source and self.rank == 0 and os.path.realpath(train.source) != os.path.realpath(self.data_dir):
            print(f"note: {cfg.dataset} not found under --data-dir {self.data_dir}; reading it from {train.source}",
                  file=sys.stderr)
        self.ood, self.ood_missing = {}, {}
        if cfg.ood or cfg.ood_folders:
            folders = dict(cfg.ood_folder_paths())
            found, missing = load_ood_sets(train, self.data_dir, folders=folders, download=self.download)
            wanted = set(cfg.ood) | set(folders)
            self.ood = {k: (_subset(v, cfg.test_subset) if cfg.test_subset else v) for k, v in found.items()
                        if k in wanted}
            self.ood_missing = {k: v for k, v in missing.items() if k in wanted}
            for k in cfg.ood:
                if k not in self.ood and k not in self.ood_missing:
                    self.ood_missing[k] = f"{k} is not an OOD set of {cfg.dataset}"
            if self.rank == 0:
                for k, why in self.ood_missing.items():
                    print(f"note: OOD set {k} skipped: {why}", file=sys.stderr)
        kw = dict(train=True, device=self.device, seed=self.seed, mean=train.mean, std=train.std,
                  pad=cfg.pad if cfg.augment else 0, flip=cfg.augment, cutout=cfg.cutout, channels_last=self.channels_last)
        late = cfg.late_batch_size if cfg.late_phase else cfg.batch_size
        if cfg.members * late > len(train):
            what = ("batch_size", "--batch-size") if late == cfg.batch_size else ("batch_size_late", "--batch-size-late")
            raise DataError(f"K {cfg.members} member minibatches of {what[0]} {late} need {cfg.members * late} "
                            f"training images per step, the training set has {len(train)}; lower --K or {what[1]} "
                            f"(or use more data)")
        # before the release one minibatch of batch_size per step; after it K member minibatches of B' (the twin's
        # single member may draw a K0-times larger one), one loader per phase
        self.loaders = {"pre": GPULoader(train, cfg.batch_size, **kw),
                        "late": GPULoader(train, cfg.members * late, **kw)}
        # BatchNorm re-estimation: the augmented training data in minibatches of batch_size (as update_bn on the
        # training loader), at most bn_images of them.
        self.bn_loader = GPULoader(train, cfg.batch_size, **{**kw, "seed": self.seed + 1})
        ev = dict(device=self.device, mean=train.mean, std=train.std, channels_last=self.channels_last)
        self.test_loader = GPULoader(test, cfg.eval_batch_size, **ev)
        self.ood_loaders = {k: GPULoader(v, cfg.eval_batch_size, **ev) for k, v in self.ood.items()}

    def model_size(self) -> WRNSize:
        """Parameters and activation sizes of the network, without building it: in closed form for a WRN, from a
        forward pass on the meta device (no memory) for the other architectures."""
        cfg, (c, h, w), classes = self.cfg, self.train_data.shape, self.train_data.num_classes
        if not cfg.arch.startswith("cnn-"):
            _, depth, width = cfg.arch.split("-")
            return wrn_size(int(depth), int(width), classes, c, h, w)
        with torch.device("meta"):
            model = image_model(cfg.arch, classes, c, cfg.dropout)
        outs = []
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(lambda _m, _i, o: outs.append(o[0].numel()))
        model(torch.zeros(2, c, h, w, device="meta"))  # two images: BatchNorm needs more than one value
        bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        return WRNSize(sum(p.numel() for p in model.parameters()), bn, sum(outs), max(outs))

    def memory_needs(self) -> list:
        cfg = self.cfg
        c, h, w = self.train_data.shape
        size = self.model_size()
        element = 2 if self.amp else 4
        step = max(cfg.members * max(cfg.batch_size, cfg.late_batch_size) // self.world, 1)
        evals = max(min(cfg.eval_batch_size, len(self.test_data)), 1)
        images = len(self.train_data) + len(self.test_data) + sum(len(v) for v in self.ood.values())
        copies = 2 + (cfg.momentum > 0) + cfg.swa  # weights, gradients, momentum, the SWA average
        return [(f"the {cfg.arch} weights ({size.parameters:,} parameters) with gradients and momentum",
                 4 * copies * size.parameters, "--arch"),
                (f"the activations of {step} images per step", element * step * size.activations,
                 "--batch-size, --K, --arch"),
                (f"evaluation batches of {evals} images", element * evals * (c * h * w + 2 * size.largest),
                 "--eval-batch-size"),
                (f"{images:,} images of the data sets", images * c * h * w, "--train-subset, --test-subset")]

    def build_model(self) -> nn.Module:
        model = image_model(self.cfg.arch, self.train_data.num_classes, self.train_data.images.shape[1],
                            self.cfg.dropout).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def example_input(self):
        return torch.zeros(1, *self.train_data.images.shape[1:], device=self.device), 1

    # ------------------------------------------------------------------ training batches
    def _loader(self, members: int):
        # the phase decides (the large-batch twin has one member after the release, with K0 B images per step)
        return self.loaders["late" if self.lp is not None else "pre"]

    def steps_per_epoch(self, members: int) -> int:
        return len(self._loader(members))

    def plain_epoch_examples(self) -> int:
        return len(self.loaders["pre"]) * self.cfg.batch_size

    def epoch_batches(self, epoch: int, members: int):
        loader = self._loader(members)
        for step in range(len(loader)):
            x, y = loader.batch(epoch, step)
            if self.distributed:
                x, y = dist_utils.shard(x, members), dist_utils.shard(y, members)
            yield x, y

    # ------------------------------------------------------------------ evaluation
    def _eval_shard(self, loader):
        """This rank's share of an eval loader's batches (every world-th image)."""
        for x, y in loader:
            yield (x[self.rank::self.world], y[self.rank::self.world]) if self.distributed else (x, y)

    def test_batches(self):
        return self._eval_shard(self.test_loader)

    def ood_batches(self) -> dict:
        return {k: (lambda ld=ld: self._eval_shard(ld)) for k, ld in self.ood_loaders.items()}

    def bn_batches(self):
        cfg = self.cfg
        n = math.ceil(cfg.bn_images / cfg.batch_size) if cfg.bn_images else len(self.bn_loader)
        for step in range(min(n, len(self.bn_loader))):
            x, _ = self.bn_loader.batch(0, step)
            yield dist_utils.shard(x, 1) if self.distributed else x

    def epoch_metrics(self) -> dict:
        """Test accuracy (%) of the current weight-averaged model (the members' mean BatchNorm statistics); after a
        release with K > 1 also the members' diagnostics: ``members_disagreement`` (% of test examples on which two
        members' top-1 classes differ, mean over pairs), ``ensemble_test_accuracy`` (%) and ``phi_spread``
        (mean_k ||phi_k - phi_bar|| / ||phi_bar||; see :mod:`deep.evaluate`); from the SWA start also the SWA
        average's accuracy (``swa_test_accuracy``, with the averaged running statistics): at the constant SWA lr the
        current weights score well below the average the run delivers."""
        def accuracy(net):
            model = shared.collapse(net) if self.lp is not None else net
            return score_plain(model, self.test_batches, {}, self.amp)["accuracy"]
        out = {"test_accuracy": accuracy(self.lp.model if self.lp is not None else self.model)}
        if self.lp is not None and self.lp.K > 1:  # do the members diverge at all?
            from .evaluate import member_disagreement, phi_spread
            d = member_disagreement(self.lp.model, self.test_batches, self.amp)
            out.update(members_disagreement=d["disagreement"], ensemble_test_accuracy=d["ensemble_accuracy"],
                       phi_spread=phi_spread(self.lp.model))
        if self.swa is not None:
            out["swa_test_accuracy"] = accuracy(self.swa.model)
        return out

    def build_spec(self) -> dict:
        return {"builder": "deep.models.image_model", "kwargs": {"arch": self.cfg.arch,
                "num_classes": self.train_data.num_classes, "in_channels": self.train_data.images.shape[1],
                "dropout": self.cfg.dropout}}

    def result_extra(self) -> dict:
        return {"ood_missing": self.ood_missing, "train_images": len(self.train_data),
                "test_images": len(self.test_data)}


def train(cfg: ImageConfig, **kwargs) -> dict:
    """Train and evaluate one run (see :class:`ImageRun`); returns the results (also written to results.json)."""
    return ImageRun(cfg, **kwargs).train()
