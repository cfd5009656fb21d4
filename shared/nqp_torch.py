"""The noisy quadratic problem as a tiny torch model, trained by the real late-phase core.

Coordinates i with curvature h_i, noise variance s_i and optimum w*_i (the definitions of :mod:`nqp`). Every minibatch
draws a target c ~ N(w*, diag(s)) and has loss l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2; the excess loss of a weight
vector is E(w) = 1/2 sum_i h_i (w_i - w*_i)^2 (loss units). Member k's weights are w_k = theta + phi_k (additive) or
w_k = theta o phi_k (multiplicative). phi acts through a submodule (:class:`Phi`) that :class:`shared.Custom` selects,
so :func:`simulate` runs :class:`shared.LatePhase` itself -- either execution path -- with one member minibatch of
size 1 per member and torch.optim.SGD as U_theta and U_phi. Independent runs are extra coordinates (coordinates do not
interact), which gives standard errors from one model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .core import LatePhase
from .errors import LatePhaseError
from .families import Custom


class Phi(nn.Module):
    """The late-phase part: x -> x + phi (additive) or x o phi (multiplicative)."""

    def __init__(self, init: torch.Tensor, kind: str):
        super().__init__()
        if kind not in ("additive", "multiplicative"):
            raise LatePhaseError(f"kind must be 'additive' or 'multiplicative', got {kind!r}")
        self.kind = kind
        self.phi = nn.Parameter(init.clone())

    def forward(self, x):
        return x + self.phi if self.kind == "additive" else x * self.phi


class NQPModel(nn.Module):
    """w = Phi(theta) for every sample of a batch; ``runs`` independent copies of the d coordinates side by side
    (index r d + i). Starts at the noise-free fixed point: additive theta = w*, phi = 0; multiplicative (balanced)
    theta = sign(w*) sqrt|w*|, phi = sqrt|w*|."""

    def __init__(self, curvature, noise, optimum, kind: str = "additive", runs: int = 1,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        h, s, w = (torch.as_tensor(v, dtype=dtype).reshape(-1) for v in (curvature, noise, optimum))
        if not h.shape == s.shape == w.shape:
            raise LatePhaseError("curvature, noise and optimum must have the same length")
        self.d, self.runs = h.numel(), int(runs)
        self.register_buffer("h", h.repeat(self.runs))
        self.register_buffer("sqrt_s", s.sqrt().repeat(self.runs))
        self.register_buffer("wstar", w.repeat(self.runs))
        if kind == "additive":
            theta, phi = self.wstar.clone(), torch.zeros_like(self.wstar)
        else:
            root = self.wstar.abs().sqrt()
            theta, phi = torch.sign(self.wstar) * root, root
        self.theta = nn.Parameter(theta)
        self.phi = Phi(phi, kind)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.phi(self.theta.expand(c.shape[0], -1))

    def loss(self, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2 (summed over all runs' coordinates)."""
        return 0.5 * (self.h * (w - c) ** 2).sum(-1).mean()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n minibatch targets c = w* + sqrt(s) xi, xi ~ N(0, I), shape (n, runs d)."""
        xi = torch.randn(n, self.h.numel(), generator=generator, dtype=self.h.dtype)
        return self.wstar + self.sqrt_s * xi.to(self.h.device)

    def excess_per_run(self, w: torch.Tensor) -> torch.Tensor:
        """E(w) per run: 1/2 sum_i h_i (w_i - w*_i)^2 over each run's d coordinates, shape (..., runs)."""
        e = 0.5 * self.h * (w - self.wstar) ** 2
        return e.reshape(*e.shape[:-1], self.runs, self.d).sum(-1)


def families():
    """The late-phase selection for :class:`NQPModel`: the :class:`Phi` submodule."""
    return [Custom(types=(Phi,))]


@dataclass
class Estimate:
    """Time-averaged stationary excess losses (loss units, summed over the d coordinates of one run), averaged over
    independent runs, with standard errors (std across runs / sqrt(runs))."""

    excess_loss_mean_model: float
    excess_loss_mean_model_stderr: float
    excess_loss_members: float
    excess_loss_members_stderr: float
    runs: int
    steps: int


def simulate(curvature, noise, optimum, *, K: int, lr_theta: float, lr_phi: float, gamma_theta: float = 1.0,
             momentum: float = 0.0, nesterov: bool = False, kind: str = "additive", path: str = "vectorized",
             steps: int = 1000, burn_in: int = 200, runs: int = 256, seed: int = 0) -> Estimate:
    """Run shared.LatePhase on the NQP from the fixed point: ``burn_in`` outer steps discarded, then the excess loss
    of the mean model (theta + phi_bar, resp. theta o phi_bar, phi_bar = mean_k phi_k) and the members' average
    (1/K) sum_k E(w_k) averaged over ``steps`` outer steps (each consumes K minibatches)."""
    if runs < 2:
        raise LatePhaseError("runs must be >= 2 (standard errors need two runs)")
    model = NQPModel(curvature, noise, optimum, kind, runs)

    def opt(lr):
        return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)

    lp = LatePhase(model, K, families(), gamma_theta=gamma_theta, theta_optimizer=opt(lr_theta),
                   phi_optimizer=opt(lr_phi), path=path)
    members = model.phi.phi_lists()[0][1]  # the K copies of phi (the Custom family replaced model.phi)
    gen = torch.Generator().manual_seed(seed)
    acc_mean = torch.zeros(runs, dtype=torch.float64)
    acc_mem = torch.zeros(runs, dtype=torch.float64)
    for i in range(burn_in + steps):
        c = model.sample(K, gen)
        lp.step(c, c, model.loss)
        if i >= burn_in:
            with torch.no_grad():
                phi = torch.stack([p for p in members])
                theta = model.theta
                wk = theta + phi if kind == "additive" else theta * phi
                wbar = theta + phi.mean(0) if kind == "additive" else theta * phi.mean(0)
                acc_mean += model.excess_per_run(wbar)
                acc_mem += model.excess_per_run(wk).mean(0)
    per_mean, per_mem = acc_mean / steps, acc_mem / steps
    se = lambda a: float(a.std() / math.sqrt(runs))  # noqa: E731
    return Estimate(float(per_mean.mean()), se(per_mean), float(per_mem.mean()), se(per_mem), runs, steps)
