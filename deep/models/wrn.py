"""Pre-activation wide residual network WRN-d-k (Zagoruyko & Komodakis 2016), as used by the late-phase paper.

Stem: 3x3 conv to 16 channels. Three stages of n = (d - 4) / 6 pre-activation blocks with widths 16k, 32k, 64k and
strides 1, 2, 2; block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the identity, or a 1x1 projection of the
pre-activated input (stride as the block) when the shape changes. No dropout. Head: BN-ReLU-global average pool-linear.
Convolutions have no bias. He initialisation (normal, fan_out) for the convolutions, BatchNorm gamma = 1 and beta = 0,
zero linear bias. WRN-28-10 for 10 classes has 36.48 M parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class WRNConfig:
    depth: int = 28
    width: int = 10
    num_classes: int = 10
    in_channels: int = 3
    dropout: float = 0.0    # between the two convolutions of every block (Zagoruyko & Komodakis); 0: none

    def __post_init__(self):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (e.g. 16, 28), got {self.depth}")
        if self.width < 1 or self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("WRN width, num_classes and in_channels must be >= 1")


class Block(nn.Module):
    """Pre-activation residual block: y = conv2(dropout(relu(bn2(conv1(relu(bn1(x))))))) + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x), inplace=True)
        h = F.relu(self.bn2(self.conv1(o)), inplace=True)
        y = self.conv2(h if self.dropout is None else self.dropout(h))
        return y + (x if self.shortcut is None else self.shortcut(o))


def init_weights(model: nn.Module) -> None:
    """The reference's initialisation: Kaiming-normal (fan_out) convolutions, BatchNorm gamma = 1 and beta = 0, zero
    linear bias (the linear weight keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class WRN(nn.Module):
    def __init__(self, cfg: WRNConfig = WRNConfig()):
        super().__init__()
        self.cfg = cfg
        n, k = (cfg.depth - 4) // 6, cfg.width
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv = nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for stage, stride in zip(range(1, 4), (1, 2, 2)):
            for i in range(n):
                blocks.append(Block(c_in, widths[stage], stride if i == 0 else 1, cfg.dropout))
                c_in = widths[stage]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.conv(x))
        x = F.relu(self.bn(x), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def wrn(depth: int = 28, width: int = 10, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WRN:
    """WRN-depth-width, e.g. ``wrn(28, 10)`` (36.48 M parameters) or ``wrn(16, 4)`` for quick runs."""
    return WRN(WRNConfig(depth, width, num_classes, in_channels, dropout))


class WRNSize(NamedTuple):
    """What a WRN costs, in elements: ``parameters`` (trainable), ``batchnorm`` (channels of all BatchNorm layers),
    ``activations`` (all convolution and linear outputs of one image's forward pass: what the backward pass keeps at
    the least) and ``largest`` (the largest single one of them)."""
    parameters: int
    batchnorm: int
    activations: int
    largest: int


def wrn_size(depth: int, width: int, num_classes: int = 10, in_channels: int = 3, height: int = 32,
             image_width: int | None = None) -> WRNSize:
    """The :class:`WRNSize` of ``wrn(depth, width, num_classes, in_channels)`` on height x image_width inputs, in
    closed form (no module is built, so absurd sizes cost nothing; equal to counting the built model, tested)."""
    n, k = (depth - 4) // 6, width
    h, w = height, image_width if image_width is not None else height
    params, bn = in_channels * 16 * 9, 0
    acts = largest = 16 * h * w
    c_in = 16
    for c_out, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for first in (True, False):
            blocks = 1 if first else n - 1
            if blocks <= 0:
                continue
            s = stride if first else 1
            c = c_in if first else c_out
            h2, w2 = -(-h // s), -(-w // s)
            shortcut = s != 1 or c != c_out
            params += blocks * (2 * c + 9 * c * c_out + 2 * c_out + 9 * c_out * c_out + (c * c_out if shortcut else 0))
            bn += blocks * (c + c_out)
            acts += blocks * (2 + shortcut) * c_out * h2 * w2
            largest = max(largest, c_out * h2 * w2)
            h, w = h2, w2
        c_in = c_out
    params += 2 * c_in + c_in * num_classes + num_classes
    bn += c_in
    acts += num_classes
    return WRNSize(params, bn, acts, largest)
