"""Algorithm 1 of von Oswald et al. (ICLR 2021), one outer step, theta held fixed during the loop:

    for k = 1..K:  draw minibatch M_k;  dtheta_k = grad_theta L(M_k; theta, phi_k);
                   phi_k <- U_phi(phi_k, grad_phi_k L(M_k; theta, phi_k))
    theta <- U_theta(theta, gamma_theta * sum_k dtheta_k)

:class:`LatePhase` is that loop for any nn.Module: constructing it is the release at T0 (the surgery and the
optimizers of :mod:`shared.release`), :meth:`LatePhase.step` is one outer step, i.e. :meth:`LatePhase.forward_backward`
(the gradients) then :meth:`LatePhase.update` (the K + 1 optimizer steps).

Time t counts minibatches: an outer step consumes K of them (one per member). Member k's update depends only on
(theta, phi_k, M_k), so computing all K gradients first and then stepping every member's own optimizer is the loop
above exactly. Two execution paths compute those gradients:

* "sequential": K forward/backward passes, member k's minibatch in member-k mode; theta's gradients accumulate.
* "vectorized": one forward/backward of the K minibatches stacked along dim 0 in stacked mode (slice k uses phi_k,
  BatchNorm statistics per slice), total loss sum_k L(M_k). Proven equal to "sequential" by the tests.

After the release the model computes K networks, so a plain forward of ``lp.model`` outside a step is refused. To
evaluate use :meth:`LatePhase.collapse` (one network, phi_bar = mean_k phi_k), :meth:`LatePhase.ensemble_probs` or
:meth:`LatePhase.member_model`, which share one BatchNorm rule, or ``with shared.member_mode(lp.model, k): ...``.
"""
from __future__ import annotations

import contextlib
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
from .modules import LateBatchNorm, late_modules, member_mode, refuse_plain_forward
from .release import OptimizerFactory, build_optimizer, sgd, surgery, vectorization_blocker

SchedulerFactory = Callable[[torch.optim.Optimizer], object]
PATHS = ("auto", "vectorized", "sequential")
PHI_MOMENTUM = ("inherit", "zero")
GAMMA_THETA_SCALES = ("gradient", "lr")
FORMAT = "late-phase-checkpoint/1"
__all__ = ["LatePhase", "sgd"]


