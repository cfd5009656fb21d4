"""The LatePhase object: surgery on any nn.Module, release at T0, and Algorithm 1 (one implementation, two paths).

Algorithm 1 (von Oswald et al. 2021), one outer step, theta held fixed during the loop:

    for k = 1..K:  draw minibatch M_k;  dtheta_k = grad_theta L(M_k; theta, phi_k);
                   phi_k <- U_phi(phi_k, grad_phi_k L(M_k; theta, phi_k))
    theta <- U_theta(theta, gamma_theta * sum_k dtheta_k)

Time t counts minibatches: an outer step consumes K of them (one per member). Member k's update depends only on
(theta, phi_k, M_k), so computing all K gradients first and then stepping every member's own optimizer is the loop
above exactly. Two execution paths compute those gradients:

* "sequential": K forward/backward passes, member k's minibatch in member-k mode; theta's gradients accumulate.
* "vectorized": one forward/backward of the K minibatches stacked along dim 0 in stacked mode (slice k uses phi_k,
  BatchNorm statistics per slice), total loss sum_k L(M_k). Proven equal to "sequential" by the tests.

Outside a step the model is in stacked mode: ``lp.model(x)`` expects K stacked minibatches. For one network use
:meth:`LatePhase.collapse` or :meth:`LatePhase.member_model`, or ``with shared.member_mode(lp.model, k): ...``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn

from . import averaging
from . import checkpoint as ckpt
from . import distributed as ddp_utils
from .errors import LatePhaseError
from .families import BatchNorm, Family
from .modules import BATCHNORM_TYPES, LateBatchNorm, late_modules, member_mode

OptimizerFactory = Callable[[list], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]
PATHS = ("auto", "vectorized", "sequential")
FORMAT = "late-phase-checkpoint/1"


def sgd(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4) -> OptimizerFactory:
    """A factory of torch.optim.SGD with these hyperparameters (defaults: the reference CIFAR settings)."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


# ----------------------------------------------------------------------------- construction helpers

def _check_arguments(model, K, families, gamma_theta, sigma0, path, T0, check_finite_every, autocast) -> list:
    """Every argument check of the constructor, once; returns the families as a list."""
    def need(ok, msg):
        if not ok:
            raise LatePhaseError(msg)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    need(integer(K) and K >= 1, f"K must be an integer >= 1 (the number of members), got {K!r}")
    need(number(gamma_theta), f"gamma_theta must be a finite number >= 0 (1: sum of member gradients, 1/K: their "
                              f"mean, 0: theta frozen), got {gamma_theta!r}")
    need(number(sigma0), f"sigma0 must be a finite number >= 0, got {sigma0!r}")
    need(path in PATHS, f"path must be one of {PATHS}, got {path!r}")
    need(integer(T0) and T0 >= 0, f"T0 must be an integer >= 0 (minibatches before the release), got {T0!r}")
    need(check_finite_every is None or (integer(check_finite_every) and check_finite_every >= 0),
         f"check_finite_every must be an integer >= 0, got {check_finite_every!r}")
    need(autocast is None or isinstance(autocast, torch.dtype),
         f"autocast must be a torch dtype such as torch.bfloat16, got {autocast!r}")
    need(not isinstance(model, nn.parallel.DistributedDataParallel),
         "pass the bare model, not a DistributedDataParallel wrapper; LatePhase wraps it itself when "
         "torch.distributed is initialised")
    need(not late_modules(model), "the model already has late-phase layers; build LatePhase on the original model")
    families = [BatchNorm()] if families is None else [families] if isinstance(families, Family) else list(families)
    need(families and all(isinstance(f, Family) for f in families),
         f"families must be a non-empty list of BatchNorm(), Head(), Rank1(), Hypernetwork(), Custom(...); "
         f"got {families!r}")
    return families


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _surgery(model: nn.Module, families: list, K: int) -> tuple[dict, dict]:
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
        _replace(model, name, late)
        sources[id(late)] = {n: (originals.get(n), anchor) for n in names}
    for name, m in list(model.named_modules()):
        if type(m) in BATCHNORM_TYPES and not any(name == c or name.startswith(c + ".") for c in chosen):
            _replace(model, name, LateBatchNorm(m, K, late=False))
    return sources, theta_sources


