"""The balance of the multiplicative model: a slow variable, and the value that the minibatch noise selects.

Per coordinate the members are w_k = theta phi_k. Gradient flow conserves the balance

    Q = theta^2 / (gamma_theta eta_theta) - sum_k phi_k^2 / eta_phi                                      (B1)

(units: weight / learning rate). One literal step of plain SGD changes it by exactly

    Delta Q = gamma_theta eta_theta (sum_k phi_k g_k)^2 - eta_phi theta^2 sum_k g_k^2,  g_k = h (theta phi_k - c_k). (B2)

With momentum mu (torch convention; theta's buffer v_theta, member k's buffer u_k) the same role is played by

    Q~ = Q - c P,  P = theta v_theta / gamma_theta - sum_k phi_k u_k,  c = 2 mu/(1 - mu) (heavy ball), 2 mu^2/(1 - mu) (Nesterov),

whose change in one step is, exactly (plain SGD: c = 0 and this is (B2)),

    Delta Q~ = eta_theta/gamma_theta (D_theta^2 + c D_theta v_theta') - eta_phi sum_k (D_k^2 + c D_k u_k')            (B3)

with the update directions D = -(x' - x)/eta of theta and of each phi_k and the new buffers v_theta', u_k'.
Delta Q~ is quadratic in the gradients, so noise-free steps at the optimum leave it unchanged and Q~ is a slow
variable: the fast modes equilibrate around the point of the optimum manifold theta phi_k = w* that has the same
balance, and Q~ drifts by E[Delta Q~] per outer step. On that manifold we label points by

    b = theta^2 / |w*|   (theta = sign(w*) sqrt(b |w*|), phi_k = sqrt(|w*| / b)),   Q(b) = |w*| (b/(gamma_theta eta_theta) - K/(eta_phi b)).

Linearised at b, the members follow the additive model with the rates eta_theta' = eta_theta |w*| / b and
eta_phi' = eta_phi |w*| b, and the drift (B3) evaluated with its stationary second moments is, per outer step,

    E[Delta Q~](b) = K h^2 s [gamma_theta eta_theta' q(a_m) - eta_phi' (q(a_m)/K + (1 - 1/K) q(a_phi))],         (B4)
    a_m = h (eta_phi' + K gamma_theta eta_theta'),  a_phi = h eta_phi',

with q(a, mu) of :func:`nqp.closed_form.drift_moment` (plain SGD: q = 2/(2 - a)). The noise selects the balance b*
where (B4) vanishes. To leading order in the steps (q = q(0)) this is gamma_theta eta_theta' = eta_phi', i.e.

    b*_0 = sqrt(gamma_theta eta_theta / eta_phi),                                                            (B5)

for every momentum; (B4) gives the finite-step value (K = 1: b*_0 is exact). In x = h |w*| eta_phi' (= a_phi) and
kappa = K gamma_theta eta_theta eta_phi (h w*)^2, (B4) has the sign of -G(x) with

    G(x) = q(a_m) (x^2 - kappa)/K + (1 - 1/K) x^2 q(x),   a_m = x + kappa/x,

so where q is positive and increasing below the stability edge (plain SGD and heavy ball; not always Nesterov) G
increases on (0, sqrt(kappa)) and is positive beyond: the drift has exactly one stable root, below sqrt(K) b*_0
(x = sqrt(kappa)). The balance relaxes to b* with the rate lambda = -dE[Delta Q~]/dQ at b* per outer step (relaxation time
K / lambda minibatches), and after a release it follows the adiabatic ODE

    dQ/dt = E[Delta Q~](b(Q)) / K        (t in minibatches).                                                  (B6)

Two paths, as elsewhere in the package: "closed" evaluates (B4) from the generated closed forms; "lyapunov" reads the
linearisation off the literal step at b (complex step, :mod:`nqp.linear`), solves the Lyapunov equation and evaluates
(B3) with the stationary moments of the step's increments. gamma_theta eta_theta = 0 freezes theta: the balance
then stays where it was released, and the model is linear in phi.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import closed_form as cf
from .errors import NQPError, UnstableError
from .methods import LatePhase


def _check(method) -> None:
    if not (isinstance(method, LatePhase) and method.kind == "multiplicative"):
        raise NQPError("the balance is defined for the multiplicative late-phase model")


def frozen(method) -> bool:
    """True when theta does not move (gamma_theta eta_theta = 0): then the balance never changes."""
    return method.gamma_theta * method.lr_theta == 0


def coupling(method) -> float:
    """c of Q~ = Q - c P: 0 (plain SGD), 2 mu/(1 - mu) (heavy ball), 2 mu^2/(1 - mu) (Nesterov)."""
    mu = method.momentum
    if not mu:
        return 0.0
    return 2 * mu ** 2 / (1 - mu) if method.nesterov else 2 * mu / (1 - mu)


# ----------------------------------------------------------------------------- the balance quantity

def quantity(state, method) -> np.ndarray:
    """Q~ of (B1)/(B3) for a late-phase state, shape (..., d) (units: weight / learning rate)."""
    _check(method)
    if frozen(method):
        raise NQPError("the balance quantity needs gamma_theta * lr_theta > 0 (theta moves)")
    gl = method.gamma_theta * method.lr_theta
    Q = state.theta ** 2 / gl - np.sum(state.phi ** 2, axis=-2) / method.lr_phi
    if method.momentum:
        P = state.theta * state.v_theta / method.gamma_theta - np.sum(state.phi * state.v_phi, axis=-2)
        Q = Q - coupling(method) * P
    return Q


def manifold_quantity(b, problem, method) -> np.ndarray:
    """Q(b) = |w*| (b/(gamma_theta eta_theta) - K/(eta_phi b)) at the manifold point with balance b."""
    w = np.abs(problem.optimum)
    b = np.asarray(b, float)
    return w * (b / (method.gamma_theta * method.lr_theta) - method.K / (method.lr_phi * b))


def balance_of(Q, problem, method) -> np.ndarray:
    """The balance b > 0 of the manifold point with Q(b) = Q: the positive root of
    b^2/(gamma_theta eta_theta) - (Q/|w*|) b - K/eta_phi = 0 (dimensionless)."""
    gl = method.gamma_theta * method.lr_theta
    q = np.asarray(Q, float) / np.abs(problem.optimum)
    disc = np.sqrt(q * q + 4 * method.K / (gl * method.lr_phi))
    # the two forms of the root avoid cancellation for either sign of q
    return np.where(q >= 0, 0.5 * gl * (q + disc), 2 * method.K / (method.lr_phi * (disc - q)))


def effective_rates(problem, method, b):
    """(eta_theta', eta_phi') = (eta_theta |w*| / b, eta_phi |w*| b): the additive model's rates at balance b."""
    w = np.abs(problem.optimum)
    b = np.asarray(b, float)
    return method.lr_theta * w / b, method.lr_phi * w * b


