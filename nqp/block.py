"""The block model: late-phase weights on their own coordinates (:class:`nqp.methods.Block`).

In a network the base weights theta (convolutions) and the late-phase weights phi (BatchNorm gamma/beta, the head) are
disjoint parameter sets that interact only through the loss. Here the coordinates `phi_coords` are phi, the others
theta; member k's weights are w_k = (theta, phi_k). The problem may carry a full curvature H and noise covariance S.

One step function, :func:`block_step`, is the whole dynamics: the Monte Carlo (:func:`simulate`) calls it on real
arrays, the exact analysis (:func:`system`) on complex arrays to read its affine map z' = A z + B xi + b off by
complex-step differentiation. Three exact paths give the stationary excess losses:

* closed form (diagonal H; S's off-diagonal then plays no part): a theta coordinate is SGD on the mean of K targets,
  gradient gamma_theta K h (theta - cbar) + lambda theta, i.e. SGD with curvature a = K gamma_theta h + lambda and
  step eta_theta; a phi coordinate is K independent SGD chains with curvature h + lambda and step eta_phi, whose mean
  has 1/K of a chain's variance. Weight decay moves the mean to h w* / a' (a' the decayed curvature), a bias
  (lambda w* / a')^2 added to the variance;
* Lyapunov (any H): the literal step's A, B, b on the state (theta, phi_1..phi_K, buffers). The members are
  exchangeable, so the state space splits exactly into the mean subspace (theta, phibar and buffers) and K - 1 copies
  of one deviation subspace (sum_k u_k phi_k, u orthonormal and orthogonal to 1); each is invariant under A (checked),
  the mean solves (I - A) m = b, the covariances solve Sigma = A Sigma A^T + B B^T (scipy). `full=True` solves the
  unreduced system instead (a check, n = (d_theta + K d_phi) (1 + momentum) states);
* Monte Carlo of the literal step, with standard errors across independent runs.

Excess losses are 1/2 E[(w - w*)^T H (w - w*)] of the mean model (theta, mean_k phi_k) and averaged over the members,
w* the optimum without weight decay (units: loss). Time counts minibatches: one outer step is K * batch of them.

The same engine computes SGD (K = 1, no phi coordinate) and ensembles of K SGD runs (every coordinate phi) with weight
decay or a full H, and the additive model with weight decay (`Block.shared`: theta and phi_k on every coordinate,
w_k = theta + phi_k; exact paths Lyapunov and Monte Carlo, no closed form).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from . import closed_form as cf
from .dynamics import LatePhaseState, optimizer_update
from .errors import NQPError, UnstableError, overflow
from .methods import SGD, Block, Ensemble, LatePhase, TailAverage

LYAPUNOV_MAX_STATES = 3000   # largest (reduced) state the dense Lyapunov solver is asked to handle


# ----------------------------------------------------------------------------- which methods run here

def needs_block(problem, method) -> bool:
    """True when `method` on `problem` is computed by this module: the block model itself, and SGD or an ensemble of
    SGD runs with weight decay or a full curvature (the block model with K = 1 / with every coordinate phi)."""
    if isinstance(method, Block):
        return True
    if isinstance(method, LatePhase) and method.weight_decay:
        return True
    if isinstance(method, TailAverage) and getattr(method.base, "weight_decay", 0):
        raise NQPError("tail averages are not modelled with `weight_decay`")
    if isinstance(method, (LatePhase, TailAverage)):
        if problem.hessian is not None:
            raise NQPError(f"a full `hessian` is modelled for `method` sgd, block and additive with `weight_decay` "
                           f"> 0, not {method.name} (late-phase weights on their own coordinates, as in a network, "
                           f"are `method` block)")
        return False
    base = method.base if isinstance(method, Ensemble) else method
    return problem.hessian is not None or base.weight_decay > 0


def as_block(problem, method) -> Block:
    """SGD = the block model with K = 1 and no phi coordinate (theta takes SGD's step); an ensemble of K SGD runs = K
    members with every coordinate phi. Block methods pass through."""
    if isinstance(method, Block):
        return method
    if isinstance(method, LatePhase):   # additive with weight decay: theta and phi_k on every coordinate
        return Block(method.K, method.lr_theta, method.lr_phi, method.gamma_theta, method.momentum, method.nesterov,
                     tuple(range(problem.dim)), method.weight_decay, shared=True)
    if isinstance(method, Ensemble):
        b = method.base
        return Block(method.K, b.lr, b.lr, 1.0, b.momentum, b.nesterov, tuple(range(problem.dim)), b.weight_decay,
                     b.batch)
    return Block(1, method.lr, method.lr, 1.0, method.momentum, method.nesterov, (), method.weight_decay,
                 method.batch)


@dataclass(frozen=True)
class Layout:
    """Coordinates of theta and of phi (0-based, sorted)."""

    theta: np.ndarray
    phi: np.ndarray
    d: int


def layout(problem, method) -> Layout:
    d = problem.dim
    bm = as_block(problem, method)
    if bm.shared:
        return Layout(np.arange(d), np.arange(d), d)
    phi = np.asarray(bm.phi_coords, dtype=int)
    if phi.size and phi.max() >= d:
        raise NQPError(f"`phi_coords`: coordinate {int(phi.max())} is out of range (the problem has {d} "
                       f"coordinates, 0..{d - 1})")
    is_theta = np.ones(d, bool)
    is_theta[phi] = False
    return Layout(np.flatnonzero(is_theta), phi, d)


# ----------------------------------------------------------------------------- the step

@dataclass
class Coeffs:
    """Problem constants for the step: curvature (vector h, or full H), noise factor (sqrt(s), or L with
    L L^T = S), optimum, and the layout."""

    h: np.ndarray
    H: np.ndarray | None
    sqrt_s: np.ndarray
    L: np.ndarray | None
    wstar: np.ndarray
    lay: Layout

    @classmethod
    def of(cls, problem, lay: Layout, dtype=np.float64) -> "Coeffs":
        L = None
        if problem.noise_cov is not None:
            lam, V = np.linalg.eigh(problem.noise_cov)
            L = (V * np.sqrt(np.clip(lam, 0, None))).astype(dtype)
        H = None if problem.hessian is None else problem.hessian.astype(dtype)
        return cls(problem.curvature.astype(dtype), H, np.sqrt(problem.noise).astype(dtype), L,
                   problem.optimum.astype(dtype), lay)

    def curvature_times(self, x):
        """H x over the last axis."""
        return x * self.h if self.H is None else x @ self.H

    def noise(self, xi):
        """c - w* for standard normal xi (last axis)."""
        return xi * self.sqrt_s if self.L is None else xi @ self.L.T


State = LatePhaseState  # theta (..., d_theta), phi (..., K, d_phi), momentum buffers: nqp.dynamics' record


def members(state: State, c: Coeffs) -> np.ndarray:
    """Member weights w_k = (theta, phi_k), shape (..., K, d)."""
    w = np.zeros(state.phi.shape[:-1] + (c.lay.d,), dtype=np.result_type(state.theta, state.phi))
    w[..., c.lay.theta] = state.theta[..., None, :]
    w[..., c.lay.phi] += state.phi        # += : theta and phi share the coordinates in the additive model
    return w


def mean_model(state: State, c: Coeffs) -> np.ndarray:
    """The weight-averaged model (theta, mean_k phi_k), shape (..., d)."""
    w = np.zeros(state.theta.shape[:-1] + (c.lay.d,), dtype=np.result_type(state.theta, state.phi))
    w[..., c.lay.theta] = state.theta
    w[..., c.lay.phi] += state.phi.mean(axis=-2)
    return w


def block_step(state: State, xi: np.ndarray, c: Coeffs, method: Block) -> None:
    """One outer step of Algorithm 1 on the block model, in place; xi (..., K, d) standard normal.

    g_k = H (w_k - c_k), c_k = w* + (S / batch)^(1/2) xi_k, every gradient at the start-of-step weights;
        phi_k <- U(phi_k, g_k[phi] + lambda phi_k),
        theta <- U(theta, gamma_theta sum_k g_k[theta] + lambda_theta theta)
    with U torch.optim.SGD's update (lr_phi resp. lr_theta, momentum, Nesterov; weight decay inside the gradient).
    """
    r = members(state, c)
    r -= c.wstar
    r -= c.noise(xi) * (1.0 / math.sqrt(method.batch))
    g = c.curvature_times(r)
    g_phi = g[..., c.lay.phi]
    g_theta = g[..., c.lay.theta].sum(axis=-2)
    g_theta *= method.gamma_theta
    if method.weight_decay:
        g_phi += method.weight_decay * state.phi
    if method.lambda_theta:
        g_theta += method.lambda_theta * state.theta
    optimizer_update(state.phi, state.v_phi, g_phi, method.lr_phi, method.momentum, method.nesterov)
    optimizer_update(state.theta, state.v_theta, g_theta, method.lr_theta, method.momentum, method.nesterov)


def state_views(F: np.ndarray, method: Block, lay: Layout) -> State:
    """A State whose arrays are views into the flat state F (..., n), laid out as
    [theta | phi_1..phi_K | v_theta | v_phi_1..v_phi_K]."""
    dt, dp, K = lay.theta.size, lay.phi.size, method.K
    size = dt + K * dp
    th = F[..., :dt]
    ph = F[..., dt:size].reshape(F.shape[:-1] + (K, dp))
    st = State(th, ph)
    if method.momentum:
        st.v_theta = F[..., size:size + dt]
        st.v_phi = F[..., size + dt:2 * size].reshape(F.shape[:-1] + (K, dp))
    for a in (ph, st.v_phi):
        assert a is None or a.size == 0 or np.shares_memory(a, F), "state view is a copy"
    return st


def state_size(method: Block, lay: Layout) -> int:
    return (lay.theta.size + method.K * lay.phi.size) * (2 if method.momentum else 1)


# ----------------------------------------------------------------------------- the affine map of the step

@dataclass
class Reduced:
    """z' = A z + B xi + b on one subspace (coordinates in its orthonormal basis E, shape (n, q))."""

    A: np.ndarray
    B: np.ndarray
    b: np.ndarray
    E: np.ndarray
    _rho: float | None = None

    @property
    def rho(self) -> float:
        """Spectral radius of A (computed once)."""
        if self._rho is None:
            self._rho = _radius(self.A)
        return self._rho


def _bases(method: Block, lay: Layout):
    """Orthonormal bases (as columns) of the mean subspace and of one deviation subspace of the flat state, and the
    matching noise directions (K, d): mean noise xi_k = e_j / sqrt(K), deviation noise xi_1 = -xi_2 = e_j / sqrt(2)."""
    dt, dp, K, d = lay.theta.size, lay.phi.size, method.K, lay.d
    size = dt + K * dp
    blocks = 2 if method.momentum else 1
    n = size * blocks
    if (dt + dp) * blocks > LYAPUNOV_MAX_STATES:
        raise NQPError(f"the exact path of this problem solves a {(dt + dp) * blocks} x {(dt + dp) * blocks} system "
                       f"(d (1 + momentum) > {LYAPUNOV_MAX_STATES}); with a diagonal H use the closed form (no "
                       f"`lyapunov`), else fewer coordinates")
    Em = np.zeros((n, (dt + dp) * blocks))
    Eu = np.zeros((n, dp * blocks)) if K > 1 else None
    for b in range(blocks):
        o, q = b * size, b * (dt + dp)
        Em[o + np.arange(dt), q + np.arange(dt)] = 1.0
        for k in range(K):
            Em[o + dt + k * dp + np.arange(dp), q + dt + np.arange(dp)] = 1 / math.sqrt(K)
        if Eu is not None:
            Eu[o + dt + np.arange(dp), b * dp + np.arange(dp)] = 1 / math.sqrt(2)
            Eu[o + dt + dp + np.arange(dp), b * dp + np.arange(dp)] = -1 / math.sqrt(2)
    Nm = np.broadcast_to(np.eye(d)[:, None, :] / math.sqrt(K), (d, K, d)).copy()
    Nu = None
    if K > 1:
        Nu = np.zeros((d, K, d))
        Nu[:, 0, :], Nu[:, 1, :] = np.eye(d) / math.sqrt(2), -np.eye(d) / math.sqrt(2)
    return (Em, Nm), ((Eu, Nu) if K > 1 else None)


def _affine(problem, method: Block, lay: Layout, E: np.ndarray, N: np.ndarray):
    """A E (n, q), B N (n, m) and b (n,) of the literal step z' = A z + B xi + b. The step is affine, and its only
    constant is the optimum w*: with w* = 0 it is linear, so A E and B N are the step of the columns of E (noise 0)
    and of the noise directions N (state 0) with w* = 0, and b is the step of the zero state with the problem's w*
    (real arithmetic, no difference of large terms)."""
    n, q = E.shape
    m = N.shape[0]
    c = Coeffs.of(problem, lay)
    b = np.zeros((1, n))
    block_step(state_views(b, method, lay), np.zeros((1, method.K, lay.d)), c, method)
    c.wstar = np.zeros_like(c.wstar)
    F = np.zeros((q + m, n))
    F[:q] = E.T
    xi = np.zeros((q + m, method.K, lay.d))
    xi[q:] = N
    block_step(state_views(F, method, lay), xi, c, method)
    return F[:q].T, F[q:].T, b[0]


_cache: dict = {}


def _reduced(problem, method: Block, lay: Layout, which: str) -> Reduced | None:
    """The step on the mean ("mean") or one deviation ("dev") subspace, cached per (problem, method): stability,
    moments and fixed point share one construction."""
    key = (id(problem), method, which)
    hit = _cache.get(key)
    if hit is not None and hit[0] is problem:
        return hit[1]
    mean, dev = _bases(method, lay)
    red = reduce(problem, method, lay, *mean) if which == "mean" else (
        reduce(problem, method, lay, *dev) if dev is not None and lay.phi.size else None)
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = (problem, red)
    return red


def reduce(problem, method: Block, lay: Layout, E: np.ndarray, N: np.ndarray) -> Reduced:
    """The step restricted to the subspace spanned by E (orthonormal columns), checking that it is invariant."""
    AE, BN, b = _affine(problem, method, lay, E, N)
    A = E.T @ AE
    resid = np.abs(AE - E @ A).max() if AE.size else 0.0
    assert resid <= 1e-9 * max(1.0, np.abs(AE).max()), f"subspace not invariant under the step ({resid:g})"
    return Reduced(A, E.T @ BN, E.T @ b, E)


def _radius(A: np.ndarray) -> float:
    return float(np.abs(np.linalg.eigvals(A)).max()) if A.size else 0.0


# ----------------------------------------------------------------------------- stability

def _closed(problem, bm: Block) -> bool:
    """Whether the per-coordinate closed forms apply: diagonal H and disjoint theta and phi."""
    return problem.diagonal and not bm.shared


def _check_moves(method: Block, lay: Layout) -> None:
    if lay.theta.size and (method.gamma_theta * method.lr_theta == 0 or method.lr_theta == 0) \
            and not (method.lambda_theta and method.lr_theta):
        raise NQPError("theta never moves (gamma_theta * lr_theta = 0 and no weight decay), so its stationary value "
                       "is its start: no stationary state to predict; give gamma_theta, lr_theta > 0")


def stability(problem, method) -> list:
    """Diagonal H: lr_theta max_theta (K gamma_theta h + lambda) < edge(mu) and lr_phi max_phi (h + lambda) < edge(mu)
    (edge = 2, 2 (1 + mu), 2 (1 + mu)/(1 + 2 mu) for plain, heavy-ball, Nesterov). Full H: the spectral radius of the
    step on the mean subspace and on the deviation subspace must be < 1."""
    from .theory import Condition

    lay = layout(problem, method)
    bm = as_block(problem, method)
    _check_moves(bm, lay)
    if not _closed(problem, bm):
        out = [Condition("spectral radius of the mean model's step (theta, phibar)",
                         _reduced(problem, bm, lay, "mean").rho, 1.0)]
        dev = _reduced(problem, bm, lay, "dev")
        if dev is not None:
            out.append(Condition("spectral radius of the members' deviation step", dev.rho, 1.0))
        return out
    edge = cf.stability_edge(bm.momentum, bm.nesterov)
    tail = {"plain": "2", "heavy": "2(1+momentum)", "nesterov": "2(1+momentum)/(1+2 momentum)"}[
        cf.variant_of(bm.momentum, bm.nesterov)]
    h, lam, out = problem.curvature, bm.weight_decay, []
    wd = " + weight_decay" if lam else ""
    if lay.theta.size:
        a = bm.K * bm.gamma_theta * h[lay.theta] + bm.lambda_theta
        wdt = " + weight_decay_theta" if bm.lambda_theta else ""
        out.append(Condition(f"lr_theta * (K*gamma_theta*h{wdt}) on theta (edge {tail})",
                             float(bm.lr_theta * a.max()), edge))
    if lay.phi.size:
        out.append(Condition(f"lr_phi * (h{wd}) on phi (edge {tail})", float(bm.lr_phi * (h[lay.phi] + lam).max()),
                             edge))
    return out


def check_stable(problem, method) -> list:
    conds = stability(problem, method)
    for c in conds:
        if not c.ok:
            expr, _, edge = c.expression.partition(" (edge")
            raise UnstableError(f"unstable: {'max ' if 'spectral' not in expr else ''}{expr} = {c.value:.6g} must be < "
                                f"{c.bound:.6g}{' (edge' + edge if edge else ''}; lower the learning rate(s)")
    return conds


def max_stable_lr(problem, method) -> dict:
    """Diagonal H: the largest stable lr_theta and lr_phi (others fixed). Full H: None (no closed bound)."""
    lay, bm = layout(problem, method), as_block(problem, method)
    if not _closed(problem, bm):
        return {"lr_theta": None, "lr_phi": None}
    edge = cf.stability_edge(bm.momentum, bm.nesterov)
    h, lam = problem.curvature, bm.weight_decay
    out = {}
    if lay.theta.size:
        out["lr_theta"] = edge / float((bm.K * bm.gamma_theta * h[lay.theta] + bm.lambda_theta).max() or np.inf)
    if lay.phi.size:
        out["lr_phi"] = edge / float((h[lay.phi] + lam).max())
    return out


# ----------------------------------------------------------------------------- stationary excess

@dataclass
class Moments:
    """Second moments M = E[(w - w*)(w - w*)^T] of the mean model and of a member (averaged over k), and the
    per-coordinate excess 1/2 sum_j H_ij M_ij of each (these sum to the excess)."""

    mean_model: np.ndarray
    members: np.ndarray


def closed_form(problem, method):
    """Per-coordinate stationary excess (mean model, members) for diagonal H (see the module docstring)."""
    lay, bm = layout(problem, method), as_block(problem, method)
    if not _closed(problem, bm):
        raise NQPError("no closed form here (a full H, or theta and phi on the same coordinates): use the Lyapunov path")
    h, s, w = problem.curvature, problem.noise / bm.batch, problem.optimum
    lam, mu, nest = bm.weight_decay, bm.momentum, bm.nesterov
    mean, mem = np.zeros(lay.d), np.zeros(lay.d)
    t, p = lay.theta, lay.phi
    if t.size:
        kh, lt = bm.K * bm.gamma_theta * h[t], bm.lambda_theta
        a = kh + lt
        V = cf.sgd_variance(bm.lr_theta, a, (kh / a) ** 2 * s[t] / bm.K, mu, nest)
        mean[t] = mem[t] = 0.5 * h[t] * (V + (lt * w[t] / a) ** 2)
    if p.size:
        a = h[p] + lam
        V = cf.sgd_variance(bm.lr_phi, a, (h[p] / a) ** 2 * s[p], mu, nest)
        bias2 = (lam * w[p] / a) ** 2
        mean[p] = 0.5 * h[p] * (V / bm.K + bias2)
        mem[p] = 0.5 * h[p] * (V + bias2)
    return mean, mem


def _solve(red: Reduced):
    import scipy.linalg  # imported here: the closed-form paths run without scipy

    q = red.A.shape[0]
    if q > LYAPUNOV_MAX_STATES:
        raise NQPError(f"the Lyapunov path would solve a {q} x {q} system; use the closed form (diagonal `hessian`) "
                       f"or fewer coordinates")
    rho = red.rho
    if rho >= 1 - 1e-12:
        raise UnstableError(f"unstable: spectral radius of the step {rho:.6g} must be < 1; lower the learning rate(s)")
    m = np.linalg.solve(np.eye(q) - red.A, red.b)
    sig = scipy.linalg.solve_discrete_lyapunov(red.A, red.B @ red.B.T)
    return m, 0.5 * (sig + sig.T)


def _observe(problem, method, lay, E):
    """Mean-model weights (d, q) and member weights (K, d, q) of the basis states E (linear in the state)."""
    st = state_views(np.ascontiguousarray(E.T), method, lay)
    c = Coeffs.of(problem, lay)
    return mean_model(st, c).T, np.moveaxis(members(st, c), 0, -1)


def lyapunov_moments(problem, method, full: bool = False) -> Moments:
    """Stationary second moments of the literal step (exact): the mean from (I - A) m = b, the covariance from
    Sigma = A Sigma A^T + B B^T, on the mean and deviation subspaces (default) or on the whole state (full=True).
    Cached per (problem, method) like the reduced systems (predict asks for the same baselines several times)."""
    key = (id(problem), as_block(problem, method), "moments", full)
    hit = _cache.get(key)
    if hit is not None and hit[0] is problem:
        return hit[1]
    if isinstance(method, Ensemble) and not full:
        # K independent runs: the average has the runs' mean and 1/K of their covariance, which is exactly SGD with
        # a K-times batch (the stationary covariance of a linear step is proportional to the noise covariance).
        b = method.base
        one = lyapunov_moments(problem, b)
        big = lyapunov_moments(problem, SGD(b.lr, b.momentum, b.nesterov, b.batch * method.K, b.weight_decay))
        out = Moments(big.mean_model, one.members)
    else:
        out = _lyapunov_moments(problem, method, full)
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = (problem, out)
    return out


def _lyapunov_moments(problem, method, full: bool) -> Moments:
    lay, bm = layout(problem, method), as_block(problem, method)
    w = problem.optimum
    if full:
        n = state_size(bm, lay)
        red = reduce(problem, bm, lay, np.eye(n), np.eye(bm.K * lay.d).reshape(bm.K * lay.d, bm.K, lay.d))
        m, sig = _solve(red)
        Cm, Ck = _observe(problem, bm, lay, red.E)
        x = Cm @ m - w
        Mm = Cm @ sig @ Cm.T + np.outer(x, x)
        xk = Ck @ m - w
        Mk = (Ck @ sig @ np.swapaxes(Ck, -1, -2) + xk[:, :, None] * xk[:, None, :]).mean(axis=0)
        return Moments(Mm, Mk)
    red = _reduced(problem, bm, lay, "mean")
    m, sig = _solve(red)
    Cm, _ = _observe(problem, bm, lay, red.E)
    x = Cm @ m - w
    Mm = Cm @ sig @ Cm.T + np.outer(x, x)
    Mk = Mm.copy()
    red_u = _reduced(problem, bm, lay, "dev")
    if red_u is not None:
        mu_u, sig_u = _solve(red_u)
        assert np.abs(mu_u).max() <= 1e-9 * max(1.0, np.abs(m).max()), "deviation subspace has a nonzero mean"
        dp = lay.phi.size
        P = np.zeros((lay.d, dp))
        P[lay.phi, np.arange(dp)] = 1.0
        Mk += (bm.K - 1) / bm.K * (P @ sig_u[:dp, :dp] @ P.T)
    return Moments(Mm, Mk)


def per_coordinate(problem, M: np.ndarray) -> np.ndarray:
    """1/2 sum_j H_ij M_ij for each coordinate i (sums to 1/2 tr(H M), the excess)."""
    return 0.5 * np.sum(problem.H * M, axis=1)


def steady_state(problem, method, path: str = "closed"):
    """Per-coordinate stationary excess (mean model, members) and the path used: the closed form for diagonal H
    (path "closed"), else the Lyapunov solution of the literal step."""
    if path == "closed" and _closed(problem, as_block(problem, method)):
        return (*closed_form(problem, method), "closed")
    mom = lyapunov_moments(problem, method)
    label = "lyapunov" if path == "lyapunov" else (
        "lyapunov (additive with weight decay: no closed form)" if problem.diagonal
        else "lyapunov (full curvature: no closed form)")
    return per_coordinate(problem, mom.mean_model), per_coordinate(problem, mom.members), label


# ----------------------------------------------------------------------------- Monte Carlo

def fixed_point(problem, method, lay: Layout):
    """The stationary mean of (theta, phi_k): diagonal H in closed form (theta = K gamma h w* / (K gamma h + lambda),
    phi = h w* / (h + lambda)), else from (I - A) m = b on the mean subspace."""
    bm = as_block(problem, method)
    h, w, lam = problem.curvature, problem.optimum, bm.weight_decay
    if _closed(problem, bm):
        kh, lt = bm.K * bm.gamma_theta * h[lay.theta], bm.lambda_theta
        th = kh * w[lay.theta] / np.where(kh + lt > 0, kh + lt, 1.0)
        return th, h[lay.phi] * w[lay.phi] / (h[lay.phi] + lam)
    red = _reduced(problem, bm, lay, "mean")
    full = red.E @ np.linalg.solve(np.eye(red.A.shape[0]) - red.A, red.b)
    st = state_views(full, bm, lay)
    return st.theta.copy(), st.phi[0].copy()


def _sgd_radius(lr, a, mu, nest):
    """Spectral radius of SGD's step on curvature a (vectorised over a)."""
    a = np.asarray(a, float)
    if not mu:
        return np.abs(1 - lr * a)
    top = 1 - lr * a * ((1 + mu) if nest else 1)
    off = -lr * mu * (mu if nest else 1)
    A = np.zeros(a.shape + (2, 2))
    A[..., 0, 0], A[..., 0, 1], A[..., 1, 0], A[..., 1, 1] = top, off, a, mu
    return np.abs(np.linalg.eigvals(A)).max(axis=-1)


def spectral_radius(problem, method) -> float:
    lay, bm = layout(problem, method), as_block(problem, method)
    if _closed(problem, bm):
        h, lam = problem.curvature, bm.weight_decay
        r = [0.0]
        if lay.theta.size:
            r.append(_sgd_radius(bm.lr_theta, bm.K * bm.gamma_theta * h[lay.theta] + bm.lambda_theta, bm.momentum,
                                 bm.nesterov).max())
        if lay.phi.size:
            r.append(_sgd_radius(bm.lr_phi, h[lay.phi] + lam, bm.momentum, bm.nesterov).max())
        return float(max(r))
    r = _reduced(problem, bm, lay, "mean").rho
    dev = _reduced(problem, bm, lay, "dev")
    return r if dev is None else max(r, dev.rho)


def auto_burn_in(problem, method, tol: float = 1e-6) -> int:
    """Minibatches until rho^(2n) <= tol (rho the spectral radius of the step), from the noise-free fixed point."""
    rho = spectral_radius(problem, method)
    if rho >= 1:
        raise NQPError(f"cannot choose a burn-in: spectral radius {rho:.17g}; give `burn_in`, or larger steps")
    steps = 1 if rho == 0 else math.ceil(math.log(tol) / (2 * math.log(rho)))
    return max(1, steps) * as_block(problem, method).minibatches_per_step


def simulate(problem, method, *, steps: int, burn_in: int | None = None, runs: int = 32, seed: int = 0,
             threads: int | None = None, progress: bool = False, dtype=np.float64):
    """Monte Carlo of :func:`block_step` from the noise-free fixed point: discard `burn_in` minibatches (default
    :func:`auto_burn_in`), then average the excess of the mean model and of the members over `steps` minibatches.
    Runs are split into tiles, each with its own random stream from (seed, tile index): results do not depend on the
    number of threads. Returns an :class:`nqp.montecarlo.MCResult` (standard errors across runs)."""
    from .montecarlo import _check_runs_seed, _Progress, _rng, _run_tiles, _Sums

    _check_runs_seed(runs, seed)
    check_stable(problem, method)
    lay, bm = layout(problem, method), as_block(problem, method)
    mpb = bm.minibatches_per_step
    if steps < mpb:
        raise NQPError(f"`steps` ({steps}) must be >= the minibatches per step ({mpb})")
    n_steps = steps // mpb
    n_burn = -(-int(auto_burn_in(problem, method) if burn_in is None else burn_in) // mpb)
    tiles = _run_blocks(int(runs), bm.K, lay.d)
    start = fixed_point(problem, method, lay)
    sums = _Sums(int(runs), 0)
    bar = _Progress(len(tiles) * (n_burn + n_steps), progress, f"simulate {method.name}")

    def run_tile(index):
        tile = _Tile(problem, bm, lay, tiles[index], start, dtype)
        rng = _rng(seed, index)
        for i in range(n_burn + n_steps):
            tile.step(rng)
            if i >= n_burn:
                tile.record()
            if (i + 1) % 256 == 0:
                bar.update(256)
                tile.check((i + 1) * mpb)
        bar.update((n_burn + n_steps) % 256)
        sums.add((*tiles[index], 0, 0), *tile.result(), None, None)

    t0 = time.perf_counter()
    _run_tiles(run_tile, len(tiles), threads, bar)
    return _result(method.name, sums, n_steps, n_burn, mpb, int(seed), bm.K * lay.d, time.perf_counter() - t0, dtype)


def _run_blocks(runs: int, K: int, d: int):
    """(r0, r1) tiles of the runs with about TILE_BYTES per (runs x members x coordinates) array."""
    from .montecarlo import TILE_BYTES

    r_block = max(1, min(runs, TILE_BYTES // (8 * K * d)))
    return [(r0, min(runs, r0 + r_block)) for r0 in range(0, runs, r_block)]


def _result(name, sums, n_steps, n_burn, mpb, seed, member_coords, seconds, dtype):
    """The MCResult of the tiles' per-run sums: run means of the time averages and their standard errors."""
    from .montecarlo import DivergedError, MCResult, _run_stats

    per_mean, per_mem = sums.mean / n_steps, sums.mem / n_steps
    stats = _run_stats(per_mean, per_mem)
    if not all(math.isfinite(v) for v in stats):
        raise DivergedError("simulation diverged (non-finite loss); lower the learning rates or the noise")
    runs = per_mean.size
    updates = runs * member_coords * (n_burn + n_steps)
    return MCResult(name, *stats, runs, n_steps * mpb, n_burn * mpb, seed, updates, seconds, per_mean,
                    per_mem, np.dtype(dtype).name)


class _Tile:
    """State and noise of one block of runs of the block model from the fixed point `start` = (theta, phi); record()
    adds the excess of the mean model and the members' average to per-run sums."""

    def __init__(self, problem, bm: Block, lay: Layout, bounds, start, dtype=np.float64):
        r0, r1 = bounds
        R, K, th0, ph0 = r1 - r0, bm.K, *start
        self.bm, self.c = bm, Coeffs.of(problem, lay, dtype)
        self.state = State(np.broadcast_to(th0, (R, th0.size)).astype(dtype),
                           np.broadcast_to(ph0, (R, K, ph0.size)).astype(dtype))
        if bm.momentum:
            self.state.v_theta, self.state.v_phi = np.zeros_like(self.state.theta), np.zeros_like(self.state.phi)
        self.xi = np.empty((R, K, lay.d), dtype)
        self.s_mean, self.s_mem = np.zeros(R), np.zeros(R)

    def step(self, rng) -> None:
        rng.standard_normal(out=self.xi, dtype=self.xi.dtype)
        block_step(self.state, self.xi, self.c, self.bm)

    def record(self) -> None:
        st, c = self.state, self.c
        x = mean_model(st, c) - c.wstar
        self.s_mean += 0.5 * np.sum(x * c.curvature_times(x), axis=-1)
        xk = members(st, c) - c.wstar
        self.s_mem += 0.5 * np.sum(xk * c.curvature_times(xk), axis=(-1, -2)) / self.bm.K

    def check(self, minibatch: int) -> None:
        from .montecarlo import DivergedError

        if not np.all(np.isfinite(self.state.theta)) or not np.all(np.isfinite(self.state.phi)):
            raise DivergedError(f"simulation diverged (non-finite values by minibatch {minibatch}); "
                                "lower the learning rates or the noise")

    def result(self):
        return self.s_mean, self.s_mem


# ----------------------------------------------------------------------------- learning curves

def _augmented(red: Reduced):
    """z~ = [z; 1]: z~' = A~ z~ + B~ xi, so that the second moment M = E[z~ z~^T] evolves as A~ M A~^T + B~ B~^T."""
    q = red.A.shape[0]
    At = np.zeros((q + 1, q + 1))
    At[:q, :q], At[:q, q], At[q, q] = red.A, red.b, 1.0
    Bt = np.vstack([red.B, np.zeros((1, red.B.shape[1]))])
    return At, Bt @ Bt.T


class _Propagator:
    """Second moments after k steps of an augmented system, M -> A^k M A^kT + Q_k, with (A^k, Q_k) by repeated
    squaring, cached per k (the time grid repeats one jump)."""

    def __init__(self, At, Q):
        self.At, self.Q, self.cache = At, Q, {}

    def __call__(self, M, k: int):
        if k == 0:
            return M
        if k not in self.cache:
            from .linear import _power
            Ak, Qk = _power(self.At[None], self.Q[None], int(k))
            self.cache[k] = (Ak[0], Qk[0])
        Ak, Qk = self.cache[k]
        return Ak @ M @ Ak.T + Qk


def _check_size(q: int) -> None:
    if q > LYAPUNOV_MAX_STATES:
        raise NQPError(f"the exact curve of the block model propagates a {q} x {q} moment matrix; use fewer "
                       f"coordinates (d (1 + momentum) <= {LYAPUNOV_MAX_STATES})")


def learning_curve(problem, method: Block, sgd: SGD, *, T0: int, horizon: int, w0=0.0, sigma0: float = 0.0,
                   points: int = 200):
    """Exact expected excess loss vs t (minibatches): `sgd` from w0 until T0, then the block model released with
    theta = w[theta], phi_k = w[phi] + sigma0 eps_k (buffers copied from SGD's). Series: sgd (continuing), sgd_batch_K
    (SGD with a K-times batch from T0), ensemble_K (K independent SGD runs from w0, floor(t/K) steps each),
    latephase_mean and latephase_members. Moments are propagated exactly on the mean subspace (with the constant
    term) and on the deviation subspace of the literal step. Returns an :class:`nqp.curves.Curve`."""
    from .curves import Curve, start_weights, time_grid

    _check_curve(problem, method, sgd, sigma0)
    t = time_grid(T0, horizon, method.K, points)
    moments = _ExactCurve(problem, method, sgd, start_weights(w0, problem.dim), sigma0, int(T0))
    series = {k: np.zeros(len(t)) for k in _ExactCurve.SERIES}
    for i, ti in enumerate(t):
        moments.step(int(ti))
        for k, v in moments.observe().items():
            series[k][i] = v
    if not all(np.all(np.isfinite(v)) for v in series.values()):
        raise overflow("w0", "noise", "curvature", "optimum")
    return Curve(t, series, int(T0), method.K, "lyapunov (block model, exact moments)")


def _check_curve(problem, method, sgd, sigma0) -> None:
    """The arguments the exact block curve models (the same momentum, batch 1, stable)."""
    from .theory import check_stable

    if not isinstance(sgd, SGD) or sgd.batch != 1:
        raise NQPError("learning_curve needs a batch-1 SGD method")
    if not isinstance(method, Block) or method.shared:
        raise NQPError("the exact curve models `method` block (additive with weight decay has none here)")
    if sigma0 < 0 or not np.isfinite(sigma0):
        raise NQPError(f"`sigma0` must be >= 0, got {sigma0}")
    if (sgd.momentum, sgd.nesterov) != (method.momentum, method.nesterov):
        raise NQPError("SGD and the late-phase method must use the same momentum setting")
    check_stable(problem, sgd)
    check_stable(problem, method)
    if method.batch != 1:
        raise NQPError("the block model's curve takes batch 1 per member")


class _ExactCurve:
    """The second moments M = E[z~ z~^T] of the curve protocol, propagated exactly: SGD's (w, v, 1) from w0 until T0
    (and on, continuing), SGD with a K-times batch from T0, and the block model released at T0 on its mean subspace
    (affine) and one deviation subspace. step(t) advances to minibatch t; observe() gives the series' values there."""

    SERIES = ("sgd", "sgd_batch_K", "ensemble_K", "latephase_mean", "latephase_members")

    def __init__(self, problem, method: Block, sgd: SGD, w0, sigma0: float, T0: int):
        K, d = method.K, problem.dim
        lay_s = layout(problem, sgd)
        bs = as_block(problem, sgd)
        n_s = state_size(bs, lay_s)
        _check_size(n_s)
        eye_noise = np.eye(d).reshape(d, 1, d)
        sys_s = reduce(problem, bs, lay_s, np.eye(n_s), eye_noise)
        big = SGD(sgd.lr, sgd.momentum, sgd.nesterov, K, sgd.weight_decay)
        sys_b = reduce(problem, as_block(problem, big), lay_s, np.eye(n_s), eye_noise)
        self.prop_s, self.prop_b = _Propagator(*_augmented(sys_s)), _Propagator(*_augmented(sys_b))
        self.H, w = problem.H, problem.optimum
        self.Ds = np.hstack([_observe(problem, bs, lay_s, np.eye(n_s))[0], -w[:, None]])     # w - w*, affine in z~
        self.M0 = np.zeros((n_s + 1, n_s + 1))
        self.M0[:d, :d] = np.outer(w0, w0)
        self.M0[:d, -1] = self.M0[-1, :d] = w0
        self.M0[-1, -1] = 1.0
        # The late-phase systems: mean subspace (affine) and one deviation subspace.
        lay = layout(problem, method)
        (Em, Nm), dev = _bases(method, lay)
        sys_m = reduce(problem, method, lay, Em, Nm)
        q = sys_m.A.shape[0]
        _check_size(q)
        self.prop_m = _Propagator(*_augmented(sys_m))
        self.Dm = np.hstack([_observe(problem, method, lay, Em)[0], -w[:, None]])
        self.dt, self.dp = dt, dp = lay.theta.size, lay.phi.size
        self.T = np.zeros((q + 1, n_s + 1))    # SGD's (w, v, 1) -> the mean subspace's (theta, sqrt(K) phibar, ..., 1)
        for b in range(2 if method.momentum else 1):
            self.T[b * (dt + dp) + np.arange(dt), b * d + lay.theta] = 1.0
            self.T[b * (dt + dp) + dt + np.arange(dp), b * d + lay.phi] = math.sqrt(K)
        self.T[-1, -1] = 1.0
        self.sys_u = self.prop_u = None
        if dev is not None and dp:
            self.sys_u = reduce(problem, method, lay, *dev)
            self.prop_u = _Propagator(self.sys_u.A, self.sys_u.B @ self.sys_u.B.T)
        self.Hpp = self.H[np.ix_(lay.phi, lay.phi)]
        self.K, self.sigma0, self.T0 = K, sigma0, T0
        self.M_s, self.now, self.M_big, self.M_m, self.M_u = self.M0, 0, None, None, None
        self.ens_cache = {}

    def _excess(self, D, M) -> float:
        return 0.5 * float(np.sum(self.H * (D @ M @ D.T)))

    def step(self, t: int) -> None:
        """Advance to minibatch t: SGD alone up to T0 (releasing there), then whole outer steps of K minibatches."""
        if t <= self.T0:
            self.M_s, self.now = self.prop_s(self.M_s, t - self.now), t
            if t == self.T0:
                self.release()
            return
        steps = (t - self.now) // self.K
        self.M_s = self.prop_s(self.M_s, t - self.now)
        self.M_big, self.M_m = self.prop_b(self.M_big, steps), self.prop_m(self.M_m, steps)
        if self.prop_u is not None:
            self.M_u = self.prop_u(self.M_u, steps)
        self.now = t

    def release(self) -> None:
        """theta = w[theta], phi_k = w[phi] + sigma0 eps_k (buffers copied): the moments mapped to the block model."""
        dt, dp = self.dt, self.dp
        self.M_big = self.M_s
        self.M_m = self.T @ self.M_s @ self.T.T
        self.M_m[dt + np.arange(dp), dt + np.arange(dp)] += self.sigma0 ** 2
        if self.prop_u is not None:
            self.M_u = np.zeros((self.sys_u.A.shape[0],) * 2)
            self.M_u[np.arange(dp), np.arange(dp)] = self.sigma0 ** 2

    def observe(self) -> dict:
        """The series' expected excess losses at the current minibatch (up to T0 every series is SGD's)."""
        out = {"ensemble_K": self._ensemble(self.now // self.K)}
        if self.now <= self.T0:
            e = self._excess(self.Ds, self.M_s)
            return {"sgd": e, "sgd_batch_K": e, "latephase_mean": e, "latephase_members": e, **out}
        mean = self._excess(self.Dm, self.M_m)
        extra = 0.0
        if self.prop_u is not None:
            extra = (self.K - 1) / self.K * 0.5 * float(np.sum(self.Hpp * self.M_u[:self.dp, :self.dp]))
        return {"sgd": self._excess(self.Ds, self.M_s), "sgd_batch_K": self._excess(self.Ds, self.M_big),
                "latephase_mean": mean, "latephase_members": mean + extra, **out}

    def _ensemble(self, n: int) -> float:
        """K independent SGD runs of n steps from w0: the mean of their average is SGD's, its variance 1/K of it."""
        if n not in self.ens_cache:
            M = self.prop_s(self.M0, n)
            S2 = self.Ds @ M @ self.Ds.T
            mu = self.Ds @ M[:, -1]
            self.ens_cache[n] = 0.5 * float(np.sum(self.H * (np.outer(mu, mu) + (S2 - np.outer(mu, mu)) / self.K)))
        return self.ens_cache[n]


def simulate_curve(problem, method: Block, sgd: SGD, *, T0: int, horizon: int, w0=0.0, sigma0: float = 0.0,
                   points: int = 60, runs: int = 32, seed: int = 0, threads: int | None = None,
                   progress: bool = False):
    """Monte Carlo of the protocol of :func:`learning_curve` (series sgd, latephase_mean, latephase_members), SGD
    continuing on its own noise beside the block model after T0. Means over runs with standard errors."""
    from .curves import start_weights, time_grid
    from .montecarlo import _check_runs_seed, _CurveSums, _Progress, _rng, _run_tiles

    _check_runs_seed(runs, seed)
    t = time_grid(T0, horizon, method.K, points)
    record = {int(x): i for i, x in enumerate(t)}
    w0 = start_weights(w0, problem.dim)
    names = ("sgd", "latephase_mean", "latephase_members")
    sums = _CurveSums(names, int(runs), len(t), problem.dim, False)
    tiles = _run_blocks(int(runs), method.K, problem.dim)
    bar = _Progress(len(tiles) * int(horizon), progress, "simulate curve")

    def run_tile(index):
        tile = _CurveTile(problem, method, sgd, tiles[index], w0, names, len(t), T0, sigma0)
        rng = _rng(seed, index)
        if T0 == 0:
            tile.release(rng)
        if 0 in record:
            tile.record(record[0])
        while tile.now < horizon:
            tile.step(rng)
            if tile.now in record:
                tile.record(record[tile.now])
        bar.update(int(horizon))
        sums.add((*tiles[index], 0, 0), *tile.result())

    _run_tiles(run_tile, len(tiles), threads, bar)
    return sums.curve(t, int(T0), method.K)


def _excess(c: Coeffs, x):
    """1/2 x^T H x over the last axis (loss units)."""
    return 0.5 * np.sum(x * c.curvature_times(x), axis=-1)


class _CurveTile:
    """One block of runs of the curve protocol: SGD (as the block model with K = 1) until T0, then the block model
    released from SGD's weights, SGD continuing beside it on its own noise. Random stream order: SGD's minibatches,
    the release's perturbation (sigma0), then per outer step K SGD minibatches and the K members' noise."""

    def __init__(self, problem, method: Block, sgd: SGD, bounds, w0, names, n_times: int, T0: int, sigma0: float):
        r0, r1 = bounds
        R, d = r1 - r0, problem.dim
        self.lay = layout(problem, method)
        self.cs, self.c = Coeffs.of(problem, layout(problem, sgd)), Coeffs.of(problem, self.lay)
        self.bs, self.method, self.sgd, self.T0, self.sigma0 = as_block(problem, sgd), method, sgd, T0, sigma0
        self.s = State(np.broadcast_to(w0, (R, d)).copy(), np.zeros((R, 1, 0)))
        if sgd.momentum:
            self.s.v_theta, self.s.v_phi = np.zeros((R, d)), np.zeros((R, 1, 0))
        self.local = {k: np.zeros((R, n_times)) for k in names}
        self.lp, self.now, self.R, self.d = None, 0, R, d

    def release(self, rng) -> None:
        """theta from SGD's weights on the theta coordinates, every phi_k from them on the phi coordinates (+ sigma0
        noise); buffers likewise."""
        s, lay, K = self.s, self.lay, self.method.K
        ph = np.repeat(s.theta[:, None, lay.phi], K, axis=1)
        if self.sigma0:
            ph += self.sigma0 * rng.standard_normal(ph.shape)
        self.lp = State(s.theta[:, lay.theta].copy(), ph)
        if self.method.momentum:
            self.lp.v_theta = s.v_theta[:, lay.theta].copy()
            self.lp.v_phi = np.repeat(s.v_theta[:, None, lay.phi], K, axis=1)

    def step(self, rng) -> None:
        """One SGD minibatch before T0 (releasing at T0), else one outer step with K SGD minibatches beside it."""
        if self.lp is None:
            block_step(self.s, rng.standard_normal((self.R, 1, self.d)), self.cs, self.bs)
            self.now += 1
            if self.now == self.T0:
                self.release(rng)
            return
        K = self.method.K
        for _ in range(K):
            block_step(self.s, rng.standard_normal((self.R, 1, self.d)), self.cs, self.bs)
        block_step(self.lp, rng.standard_normal((self.R, K, self.d)), self.c, self.method)
        self.now += K

    def record(self, i: int) -> None:
        local, cs, c, lp = self.local, self.cs, self.c, self.lp
        local["sgd"][:, i] = _excess(cs, self.s.theta - cs.wstar)
        if lp is None:
            local["latephase_mean"][:, i] = local["latephase_members"][:, i] = local["sgd"][:, i]
        else:
            local["latephase_mean"][:, i] = _excess(c, mean_model(lp, c) - c.wstar)
            local["latephase_members"][:, i] = _excess(c, members(lp, c) - c.wstar).mean(axis=-1)

    def result(self):
        from .montecarlo import DivergedError

        if not all(np.all(np.isfinite(v)) for v in self.local.values()):
            raise DivergedError("simulation diverged (non-finite loss); lower the learning rates or the noise")
        return self.local, None
