"""Pretrained torchvision classifiers for the ImageNet late-phase fine-tuning benchmark.

`build_pretrained(arch, weights)` gives a torchvision classification model (the paper: resnet50, resnet152,
densenet161) with
  * weights="default" or a weights name ("IMAGENET1K_V1", ...): torchvision's weights, read from torchvision's
    cache `<torch hub dir>/checkpoints/<file>` when present, downloaded into it otherwise;
  * weights="paper": the weights the paper started from, the ImageNet-1k V1 weights (the only ones torchvision had
    in 2020; torchvision's current default for the ResNets is the stronger V2 recipe, which would shift the
    baselines of the paper's table);
  * weights=<path of a local file>: a state_dict saved by torch.save (a bare state_dict, or a checkpoint dict
    holding it under "state_dict" or "model"), e.g. torchvision's own .pth copied from a machine with internet;
  * weights=None: random initialisation.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import DeepError

PAPER_ARCHS = ("resnet50", "resnet152", "densenet161")
PAPER_WEIGHTS = "IMAGENET1K_V1"
_SPECIAL_NAMES = ("default", "paper")
# Legacy DenseNet checkpoints (torchvision's own densenet*.pth) name layers "norm.1", "conv.2", ...
_LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.\w+)$")
# Constructor arguments torchvision's builders force when they load pretrained weights.
_PRETRAINED_KWARGS = {name: {"transform_input": True, "aux_logits": True, "init_weights": False}
                      for name in ("googlenet", "inception_v3")}


class ModelError(DeepError):
    """A model or its weights cannot be built or loaded (one actionable line)."""


def classification_models() -> list[str]:
    """Names of torchvision's classification models (valid `arch` values)."""
    return torchvision.models.list_models(module=torchvision.models)


def _weights_entry(arch: str, name: str):
    """torchvision's weights enum member for `arch` named `name` ("default"/"paper" resolved)."""
    enum = torchvision.models.get_model_weights(arch)
    key = {"default": "DEFAULT", "paper": PAPER_WEIGHTS}.get(name.lower(), name)
    try:
        return enum[key]
    except KeyError:
        names = ", ".join(["default", "paper"] + [member.name for member in enum])
        raise ModelError(f"{arch} has no weights {name!r}; choose one of: {names}, a local file path, or None") \
            from None


def cached_weights_path(arch: str, weights: str = "default") -> Path:
    """Where torchvision looks for (and downloads) the weights file of `arch`: <hub dir>/checkpoints/<file>."""
    entry = _weights_entry(arch, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(entry.url)


def weights_unavailable_message(arch: str, weights: str = "default", reason: str | None = None) -> str:
    """One line saying which file torchvision expects for `arch`, where it comes from, and how to pass it."""
    entry = _weights_entry(arch, weights)
    path = cached_weights_path(arch, weights)
    why = f" ({reason})" if reason else ""
    return (f"cannot obtain {arch} weights {entry.name}{why}: download {entry.url} on a machine with internet and "
            f"either put {path.name} into {path.parent} or pass the file as weights=PATH (e.g. --weights PATH)")


def _download(arch: str, weights: str, target: Path) -> None:
    """Download the weights file into torchvision's cache, checking the hash embedded in its name."""
    entry = _weights_entry(arch, weights)
    match = torch.hub.HASH_REGEX.search(target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(entry.url, str(target), hash_prefix=match.group(1) if match else None)
    except Exception as error:  # network, disk or hash failures all mean: no weights
        raise ModelError(weights_unavailable_message(arch, weights, f"download failed: {error}")) from error


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a saved state_dict (bare, or under "state_dict" / "model"), with DDP's "module." removed."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, EOFError):
            why += " (the file is empty or truncated)"
        elif isinstance(error, pickle.UnpicklingError):  # torch's text suggests weights_only=False: not for this
            why = "not a weights file saved by torch.save (damaged, or another format)"
        raise ModelError(f"cannot read weights file {path}: {why}") from error
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ModelError(f"weights file {path} holds no state_dict of tensors")
    state = {}
    for key, value in loaded.items():
        key = key[len("module."):] if key.startswith("module.") else key
        legacy = _LEGACY_DENSENET_KEY.match(key)
        state[legacy.group(1) + legacy.group(2) if legacy else key] = value
    return state


def _load_local(arch: str, path: Path, kwargs: dict[str, Any]) -> nn.Module:
    """`arch` built with random weights and `kwargs`, then loaded strictly from the state_dict at `path`."""
    official = {os.path.basename(entry.url) for entry in torchvision.models.get_model_weights(arch)}
    forced = _PRETRAINED_KWARGS.get(arch, {}) if path.name in official else {}
    model = torchvision.models.get_model(arch, weights=None, **{**forced, **kwargs})
    state = _read_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelError(f"weights file {path} does not fit {arch} {kwargs or ''} (wrong arch or num_classes?): "
                         f"{detail}") from None
    if forced and not kwargs.get("aux_logits", False):  # as torchvision: drop the auxiliary heads after loading
        model.aux_logits = False
        for name in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, name):
                setattr(model, name, None)
    return model


def build_pretrained(arch: str, weights: str | os.PathLike | None = "default", allow_download: bool = True,
                     **kwargs: Any) -> nn.Module:
    """A torchvision classification model `arch` with the requested weights (see the module docstring).

    Named weights are read from torchvision's cache and, if missing there and `allow_download`, downloaded into it;
    when that is impossible a ModelError names the expected file, its URL and the weights=PATH alternative.
    kwargs go to the model builder (e.g. num_classes for random or local weights).
    """
    if arch not in classification_models():
        raise ModelError(f"unknown torchvision classification model {arch!r}; e.g. {', '.join(PAPER_ARCHS)}")
    if weights is None:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    text = os.fspath(weights)
    path = Path(text).expanduser()
    if path.is_file():
        return _load_local(arch, path, kwargs)
    names = [member.name for member in torchvision.models.get_model_weights(arch)]
    if text.lower() not in _SPECIAL_NAMES and text not in names:
        raise ModelError(f"weights {text!r} is neither an existing file nor one of {arch}'s weights "
                         f"({', '.join(['default', 'paper'] + names)}); pass a file path, a name, or None")
    cached = cached_weights_path(arch, text)
    if not cached.is_file():
        if not allow_download:
            raise ModelError(weights_unavailable_message(arch, text, "not in the cache and downloads are off"))
        _download(arch, text, cached)
    entry = _weights_entry(arch, text)
    try:
        return torchvision.models.get_model(arch, weights=entry, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise ModelError(f"cannot load cached {cached} for {arch}: {detail}; delete it to download it again") \
            from None