def leading_order(method) -> float:
    """b*_0 = sqrt(gamma_theta eta_theta / eta_phi) of (B5) (dimensionless)."""
    return float(np.sqrt(method.gamma_theta * method.lr_theta / method.lr_phi))


def _interval(problem, method):
    """(b_lo, b_hi) of stable balances and the discriminant (no stable balance where it is <= 0); arrays broadcast."""
    edge = cf.stability_edge(method.momentum, method.nesterov)
    kgl = method.K * method.gamma_theta * method.lr_theta
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        E = edge / (problem.curvature * np.abs(problem.optimum))
        disc = E * E - 4 * method.lr_phi * kgl
        root = np.sqrt(np.where(disc > 0, disc, np.nan))
        lo = np.where(kgl > 0, 2 * kgl / (E + root), 0.0)
        hi = (E + root) / (2 * method.lr_phi)
    return lo, hi, disc, edge


def stable_interval(problem, method):
    """(b_lo, b_hi) per coordinate: the balances at which the linearised dynamics are stable,
    a_m = h |w*| (eta_phi b + K gamma_theta eta_theta / b) < edge (this also bounds a_phi). Raises UnstableError
    when no balance is stable: 2 h |w*| sqrt(K gamma_theta eta_theta eta_phi) >= edge."""
    lo, hi, disc, edge = _interval(problem, method)
    if np.any(disc <= 0):
        i = int(np.argmin(disc))
        h = problem.curvature[i] * abs(problem.optimum[i])
        value = 2 * h * np.sqrt(method.K * method.gamma_theta * method.lr_theta * method.lr_phi)
        raise UnstableError(f"unstable at every balance of theta and phi: 2 h |w*| sqrt(K*gamma_theta*lr_theta*lr_phi) "
                            f"= {value:.6g} must be < {edge:.6g} (coordinate {i}); lower the learning rate(s)")
    return lo, hi


