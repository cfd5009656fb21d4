"""A small VGG-style BatchNorm CNN for CPU-sized experiments (e.g. Fashion-MNIST on two cores).

Architecture ``cnn-S1-S2-...``: stages separated by dashes, a stage ``W`` (one 3x3 conv of W channels) or ``WxN``
(N of them); every conv is Conv(3x3, no bias)-BatchNorm-ReLU; a 2x2 max-pool between stages; then global average
pooling and one nn.Linear head (the late-phase head). ``cnn-32-64-128`` on 28x28x1 inputs has 94,186 parameters
(10 classes) and costs 7.45 M multiply-accumulates per image forward. Initialisation as the WRN's: He normal
(fan_out) convolutions, BatchNorm gamma = 1 and beta = 0, zero linear bias. ``dropout`` > 0 adds dropout after every
conv block (for MC dropout).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .wrn import init_weights


def parse_plan(arch: str) -> tuple[tuple[int, ...], ...]:
    """``cnn-32-64x2-128`` -> ((32,), (64, 64), (128,)); raises ValueError for anything else."""
    parts = arch.split("-")
    if len(parts) < 2 or parts[0] != "cnn":
        raise ValueError(f"a CNN arch is cnn-STAGE-STAGE-..., each stage W or WxN, got {arch!r}")
    plan = []
    for p in parts[1:]:
        width, _, count = p.partition("x")
        if not width.isdigit() or int(width) < 1 or (count and (not count.isdigit() or int(count) < 1)):
            raise ValueError(f"CNN stage {p!r} of {arch!r}: expected W or WxN with positive integers")
        plan.append((int(width),) * (int(count) if count else 1))
    return tuple(plan)


class CNN(nn.Module):
    """See the module doc; ``plan``: the stages' channel widths."""

    def __init__(self, plan=((32,), (64,), (128,)), num_classes: int = 10, in_channels: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        layers, c = [], in_channels
        for i, stage in enumerate(plan):
            if i:
                layers.append(nn.MaxPool2d(2))
            for w in stage:
                layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
                c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)  # as the WRN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def cnn(arch: str = "cnn-32-64-128", num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> CNN:
    """The CNN named ``arch`` (see :func:`parse_plan`), e.g. ``cnn("cnn-32-64-128")``."""
    return CNN(parse_plan(arch), num_classes, in_channels, dropout)
