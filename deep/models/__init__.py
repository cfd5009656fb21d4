"""Network architectures for the deep benchmarks, and the models a run exports.

Every run writes its final networks as plain state_dicts of the original architecture into RUN/export/
(``averaged.pt``, ``member_K.pt``) with ``models.json`` saying how to build the architecture and which BatchNorm
statistics they hold. Three lines load one::

    import json, torch, deep.models
    spec = json.load(open("runs/fmnist_bn_seed0/export/models.json"))["build"]       # e.g. deep.models.wrn(...)
    model = deep.models.build(spec); model.load_state_dict(torch.load("runs/fmnist_bn_seed0/export/averaged.pt"))

or in one: ``deep.models.load_exported("runs/fmnist_bn_seed0")`` (``which="member_3"`` for a member).
"""
from __future__ import annotations

import importlib
import json
import os

import torch

from .cnn import CNN, cnn
from .wrn import WRN, WRNConfig, wrn

__all__ = ["WRN", "WRNConfig", "wrn", "CNN", "cnn", "build", "load_exported", "image_model"]


def image_model(arch: str, num_classes: int, in_channels: int, dropout: float = 0.0) -> torch.nn.Module:
    """The image classifier named ``arch``: wrn-DEPTH-WIDTH (:func:`wrn`) or cnn-STAGES (:func:`cnn`)."""
    if arch.startswith("cnn-"):
        return cnn(arch, num_classes, in_channels, dropout)
    _, depth, width = arch.split("-")
    return wrn(int(depth), int(width), num_classes, in_channels, dropout)


def build(spec: dict) -> torch.nn.Module:
    """The (untrained) network described by an export's ``build`` entry: ``{"builder": "module.function",
    "name": optional first argument, "kwargs": {...}}`` (deep.models.wrn, deep.models.lstm.CharLSTM or
    torchvision.models.get_model)."""
    module, _, fn = spec["builder"].rpartition(".")
    builder = getattr(importlib.import_module(module), fn)
    args = (spec["name"],) if "name" in spec else ()
    return builder(*args, **spec.get("kwargs", {}))


def load_exported(run: str, which: str = "averaged", map_location="cpu") -> torch.nn.Module:
    """An exported network of the run folder ``run`` (see the module doc), in eval mode."""
    from ..errors import DeepError
    folder = os.path.join(run, "export")
    try:
        with open(os.path.join(folder, "models.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        raise DeepError(f"{run} has no exported models (export/models.json); train the run to its end") from None
    if which not in manifest["files"]:
        raise DeepError(f"{run} exports {', '.join(manifest['files'])}, not {which}")
    model = build(manifest["build"])
    state = torch.load(os.path.join(folder, manifest["files"][which]), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
