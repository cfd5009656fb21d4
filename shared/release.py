"""The release at T0: the surgery that gives a model K members, and the optimizers that continue its training.

* :func:`surgery` replaces, in place, every module a family selects by its member-aware version (phi_1..phi_K
  copies of its late-phase weights) and every other nn.BatchNorm by a shared one with per-member batch statistics.
* :func:`build_optimizer` builds U_theta or one member's U_phi: from a factory ``params -> Optimizer`` (e.g.
  :func:`sgd`), or by inheriting the optimizer the model was trained with -- its class, every param-group
  hyperparameter and (optionally) its per-parameter state.
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
import torch.nn as nn

from .errors import LatePhaseError
from .modules import BATCHNORM_TYPES, LateBatchNorm

OptimizerFactory = Callable[[list], torch.optim.Optimizer]


def sgd(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4) -> OptimizerFactory:
    """A factory ``params -> torch.optim.SGD(params, ...)`` with these hyperparameters; the defaults are the paper's
    CIFAR settings (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4).

    Example::

        lp = shared.LatePhase(model, K=10, theta_optimizer=shared.sgd(), phi_optimizer=shared.sgd())
    """
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def surgery(model: nn.Module, families: list, K: int) -> tuple[dict, dict]:
    """Replace every selected module by its member-aware version, in place, and every other nn.BatchNorm by a shared
    one (per-member batch statistics in stacked mode). Returns, per new late module (by id), {phi name: (the original
    Parameter it replicates or None, the wrapped module's first Parameter or None)}, read before wrapping; and, per
    new theta tensor that a replacement creates (by id, e.g. a template bank), the first Parameter of the first
    module it replaces (whose optimizer param group it joins)."""
    chosen = {}
    for fam in families:
        for sel in fam.select(model):
            if sel.name == "":
                raise LatePhaseError(f"{fam!r} selects the model itself; wrap the model in a container so the "
                                     f"late-phase layer is a submodule")
            if sel.name in chosen:
                raise LatePhaseError(f"module {sel.name!r} is selected by both {chosen[sel.name][0]!r} and {fam!r}; "
                                     f"exclude it from one of them")
            chosen[sel.name] = (fam, sel)
    for name in chosen:
        parts = name.split(".")
        outer = next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in chosen), None)
        if outer is not None:
            raise LatePhaseError(f"module {name!r} lies inside {outer!r}, which is also selected; select one of them")
    sources, theta_sources = {}, {}
    for name, (fam, sel) in chosen.items():
        originals = {p: sel.module.get_parameter(p) for p in sel.params}
        anchor = next(sel.module.parameters(), None)
        before = {id(p) for p in sel.module.parameters()}
        late = fam.wrap(sel, K)
        names = {n for n, _ in late.phi_lists()}
        phi_ids = {id(p) for _, plist in late.phi_lists() for p in plist}
        for p in late.parameters():
            if id(p) not in before and id(p) not in phi_ids and anchor is not None:
                theta_sources.setdefault(id(p), anchor)
        if not set(sel.params) <= names:
            raise LatePhaseError(f"{fam!r}: the replacement of {name!r} has no member copies of "
                                 f"{sorted(set(sel.params) - names)}; this is a bug in the family")
        replace(model, name, late)
        sources[id(late)] = {n: (originals.get(n), anchor) for n in names}
    for name, m in list(model.named_modules()):
        if type(m) in BATCHNORM_TYPES and not any(name == c or name.startswith(c + ".") for c in chosen):
            replace(model, name, LateBatchNorm(m, K, late=False))
    return sources, theta_sources


def vectorization_blocker(model: nn.Module) -> str | None:
    """Why stacked mode would not be Algorithm 1 for this model (a batch-coupling layer it cannot split), or None.
    Plain nn.BatchNorm1d/2d/3d layers are fine: the surgery gives them per-member batch statistics."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m) not in BATCHNORM_TYPES:
            return f"{name!r} is a {type(m).__name__}, whose batch statistics cannot be split per member"
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return f"{name!r} ({type(m).__name__}) tracks running statistics over the whole batch"
    return None


def _clone_state(state: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def _inherited_groups(old: torch.optim.Optimizer, params: list, sources: list) -> list:
    """Param groups for ``params`` copying every hyperparameter of the old optimizer's group that holds each tensor's
    source (lr, weight decay, momentum, Nesterov, ..., and a scheduler's initial_lr); the old defaults for the rest."""
    group_of = {id(p): i for i, g in enumerate(old.param_groups) for p in g["params"]}
    buckets: dict[int, list] = {}
    for p, src in zip(params, sources):
        buckets.setdefault(group_of.get(id(src), -1), []).append(p)
    return [{**(old.defaults if i < 0 else {k: v for k, v in old.param_groups[i].items() if k != "params"}),
             "params": ps} for i, ps in sorted(buckets.items())]


def build_optimizer(factory, params: list, sources: list, old, what: str, copy_state: bool = True
                    ) -> torch.optim.Optimizer:
    """U for ``params``: ``factory(params)`` when a factory is given, else ``old``'s class with the hyperparameters of
    each source's param group (:func:`_inherited_groups`). With ``old`` and ``copy_state``, the pre-T0 state of each
    source (momentum buffers, Adam's moments and step) is copied to its new tensor; without, the state starts empty
    (zero momentum), as for a tensor that never received a gradient."""
    if factory is None:
        opt = type(old)(_inherited_groups(old, params, sources))
    else:
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise LatePhaseError(f"the {what} optimizer factory must return a torch.optim.Optimizer, got "
                                 f"{type(opt).__name__}; e.g. lambda params: torch.optim.SGD(params, lr=0.1)")
        if {id(p) for g in opt.param_groups for p in g["params"]} != {id(p) for p in params}:
            raise LatePhaseError(f"the {what} optimizer factory must optimize exactly the parameters it is given "
                                 f"(use them as passed: factory(params) -> Optimizer(params, ...))")
        if old is not None and type(opt) is not type(old):
            raise LatePhaseError(f"inherit_optimizer_state: the old optimizer is a {type(old).__name__} but the new "
                                 f"{what} optimizer is a {type(opt).__name__}; use the same optimizer class")
    if old is not None and copy_state:
        for p, src in zip(params, sources):
            if src is not None and src in old.state and src.shape == p.shape:
                opt.state[p] = _clone_state(old.state[src])
    return opt
