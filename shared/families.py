"""Late-phase weight families: which layers of a model get K per-member copies phi_1..phi_K.

A family selects modules of a model (``select``) and replaces each by a member-aware module (``wrap``):

* :class:`BatchNorm` -- every nn.BatchNorm1d/2d/3d: gamma, beta and the running statistics become per member.
* :class:`Head` -- the classifier head (the last nn.Linear, or a named one): W and b become per member.
* :class:`Rank1` -- rank-1 multiplicative factors on Linear/Conv layers: W_k = W o (r_k s_k^T) (BatchEnsemble style).
* :class:`Custom` -- any parameters, selected by module type or by parameter name pattern.

Families combine (``[BatchNorm(), Head()]`` is the reference CIFAR setting); a module selected twice is an error.
Module and parameter names are matched with shell-style patterns (fnmatch: ``*`` matches any characters, dots included).
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Sequence

import torch.nn as nn

from .errors import LatePhaseError
from .modules import BATCHNORM_TYPES, CONV_TYPES, LateBatchNorm, LateCustom, LateLinear, Rank1 as Rank1Module


def _patterns(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)


class Family:
    """Base class. ``select(model)`` returns [(module name, module, phi names or None)]; ``wrap(module, K, names)``
    returns (member-aware module, {phi name: original Parameter}) -- the originals let a pre-T0 optimizer state be
    handed to every member."""

    def select(self, model: nn.Module) -> list:
        return []

    def wrap(self, module: nn.Module, K: int, names=None):
        return module, {}

    def __repr__(self) -> str:
        def show(v):
            if isinstance(v, tuple):
                return "(" + ", ".join(t.__name__ if isinstance(t, type) else repr(t) for t in v) + \
                    ("," if len(v) == 1 else "") + ")"
            return repr(v)
        args = ", ".join(f"{k}={show(v)}" for k, v in vars(self).items() if v not in ((), None, ("*",)))
        return f"{type(self).__name__}({args})"


class BatchNorm(Family):
    """Late-phase BatchNorm: gamma, beta (if affine) and running statistics of every nn.BatchNorm1d/2d/3d whose module
    name matches one of ``include`` (default: all) and none of ``exclude``."""

    def __init__(self, *include: str, exclude: Sequence[str] | str = ()):
        self.include = include or ("*",)
        self.exclude = _patterns(exclude)

    def select(self, model):
        out = []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and _matches(name, self.include, self.exclude):
                if type(m) not in BATCHNORM_TYPES:
                    raise LatePhaseError(f"module {name!r} is a {type(m).__name__}; late-phase BatchNorm supports "
                                         f"nn.BatchNorm1d/2d/3d (convert it, or exclude it with exclude=[{name!r}])")
                out.append((name, m, None))
        if not out:
            raise LatePhaseError(f"{self!r} selected no module: the model has no matching nn.BatchNorm1d/2d/3d "
                                 f"layer; choose another family (e.g. Head() or Rank1())")
        return out

    def wrap(self, module, K, names=None):
        origins = {"weight": module.weight, "bias": module.bias} if module.affine else {}
        return LateBatchNorm(module, K, late=True), origins


class Head(Family):
    """Late-phase classifier head: weight and bias of the nn.Linear named ``name`` (default: the last nn.Linear in
    the model's registration order, e.g. ``fc`` of a torchvision ResNet)."""

    def __init__(self, name: str | None = None):
        self.name = name

    def select(self, model):
        if self.name is not None:
            try:
                m = model.get_submodule(self.name)
            except AttributeError:
                raise LatePhaseError(f"Head({self.name!r}): the model has no submodule {self.name!r}; "
                                     f"pass the name of its final nn.Linear") from None
            if not isinstance(m, nn.Linear):
                raise LatePhaseError(f"Head({self.name!r}) is a {type(m).__name__}, not an nn.Linear; "
                                     f"use Custom(...) for other head types")
            return [(self.name, m, None)]
        linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
        if not linears:
            raise LatePhaseError("Head() found no nn.Linear in the model; name the head with Head('name') or use "
                                 "Custom(...)")
        name, m = linears[-1]
        return [(name, m, None)]

    def wrap(self, module, K, names=None):
        origins = {"weight": module.weight}
        if module.bias is not None:
            origins["bias"] = module.bias
        return LateLinear(module, K), origins


class Rank1(Family):
    """Rank-1 multiplicative late-phase factors (BatchEnsemble style) on every layer of ``types`` (default nn.Linear
    and nn.Conv1d/2d/3d, exact types) whose module name matches ``include`` (default: all) and not ``exclude``:
    W_k = W o (r_k s_k^T), r_k and s_k initialised to ones. Also usable with K = 1 from step 0."""

    def __init__(self, *include: str, exclude: Sequence[str] | str = (), types: Sequence[type] = (nn.Linear,) +
                 CONV_TYPES):
        self.include = include or ("*",)
        self.exclude = _patterns(exclude)
        self.types = tuple(types)

    def select(self, model):
        out = [(n, m, None) for n, m in model.named_modules()
               if type(m) in self.types and _matches(n, self.include, self.exclude)]
        if not out:
            raise LatePhaseError(f"{self!r} selected no module; check the name patterns against "
                                 f"[n for n, _ in model.named_modules()]")
        return out

    def wrap(self, module, K, names=None):
        return Rank1Module(module, K), {}


class Custom(Family):
    """Any parameters as late-phase weights: all parameters of every module that is an instance of ``types`` (the
    outermost one when such modules nest), and every parameter whose full name matches one of ``names`` (fnmatch
    patterns such as ``"encoder.*.weight"``). The module owning the parameters is run per member with
    torch.func.functional_call (vectorized with torch.vmap); it must have no buffers."""

    def __init__(self, types: Sequence[type] | type = (), names: Sequence[str] | str = ()):
        self.types = tuple(types) if isinstance(types, (list, tuple)) else (types,)
        self.names = _patterns(names)
        if not self.types and not self.names:
            raise LatePhaseError("Custom() needs types=(ModuleClass, ...) or names=('pattern', ...)")

    def select(self, model):
        chosen: dict[str, list[str]] = {}
        if self.types:
            for name, m in model.named_modules():
                if isinstance(m, self.types) and not any(name.startswith(c + ".") or not c for c in chosen):
                    chosen[name] = [n for n, _ in m.named_parameters()]
        by_type = list(chosen)
        for full, _ in model.named_parameters():
            if any(fnmatchcase(full, p) for p in self.names):
                if any(full.startswith(c + ".") or not c for c in by_type):
                    continue
                owner, _, leaf = full.rpartition(".")
                chosen.setdefault(owner, [])
                if leaf not in chosen[owner]:
                    chosen[owner].append(leaf)
        chosen = {k: v for k, v in chosen.items() if v}
        if not chosen:
            raise LatePhaseError(f"{self!r} selected no parameter; check the types or the name patterns against "
                                 f"[n for n, _ in model.named_parameters()]")
        if "" in chosen:
            raise LatePhaseError(f"{self!r} selects parameters {chosen[''][:3]} owned by the model itself; move them "
                                 f"into a submodule (the owning module is what gets replicated)")
        return [(name, model.get_submodule(name), names) for name, names in chosen.items()]

    def wrap(self, module, K, names=None):
        origins = {n: module.get_parameter(n) for n in names}
        return LateCustom(module, names, K), origins
