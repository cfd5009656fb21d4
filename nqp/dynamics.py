"""The literal update rules: one SGD step and one late-phase outer step (Algorithm 1).

These functions are the single implementation of the dynamics. The Monte Carlo simulator calls
them on real arrays; the exact analysis (:mod:`nqp.linear`) calls them on complex arrays to read off
their Jacobians by complex-step differentiation, so theory and simulation share one code path.

Array layout: trailing axis = coordinates (d). SGD state: w, v of shape (..., d). Late-phase state:
theta, v_theta of shape (..., d); phi, v_phi of shape (..., K, d). Noise xi is standard normal:
(..., d) for SGD, (..., K, d) for late-phase (member k's minibatch target is c_k = w* + sqrt(s) xi_k).
All updates are in place. Momentum buffers are None when momentum == 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .methods import SGD, LatePhase


@dataclass
class Coeffs:
    """Per-coordinate problem constants, broadcast against the state arrays."""

    h: np.ndarray
    sqrt_s: np.ndarray
    wstar: np.ndarray

    @classmethod
    def of(cls, problem, noise_scale: float = 1.0) -> "Coeffs":
        return cls(problem.curvature, np.sqrt(problem.noise * noise_scale), problem.optimum)


def optimizer_update(x, v, grad, lr, momentum: float, nesterov: bool) -> None:
    """torch.optim.SGD's update (dampening 0), in place:
    v <- mu v + grad; x <- x - lr v (heavy ball) or x - lr (grad + mu v) (Nesterov); x <- x - lr grad if mu = 0.
    `grad` may be overwritten; lr is a number or, without momentum, an array broadcast against grad."""
    if momentum:
        v *= momentum
        v += grad
        if nesterov:
            grad += momentum * v
            grad *= lr
            x -= grad
        else:
            x -= lr * v
    else:
        grad *= lr
        x -= grad


@dataclass
class SGDState:
    w: np.ndarray
    v: np.ndarray | None = None

    def arrays(self):
        return [a for a in (self.w, self.v) if a is not None]


@dataclass
class LatePhaseState:
    """theta (..., d), phi (..., K, d) and their torch-style momentum buffers (None without momentum); nqp.block's
    state too, with theta on its own coordinates (..., d_theta) and phi on the others (..., K, d_phi)."""

    theta: np.ndarray
    phi: np.ndarray
    v_theta: np.ndarray | None = None
    v_phi: np.ndarray | None = None

    def arrays(self):
        return [a for a in (self.theta, self.phi, self.v_theta, self.v_phi) if a is not None]


def sgd_step(state: SGDState, xi: np.ndarray, c: Coeffs, method: SGD) -> None:
    """One SGD step with `method.batch` minibatches averaged (target noise variance s / batch):
    g = h (w - w* - sqrt(s/B) xi); then optimizer_update. Overwrites xi with the gradient."""
    g = xi
    g *= -c.sqrt_s / np.sqrt(method.batch)
    g += state.w
    g -= c.wstar
    g *= c.h
    optimizer_update(state.w, state.v, g, method.lr, method.momentum, method.nesterov)


def latephase_step(state: LatePhaseState, xi: np.ndarray, c: Coeffs, method: LatePhase, work=None) -> None:
    """One outer step of Algorithm 1 (consumes K minibatches). Overwrites xi (and `work`, an optional scratch
    array of xi's shape that saves one allocation).

    With g_k = h (w_k - c_k), c_k = w* + sqrt(s) xi_k and w_k = theta + phi_k (additive) or
    theta * phi_k (multiplicative), all evaluated at the theta and phi_k of the start of the step:
        phi_k <- U_phi(phi_k, dl/dphi_k)               [additive: g_k; multiplicative: theta g_k]
        theta <- U_theta(theta, gamma_theta sum_k dl/dtheta|_k)   [g_k; resp. phi_k g_k]
    Member k's update depends only on (theta, phi_k, c_k), so applying the K member updates after
    computing all K gradients is the sequential loop of Algorithm 1 exactly. The target -c_k is formed first, as
    in the problem's definition (a noise below the resolution of w* is then lost in every path alike); without
    momentum the multiplicative phi_k's step lr_phi theta g_k takes lr_phi theta as one factor.
    """
    theta = state.theta[..., None, :]
    g = xi
    g *= -c.sqrt_s
    g -= c.wstar                        # g = -c_k
    if method.kind == "additive":
        g += state.phi
        g += theta
        g *= c.h
        grad_theta = g.sum(axis=-2)
        grad_theta *= method.gamma_theta
        optimizer_update(state.phi, state.v_phi, g, method.lr_phi, method.momentum, method.nesterov)
    else:
        if work is None:
            work = np.empty_like(state.phi)
        np.multiply(state.phi, theta, out=work)
        g += work
        g *= c.h
        grad_theta = np.einsum("...kd,...kd->...d", state.phi, g)
        grad_theta *= method.gamma_theta
        if method.momentum:
            g *= theta
            optimizer_update(state.phi, state.v_phi, g, method.lr_phi, method.momentum, method.nesterov)
        else:
            optimizer_update(state.phi, None, g, method.lr_phi * theta, 0.0, False)
    optimizer_update(state.theta, state.v_theta, grad_theta, method.lr_theta, method.momentum,
                     method.nesterov)


def mean_model(state, method) -> np.ndarray:
    """The weight-averaged model: w itself for SGD; theta + mean_k phi_k (additive) or
    theta * mean_k phi_k (multiplicative)."""
    if isinstance(state, SGDState):
        return state.w
    phibar = state.phi.mean(axis=-2)
    return state.theta + phibar if method.kind == "additive" else state.theta * phibar


def members(state, method) -> np.ndarray:
    """Member weights w_k, shape (..., K, d) (SGD: one member)."""
    if isinstance(state, SGDState):
        return state.w[..., None, :]
    theta = state.theta[..., None, :]
    return theta + state.phi if method.kind == "additive" else theta * state.phi


def fixed_point(problem, method, shape=(), dtype=float, balance=None):
    """The noise-free fixed point at the optimum (members equal, buffers zero).

    Additive: theta = w*, phi_k = 0. Multiplicative: theta = sign(w*) sqrt(b |w*|), phi_k = sqrt(|w*| / b) with
    the balance b = theta^2 / |w*| (default 1, the balanced factorisation theta = phi; one value or one per
    coordinate). SGD: w = w*.
    """
    wstar = problem.optimum
    d = wstar.size
    mom = method.momentum != 0
    if isinstance(method, SGD):
        w = np.broadcast_to(wstar, shape + (d,)).astype(dtype)
        return SGDState(w, np.zeros_like(w) if mom else None)
    K = method.K
    if method.kind == "additive":
        th, ph = wstar, np.zeros(d)
    else:
        b = 1.0 if balance is None else np.asarray(balance, float)
        th, ph = np.sign(wstar) * np.sqrt(b * np.abs(wstar)), np.sqrt(np.abs(wstar) / b)
    theta = np.broadcast_to(th, shape + (d,)).astype(dtype)
    phi = np.broadcast_to(ph, shape + (K, d)).astype(dtype)
    return LatePhaseState(theta, phi, np.zeros_like(theta) if mom else None,
                          np.zeros_like(phi) if mom else None)


def release(w: np.ndarray, v: np.ndarray | None, method: LatePhase, sigma0: float = 0.0,
            rng: np.random.Generator | None = None) -> LatePhaseState:
    """Switch from SGD to late-phase learning at T0: members start as copies of the SGD iterate w.

    Additive: theta = w, phi_k = sigma0 * eps_k. Multiplicative: theta = sign(w) sqrt|w|,
    phi_k = sqrt|w| + sigma0 * eps_k (balanced factorisation). eps_k ~ N(0, 1) i.i.d.
    theta's momentum buffer continues the SGD buffer (scaled by phi for the multiplicative split);
    the members' buffers start at zero.
    """
    K = method.K
    if method.kind == "additive":
        theta = w.copy()
        phi = np.zeros(w.shape[:-1] + (K, w.shape[-1]), dtype=w.dtype)
        v_theta = None if v is None else v.copy()
    else:
        root = np.sqrt(np.abs(w))
        theta = np.sign(w) * root
        phi = np.broadcast_to(root[..., None, :], w.shape[:-1] + (K, w.shape[-1])).copy()
        v_theta = None if v is None else v * root
    if sigma0:
        phi += sigma0 * rng.standard_normal(phi.shape)
    mom = method.momentum != 0
    if mom and v_theta is None:
        v_theta = np.zeros_like(theta)
    return LatePhaseState(theta, phi, v_theta if mom else None, np.zeros_like(phi) if mom else None)
