"""Exact second-moment analysis of the literal dynamics ("Lyapunov path").

Per coordinate i, the update of :mod:`nqp.dynamics` about its noise-free fixed point z0 is

    z_{n+1} - z0 = A (z_n - z0) + B xi_n,          xi_n ~ N(0, I)                  (1)

exactly for SGD and additive late-phase learning, and to first order (the small-noise
linearisation) for the multiplicative model. A, B and the observation rows C (mean model, members)
are read off the step function itself by complex-step differentiation, so this analysis checks the
very code that the Monte Carlo simulator runs.

Late-phase learning has a neutral direction r (additive: theta + a, phi_k - a; multiplicative:
theta (1 + a), phi_k (1 - a)) with A r = r and C r = 0: it changes no member. The stationary
covariance is therefore solved on the quotient by r, with P an orthonormal basis of r-perp:

    Sigma_q = Abar Sigma_q Abar^T + Bbar Bbar^T,   Abar = P^T A P,  Bbar = P^T B   (2)

(scipy.linalg.solve_discrete_lyapunov), and observed as C P Sigma_q P^T C^T. The dynamics are stable
iff the spectral radius of Abar is < 1. All times here are in steps (one step = minibatches_per_step
minibatches).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dynamics as dyn
from .errors import UnstableError
from .methods import SGD, LatePhase


@dataclass
class LinearSystem:
    """Per-coordinate linear dynamics (1): A (d,n,n), B (d,n,m), observation rows C_mean (d,n) and
    C_members (d,K,n), fixed point z0 (d,n), neutral direction r (d,n) or None."""

    A: np.ndarray
    B: np.ndarray
    C_mean: np.ndarray
    C_members: np.ndarray
    z0: np.ndarray
    r: np.ndarray | None
    h: np.ndarray

    @property
    def n(self) -> int:
        return self.A.shape[-1]


# ----------------------------------------------------------------------------- state <-> vector

def state_size(method) -> int:
    mom = 2 if method.momentum else 1
    return mom * (1 if isinstance(method, SGD) else method.K + 1)


def noise_size(method) -> int:
    return 1 if isinstance(method, SGD) else method.K


def state_views(F: np.ndarray, method):
    """A state object whose arrays are views into F of shape (..., n, d)."""
    if isinstance(method, SGD):
        return dyn.SGDState(F[..., 0, :], F[..., 1, :] if method.momentum else None)
    K = method.K
    st = dyn.LatePhaseState(F[..., 0, :], F[..., 1:K + 1, :])
    if method.momentum:
        st.v_theta, st.v_phi = F[..., K + 1, :], F[..., K + 2:2 * K + 2, :]
    return st


def state_vector(state, method) -> np.ndarray:
    """Stack a state into shape (..., n, d) in the order [theta, phi_1..K, v_theta, v_phi_1..K]
    (SGD: [w, v])."""
    parts = []
    for a in state.arrays():
        parts.append(a[..., None, :] if a.ndim == state.arrays()[0].ndim else a)
    return np.concatenate(parts, axis=-2)


# ----------------------------------------------------------------------------- linearisation

def linearize(problem, method, eps: float = 1e-30, balance=None) -> LinearSystem:
    """Read A, B, C of (1) off the literal step by complex-step differentiation at z0:
    A[:, :, j] = Im(step(z0 + i eps e_j)) / eps, exact for linear steps (no cancellation).
    Multiplicative: z0 is the fixed point at the balance b = theta^2/|w*| (default 1; see
    :func:`nqp.dynamics.fixed_point`)."""
    n, m, d = state_size(method), noise_size(method), problem.dim
    z0_state = dyn.fixed_point(problem, method, balance=balance)
    z0 = np.moveaxis(state_vector(z0_state, method), -1, -2)  # (d, n)
    F = np.empty((n + m, n, d), dtype=complex)
    F[:] = state_vector(z0_state, method)
    F[np.arange(n), np.arange(n), :] += 1j * eps
    st = state_views(F, method)
    c = dyn.Coeffs.of(problem)
    C_mean = np.transpose(dyn.mean_model(st, method)[:n].imag, (1, 0)) / eps            # (d, n)
    C_mem = np.transpose(dyn.members(st, method)[:n].imag, (2, 1, 0)) / eps               # (d, K, n)
    if isinstance(method, SGD):
        xi = np.zeros((n + m, d), dtype=complex)
        xi[n:, :] = 1j * eps
        dyn.sgd_step(st, xi, c, method)
    else:
        xi = np.zeros((n + m, method.K, d), dtype=complex)
        xi[n + np.arange(m), np.arange(m), :] = 1j * eps
        dyn.latephase_step(st, xi, c, method)
    out = np.transpose(F.imag, (2, 1, 0)) / eps                                           # (d, n, n+m)
    A, B = out[:, :, :n].copy(), out[:, :, n:].copy()
    r = None
    if isinstance(method, LatePhase):
        r = np.zeros((d, n))
        K = method.K
        if method.kind == "additive":
            r[:, 0], r[:, 1:K + 1] = 1.0, -1.0
        else:
            r[:, 0] = z0[:, 0]
            r[:, 1:K + 1] = -z0[:, 1:K + 1]
        resid = np.abs(np.einsum("dij,dj->di", A, r) - r).max()
        assert resid <= 1e-9 * max(1.0, np.abs(r).max()), f"neutral direction not invariant ({resid})"
    return LinearSystem(A, B, C_mean, C_mem, z0, r, problem.curvature)


def quotient(sys: LinearSystem):
    """Project out the neutral direction: returns (Abar, Bbar, Cbar_mean, Cbar_members, P)."""
    if sys.r is None:
        eye = np.broadcast_to(np.eye(sys.n), sys.A.shape)
        return sys.A, sys.B, sys.C_mean, sys.C_members, eye
    Q, _ = np.linalg.qr(sys.r[..., None], mode="complete")
    P = Q[..., 1:]                                                      # (d, n, n-1)
    Pt = np.swapaxes(P, -1, -2)
    return Pt @ sys.A @ P, Pt @ sys.B, np.einsum("dn,dnq->dq", sys.C_mean, P), sys.C_members @ P, P


def spectral_radius(sys: LinearSystem) -> np.ndarray:
    """Per-coordinate spectral radius of the quotient dynamics (stable iff < 1)."""
    Abar = quotient(sys)[0]
    return np.abs(np.linalg.eigvals(Abar)).max(axis=-1)


# ----------------------------------------------------------------------------- stationary moments

@dataclass
class Stationary:
    """Stationary variances per coordinate (units: weight^2) of the mean model and each member,
    and the quotient covariance Sigma_q with its system, for further use (tail averages)."""

    var_mean: np.ndarray      # (d,)
    var_members: np.ndarray   # (d, K)
    sigma_q: np.ndarray       # (d, q, q)
    Abar: np.ndarray
    Cbar_mean: np.ndarray
    Cbar_members: np.ndarray
    system: LinearSystem | None = None
    P: np.ndarray | None = None   # (d, n, q): Sigma = P Sigma_q P^T in the full state

    @property
    def sigma(self) -> np.ndarray:
        """The stationary covariance of the full state z - z0 (no variance along the neutral direction)."""
        return self.P @ self.sigma_q @ np.swapaxes(self.P, -1, -2)


def _unique_rows(*cols):
    keys = np.stack(cols, axis=-1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def stationary(problem, method, tol: float = 1e-12, balance=None) -> Stationary:
    """Solve the discrete Lyapunov equation (2) per coordinate with scipy; raise UnstableError if the
    spectral radius of the quotient dynamics is >= 1. Multiplicative: linearised at the balance b (default 1)."""
    import scipy.linalg  # imported here: the closed-form paths run without scipy

    sys = linearize(problem, method, balance=balance)
    Abar, Bbar, Cm, Cmem, P = quotient(sys)
    rho = np.abs(np.linalg.eigvals(Abar)).max(axis=-1)
    if np.any(rho >= 1 - tol):
        i = int(np.argmax(rho))
        raise UnstableError(f"unstable: spectral radius {rho[i]:.6g} >= 1 in coordinate {i} "
                            f"(h={problem.curvature[i]:g}); lower the learning rates")
    b = np.broadcast_to(1.0 if balance is None else np.asarray(balance, float), problem.curvature.shape)
    first, inverse = _unique_rows(problem.curvature, problem.noise, problem.optimum, b)
    sig_u = np.stack([scipy.linalg.solve_discrete_lyapunov(Abar[i], Bbar[i] @ Bbar[i].T) for i in first])
    sig = sig_u[inverse]
    sig = 0.5 * (sig + np.swapaxes(sig, -1, -2))
    var_mean = np.einsum("dq,dqp,dp->d", Cm, sig, Cm)
    var_mem = np.einsum("dkq,dqp,dkp->dk", Cmem, sig, Cmem)
    return Stationary(var_mean, var_mem, sig, Abar, Cm, Cmem, sys, P)


def tail_average_variance(st: Stationary, steps: int, members: bool = False) -> np.ndarray:
    """Variance of the average of `steps` consecutive stationary iterates of the mean model
    (members=False, shape (d,)) or of each member (shape (d, K)):

        Var = C [n Sigma + M_n Sigma + Sigma M_n^T] C^T / n^2,
        M_n = sum_{tau=1}^{n-1} (n - tau) Abar^tau = n G - Abar (I - Abar^n) G^2 - n I,  G = (I - Abar)^-1.
    """
    n = int(steps)
    A, S = st.Abar, st.sigma_q
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    G = np.linalg.inv(eye - A)
    M = n * G - A @ (eye - np.linalg.matrix_power(A, n)) @ G @ G - n * eye
    tot = n * S + M @ S + S @ np.swapaxes(M, -1, -2)
    if members:
        return np.einsum("dkq,dqp,dkp->dk", st.Cbar_members, tot, st.Cbar_members) / n ** 2
    return np.einsum("dq,dqp,dp->d", st.Cbar_mean, tot, st.Cbar_mean) / n ** 2


# ----------------------------------------------------------------------------- transient moments

def _compose(a, b):
    """(A_a, Q_a) then (A_b, Q_b): z -> A_b (A_a z + e_a) + e_b."""
    Aa, Qa = a
    Ab, Qb = b
    return Ab @ Aa, Ab @ Qa @ np.swapaxes(Ab, -1, -2) + Qb


def _power(A, Q, k: int):
    """k steps of z -> A z + e, Cov(e) = Q, by repeated squaring: (A^k, sum_{j<k} A^j Q A^jT)."""
    eye = np.broadcast_to(np.eye(A.shape[-1]), A.shape)
    result = (eye, np.zeros_like(Q))
    base = (A, Q)
    while k:
        if k & 1:
            result = _compose(result, base)
        k >>= 1
        if k:
            base = _compose(base, base)
    return result


def moments_at(A, B, mean0, cov0, times):
    """Exact mean and covariance of z_n - z0 under (1) at the step counts `times` (sorted, >= 0):
    mean_{n} = A^n mean_0,  Cov_{n+1} = A Cov_n A^T + B B^T. Returns arrays (T, d, n), (T, d, n, n)."""
    Q = B @ np.swapaxes(B, -1, -2)
    means, covs = [], []
    mean, cov, now = mean0, cov0, 0
    for t in times:
        t = int(t)
        if t < now:
            raise ValueError("times must be sorted")
        if t > now:
            Ak, Qk = _power(A, Q, t - now)
            mean = np.einsum("dij,dj->di", Ak, mean)
            cov = Ak @ cov @ np.swapaxes(Ak, -1, -2) + Qk
            now = t
        means.append(mean)
        covs.append(cov)
    return np.stack(means), np.stack(covs)


def augment_running_sum(A, B, C):
    """Append S_{n} = sum_{j=1}^{n} C z_j to the state (for averages of iterates):
    [z; S] -> [[A, 0], [C A, 1]] [z; S] + [[B], [C B]] xi."""
    d, n, _ = A.shape
    Aa = np.zeros((d, n + 1, n + 1))
    Aa[:, :n, :n] = A
    Aa[:, n, :n] = np.einsum("dj,dji->di", C, A)
    Aa[:, n, n] = 1.0
    Ba = np.concatenate([B, np.einsum("dj,djm->dm", C, B)[:, None, :]], axis=1)
    return Aa, Ba
