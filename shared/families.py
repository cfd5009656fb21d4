"""Late-phase weight families: which layers of a model get K per-member copies phi_1..phi_K.

The contract is two methods. ``select(model)`` returns a :class:`Selection` per module to make late-phase: its name
in the model, the module, and the names of its parameters that become phi (the module's other parameters stay theta).
``wrap(selection, K)`` returns the member-aware replacement (a :class:`shared.modules.LateModule`); the default wraps
any module without buffers generically (:class:`shared.modules.LateCustom`: each member runs the original module with
its own phi through torch.func.functional_call, vectorized over members with torch.vmap), so a new family is usually
just a ``select``. :class:`shared.LatePhase` reads the selected original parameters before it calls ``wrap``, so their
pre-T0 optimizer state and hyperparameters reach every member whatever ``wrap`` does to the module.

* :class:`BatchNorm` -- every nn.BatchNorm1d/2d/3d: gamma, beta and the running statistics become per member.
* :class:`Head` -- the classifier head (the last nn.Linear, or a named one): W and b become per member.
* :class:`Rank1` -- rank-1 multiplicative factors on Linear/Conv layers: W_k = W o (r_k s_k^T) (BatchEnsemble style).
* :class:`Hypernetwork` -- Linear/Conv weights from template banks: W_k = sum_j T_j c_kj, templates T theta,
  coefficients c_k per member (the reference's hypernetwork late-phase weights).
* :class:`Custom` -- any parameters, selected by module type or by parameter name pattern.

Families combine (``[BatchNorm(), Head()]`` is the reference CIFAR setting); a module selected twice is an error.
Module and parameter names are matched with shell-style patterns (fnmatch: ``*`` matches any characters, dots included).

Example, a family for LayerNorm scale and shift (vectorized = sequential and collapse to nn.LayerNorm are tested)::

    class LayerNorm(shared.Family):
        def select(self, model):
            return [shared.Selection(name, m, ("weight", "bias"))
                    for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Sequence

import torch.nn as nn

from .distributed import SyncedBatchNorm
from .errors import LatePhaseError
from .modules import (BATCHNORM_TYPES, CONV_TYPES, LateBatchNorm, LateCustom, LateHyper, LateLinear, LateModule,
                      LateRank1, template_bank)


@dataclass(frozen=True)
class Selection:
    """One module that a family makes late-phase: ``name`` (its path in the model, as in ``named_modules``), the
    ``module`` itself, and ``params``, the names (relative to the module, e.g. ``"weight"``) of its parameters that
    become per-member phi. Empty ``params``: the replacement creates new phi tensors (e.g. rank-1 factors)."""
    name: str
    module: nn.Module
    params: tuple[str, ...] = ()


def _patterns(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in include) and not any(fnmatchcase(name, p) for p in exclude)


class Family(abc.ABC):
    """Base class of the late-phase families: define :meth:`select`; override :meth:`wrap` for a layer type that
    needs its own member-aware module (buffers such as BatchNorm statistics, or a faster stacked forward)."""

    @abc.abstractmethod
    def select(self, model: nn.Module) -> list[Selection]:
        """The modules of ``model`` to make late-phase; raise :class:`shared.LatePhaseError` if there are none."""

    def wrap(self, selection: Selection, K: int) -> LateModule:
        """The member-aware replacement of ``selection.module`` with K copies of ``selection.params``."""
        return LateCustom(selection.module, selection.params, K)

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
    name matches one of ``include`` (default: all) and none of ``exclude``. A layer converted by
    :func:`shared.distributed.sync_batchnorm` counts as its BatchNorm class (LatePhase converts it back first)."""

    def __init__(self, *include: str, exclude: Sequence[str] | str = ()):
        self.include = include or ("*",)
        self.exclude = _patterns(exclude)

    def select(self, model):
        out = []
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and _matches(name, self.include, self.exclude):
                if type(m) not in BATCHNORM_TYPES and not isinstance(m, SyncedBatchNorm):
                    raise LatePhaseError(f"module {name!r} is a {type(m).__name__}; late-phase BatchNorm supports "
                                         f"nn.BatchNorm1d/2d/3d (convert it, or exclude it with exclude=[{name!r}])")
                out.append(Selection(name, m, ("weight", "bias") if m.affine else ()))
        if not out:
            raise LatePhaseError(f"{self!r} selected no module: the model has no matching nn.BatchNorm1d/2d/3d "
                                 f"layer; choose another family (e.g. Head() or Rank1())")
        return out

    def wrap(self, selection, K):
        return LateBatchNorm(selection.module, K, late=True)


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
            name = self.name
        else:
            linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
            if not linears:
                raise LatePhaseError("Head() found no nn.Linear in the model; name the head with Head('name') or use "
                                     "Custom(...)")
            name, m = linears[-1]
        return [Selection(name, m, ("weight", "bias") if m.bias is not None else ("weight",))]

    def wrap(self, selection, K):
        return LateLinear(selection.module, K)


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
        out = [Selection(n, m) for n, m in model.named_modules()
               if type(m) in self.types and _matches(n, self.include, self.exclude)]
        if not out:
            raise LatePhaseError(f"{self!r} selected no module; check the name patterns against "
                                 f"[n for n, _ in model.named_modules()]")
        return out

    def wrap(self, selection, K):
        return LateRank1(selection.module, K)