class LatePhase:
    """Late-phase weights for any nn.Module; constructing it is the release at T0.

    ``model`` is changed in place: the layers selected by ``families`` become member-aware modules with K copies
    phi_1..phi_K of their late-phase weights (initialised as phi_k = phi + sigma0 * RMS(phi) * eps_k per tensor,
    eps_k ~ N(0, 1); sigma0 = 0 gives identical members; BatchNorm running statistics are copied), and every other
    nn.BatchNorm layer gets per-member batch statistics for the vectorized path while its gamma, beta and running
    statistics stay shared (theta). theta keeps its Parameter objects. From then on a plain forward of ``model``
    raises LatePhaseError (it holds K networks): evaluate with :meth:`collapse`, :meth:`ensemble_probs`,
    :meth:`member_model` or :func:`shared.member_mode`. Gradients left from the pre-release loop are cleared.

    Example::

        lp = shared.LatePhase(model, K=4, families=[shared.BatchNorm(), shared.Head()], inherit_optimizer_state=opt,
                              gamma_theta=1 / 4)
        for x, y in shared.stack_batches(train_loader, K=4):
            lp.step(x, y, F.cross_entropy)   # theta <- U(theta, (1/4) sum_k grad_theta L(M_k)); phi_k <- U(phi_k, .)
        final = lp.collapse(train_loader)         # plain model, eval mode, BatchNorm statistics from the data

    Args:
        model: the network (after its first T0 minibatches of ordinary training); its SyncedBatchNorm layers (from
            :func:`shared.distributed.sync_batchnorm`) become nn.BatchNorm again, with the same tensors.
        K: number of members (>= 1).
        families: late-phase weight families, e.g. ``[BatchNorm(), Head()]`` (default ``[BatchNorm()]``).
        inherit_optimizer_state: the optimizer the model was trained with before the release. U_theta and every
            member's U_phi take its class and every param-group hyperparameter (lr, weight decay, momentum, Nesterov,
            betas, a scheduler's initial_lr) of the group that held each tensor (new tensors such as rank-1 factors or
            template banks: the group of the layer's weight), and its per-parameter state (momentum buffers, Adam's
            moments): theta's as it is, the original phi tensors' state copied to every member (see
            ``phi_momentum``). A factory that is given sets the hyperparameters instead (same class required).
        theta_optimizer, phi_optimizer: factories ``params -> torch.optim.Optimizer`` for U_theta and U_phi (phi's is
            called once per member), e.g. :func:`sgd` for the paper's SGD (lr 0.1, Nesterov momentum 0.9, weight
            decay 5e-4). Without ``inherit_optimizer_state`` both are required: the optimizer is never guessed.
        gamma_theta: theta <- U_theta(theta, gamma_theta * sum_k grad_theta L(M_k)); 1 sums the member gradients (the
            reference CIFAR code), 1/K averages them (its ImageNet script); 0 freezes theta (U_theta is not stepped,
            so neither weight decay nor momentum moves it).
        gamma_theta_scales: "gradient" (default): theta's gradient is multiplied by gamma_theta before U_theta steps,
            so weight decay keeps its strength; "lr": U_theta's learning rate is multiplied by gamma_theta instead
            (every param group's lr and initial_lr, once, at the release), so the whole step, weight decay included,
            shrinks -- what the reference ImageNet script does for gamma_theta = 1/K. The two agree for plain SGD
            without weight decay.
        phi_momentum: "inherit" (default): every member starts with the pre-release optimizer state of phi (its
            momentum); "zero": the members' optimizers start empty (zero momentum, fresh Adam moments), as in the
            reference code, where the member copies received no gradient before the release. theta keeps its state
            either way.
        sigma0: relative std of the release noise.
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
        distributed: use torch.distributed (default: when a process group with > 1 rank is initialised); a dict
            also gives keyword arguments for DistributedDataParallel (vectorized path). Every BatchNorm layer then
            takes its training-mode statistics over each member's whole minibatch on all ranks during the steps, as
            in one process (see :mod:`shared.distributed`).
    """

    def __init__(self, model: nn.Module, K: int, families: Sequence[Family] | Family | None = None, *,
                 inherit_optimizer_state: torch.optim.Optimizer | None = None,
                 theta_optimizer: OptimizerFactory | None = None, phi_optimizer: OptimizerFactory | None = None,
                 gamma_theta: float = 1.0, gamma_theta_scales: str = "gradient", phi_momentum: str = "inherit",
                 sigma0: float = 0.0, theta_scheduler: SchedulerFactory | None = None,
                 phi_scheduler: SchedulerFactory | None = None, path: str = "auto", T0: int = 0,
                 generator: torch.Generator | None = None, check_finite_every: int | None = None,
                 autocast: torch.dtype | None = None, distributed: bool | dict | None = None):
        families = _check_arguments(model, K, families, gamma_theta, sigma0, path, T0, check_finite_every, autocast,
                                    inherit_optimizer_state, theta_optimizer, phi_optimizer, gamma_theta_scales,
                                    phi_momentum)
        model = ddp_utils.plain_batchnorm(model)  # SyncedBatchNorm layers (pre-release DDP) become nn.BatchNorm again
        blocker = vectorization_blocker(model)
        if path == "vectorized" and blocker:
            raise LatePhaseError(f"path='vectorized' is not exact for this model: {blocker}; use path='sequential'")
        self.model, self.K, self.families, self.gamma_theta, self.T0 = model, K, families, float(gamma_theta), T0
        self.gamma_theta_scales, self.phi_momentum = gamma_theta_scales, phi_momentum
        self.path = path if path != "auto" else ("sequential" if blocker else "vectorized")
        self._blocker, self.outer_step = blocker, 0
        model.zero_grad(set_to_none=True)  # gradients accumulate from here on (forward_backward adds, update clears)

        # the surgery: K copies phi_1..phi_K of every selected tensor, in place
        sources, theta_sources = surgery(model, families, K)
        refuse_plain_forward(model)  # from here on lp.model is K networks: evaluate through collapse/ensemble/members
        late = [m for _, m in late_modules(model)]
        self.phi_params = [[p for m in late for p in m.phi(k)] for k in range(K)]
        if not self.phi_params[0]:
            raise LatePhaseError(f"no late-phase parameters selected by {families!r} (e.g. BatchNorm without affine "
                                 f"parameters); select layers that have parameters")
        phi_sources = [sources[id(m)][name] for m in late for name, _ in m.phi_lists()]
        phi_ids = {id(p) for ps in self.phi_params for p in ps}
        self.theta_params = [p for p in model.parameters() if id(p) not in phi_ids]
        self._release_noise(late, float(sigma0), generator)

        # U_theta and one U_phi per member: from the factories, or inherited from the optimizer used before T0
        old = inherit_optimizer_state
        theta = [p for p in self.theta_params if p.requires_grad]
        theta_origins = [theta_sources.get(id(p), p) for p in theta]
        self.theta_optimizer = build_optimizer(theta_optimizer, theta, theta_origins, old, "theta") if theta else None
        if self.theta_optimizer is not None and gamma_theta_scales == "lr":
            for group in self.theta_optimizer.param_groups:  # the whole step, weight decay included, scales
                group["lr"] *= self.gamma_theta
                if "initial_lr" in group:
                    group["initial_lr"] *= self.gamma_theta
        self.phi_optimizers = []
        for k, ps in enumerate(self.phi_params):
            trainable = [(p, src) for p, src in zip(ps, phi_sources) if p.requires_grad]
            origins = [src[0] if src[0] is not None else src[1] for _, src in trainable]
            self.phi_optimizers.append(build_optimizer(phi_optimizer, [p for p, _ in trainable], origins, old,
                                                       f"phi_{k}", copy_state=phi_momentum == "inherit"))
        self.schedulers = [theta_scheduler(self.theta_optimizer)] if theta_scheduler and self.theta_optimizer else []
        self.schedulers += [phi_scheduler(opt) for opt in self.phi_optimizers] if phi_scheduler else []

        device = self.phi_params[0][0].device
        self._guard = _FiniteGuard(check_finite_every if check_finite_every is not None
                                   else (1 if device.type == "cpu" else 50))
        self._autocast = functools.partial(maybe_autocast, device, autocast)
        self._distributed = ddp_utils.is_distributed() if distributed is None else bool(distributed)
        self._ddp = None
        self._synced_bns = [m for m in late if isinstance(m, LateBatchNorm)] if self._distributed else []
        if self._distributed:
            self._setup_distributed(distributed)

    # ------------------------------------------------------------------ Algorithm 1
    def step(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """One outer step of Algorithm 1 on K member minibatches (consumes K minibatches: t += K).

        ``inputs``/``targets``: the K minibatches stacked along dim 0 (K*B samples; slice k is member k's), or lists
        of K tensors. ``loss_fn(output, target)``: the mean loss of a minibatch. Returns the mean member loss
        (1/K) sum_k L(M_k) as a tensor (no host synchronisation). Raises LatePhaseError on a NaN/inf loss (see
        ``check_finite_every``)."""
        losses = self.forward_backward(inputs, targets, loss_fn, path)
        self.update()
        return losses.mean()

    def forward_backward(self, inputs, targets, loss_fn: Callable, path: str | None = None) -> torch.Tensor:
        """The gradients of one outer step (first half of :meth:`step`), added to ``.grad`` as ``loss.backward()``
        does: theta.grad += sum_k grad_theta L(M_k) and phi_k.grad += grad_phi_k L(M_k). Returns the K member losses
        L(M_k) (detached, shape (K,)).

        :meth:`update` clears the gradients after stepping, so several calls before one update accumulate, as in
        nanoGPT; with ``loss_fn`` scaled by 1/n, n calls on micro-batches give the gradients of the whole minibatches::

            for x, y in micro_batches:                       # n micro-batches, each K stacked member micro-batches
                lp.forward_backward(x, y, lambda out, t: F.cross_entropy(out, t) / n)
            lp.update()

        ``inputs``/``targets`` hold the K member minibatches stacked along dim 0 (K*B samples, slice k = member k),
        or are lists of K tensors; ``loss_fn(output, target)`` returns the mean loss of a minibatch."""
        K = self.K
        x, y = _stack(inputs, targets, K)
        n, B = x.shape[0], x.shape[0] // K
        path = self.path if path is None else self._check_path(path)
        with ddp_utils.synced_statistics(self._synced_bns):
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
        losses = losses.detach()
        self._guard.observe(losses, self)
        return losses

    def update(self) -> None:
        """Second half of :meth:`step`: theta <- U_theta(theta, gamma_theta * theta.grad) (not stepped at all when
        gamma_theta = 0; with gamma_theta_scales="lr" U_theta's learning rate carries gamma_theta instead); then every
        member's own optimizer steps its own phi_k; then every gradient is cleared (set to None). Increments
        ``outer_step``."""
        if self.theta_optimizer is not None and self.gamma_theta > 0:
            grads = [p.grad for p in self.theta_params if p.grad is not None]
            if grads and self.gamma_theta != 1.0 and self.gamma_theta_scales == "gradient":
                torch._foreach_mul_(grads, self.gamma_theta)
            self.theta_optimizer.step()
        for opt in self.phi_optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.outer_step += 1
        self._guard.stepped()
        if self._guard.every > 1 and self.outer_step % self._guard.every == 0:
            self._guard.check(self)

    # ------------------------------------------------------------------ counters, optimizers, gradient clipping
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

    # ------------------------------------------------------------------ end of training: one BatchNorm rule
    def collapse(self, loader: Iterable | None = None, members: Sequence[int] | None = None,
                 device=None) -> nn.Module:
        """One plain nn.Module of the original architecture in eval mode with phi_bar = mean_k phi_k over ``members``
        (default: all). BatchNorm statistics: the stored ones (the members' mean running statistics), or, given a
        ``loader``, re-estimated from its data -- the same rule as :meth:`ensemble_probs` and :meth:`member_model`.
        This is ``shared.collapse(lp.model, ...)`` (see :func:`shared.averaging.collapse`)."""
        return averaging.collapse(self.model, loader, members, device)

    def member_model(self, k: int, loader: Iterable | None = None, device=None) -> nn.Module:
        """Member k's network as a plain nn.Module in eval mode (its own phi_k); BatchNorm statistics: its stored
        running statistics, or, given a ``loader``, re-estimated from its data."""
        return averaging.collapse(self.model, loader, [k], device)

    def ensemble_logits(self, x: torch.Tensor, loader: Iterable | None = None, device=None):
        """Per-member outputs f_k(x), shape (K, N, ...), from one stacked forward in eval mode; BatchNorm statistics:
        each member's stored ones, or, given a ``loader``, re-estimated from its data (one pass per call, on a copy;
        see :func:`shared.averaging.ensemble_logits`)."""
        return averaging.ensemble_logits(self.model, x, loader, device)

    def ensemble_probs(self, x: torch.Tensor, loader: Iterable | None = None, dim: int = -1,
                       output: Callable | None = None, device=None) -> torch.Tensor:
        """Ensemble prediction (1/K) sum_k softmax(f_k(x)), shape (N, ...), under the BatchNorm rule of
        :meth:`ensemble_logits` (see :func:`shared.averaging.ensemble_probs`). With K = 1 and the same ``loader``
        (or none) it is softmax of :meth:`collapse`'s output."""
        return averaging.ensemble_probs(self.model, x, loader, dim, output, device)

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

    # ------------------------------------------------------------------ release details
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

    def _setup_distributed(self, distributed) -> None:
        """Under torch.distributed: DDP around the model on the vectorized path, rank 0's weights everywhere on the
        sequential one (whose gradients forward_backward all-reduces itself)."""
        ddp_utils._opaque_to_compile()
        if not ddp_utils.is_distributed():
            raise LatePhaseError("distributed=True needs an initialised torch.distributed process group with more "
                                 "than one rank (see shared.distributed.init_from_env)")
        if self.path == "vectorized":
            kwargs = distributed if isinstance(distributed, dict) else {}
            self._ddp = nn.parallel.DistributedDataParallel(self.model, **kwargs)
        else:
            ddp_utils.broadcast_module(self.model)

    def __repr__(self) -> str:
        return (f"LatePhase(K={self.K}, families={self.families!r}, gamma_theta={self.gamma_theta}, "
                f"path={self.path!r}, outer_step={self.outer_step}, t={self.t}, "
                f"phi_tensors_per_member={len(self.phi_params[0])})")


# ----------------------------------------------------------------------------- helpers

def maybe_autocast(device: torch.device | str, dtype: torch.dtype | None):
    """torch.autocast on `device`'s type with `dtype`, or a context that does nothing when `dtype` is None.

    The one rule for every forward pass of the project (late-phase steps, plain training, evaluation):

        with shared.core.maybe_autocast(x.device, torch.bfloat16):   # bf16 forward passes
            logits = model(x)
        with shared.core.maybe_autocast(x.device, None):             # float32: nothing happens
            logits = model(x)
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _check_arguments(model, K, families, gamma_theta, sigma0, path, T0, check_finite_every, autocast, old,
                     theta_optimizer, phi_optimizer, gamma_theta_scales, phi_momentum) -> list:
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
    need(old is None or isinstance(old, torch.optim.Optimizer),
         f"inherit_optimizer_state must be the torch.optim.Optimizer the model was trained with, got "
         f"{type(old).__name__}")
    need(old is not None or (theta_optimizer is not None and phi_optimizer is not None),
         "LatePhase needs the optimizer to continue with: pass inherit_optimizer_state=opt (the optimizer the model "
         "was trained with) or both theta_optimizer= and phi_optimizer= factories (e.g. shared.sgd(lr=0.1) for the "
         "paper's SGD)")
    need(gamma_theta_scales in GAMMA_THETA_SCALES,
         f"gamma_theta_scales must be one of {GAMMA_THETA_SCALES}, got {gamma_theta_scales!r}")
    need(phi_momentum in PHI_MOMENTUM, f"phi_momentum must be one of {PHI_MOMENTUM}, got {phi_momentum!r}")
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

    def stepped(self) -> None:
        """One update done: later losses belong to the next outer step."""
        if self.count is not None:
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