# ----------------------------------------------------------------------------- the drift (B3)/(B4)

def drift(problem, method, b, path: str = "closed") -> np.ndarray:
    """E[Delta Q~] per outer step at balance b (one value or one per coordinate), shape (d,), in units of Q:
    (B4) for path "closed", (B3) with the Lyapunov moments of the literal step for path "lyapunov"."""
    _check(method)
    b = np.broadcast_to(np.asarray(b, float), problem.curvature.shape)
    if path == "closed":
        return _drift_closed(problem, method, b)
    if path == "lyapunov":
        return _drift_lyapunov(problem, method, b)
    raise NQPError(f"path must be 'closed' or 'lyapunov', got {path!r}")


def _drift_closed(problem, method, b, slope: bool = False):
    """(B4), or with slope=True its derivative with respect to log b (same units)."""
    value, d = _Drift.of(problem, method)(b, with_slope=slope)
    return d if slope else value


class _Drift(NamedTuple):
    """(B4) as a function of the balance b alone (arrays broadcast; the rates of :func:`effective_rates` folded in):

        E[Delta Q~](b) = (u/b) q(a_m) - v b (q(a_m)/K + (1 - 1/K) q(a_p)),   a_p = A b,   a_m = A b + C/b,

    u = K h^2 s gamma_theta eta_theta |w*|, v = K h^2 s eta_phi |w*|, A = h |w*| eta_phi, C = K gamma_theta eta_theta
    h |w*|. Its slope in log b follows from d a_p = a_p, d a_m = A b - C/b."""

    u: np.ndarray
    v: np.ndarray
    A: np.ndarray
    C: np.ndarray
    K: np.ndarray
    momentum: float
    nesterov: bool

    @classmethod
    def of(cls, problem, method) -> _Drift:
        h, s, w = problem.curvature, problem.noise, np.abs(problem.optimum)
        K, gl = method.K, method.gamma_theta * method.lr_theta
        with np.errstate(over="ignore"):
            scale = K * h * h * s * w
            return cls(scale * gl, scale * method.lr_phi, h * w * method.lr_phi, K * gl * h * w, K,
                       method.momentum, method.nesterov)

    def take(self, idx) -> _Drift:
        """The elements idx of flat (equal-shaped) arrays."""
        return self._replace(**{k: getattr(self, k)[idx] for k in ("u", "v", "A", "C", "K")})

    def __call__(self, b, with_slope: bool = True):
        """(E[Delta Q~](b), its derivative in log b); the derivative is None without with_slope."""
        mu, nest, K = self.momentum, self.nesterov, self.K
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            Ab, Cb = self.A * b, self.C / b
            a_m = Ab + Cb
            q_m, q_p = cf.drift_moment(a_m, mu, nest), cf.drift_moment(Ab, mu, nest)
            theta, members = self.u / b, self.v * b
            share = q_m / K + (1 - 1 / K) * q_p
            value = theta * q_m - members * share
            if not with_slope:
                return value, None
            da_m = Ab - Cb                                      # d a_m / d log b (d a_p / d log b = a_p)
            dq_m, dq_p = cf.drift_moment(a_m, mu, nest, slope=True), cf.drift_moment(Ab, mu, nest, slope=True)
            return value, (theta * (dq_m * da_m - q_m) - members * share
                           - members * (dq_m * da_m / K + (1 - 1 / K) * dq_p * Ab))