@dataclass(frozen=True)
class _Templated(Selection):
    """A layer selected by :class:`Hypernetwork`: its template bank T and the index i of its own template T_i = W."""
    bank: nn.Parameter | None = None
    index: int = 0


class Hypernetwork(Family):
    """Hypernetwork late-phase weights (the reference's template banks, after Savarese & Maire 2019) on every layer of
    ``types`` (default nn.Linear and nn.Conv1d/2d/3d, exact types) whose module name matches ``include`` (default:
    all) and not ``exclude``: member k's weight of layer l, drawn from bank b, is

        W_kl = sum_{j=1..J} T_bj c_klj,

    the templates T_b (theta) shared by all members, the coefficients c_kl in R^J member k's phi.

    ``share=True`` (default; the reference shares a bank among its layers of equal weight shape): the selected layers
    of one type, weight shape and groups (dtype, device) share one bank; ``share=False``: every layer has its own. A
    bank of n layers holds J = max(``templates``, n) templates: T_i = W_i, the trained weight of its layer i, and
    J - n new ones ~ N(0, 2 / fan_in), kaiming normal as the reference draws its templates
    (:func:`shared.modules.template_bank`). Every member's coefficients of layer i start at c_ki = e_i, so
    sum_j T_j c_kij = W_i: the release reproduces the trained network exactly (sigma0 > 0 perturbs the coefficients).
    Biases stay theta. ``generator`` draws the new templates (default: the global CPU generator). Collapse:
    W_bar = sum_j T_j c_bar_j with c_bar = mean_k c_k, which is the members' mean weight (W is linear in c).

    The reference (``nets/hyper_layers.py``, ``nets/hyper_wrn.py``) builds its WRN from templates from the start:
    random templates, coefficients orthogonal across the layers of a bank with unit norm, tied across members until
    the release and copied to every member then. Here the network is an ordinary one until the release, and the bank
    is formed then in the basis in which its templates are the trained weights, where those orthonormal coefficients
    are e_1..e_n. Not reproduced: its split of the input channels into pieces with their own coefficients
    (``template_split_factor``), its bias templates (a bias here is theta) and its per-stage template counts
    (10 for the first convolution and the head, (2 * blocks - 1) or twice that per stage bank)."""

    def __init__(self, *include: str, exclude: Sequence[str] | str = (), templates: int = 10, share: bool = True,
                 types: Sequence[type] = (nn.Linear,) + CONV_TYPES, generator=None):
        if not isinstance(templates, int) or isinstance(templates, bool) or templates < 1:
            raise LatePhaseError(f"Hypernetwork(templates=...) is the number J >= 1 of templates per bank, "
                                 f"got {templates!r}")
        self.include = include or ("*",)
        self.exclude = _patterns(exclude)
        self.templates, self.share = templates, bool(share)
        self.types = tuple(types)
        self.generator = generator

    def select(self, model):
        chosen = [(n, m) for n, m in model.named_modules()
                  if type(m) in self.types and _matches(n, self.include, self.exclude)]
        if not chosen:
            raise LatePhaseError(f"{self!r} selected no module; check the name patterns against "
                                 f"[n for n, _ in model.named_modules()]")
        groups: dict = {}
        for n, m in chosen:
            w = m.weight
            key = ((type(m), tuple(w.shape), getattr(m, "groups", 1), w.dtype, w.device, w.requires_grad)
                   if self.share else n)
            groups.setdefault(key, []).append((n, m))
        where = {}
        for members in groups.values():
            bank = template_bank([m.weight for _, m in members], max(self.templates, len(members)), self.generator)
            for i, (n, _) in enumerate(members):
                where[n] = (bank, i)
        return [_Templated(n, m, (), *where[n]) for n, m in chosen]

    def wrap(self, selection, K):
        return LateHyper(selection.module, K, selection.bank, selection.index)


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
        return [Selection(name, model.get_submodule(name), tuple(names)) for name, names in chosen.items()]
