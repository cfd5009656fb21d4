"""Network architectures for the deep benchmarks, and the models a run exports.

Every run writes its final networks as plain state_dicts of the original architecture into RUN/export/
(``averaged.pt``, ``member_K.pt``) with ``models.json`` saying how to build the architecture and which BatchNorm
statistics they hold. Three lines load one::

    import json, torch, deep.models
    spec = json.load(open("runs/fmnist_bn_seed0/export/models.json"))["build"]  # e.g. deep.models.image_model(...)
    model = deep.models.build(spec); model.load_state_dict(torch.load("runs/fmnist_bn_seed0/export/averaged.pt"))

or in one: ``deep.models.load_exported("runs/fmnist_bn_seed0")`` (``which="member_3"`` for a member), which also
checks each file's SHA-256 recorded in models.json. Exports are meant to be passed on, so ``build`` calls only the
three builders of :data:`BUILDERS` with plain arguments: a models.json naming anything else runs nothing.
"""
from __future__ import annotations

import hashlib
import importlib
import os

import torch

from .cnn import CNN, cnn
from .wrn import WRN, WRNConfig, wrn

__all__ = ["WRN", "WRNConfig", "wrn", "CNN", "cnn", "build", "load_exported", "image_model", "BUILDERS"]


def image_model(arch: str, num_classes: int, in_channels: int, dropout: float = 0.0) -> torch.nn.Module:
    """The image classifier named ``arch``: wrn-DEPTH-WIDTH (:func:`wrn`) or cnn-STAGES (:func:`cnn`)."""
    if arch.startswith("cnn-"):
        return cnn(arch, num_classes, in_channels, dropout)
    _, depth, width = arch.split("-")
    return wrn(int(depth), int(width), num_classes, in_channels, dropout)


# The only callables an export may name: the three builders the trainers write (deep.images, deep.lm, deep.finetune).
# An export is a file from someone else: naming any other callable (os.system, builtins.exec, ...) is refused before
# anything is imported, so loading one never runs code of its choosing.
BUILDERS = ("deep.models.image_model", "deep.models.lstm.CharLSTM", "torchvision.models.get_model")


def _plain(value) -> bool:
    """A JSON scalar (the only kind of argument a builder takes)."""
    return value is None or isinstance(value, (bool, int, float, str))


def build(spec: dict) -> torch.nn.Module:
    """The (untrained) network described by an export's ``build`` entry: ``{"builder": one of BUILDERS, "name":
    optional first argument, "kwargs": {...}}`` (deep.models.image_model, deep.models.lstm.CharLSTM or
    torchvision.models.get_model), e.g. ``build({"builder": "deep.models.image_model", "kwargs": {"arch": "cnn-8",
    "num_classes": 10, "in_channels": 1}})``. Any other builder, or arguments that are not plain JSON values, is a
    DeepError; so is a builder that refuses its arguments."""
    from ..errors import DeepError
    if not isinstance(spec, dict):
        raise DeepError(f"an export's build entry must be an object, got {type(spec).__name__}")
    builder, kwargs = spec.get("builder"), spec.get("kwargs", {})
    if builder not in BUILDERS:
        raise DeepError(f"an export's builder must be one of {', '.join(BUILDERS)}, got {builder!r}; "
                        f"this export was not written by python -m deep")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and _plain(v) for k, v in kwargs.items()) or \
            not isinstance(spec.get("name", ""), str):
        raise DeepError(f"an export's build arguments must be plain values, got {spec.get('name')!r}, {kwargs!r}")
    module, _, fn = builder.rpartition(".")
    args = (spec["name"],) if "name" in spec else ()
    try:
        return getattr(importlib.import_module(module), fn)(*args, **kwargs)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeepError(f"{builder} refuses the export's arguments {kwargs}: {line}") from None


def load_exported(run: str, which: str = "averaged", map_location="cpu") -> torch.nn.Module:
    """An exported network of the run folder ``run`` (see the module doc), in eval mode. The file's SHA-256 must be
    the one models.json records (a damaged or swapped file is refused); nothing outside ``run/export`` is read and no
    link is followed. Every problem is one DeepError line."""
    from ..errors import DeepError
    from ..untrusted import read_bytes, read_json, torch_load
    folder = os.path.join(run, "export")
    again = f"export it again with python -m deep train --resume --out {run} (a finished run is only evaluated)"
    manifest_path = os.path.join(folder, "models.json")
    try:
        manifest = read_json(manifest_path)
    except FileNotFoundError:
        raise DeepError(f"{run} has no exported models (export/models.json); train the run to its end") from None
    except (OSError, ValueError) as e:
        raise DeepError(f"{manifest_path} is not an export's manifest ({e}); {again}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not isinstance(digests, dict):
        raise DeepError(f"{manifest_path} is not an export's manifest (it needs \"files\" and their \"sha256\", "
                        f"which exports written before digests existed lack); {again}")
    if which not in files:
        raise DeepError(f"{run} exports {', '.join(map(str, files))}, not {which}")
    name = files[which]
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise DeepError(f"{manifest_path} names {name!r} for {which}: an exported file is a plain name inside export/")
    path = os.path.join(folder, name)
    try:
        data = read_bytes(path)
    except OSError as e:
        raise DeepError(f"cannot read {path}: {e.strerror or e}; {again}") from None
    if hashlib.sha256(data).hexdigest() != digests.get(which):
        raise DeepError(f"{path} does not match the SHA-256 that models.json records: the file is damaged or was "
                        f"replaced; {again}")
    model = build(manifest.get("build"))
    try:
        state = torch_load(data, map_location)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 -- any failure of a digest-valid file: it is not this architecture's
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeepError(f"{path} does not load into {manifest['build'].get('builder')}: {line}") from None
    return model.eval()