def _drift_lyapunov(problem, method, b):
    """(B3) with the stationary moments of the literal step linearised at b: with z' = A z + B xi,
    Var(z' - z) = (A - I) Sigma (A - I)^T + B B^T and Cov(z' - z, z') = (A - I) Sigma A^T + B B^T."""
    from . import linear

    st = linear.stationary(problem, method, balance=b)
    A, B = st.system.A, st.system.B
    S = st.sigma
    eye = np.eye(A.shape[-1])
    AmI = A - eye
    BB = B @ np.swapaxes(B, -1, -2)
    var_inc = AmI @ S @ np.swapaxes(AmI, -1, -2) + BB
    cov_inc_next = AmI @ S @ np.swapaxes(A, -1, -2) + BB
    K, et, ep, g = method.K, method.lr_theta, method.lr_phi, method.gamma_theta
    c = coupling(method)
    th = var_inc[:, 0, 0] / et ** 2
    mem = np.einsum("dkk->d", var_inc[:, 1:K + 1, 1:K + 1]) / ep ** 2
    if c:
        th = th - c * cov_inc_next[:, 0, K + 1] / et
        mem = mem - c * np.einsum("dkk->d", cov_inc_next[:, 1:K + 1, K + 2:2 * K + 2]) / ep
    return et / g * th - ep * mem


def _dq_dlogb(problem, method, b):
    """dQ/d log b = |w*| (b/(gamma_theta eta_theta) + K/(eta_phi b)) on the manifold."""
    w = np.abs(problem.optimum)
    return w * (b / (method.gamma_theta * method.lr_theta) + method.K / (method.lr_phi * b))


def _slope(problem, method, b, path):
    if path == "closed":
        return _drift_closed(problem, method, b, slope=True)
    step = 1e-5   # central difference in log b (relative error ~1e-10)
    return (drift(problem, method, b * np.exp(step), path) - drift(problem, method, b * np.exp(-step), path)) / (2 * step)


# ----------------------------------------------------------------------------- the selected balance

@dataclass
class Balance:
    """The noise-selected balance b* = theta^2/|w*| per coordinate (dimensionless) and its relaxation.

    relaxation_steps: 1/lambda (outer steps), lambda = -dE[Delta Q~]/dQ at b*; infinite where the coordinate has no
    noise or theta is frozen (the balance then stays at `release`). leading_order: (B5)."""

    selected: np.ndarray
    release: np.ndarray
    leading_order: float
    relaxation_steps: np.ndarray
    K: int
    frozen: bool
    path: str

    @property
    def relaxation_minibatches(self) -> np.ndarray:
        """Relaxation time of the balance in minibatches, per coordinate (K minibatches per outer step)."""
        return self.K * self.relaxation_steps

    def summary(self) -> dict:
        """JSON-ready summary: the selected balance (min, median, max over coordinates), its leading order, and
        the slowest relaxation time in minibatches (None when the balance never moves)."""
        tau = self.relaxation_minibatches
        finite = tau[np.isfinite(tau)]
        b = self.selected
        return {"definition": "b = theta^2/|w*| at the point of theta*phi_k = w* around which the members fluctuate",
                "selected": {"min": float(b.min()), "median": float(np.median(b)), "max": float(b.max())},
                "leading_order": self.leading_order,
                "release": float(np.median(self.release)),
                "frozen": self.frozen,
                "path": self.path,
                "relaxation_minibatches": float(finite.max()) if finite.size else None}


