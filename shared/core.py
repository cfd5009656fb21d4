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
from .modules import BATCHNORM_TYPES, LateBatchNorm, late_modules, set_member

OptimizerFactory = Callable[[list], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], object]
PATHS = ("auto", "vectorized", "sequential")
FORMAT = "late-phase-checkpoint/1"


def sgd(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4) -> OptimizerFactory:
    """A factory of torch.optim.SGD with these hyperparameters (defaults: the reference CIFAR settings)."""
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _clone_state(state: dict) -> dict:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in state.items()}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def _slice(obj, sl: slice, n: int):
    """Rows ``sl`` of every tensor in ``obj`` whose dim 0 has the stacked batch size ``n``."""
    if isinstance(obj, torch.Tensor):
        return obj[sl] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(o, sl, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _slice(v, sl, n) for k, v in obj.items()}
    return obj


def _vectorization_blocker(model: nn.Module) -> str | None:
    """Why stacked mode would not be Algorithm 1 for this model (a batch-coupling layer it cannot split), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{name!r} is a {type(m).__name__}, whose batch statistics cannot be split per member"
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return f"{name!r} ({type(m).__name__}) tracks running statistics over the whole batch"
    return None


class LatePhase:
    """Late-phase weights for any nn.Module; constructing it is the release at T0.

    ``model`` is changed in place: the layers selected by ``families`` become member-aware modules with K copies
    phi_1..phi_K of their late-phase weights (initialised as phi_k = phi + sigma0 * RMS(phi) * eps_k per tensor,
    eps_k ~ N(0, 1); sigma0 = 0 gives identical members; BatchNorm running statistics are copied), and every other
    nn.BatchNorm layer gets per-member batch statistics for the vectorized path while its gamma, beta and running
    statistics stay shared (theta). theta keeps its Parameter objects, so a pre-T0 optimizer state can be carried over
    (``inherit_optimizer_state``: theta's state is copied, and every member gets a copy of the original phi's state).

    Args:
        model: the network (after its first T0 minibatches of ordinary training).
        K: number of members (>= 1).
        families: late-phase weight families, e.g. ``[BatchNorm(), Head()]`` (default ``[BatchNorm()]``).
        gamma_theta: theta <- U_theta(theta, gamma_theta * sum_k grad_theta L(M_k)); 1 sums the member gradients (the
            reference CIFAR code), 1/K averages them (its ImageNet script).
        sigma0: relative std of the release noise.
        theta_optimizer, phi_optimizer: factories ``params -> torch.optim.Optimizer`` for U_theta and U_phi (phi's is
            called once per member). Default: :func:`sgd` (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4).
        theta_scheduler, phi_scheduler: optional factories ``optimizer -> LR scheduler``; see :meth:`step_schedulers`.
        path: "vectorized", "sequential" or "auto" (vectorized unless the model has a batch-coupling layer that
            cannot be split per member, e.g. SyncBatchNorm).
        T0: minibatches trained before the release (for the counter ``t``).
        generator: torch.Generator for the release noise (default: the global CPU generator).
        check_finite_every: check the loss for NaN/inf every this many outer steps (1: before every update, which
            synchronises with the GPU; n > 1: a device-side flag read every n steps; 0: never). Default: 1 on the CPU,
            50 on accelerators.
        autocast: run the forward passes and losses under torch.autocast with this dtype (e.g. torch.bfloat16);
            backward passes and optimizer steps run outside it.
        distributed: use torch.distributed (default: when a process group with > 1 rank is initialised).
        ddp_kwargs: keyword arguments for DistributedDataParallel (vectorized path).
    """

    def __init__(self, model: nn.Module, K: int, families: Sequence[Family] | Family | None = None, *,
                 gamma_theta: float = 1.0, sigma0: float = 0.0, theta_optimizer: OptimizerFactory | None = None,
                 phi_optimizer: OptimizerFactory | None = None, theta_scheduler: SchedulerFactory | None = None,
                 phi_scheduler: SchedulerFactory | None = None, path: str = "auto", T0: int = 0,
                 inherit_optimizer_state: torch.optim.Optimizer | None = None,
                 generator: torch.Generator | None = None, check_finite_every: int | None = None,
                 autocast: torch.dtype | None = None, distributed: bool | None = None,
                 ddp_kwargs: dict | None = None):
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise LatePhaseError(f"K must be an integer >= 1 (the number of members), got {K!r}")
        if not (isinstance(gamma_theta, (int, float)) and math.isfinite(gamma_theta) and gamma_theta >= 0):
            raise LatePhaseError(f"gamma_theta must be a finite number >= 0 (1: sum of member gradients, 1/K: their "
                                 f"mean), got {gamma_theta!r}")
        if not (isinstance(sigma0, (int, float)) and math.isfinite(sigma0) and sigma0 >= 0):
            raise LatePhaseError(f"sigma0 must be a finite number >= 0, got {sigma0!r}")
        if path not in PATHS:
            raise LatePhaseError(f"path must be one of {PATHS}, got {path!r}")
        if isinstance(T0, bool) or not isinstance(T0, int) or T0 < 0:
            raise LatePhaseError(f"T0 must be an integer >= 0 (minibatches before the release), got {T0!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise LatePhaseError("pass the bare model, not a DistributedDataParallel wrapper; LatePhase wraps it "
                                 "itself when torch.distributed is initialised")
        if late_modules(model):
            raise LatePhaseError("the model already has late-phase layers; build LatePhase on the original model")
        if families is None:
            families = [BatchNorm()]
        elif isinstance(families, Family):
            families = [families]
        families = list(families)
        if not families or not all(isinstance(f, Family) for f in families):
            raise LatePhaseError(f"families must be a non-empty list of BatchNorm(), Head(), Rank1(), Custom(...); "
                                 f"got {families!r}")
        self.model, self.K, self.gamma_theta, self.sigma0, self.T0 = model, K, float(gamma_theta), float(sigma0), T0
        self.families = families
        origins = self._surgery(model, families, K)
        self.late = [m for _, m in late_modules(model)]
        self.phi_params = [[p for m in self.late for p in m.phi(k)] for k in range(K)]
        if not self.phi_params[0]:
            raise LatePhaseError(f"no late-phase parameters selected by {families!r} (e.g. BatchNorm without affine "
                                 f"parameters); select layers that have parameters")
        phi_ids = {id(p) for ps in self.phi_params for p in ps}
        self.theta_params = [p for p in model.parameters() if id(p) not in phi_ids]
        self._release_noise(generator)

        theta_optimizer = theta_optimizer or sgd()
        phi_optimizer = phi_optimizer or sgd()
        trainable = [p for p in self.theta_params if p.requires_grad]
        self.theta_optimizer = self._make_optimizer(theta_optimizer, trainable, "theta") if trainable else None
        self.phi_optimizers = [self._make_optimizer(phi_optimizer, [p for p in ps if p.requires_grad], f"phi_{k}")
                               for k, ps in enumerate(self.phi_params)]
        if inherit_optimizer_state is not None:
            self._inherit(inherit_optimizer_state, origins)
        self.schedulers = []
        if theta_scheduler is not None and self.theta_optimizer is not None:
            self.schedulers.append(theta_scheduler(self.theta_optimizer))
        if phi_scheduler is not None:
            self.schedulers.extend(phi_scheduler(opt) for opt in self.phi_optimizers)

        blocker = _vectorization_blocker(model)
        if path == "vectorized" and blocker:
            raise LatePhaseError(f"path='vectorized' is not exact for this model: {blocker}; use path='sequential'")
        self.path = path if path != "auto" else ("sequential" if blocker else "vectorized")
        self._blocker = blocker

        self.outer_step = 0
        device = self.phi_params[0][0].device
        self.check_finite_every = (check_finite_every if check_finite_every is not None
                                   else (1 if device.type == "cpu" else 50))
        if not isinstance(self.check_finite_every, int) or self.check_finite_every < 0:
            raise LatePhaseError(f"check_finite_every must be an integer >= 0, got {check_finite_every!r}")
        self._bad_step = None
        self._dev_step = None
        if autocast is not None and not isinstance(autocast, torch.dtype):
            raise LatePhaseError(f"autocast must be a torch dtype such as torch.bfloat16, got {autocast!r}")
        self.autocast = autocast
        self._device_type = device.type

        self.distributed = ddp_utils.is_distributed() if distributed is None else bool(distributed)
        self._ddp = None
        if self.distributed:
            if not ddp_utils.is_distributed():
                raise LatePhaseError("distributed=True needs an initialised torch.distributed process group with more "
                                     "than one rank (see shared.distributed.init_from_env)")
            if self.path == "vectorized":
                self._ddp = nn.parallel.DistributedDataParallel(model, **(ddp_kwargs or {}))
            else:
                ddp_utils.broadcast_module(model)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _surgery(model: nn.Module, families: list, K: int) -> list:
        """Replace the selected modules in place; returns [(original phi Parameter, [member Parameters])]."""
        chosen: dict[str, tuple] = {}
        for fam in families:
            for name, module, names in fam.select(model):
                if name == "":
                    raise LatePhaseError(f"{fam!r} selects the model itself; wrap the model in a container so the "
                                         f"late-phase layer is a submodule")
                if name in chosen:
                    raise LatePhaseError(f"module {name!r} is selected by both {chosen[name][0]!r} and {fam!r}; "
                                         f"exclude it from one of them")
                chosen[name] = (fam, module, names)
        for name in chosen:
            for other in chosen:
                if other != name and name.startswith(other + "."):
                    raise LatePhaseError(f"module {name!r} lies inside {other!r}, which is also selected; "
                                         f"select one of them")
        origins = []
        for name, (fam, module, names) in chosen.items():
            late, orig = fam.wrap(module, K, names)
            _replace(model, name, late)
            for pname, p in orig.items():
                origins.append((p, [dict(late.phi_lists())[pname][k] for k in range(K)]))
        for name, m in list(model.named_modules()):
            if type(m) in BATCHNORM_TYPES and not any(name == c or name.startswith(c + ".") for c in chosen):
                _replace(model, name, LateBatchNorm(m, K, late=False))
        return origins

    @torch.no_grad()
    def _release_noise(self, generator) -> None:
        """phi_k <- phi + sigma0 * RMS(phi) * eps_k per tensor, eps_k ~ N(0, 1), RMS(phi) = sqrt(mean(phi^2))."""
        if self.sigma0 == 0:
            return
        for m in self.late:
            for _, plist in m.phi_lists():
                rms = plist[0].detach().double().pow(2).mean().sqrt().item()
                for p in plist:
                    eps = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                    p.add_(eps.to(p.device), alpha=self.sigma0 * rms)

    @staticmethod
    def _make_optimizer(factory, params, what):
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise LatePhaseError(f"the {what} optimizer factory must return a torch.optim.Optimizer, got "
                                 f"{type(opt).__name__}; e.g. lambda params: torch.optim.SGD(params, lr=0.1)")
        got = {id(p) for g in opt.param_groups for p in g["params"]}
        if got != {id(p) for p in params}:
            raise LatePhaseError(f"the {what} optimizer factory must optimize exactly the parameters it is given "
                                 f"(use them as passed: factory(params) -> Optimizer(params, ...))")
        return opt

    def _inherit(self, old: torch.optim.Optimizer, origins: list) -> None:
        for opt in self.optimizers:
            if type(opt) is not type(old):
                raise LatePhaseError(f"inherit_optimizer_state: the old optimizer is a {type(old).__name__} but the "
                                     f"new ones are {type(opt).__name__}; use the same optimizer class")
        if self.theta_optimizer is not None:
            for p in self.theta_params:
                if p in old.state:
                    self.theta_optimizer.state[p] = _clone_state(old.state[p])
        for orig, members in origins:
            if orig in old.state:
                for k, p in enumerate(members):
                    if p.shape != orig.shape:
                        raise LatePhaseError("inherit_optimizer_state: shape mismatch between a phi tensor and its "
                                             "original; this is a bug in a family")
                    self.phi_optimizers[k].state[p] = _clone_state(old.state[orig])

    # ------------------------------------------------------------------ properties
    @property
    def optimizers(self) -> list:
        """[theta optimizer, phi_1 optimizer, ..., phi_K optimizer] (theta's omitted when theta has no trainable
        tensor); attach LR schedulers to each as needed."""
        return ([self.theta_optimizer] if self.theta_optimizer is not None else []) + list(self.phi_optimizers)

    @property
    def t(self) -> int:
        """Minibatches consumed so far: t = T0 + K * outer_step."""
        return self.T0 + self.K * self.outer_step

    @property
    def vectorizable(self) -> bool:
        return self._blocker is None

    @contextlib.contextmanager
    def mode(self, member: int | None):
        """Context manager: run the model as member k (``mode(k)``) or in stacked mode (``mode(None)``)."""
        if member is not None and not 0 <= member < self.K:
            raise LatePhaseError(f"member must be in 0..{self.K - 1} or None (stacked), got {member}")
        prev = [m.member for m in self.late]
        set_member(self.late, member)
        try:
            yield self.model
        finally:
            for m, p in zip(self.late, prev):
                m.member = p

    # ------------------------------------------------------------------ Algorithm 1
    def _stack_inputs(self, inputs, targets):
        K = self.K
        if isinstance(inputs, (list, tuple)):
            if not isinstance(targets, (list, tuple)) or len(inputs) != K or len(targets) != K:
                raise LatePhaseError(f"give K={K} member minibatches as lists of K inputs and K targets (or one "
                                     f"stacked tensor each); got {len(inputs)} inputs")
            shapes = {tuple(x.shape) for x in inputs}
            if len(shapes) != 1:
                raise LatePhaseError(f"member minibatches have mismatched shapes {sorted(shapes)}; give every member "
                                     f"a minibatch of the same shape")
            inputs, targets = torch.cat(list(inputs)), torch.cat(list(targets))
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise LatePhaseError("inputs and targets must be tensors holding K stacked member minibatches along dim 0 "
                                 "(or lists of K tensors)")
        n = inputs.shape[0]
        if targets.shape[0] != n:
            raise LatePhaseError(f"inputs have {n} samples but targets have {targets.shape[0]}; they must match "
                                 f"along dim 0")
        if n == 0 or n % K:
            raise LatePhaseError(f"a batch of {n} samples does not split into K={K} member minibatches; give K*B "
                                 f"samples (B per member) along dim 0")
        return inputs, targets, n // K

    def _loss(self, loss_fn, out, y):
        loss = loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise LatePhaseError("loss_fn(output, target) must return a scalar tensor (the mean loss over the "
                                 "minibatch)")
        return loss

    def _check_now(self, loss, describe: Callable[[], str]) -> None:
        if not bool(torch.isfinite(loss)):
            members = describe()
            t = self.t
            raise LatePhaseError(f"non-finite loss at outer step {self.outer_step} (minibatches t={t}..{t + self.K - 1}"
                                 f"), {members}; no update was made -- lower the learning rate or check the data")

    def _record(self, total) -> None:
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=total.device)
            self._dev_step = torch.full((), self.outer_step, dtype=torch.long, device=total.device)
        bad = (~torch.isfinite(total.detach())) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, self._dev_step, self._bad_step)
        self._dev_step += 1

    def check_finite(self) -> None:
        """Raise if a loss recorded since the last check was NaN or inf (deferred mode, check_finite_every > 1)."""
        if self._bad_step is not None:
            bad = int(self._bad_step)
            if bad >= 0:
                t = self.T0 + self.K * bad
                raise LatePhaseError(f"non-finite loss at outer step {bad} (minibatches t={t}..{t + self.K - 1}); "
                                     f"detected at step {self.outer_step} (check_finite_every="
                                     f"{self.check_finite_every}) -- lower the learning rate or check the data")

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device_type, dtype=self.autocast)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def forward_backward(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """Gradients of one outer step (first half of :meth:`step`): afterwards theta.grad = sum_k grad_theta L(M_k)
        and phi_k.grad = grad_phi_k L(M_k). Returns the K member losses L(M_k) (detached, shape (K,)).

        ``inputs``/``targets`` hold the K member minibatches stacked along dim 0 (K*B samples, slice k = member k),
        or are lists of K tensors; ``loss_fn(output, target)`` returns the mean loss of a minibatch."""
        path = self.path if path is None else path
        if path not in ("vectorized", "sequential"):
            raise LatePhaseError(f"path must be 'vectorized' or 'sequential', got {path!r}")
        if path == "vectorized" and self._blocker:
            raise LatePhaseError(f"path='vectorized' is not exact for this model: {self._blocker}; use 'sequential'")
        if self.distributed and path != self.path:
            raise LatePhaseError("the path is fixed at construction when distributed; build LatePhase with "
                                 f"path={path!r}")
        x, y, B = self._stack_inputs(inputs, targets)
        K, n = self.K, x.shape[0]
        immediate = self.check_finite_every == 1
        self.zero_grad()
        if self.distributed and path == "sequential":
            ddp_utils.broadcast_module(self.model, buffers_only=True)
        if path == "vectorized":
            set_member(self.late, None)
            with self._autocast():
                out = (self._ddp or self.model)(x)
                losses = torch.stack([self._loss(loss_fn, _slice(out, slice(k * B, (k + 1) * B), n),
                                                 y[k * B:(k + 1) * B]) for k in range(K)])
            total = losses.sum()
            if immediate:
                self._check_now(total, lambda: f"member losses {losses.detach().tolist()}")
            total.backward()
            losses = losses.detach()
        else:
            losses = []
            for k in range(K):
                set_member(self.late, k)
                sl = slice(k * B, (k + 1) * B)
                with self._autocast():
                    loss = self._loss(loss_fn, self.model(x[sl]), y[sl])
                if immediate:
                    self._check_now(loss, lambda: f"member {k}'s loss {loss.item()}")
                loss.backward()
                losses.append(loss.detach())
            losses = torch.stack(losses)
            total = losses.sum()
            if self.distributed:
                ddp_utils.allreduce_grads(self.model.parameters())
        if self.check_finite_every > 1:
            self._record(total)
        return losses

    def update(self) -> None:
        """Second half of :meth:`step`: theta <- U_theta(theta, gamma_theta * theta.grad); then every member's own
        optimizer steps its own phi_k. Increments ``outer_step``."""
        if self.theta_optimizer is not None:
            if self.gamma_theta != 1.0:
                grads = [p.grad for p in self.theta_params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, self.gamma_theta)
            self.theta_optimizer.step()
        for opt in self.phi_optimizers:
            opt.step()
        self.outer_step += 1
        if self.check_finite_every > 1 and self.outer_step % self.check_finite_every == 0:
            self.check_finite()

    def step(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """One outer step of Algorithm 1 on K member minibatches (consumes K minibatches: t += K).

        ``inputs``/``targets``: the K minibatches stacked along dim 0 (K*B samples; slice k is member k's), or lists
        of K tensors. ``loss_fn(output, target)``: the mean loss of a minibatch. Returns the mean member loss
        (1/K) sum_k L(M_k) as a tensor (no host synchronisation). Raises LatePhaseError on a NaN/inf loss (see
        ``check_finite_every``)."""
        losses = self.forward_backward(inputs, targets, loss_fn, path)
        self.update()
        return losses.mean()

    def step_schedulers(self) -> None:
        """Step every LR scheduler made by the scheduler factories or added with :meth:`add_scheduler`."""
        for s in self.schedulers:
            s.step()

    def add_scheduler(self, scheduler) -> None:
        """Register an LR scheduler so that :meth:`step_schedulers` steps it and checkpoints include its state."""
        self.schedulers.append(scheduler)

    # ------------------------------------------------------------------ end of training
    def collapse(self, loader: Iterable | None = None, bn: str = "data", members: Sequence[int] | None = None,
                 device=None) -> nn.Module:
        """A plain nn.Module of the original architecture with phi_bar = mean_k phi_k (see
        :func:`shared.averaging.collapse`)."""
        return averaging.collapse(self.model, loader, bn, members, device)

    def member_model(self, k: int) -> nn.Module:
        """Member k's network as a plain nn.Module (its own phi_k and BatchNorm statistics)."""
        return averaging.collapse(self.model, None, "mean", [k])

    def ensemble_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-member outputs, shape (K, N, ...), from one stacked forward in eval mode."""
        return averaging.ensemble_logits(self.model, x)

    def ensemble_probs(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Ensemble prediction (1/K) sum_k softmax(f_k(x)), shape (N, ...)."""
        return averaging.ensemble_probs(self.model, x, dim)

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
        self._bad_step = self._dev_step = None
        if restore_rng:
            ckpt.set_rng_state(state["rng"])

    def __repr__(self) -> str:
        return (f"LatePhase(K={self.K}, families={self.families!r}, gamma_theta={self.gamma_theta}, "
                f"sigma0={self.sigma0}, path={self.path!r}, outer_step={self.outer_step}, t={self.t}, "
                f"late_layers={len(self.late)}, phi_tensors_per_member={len(self.phi_params[0])})")