def _vectorization_blocker(model: nn.Module) -> str | None:
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


def _build_optimizer(factory, params: list, sources: list, old, what: str) -> torch.optim.Optimizer:
    """U for ``params``: factory(params) when a factory is given; else, when inheriting, the old optimizer's class with
    the hyperparameters of each source's group; else :func:`sgd`. The pre-T0 state of each source is copied."""
    if factory is None and old is not None:
        opt = type(old)(_inherited_groups(old, params, sources))
    else:
        opt = (factory or sgd())(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise LatePhaseError(f"the {what} optimizer factory must return a torch.optim.Optimizer, got "
                                 f"{type(opt).__name__}; e.g. lambda params: torch.optim.SGD(params, lr=0.1)")
        if {id(p) for g in opt.param_groups for p in g["params"]} != {id(p) for p in params}:
            raise LatePhaseError(f"the {what} optimizer factory must optimize exactly the parameters it is given "
                                 f"(use them as passed: factory(params) -> Optimizer(params, ...))")
        if old is not None and type(opt) is not type(old):
            raise LatePhaseError(f"inherit_optimizer_state: the old optimizer is a {type(old).__name__} but the new "
                                 f"{what} optimizer is a {type(opt).__name__}; use the same optimizer class")
    if old is not None:
        for p, src in zip(params, sources):
            if src is not None and src in old.state and src.shape == p.shape:
                opt.state[p] = _clone_state(old.state[src])
    return opt


class _FiniteGuard:
    """The NaN/inf policy for the member losses of each outer step. every = 1: raise before the update (one host
    synchronisation per step); every = n > 1: a device-side flag records the first bad step and is read every n steps
    (and by state_dict); every = 0: never checked."""

    def __init__(self, every: int):
        self.every, self.bad, self.count = every, None, None

    def observe(self, losses: torch.Tensor, lp: "LatePhase") -> None:
        if self.every == 1 and not bool(torch.isfinite(losses).all()):
            t = lp.t
            raise LatePhaseError(f"non-finite loss at outer step {lp.outer_step} (minibatches t={t}..{t + lp.K - 1}), "
                                 f"member losses {losses.tolist()}; no update was made -- lower the learning rate or "
                                 f"check the data")
        if self.every > 1:
            if self.bad is None:
                self.bad = torch.full((), -1, dtype=torch.long, device=losses.device)
                self.count = torch.full((), lp.outer_step, dtype=torch.long, device=losses.device)
            self.bad = torch.where(~torch.isfinite(losses).all() & (self.bad < 0), self.count, self.bad)
            self.count += 1

    def check(self, lp: "LatePhase") -> None:
        if self.bad is not None and (bad := int(self.bad)) >= 0:
            t = lp.T0 + lp.K * bad
            raise LatePhaseError(f"non-finite loss at outer step {bad} (minibatches t={t}..{t + lp.K - 1}); detected "
                                 f"at step {lp.outer_step} (check_finite_every={self.every}) -- lower the learning "
                                 f"rate or check the data")


def _stack(inputs, targets, K: int):
    """(x, y) with the K member minibatches along dim 0, from stacked tensors or from lists of K tensors."""
    if isinstance(inputs, (list, tuple)):
        if not isinstance(targets, (list, tuple)) or len(inputs) != K or len(targets) != K:
            raise LatePhaseError(f"give K={K} member minibatches as lists of K inputs and K targets (or one stacked "
                                 f"tensor each); got {len(inputs)} inputs")
        if len({tuple(x.shape) for x in inputs}) != 1:
            raise LatePhaseError(f"member minibatches have mismatched shapes {sorted({tuple(x.shape) for x in inputs})}"
                                 f"; give every member a minibatch of the same shape")
        inputs, targets = torch.cat(list(inputs)), torch.cat(list(targets))
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise LatePhaseError(f"inputs have {n} samples but targets have {targets.shape[0]}; they must match along dim 0")
    if n == 0 or n % K:
        raise LatePhaseError(f"a batch of {n} samples does not split into K={K} member minibatches; give K*B samples "
                             f"(B per member) along dim 0")
    return inputs, targets


def _member_slice(out, k: int, B: int, n: int):
    """Member k's part of a stacked forward's output: rows k B..(k+1) B-1 of every tensor (tuples, lists and dicts
    of them too); 0-dim tensors and other values are every member's."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0:
            return out
        if out.shape[0] != n:
            raise LatePhaseError(f"the model's output has {out.shape[0]} entries in dim 0 but the stacked batch has "
                                 f"{n}; the vectorized path needs batch-first outputs (or use path='sequential')")
        return out[k * B:(k + 1) * B]
    if isinstance(out, (tuple, list)):
        return type(out)(_member_slice(o, k, B, n) for o in out)
    if isinstance(out, dict):
        return {key: _member_slice(v, k, B, n) for key, v in out.items()}
    return out


def _scalar(loss):
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise LatePhaseError("loss_fn(output, target) must return a scalar tensor (the mean loss over the minibatch)")
    return loss


# ----------------------------------------------------------------------------- LatePhase

class LatePhase:
    """Late-phase weights for any nn.Module; constructing it is the release at T0.

    ``model`` is changed in place: the layers selected by ``families`` become member-aware modules with K copies
    phi_1..phi_K of their late-phase weights (initialised as phi_k = phi + sigma0 * RMS(phi) * eps_k per tensor,
    eps_k ~ N(0, 1); sigma0 = 0 gives identical members; BatchNorm running statistics are copied), and every other
    nn.BatchNorm layer gets per-member batch statistics for the vectorized path while its gamma, beta and running
    statistics stay shared (theta). theta keeps its Parameter objects.

    Example::

        lp = shared.LatePhase(model, K=4, families=[shared.BatchNorm(), shared.Head()], gamma_theta=1 / 4)
        for x, y in shared.stack_batches(train_loader, K=4):
            lp.step(x, y, F.cross_entropy)        # theta <- U(theta, (1/4) sum_k grad_theta L(M_k)); phi_k <- U(phi_k, .)
        final = lp.collapse(train_loader)         # plain model, eval mode

    Args:
        model: the network (after its first T0 minibatches of ordinary training); its SyncedBatchNorm layers (from
            :func:`shared.distributed.sync_batchnorm`) become nn.BatchNorm again, with the same tensors.
        K: number of members (>= 1).
        families: late-phase weight families, e.g. ``[BatchNorm(), Head()]`` (default ``[BatchNorm()]``).
        gamma_theta: theta <- U_theta(theta, gamma_theta * sum_k grad_theta L(M_k)); 1 sums the member gradients (the
            reference CIFAR code), 1/K averages them (its ImageNet script); 0 freezes theta (U_theta is not stepped,
            so neither weight decay nor momentum moves it).
        sigma0: relative std of the release noise.
        theta_optimizer, phi_optimizer: factories ``params -> torch.optim.Optimizer`` for U_theta and U_phi (phi's is
            called once per member). Default: :func:`sgd` (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4), or,
            with ``inherit_optimizer_state``, the old optimizer's class and hyperparameters.
        theta_scheduler, phi_scheduler: optional factories ``optimizer -> LR scheduler``; see :meth:`step_schedulers`.
        path: "vectorized", "sequential" or "auto" (vectorized unless the model has a batch-coupling layer that
            cannot be split per member, e.g. SyncBatchNorm).
        T0: minibatches trained before the release (for the counter ``t``).
        inherit_optimizer_state: the optimizer used before the release. Its per-parameter state (e.g. momentum
            buffers) is copied: theta's as it is, and the original phi tensors' state to every member's copies. Where
            a factory is not given, the new optimizer also takes its class and every param-group hyperparameter (lr,
            weight decay, momentum, Nesterov, a scheduler's initial_lr) of the group that held each tensor (new tensors
            such as rank-1 factors or template banks: the group of the layer's weight; a new tensor has no state to
            copy). A factory that is given sets the hyperparameters.
        generator: torch.Generator for the release noise (default: the global CPU generator).
        check_finite_every: check the loss for NaN/inf every this many outer steps (1: before every update, which
            synchronises with the GPU; n > 1: a device-side flag read every n steps; 0: never). Default: 1 on the CPU,
            50 on accelerators.
        autocast: run the forward passes and losses under torch.autocast with this dtype (e.g. torch.bfloat16);
            backward passes and optimizer steps run outside it.
        distributed: use torch.distributed (default: when a process group with > 1 rank is initialised); a dict
            also gives keyword arguments for DistributedDataParallel (vectorized path). Every BatchNorm layer then
            takes its training-mode statistics over each member's whole minibatch on all ranks during the steps, as
            in one process (see :mod:`shared.distributed`).
    """

    def __init__(self, model: nn.Module, K: int, families: Sequence[Family] | Family | None = None, *,
                 gamma_theta: float = 1.0, sigma0: float = 0.0, theta_optimizer: OptimizerFactory | None = None,
                 phi_optimizer: OptimizerFactory | None = None, theta_scheduler: SchedulerFactory | None = None,
                 phi_scheduler: SchedulerFactory | None = None, path: str = "auto", T0: int = 0,
                 inherit_optimizer_state: torch.optim.Optimizer | None = None,
                 generator: torch.Generator | None = None, check_finite_every: int | None = None,
                 autocast: torch.dtype | None = None, distributed: bool | dict | None = None):
        families = _check_arguments(model, K, families, gamma_theta, sigma0, path, T0, check_finite_every, autocast)
        model = ddp_utils.plain_batchnorm(model)  # SyncedBatchNorm layers (pre-release DDP) become nn.BatchNorm again
        blocker = _vectorization_blocker(model)
        if path == "vectorized" and blocker:
            raise LatePhaseError(f"path='vectorized' is not exact for this model: {blocker}; use path='sequential'")
        self.model, self.K, self.families, self.gamma_theta, self.T0 = model, K, families, float(gamma_theta), T0
        self.path = path if path != "auto" else ("sequential" if blocker else "vectorized")
        self._blocker, self.outer_step = blocker, 0

        sources, theta_sources = _surgery(model, families, K)
        late = [m for _, m in late_modules(model)]
        self.phi_params = [[p for m in late for p in m.phi(k)] for k in range(K)]
        if not self.phi_params[0]:
            raise LatePhaseError(f"no late-phase parameters selected by {families!r} (e.g. BatchNorm without affine "
                                 f"parameters); select layers that have parameters")
        phi_sources = [sources[id(m)][name] for m in late for name, _ in m.phi_lists()]
        phi_ids = {id(p) for ps in self.phi_params for p in ps}
        self.theta_params = [p for p in model.parameters() if id(p) not in phi_ids]
        self._release_noise(late, float(sigma0), generator)

        old = inherit_optimizer_state
        theta = [p for p in self.theta_params if p.requires_grad]
        theta_origins = [theta_sources.get(id(p), p) for p in theta]
        self.theta_optimizer = (_build_optimizer(theta_optimizer, theta, theta_origins, old, "theta") if theta
                                else None)
        self.phi_optimizers = []
        for k, ps in enumerate(self.phi_params):
            trainable = [(p, src) for p, src in zip(ps, phi_sources) if p.requires_grad]
            origins = [src[0] if src[0] is not None else src[1] for _, src in trainable]
            self.phi_optimizers.append(_build_optimizer(phi_optimizer, [p for p, _ in trainable], origins, old,
                                                        f"phi_{k}"))
        self.schedulers = [theta_scheduler(self.theta_optimizer)] if theta_scheduler and self.theta_optimizer else []
        self.schedulers += [phi_scheduler(opt) for opt in self.phi_optimizers] if phi_scheduler else []

        device = self.phi_params[0][0].device
        self._guard = _FiniteGuard(check_finite_every if check_finite_every is not None
                                   else (1 if device.type == "cpu" else 50))
        self._autocast = (functools.partial(torch.autocast, device.type, dtype=autocast) if autocast is not None
                          else contextlib.nullcontext)
        self._distributed = ddp_utils.is_distributed() if distributed is None else bool(distributed)
        self._ddp = None
        self._synced_bns = [m for m in late if isinstance(m, LateBatchNorm)] if self._distributed else []
        if self._distributed:
            ddp_utils._opaque_to_compile()
            if not ddp_utils.is_distributed():
                raise LatePhaseError("distributed=True needs an initialised torch.distributed process group with more "
                                     "than one rank (see shared.distributed.init_from_env)")
            if self.path == "vectorized":
                kwargs = distributed if isinstance(distributed, dict) else {}
                self._ddp = nn.parallel.DistributedDataParallel(model, **kwargs)
            else:
                ddp_utils.broadcast_module(model)

    @torch.no_grad()
    def _release_noise(self, late: list, sigma0: float, generator) -> None:
        """phi_k <- phi + sigma0 * RMS(phi) * eps_k per tensor, eps_k ~ N(0, 1), RMS(phi) = sqrt(mean(phi^2))."""
        if sigma0 == 0:
            return
        for m in late:
            for _, plist in m.phi_lists():
                rms = plist[0].detach().double().pow(2).mean().sqrt().item()
                for p in plist:
                    eps = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    p.add_(eps.to(p.device), alpha=sigma0 * rms)

    # ------------------------------------------------------------------ counters and optimizers
    @property
    def optimizers(self) -> list:
        """[theta optimizer, phi_1 optimizer, ..., phi_K optimizer] (theta's omitted when theta has no trainable
        tensor); attach LR schedulers to each as needed (append them to ``schedulers`` to have them stepped and
        checkpointed)."""
        return ([self.theta_optimizer] if self.theta_optimizer is not None else []) + list(self.phi_optimizers)

    @property
    def t(self) -> int:
        """Minibatches consumed so far: t = T0 + K * outer_step."""
        return self.T0 + self.K * self.outer_step

    def step_schedulers(self) -> None:
        """Step every LR scheduler in ``schedulers`` (those the scheduler factories made, and any appended)."""
        for s in self.schedulers:
            s.step()

    def check_finite(self) -> None:
        """Raise if a loss recorded since the last check was NaN or inf (deferred mode, check_finite_every > 1)."""
        self._guard.check(self)

    # ------------------------------------------------------------------ Algorithm 1
    def forward_backward(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """Gradients of one outer step (first half of :meth:`step`): afterwards theta.grad = sum_k grad_theta L(M_k)
        and phi_k.grad = grad_phi_k L(M_k). Returns the K member losses L(M_k) (detached, shape (K,)).

        ``inputs``/``targets`` hold the K member minibatches stacked along dim 0 (K*B samples, slice k = member k),
        or are lists of K tensors; ``loss_fn(output, target)`` returns the mean loss of a minibatch. The model is
        in stacked mode afterwards, on both paths."""
        K = self.K
        x, y = _stack(inputs, targets, K)
        n, B = x.shape[0], x.shape[0] // K
        path = self.path if path is None else self._check_path(path)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        with self._synced_statistics() if self._synced_bns else contextlib.nullcontext():
            losses = self._gradients(x, y, loss_fn, path, K, n, B)
        losses = losses.detach()
        self._guard.observe(losses, self)
        return losses

    @contextlib.contextmanager
    def _synced_statistics(self):
        """Under torch.distributed: the BatchNorm layers take their training-mode batch statistics over each member's
        whole minibatch on all ranks (the single-process protocol) during this block (the forward and backward passes
        of a step). Outside steps, e.g. BatchNorm re-estimation on one rank, they stay per process."""
        for m in self._synced_bns:
            m.sync = True
        try:
            yield
        finally:
            for m in self._synced_bns:
                m.sync = False

    def _gradients(self, x, y, loss_fn, path: str, K: int, n: int, B: int) -> torch.Tensor:
        """The forward/backward passes of one outer step on ``path``; returns the K member losses."""
        if path == "vectorized":  # one pass: member k's phi on slice k of the stacked batch
            with member_mode(self.model, None, rows=n), self._autocast():
                out = (self._ddp or self.model)(x)
                losses = torch.stack([_scalar(loss_fn(_member_slice(out, k, B, n), y[k * B:(k + 1) * B]))
                                      for k in range(K)])
            losses.sum().backward()
        else:  # K passes: member k on its own minibatch; theta's gradients accumulate
            if self._distributed:
                ddp_utils.broadcast_module(self.model, buffers_only=True)
            losses = []
            for k in range(K):
                with member_mode(self.model, k), self._autocast():
                    loss = _scalar(loss_fn(self.model(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B]))
                loss.backward()
                losses.append(loss.detach())
            losses = torch.stack(losses)
            if self._distributed:
                ddp_utils.allreduce_grads(self.model.parameters())
        return losses

    def update(self) -> None:
        """Second half of :meth:`step`: theta <- U_theta(theta, gamma_theta * theta.grad) (not stepped at all when
        gamma_theta = 0); then every member's own optimizer steps its own phi_k. Increments ``outer_step``."""
        if self.theta_optimizer is not None and self.gamma_theta > 0:
            grads = [p.grad for p in self.theta_params if p.grad is not None]
            if grads and self.gamma_theta != 1.0:
                torch._foreach_mul_(grads, self.gamma_theta)
            self.theta_optimizer.step()
        for opt in self.phi_optimizers:
            opt.step()
        self.outer_step += 1
        if self._guard.every > 1 and self.outer_step % self._guard.every == 0:
            self._guard.check(self)

    def step(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """One outer step of Algorithm 1 on K member minibatches (consumes K minibatches: t += K).

        ``inputs``/``targets``: the K minibatches stacked along dim 0 (K*B samples; slice k is member k's), or lists
        of K tensors. ``loss_fn(output, target)``: the mean loss of a minibatch. Returns the mean member loss
        (1/K) sum_k L(M_k) as a tensor (no host synchronisation). Raises LatePhaseError on a NaN/inf loss (see
        ``check_finite_every``)."""
        losses = self.forward_backward(inputs, targets, loss_fn, path)
        self.update()
        return losses.mean()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of one outer step (between :meth:`forward_backward` and :meth:`update`) by the norm of
        the mean member's gradient,

            N = sqrt(|g_theta / K|^2 + (1/K) sum_k |g_phi_k|^2),   g_theta = theta.grad = sum_k grad_theta L(M_k),

        the root mean square over members of the norm of (the members' mean theta gradient, member k's phi gradient):
        every gradient is multiplied by min(1, max_norm / (N + 1e-6)), as torch.nn.utils.clip_grad_norm_ does. With
        K = 1 this is clip_grad_norm_ over all parameters; with identical members on identical minibatches it is the
        plain model's clip. (Clipping ``model.parameters()`` instead would mix theta's summed gradient with all K
        members' phi gradients.) Returns N before clipping (a tensor; no host synchronisation)."""
        def sq(grads):
            if not grads:
                return torch.zeros((), dtype=torch.float64, device=self.phi_params[0][0].device)
            return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]).pow(2).sum()

        theta = [p.grad for p in self.theta_params if p.grad is not None]
        phis = [[p.grad for p in ps if p.grad is not None] for ps in self.phi_params]
        norm = (sq(theta) / self.K ** 2 + sum(sq(g) for g in phis) / self.K).sqrt()
        grads = theta + [g for gs in phis for g in gs]
        if grads:
            torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
        return norm

    def _check_path(self, path: str) -> str:
        if path not in ("vectorized", "sequential"):
            raise LatePhaseError(f"path must be 'vectorized' or 'sequential', got {path!r}")
        if path == "vectorized" and self._blocker:
            raise LatePhaseError(f"path='vectorized' is not exact for this model: {self._blocker}; use 'sequential'")
        if self._distributed and path != self.path:
            raise LatePhaseError(f"the path is fixed at construction when distributed; build LatePhase with "
                                 f"path={path!r}")
        return path

    # ------------------------------------------------------------------ end of training
    def collapse(self, loader: Iterable | None = None, bn: str = "data", members: Sequence[int] | None = None,
                 device=None) -> nn.Module:
        """A plain nn.Module of the original architecture in eval mode, phi_bar = mean_k phi_k: this is
        ``shared.collapse(lp.model, ...)`` (see :func:`shared.averaging.collapse`)."""
        return averaging.collapse(self.model, loader, bn, members, device)

    def member_model(self, k: int) -> nn.Module:
        """Member k's network as a plain nn.Module in eval mode (its own phi_k and BatchNorm statistics)."""
        return averaging.collapse(self.model, None, "mean", [k])

    def ensemble_logits(self, x: torch.Tensor):
        """Per-member outputs, shape (K, N, ...), from one stacked forward in eval mode (see
        :func:`shared.averaging.ensemble_logits`)."""
        return averaging.ensemble_logits(self.model, x)

    def ensemble_probs(self, x: torch.Tensor, dim: int = -1, output: Callable | None = None) -> torch.Tensor:
        """Ensemble prediction (1/K) sum_k softmax(f_k(x)), shape (N, ...) (see
        :func:`shared.averaging.ensemble_probs`)."""
        return averaging.ensemble_probs(self.model, x, dim, output)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Complete training state: model (theta, every phi_k, BatchNorm buffers), all optimizer and scheduler
        states, step counters and RNG states (torch CPU, CUDA, numpy, python), as tensors and plain values."""
        self.check_finite()
        return {
            "format": FORMAT,
            "K": self.K,
            "gamma_theta": self.gamma_theta,
            "T0": self.T0,
            "outer_step": self.outer_step,
            "model": self.model.state_dict(),
            "theta_optimizer": None if self.theta_optimizer is None else self.theta_optimizer.state_dict(),
            "phi_optimizers": [opt.state_dict() for opt in self.phi_optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict, restore_rng: bool = True) -> None:
        """Restore a state from :meth:`state_dict` into a LatePhase built the same way (same model, K, families,
        optimizer and scheduler factories). With restore_rng the generators continue exactly where they were."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LatePhaseError("not a LatePhase checkpoint (missing format tag); load it with "
                                 "shared.checkpoint.load and pass LatePhase.state_dict() output")
        if state["K"] != self.K:
            raise LatePhaseError(f"the checkpoint has K={state['K']} members but this LatePhase has K={self.K}; build "
                                 f"it with K={state['K']}")
        if len(state["schedulers"]) != len(self.schedulers):
            raise LatePhaseError(f"the checkpoint has {len(state['schedulers'])} LR schedulers but this LatePhase has "
                                 f"{len(self.schedulers)}; create the same schedulers before loading")
        if (state["theta_optimizer"] is None) != (self.theta_optimizer is None):
            raise LatePhaseError("the checkpoint and this LatePhase disagree on whether theta has an optimizer; "
                                 "build the model with the same trainable parameters")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise LatePhaseError(f"the checkpoint does not fit this model ({str(e).splitlines()[0]} ...); build the "
                                 f"same architecture and families") from e
        try:
            if self.theta_optimizer is not None:
                self.theta_optimizer.load_state_dict(state["theta_optimizer"])
            for opt, s in zip(self.phi_optimizers, state["phi_optimizers"]):
                opt.load_state_dict(s)
        except ValueError as e:
            raise LatePhaseError(f"the checkpoint's optimizer states do not fit ({e}); use the same optimizer "
                                 f"factories") from e
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        self.gamma_theta, self.T0, self.outer_step = float(state["gamma_theta"]), state["T0"], state["outer_step"]
        self._guard.bad = self._guard.count = None
        if restore_rng:
            ckpt.set_rng_state(state["rng"])

    def __repr__(self) -> str:
        return (f"LatePhase(K={self.K}, families={self.families!r}, gamma_theta={self.gamma_theta}, "
                f"path={self.path!r}, outer_step={self.outer_step}, t={self.t}, "
                f"phi_tensors_per_member={len(self.phi_params[0])})")