def _bracketed_root(f, lo, hi):
    """Vectorised root of f in (lo, hi), with f > 0 towards lo and f < 0 towards hi; the ends are never evaluated
    (f may be infinite there). Bisection until both ends have finite values and the bracket is narrow, then the
    Illinois variant of regula falsi (superlinear, the bracket always holds the root), until the brackets reach
    adjacent floating-point numbers or f vanishes."""
    lo, hi = lo.copy(), hi.copy()
    f_lo = np.full(lo.shape, np.inf)
    f_hi = np.full(hi.shape, -np.inf)
    side = np.zeros(lo.shape, int)          # which end moved last (+1 lo, -1 hi), for the Illinois halving
    done = lo >= hi
    for it in range(300):
        finite = np.isfinite(f_lo) & np.isfinite(f_hi)
        mid = 0.5 * (lo + hi)
        with np.errstate(invalid="ignore", divide="ignore"):
            falsi = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        use = finite & (it >= 8) & (falsi > lo) & (falsi < hi)
        x = np.where(use, falsi, mid)
        done |= (x <= lo) | (x >= hi)
        if np.all(done):
            break
        fx = f(np.where(done, lo, x))
        done |= fx == 0
        right = (fx > 0) & ~done
        left = (fx < 0) & ~done
        # Illinois: halve the stale end's value when the same end moves twice in a row
        f_hi = np.where(right & (side == 1) & use, 0.5 * f_hi, f_hi)
        f_lo = np.where(left & (side == -1) & use, 0.5 * f_lo, f_lo)
        lo = np.where(right, x, lo)
        f_lo = np.where(right, fx, f_lo)
        hi = np.where(left, x, hi)
        f_hi = np.where(left, fx, f_hi)
        side = np.where(right, 1, np.where(left, -1, side))
        lo = np.where(fx == 0, x, lo)
        hi = np.where(fx == 0, x, hi)
    return np.where(f_lo == 0, lo, np.where(f_hi == 0, hi, 0.5 * (lo + hi)))


def _root(f, beta_lo, beta_hi, beta_rel, noisy):
    """The root of the drift f(beta) that the balance reaches from beta_rel: bisection on the side towards which
    the drift points (the drift is +inf / -inf at the lower / upper stability edge). Where the drift vanishes at the
    release or there is no noise, beta_rel."""
    sign0 = np.sign(f(beta_rel))
    up = sign0 > 0                         # the drift pushes b up: the root lies in (release, b_hi)
    still = (sign0 == 0) | ~noisy          # no drift: the balance stays at the release (empty bracket)
    return _bracketed_root(f, np.where(up | still, beta_rel, beta_lo), np.where(up & ~still, beta_hi, beta_rel))


def select(problem, method, path: str = "closed", release=1.0) -> Balance:
    """Solve E[Delta Q~](b) = 0 (B4) per coordinate, on the side of the release balance towards which the drift
    points (the root that the balance reaches from the release), and the relaxation time there."""
    _check(method)
    d = problem.dim
    rel = np.broadcast_to(np.asarray(release, float), (d,)).copy()
    lead = leading_order(method)
    if frozen(method):
        return Balance(rel, rel, lead, np.full(d, np.inf), method.K, True, path)
    lo, hi = stable_interval(problem, method)
    with np.errstate(divide="ignore"):
        beta_lo, beta_hi, beta_rel = np.log(lo), np.log(hi), np.log(rel)
    if np.any(beta_rel <= beta_lo) or np.any(beta_rel >= beta_hi):
        raise UnstableError("unstable at the release balance; lower the learning rate(s)")
    noisy = problem.noise > 0
    beta = _root(lambda x: drift(problem, method, np.exp(x), path), beta_lo, beta_hi, beta_rel, noisy)
    b = np.exp(beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = -_slope(problem, method, b, path) / _dq_dlogb(problem, method, b)
        tau = np.where(noisy & (lam > 0), 1.0 / lam, np.inf)
    return Balance(b, rel, lead, tau, method.K, False, path)


def _newton_root(f_and_slope, lo, hi, x0, max_iter: int = 100):
    """Root of f in the flat bracket (lo, hi) (f > 0 towards lo, f < 0 towards hi), from x0, by Newton's method on
    the analytic slope, safeguarded: a step that leaves the bracket or a slope of the wrong sign bisects instead.
    f_and_slope(x, idx) evaluates f and df/dx at x for the elements idx only, so every pass works on the elements
    still moving (a few passes each, against the dozens of a derivative-free bracketing). Stops where the step is
    below 1e-12 of the scale (Newton then has the root to rounding) or f vanishes; lo >= hi gives lo."""
    lo, hi = lo.copy(), hi.copy()
    x = np.where((x0 > lo) & (x0 < hi), x0, 0.5 * (lo + hi))
    x = np.where(lo < hi, x, lo)
    idx = slice(None)        # the first pass on every element: a gather would cost as much as the pass
    for _ in range(max_iter):
        xi, li, hi_ = x[idx], lo[idx], hi[idx]
        f, df = f_and_slope(xi, idx)
        li = np.where(f > 0, xi, li)
        hi_ = np.where(f < 0, xi, hi_)
        with np.errstate(all="ignore"):
            step = f / df
            tol = 1e-12 * (1.0 + np.abs(xi))
        newton = xi - step
        inside = (newton > li) & (newton < hi_) & (df < 0)
        done = (f == 0) | (np.abs(step) <= tol) & (df < 0) | (hi_ - li <= tol)
        new = np.where(inside, newton, np.where(done, xi, 0.5 * (li + hi_)))
        lo[idx], hi[idx], x[idx] = li, hi_, new
        idx = np.flatnonzero(~done) if isinstance(idx, slice) else idx[~done]
        if idx.size == 0:
            break
    return x


def select_grid(problem, K, gamma_theta, lr_theta, lr_phi, momentum: float = 0.0, nesterov: bool = False):
    """The closed-form b* from the balanced start (b = 1) for many settings at once: K, gamma_theta, lr_theta, lr_phi
    arrays of shape (P, 1) (broadcast against the d coordinates), one momentum. Returns b* of shape (P, d): NaN where
    the release b = 1 is unstable; 1 where theta is frozen (gamma_theta lr_theta = 0) or a coordinate has no noise.
    The same root as :func:`select` per setting (the side of b = 1 towards which the drift points), found by
    safeguarded Newton steps from the leading order (B5) on all settings and coordinates at once."""
    from types import SimpleNamespace

    h, s, w = (np.asarray(a, float)[None, :] for a in (problem.curvature, problem.noise, problem.optimum))
    K, g, et, ep = (np.asarray(a, float) for a in (K, gamma_theta, lr_theta, lr_phi))
    moving = (g * et) > 0
    # frozen settings get stand-in rates (their balance stays 1); they are restored below
    g, et = np.where(moving, g, 1.0), np.where(moving, et, 1e-300)
    meth = SimpleNamespace(K=K, gamma_theta=g, lr_theta=et, lr_phi=ep, momentum=momentum, nesterov=nesterov)
    lo, hi, disc, edge = _interval(SimpleNamespace(curvature=h, optimum=w), meth)
    shape = np.broadcast_shapes(h.shape, K.shape, disc.shape)
    a_release = h * np.abs(w) * (ep + K * g * et)        # the release at b = 1 must be stable
    ok = np.broadcast_to((disc > 0) & (a_release < edge) & (h * np.abs(w) * ep < edge), shape).ravel()
    terms = _Drift(*(np.broadcast_to(a, shape).ravel() for a in _Drift.of(
        SimpleNamespace(curvature=h, noise=s, optimum=w), meth)[:5]), momentum, nesterov)

    def f_and_slope(beta, idx, with_slope=True):
        return terms.take(idx)(np.exp(beta), with_slope)

    with np.errstate(all="ignore"):
        beta_lo = np.where(ok, np.log(np.where(ok, np.broadcast_to(lo, shape).ravel(), 1.0)), 0.0)
        beta_hi = np.where(ok, np.log(np.where(ok, np.broadcast_to(hi, shape).ravel(), 1.0)), 0.0)
        solve = ok & np.broadcast_to((s > 0) & moving, shape).ravel()    # else b stays at the release b = 1
        start = np.broadcast_to(0.5 * np.log(g * et / ep), shape).ravel().copy()     # the leading order (B5)
        if momentum == 0 or not nesterov:
            # q(a) is positive and increasing below the edge (plain, heavy ball): (B4) has one root in the stable
            # interval (module docstring), so the side of the release needs no evaluation
            lo, hi = np.where(solve, beta_lo, 0.0), np.where(solve, beta_hi, 0.0)
        else:
            sign0 = np.where(solve, np.sign(f_and_slope(np.zeros(ok.size), slice(None), False)[0]), 0.0)
            up, down = sign0 > 0, sign0 < 0   # the drift at the release b = 1 points up / down (0: b stays at 1)
            lo, hi = np.where(down, beta_lo, 0.0), np.where(up, beta_hi, 0.0)
            # where (B5) is not inside the bracket (e.g. at the release itself), a Newton step from the release
            far = np.flatnonzero((lo < hi) & ~((start > lo) & (start < hi)))
            f0, df0 = f_and_slope(np.zeros(far.size), far)
            start[far] = -f0 / df0
        beta = _newton_root(f_and_slope, lo, hi, start)
    b = np.where(np.broadcast_to(moving, shape).ravel(), np.exp(beta), 1.0)
    return np.where(ok, b, np.nan).reshape(shape)


# ----------------------------------------------------------------------------- the adiabatic ODE (B6)

def _clenshaw(x, coef):
    """sum_j coef[j, i] T_j(x[:, i]) for every column i (Chebyshev series, Clenshaw's recurrence)."""
    b1 = np.zeros_like(x)
    b2 = np.zeros_like(x)
    for c in coef[:0:-1]:
        b1, b2 = 2 * x * b1 - b2 + c[None, :], b1
    return x * b1 - b2 + coef[0][None, :]


@dataclass
class Trajectory:
    """b(t) under the adiabatic ODE (B6) from the release, per coordinate; call it with times t (minibatches after
    the release) to get an array of shape (len(t), d). Built by :func:`ode`."""

    b0: np.ndarray
    bstar: np.ndarray
    moving: np.ndarray            # coordinates whose balance moves (noise > 0, b0 != b*)
    times: np.ndarray             # (J, d): t at the grid points of u
    u: np.ndarray                 # (J, d): log |log b - log b*|
    sign: np.ndarray
    rate: np.ndarray              # (J, d): dt/du (minibatches per unit of u, > 0 as u decreases)

    def __call__(self, t) -> np.ndarray:
        """Cubic Hermite interpolation of u(t) between the grid points (slopes du/dt = -1/rate)."""
        t = np.atleast_1d(np.asarray(t, float))
        out = np.broadcast_to(self.b0, (len(t), self.b0.size)).copy()
        beta_s = np.log(self.bstar)
        for i in np.flatnonzero(self.moving):
            T, U, S = self.times[:, i], self.u[:, i], -1.0 / self.rate[:, i]
            j = np.clip(np.searchsorted(T, t, side="right") - 1, 0, len(T) - 2)
            dt = T[j + 1] - T[j]
            x = (t - T[j]) / dt
            h00, h10, h01, h11 = 2 * x ** 3 - 3 * x ** 2 + 1, x ** 3 - 2 * x ** 2 + x, -2 * x ** 3 + 3 * x ** 2, x ** 3 - x ** 2
            ui = h00 * U[j] + h10 * dt * S[j] + h01 * U[j + 1] + h11 * dt * S[j + 1]
            ui = np.where(t > T[-1], -np.inf, ui)
            out[:, i] = np.exp(beta_s[i] + self.sign[i] * np.exp(ui))
        return out


def ode(problem, method, b0=1.0, path: str = "closed", selected: Balance | None = None) -> Trajectory:
    """Solve (B6) from b(0) = b0 per coordinate.

    Per coordinate (B6) is autonomous: with beta = log b, dbeta/dt = E[Delta Q~](beta) / (K dQ/dbeta). Writing
    beta = beta* + sign * exp(u), the time to reach u is the integral t(u) = int K (dQ/dbeta) (beta - beta*) /
    (-E[Delta Q~]) du, whose integrand is smooth and tends to the relaxation time as beta -> beta*. The drift is
    interpolated in beta by a Chebyshev series of R = E[Delta Q~] / (beta - beta*) (48 nodes; smooth and of one sign
    between b0 and b*), the integral is taken by the trapezoid rule on a grid of step 0.01 in u over 45 e-folds,
    and u(t) is interpolated linearly (beyond the grid b = b*)."""
    _check(method)
    d = problem.dim
    b0 = np.broadcast_to(np.asarray(b0, float), (d,)).copy()
    empty = np.zeros((2, d))
    if frozen(method):
        return Trajectory(b0, b0, np.zeros(d, bool), empty, empty, np.ones(d), empty + 1)
    sel = selected if selected is not None else select(problem, method, path, release=b0)
    bstar = np.where(problem.noise > 0, sel.selected, b0)
    beta0, beta_s = np.log(b0), np.log(bstar)
    delta = beta0 - beta_s
    moving = (problem.noise > 0) & (np.abs(delta) > 1e-15 * np.maximum(1.0, np.abs(beta_s)))
    if not moving.any():
        return Trajectory(bstar, bstar, moving, empty, empty, np.ones(d), empty + 1)
    n_cheb = 48
    x = np.cos(np.pi * (np.arange(n_cheb) + 0.5) / n_cheb)                  # Chebyshev-Gauss nodes in (-1, 1)
    mid, half = 0.5 * (beta0 + beta_s), 0.5 * delta
    nodes = mid[None, :] + half[None, :] * x[:, None]                       # (n_cheb, d)
    D = np.stack([drift(problem, method, np.exp(nodes[j]), path) for j in range(n_cheb)])
    with np.errstate(divide="ignore", invalid="ignore"):
        R = D / (nodes - beta_s[None, :])
    R = np.where(moving[None, :], R, -1.0)
    coef = np.polynomial.chebyshev.chebfit(x, R, n_cheb - 1)                 # (n_cheb, d)
    u0 = np.log(np.abs(np.where(moving, delta, 1.0)))
    du = 0.01
    u = u0[None, :] - du * np.arange(int(45 / du) + 1)[:, None]
    sign = np.where(delta < 0, -1.0, 1.0)
    beta = beta_s[None, :] + sign[None, :] * np.exp(u)
    xs = (beta - mid[None, :]) / np.where(half == 0, 1.0, half)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        integrand = -method.K * _dq_dlogb(problem, method, np.exp(beta)) / _clenshaw(xs, coef)
    integrand = np.where(moving[None, :], integrand, 1.0)
    # trapezoid rule with the Euler-Maclaurin end correction (fourth order in du)
    trap = np.concatenate([np.zeros((1, d)), np.cumsum(0.5 * du * (integrand[1:] + integrand[:-1]), axis=0)])
    slope = np.gradient(integrand, -du, axis=0, edge_order=2)              # d(integrand)/du
    times = trap + du ** 2 / 12 * (slope - slope[:1])
    return Trajectory(b0, bstar, moving, times, u, sign, integrand)


def trajectory(problem, method, t, b0=1.0, path: str = "closed", selected: Balance | None = None) -> np.ndarray:
    """b(t) under (B6) at times t (minibatches after the release), shape (len(t), d): :func:`ode` evaluated."""
    return ode(problem, method, b0, path, selected)(t)
