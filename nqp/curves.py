"""Expected excess loss as a function of time t (minibatches), with the switch to late-phase at T0.

Protocol. Every run starts at w = w0 (deterministic) and trains with `sgd` until t = T0. At T0 the
late-phase weights are released (:func:`nqp.dynamics.release`: members are copies of the SGD iterate,
phi_k perturbed by N(0, sigma0^2)), and one outer step consumes K minibatches from then on.
Baselines on the same clock: SGD continuing; SGD with a K-times batch from T0 (one step per K
minibatches); an ensemble of K independent SGD runs started at w0, each having taken floor(t/K) steps;
and, with swa_start, the running average of the mean model from swa_start on (tail averaging).

Exact moments are propagated per step (:func:`nqp.linear.moments_at`):
- path "closed": the reduction of :mod:`nqp.closed_form` -- the mean model is SGD with
  eta_eff = eta_phi + K gamma_theta eta_theta and noise s/K, each member's deviation SGD with eta_phi and
  noise s (1 - 1/K); each is a 1- or 2-state system per coordinate.
- path "lyapunov": the full (theta, phi_1..K, buffers) system read off the literal step.
For the multiplicative model both are its small-noise linearisation about the optimum manifold theta phi_k = w*
(valid while w stays near w*; before T0 the SGD phase is exact). By default (balance="ode") the fast modes are
linearised at the balance b(t) = theta^2/|w*| that follows the adiabatic ODE of :mod:`nqp.balance` from its release
value: exact in the limit of small noise at fixed s (t - T0). The moments are then propagated over segments of steps
with b fixed at its mid-segment value (segments short enough that log b changes by at most 2e-3 in each); in the
Lyapunov path the state is carried between segments in the coordinates that do not depend on b (member weights and
buffers). balance="release" keeps b at its release value (the short-time lines, t - T0 << the relaxation time).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from . import balance as bal
from . import linear
from .errors import NQPError, overflow
from .methods import SGD, Block, LatePhase
from .problem import Problem
from .theory import check_stable


@dataclass
class Curve:
    """Expected excess loss (loss units, summed over coordinates) at times t (minibatches)."""

    t: np.ndarray
    series: dict
    T0: int
    K: int
    path: str
    stderr: dict = field(default_factory=dict)
    balance: np.ndarray | None = None     # (len(t), d): multiplicative b(t) = theta^2/|w*| (NaN before T0)
    balance_stderr: np.ndarray | None = None   # Monte Carlo: standard error of `balance`

    def to_dict(self) -> dict:
        out = {"t": self.t.tolist(), "T0": self.T0, "K": self.K, "path": self.path,
               "series": {k: v.tolist() for k, v in self.series.items()}}
        if self.stderr:
            out["stderr"] = {k: v.tolist() for k, v in self.stderr.items()}
        if self.balance is not None:
            b = self.balance
            with np.errstate(invalid="ignore"):
                out["balance"] = {"definition": "b = theta^2/|w*| per coordinate (null before T0)",
                                  "median": np.median(b, axis=1).tolist(), "min": b.min(axis=1).tolist(),
                                  "max": b.max(axis=1).tolist()}
        return out


def time_grid(T0: int, horizon: int, K: int, points: int = 200) -> np.ndarray:
    """About `points` evaluation times in [0, horizon]: any integer before T0, T0 + K n after it."""
    if int(T0) != T0 or T0 < 0:
        raise NQPError(f"`T0` must be a non-negative integer number of minibatches, got {T0}")
    if int(horizon) != horizon or horizon <= T0:
        raise NQPError(f"`horizon` ({horizon}) must be an integer > `T0` ({T0})")
    if horizon < T0 + K:  # else the curve would end before the first late-phase outer step (K minibatches)
        raise NQPError(f"`horizon` ({horizon}) must reach at least one outer step past `T0`: >= {T0 + K} (T0 + K)")
    if points < 2:
        raise NQPError(f"`points` must be >= 2, got {points}")
    raw = np.linspace(0, horizon, int(points))
    pre = np.round(raw[raw < T0]).astype(int)
    post = T0 + K * np.round((raw[raw >= T0] - T0) / K).astype(int)
    return np.unique(np.concatenate([pre, [T0], post[post <= horizon]]))


def start_weights(w0, dim: int) -> np.ndarray:
    """The start w_0 (one value broadcasts, or one per coordinate), checked finite."""
    w = np.asarray(w0, float).reshape(-1)
    if w.size not in (1, dim):
        raise NQPError(f"`w0` takes one value or one per coordinate ({dim}), got {w.size}")
    if not np.all(np.isfinite(w)):
        raise NQPError("`w0` must be finite")
    return np.broadcast_to(w if w.size == dim else w[0], (dim,))


def _observe(h, C, mean, cov):
    """E = 1/2 sum_i h_i (E[C z]^2 + Var[C z]) for C of shape (d, n), moments (T, d, n), (T, d, n, n)."""
    m = np.einsum("dn,tdn->td", C, mean)
    v = np.einsum("dn,tdnp,dp->td", C, cov, C)
    return 0.5 * ((m ** 2 + v) * h).sum(axis=1)


def _sgd_system(problem: Problem, sgd: SGD, curvature_scale=1.0, noise_scale=1.0):
    """(A, B) of SGD on the rescaled problem (lr h -> lr h scale, s -> s noise_scale)."""
    sub = Problem(problem.curvature * curvature_scale, problem.noise * noise_scale, problem.optimum)
    sys = linear.linearize(sub, sgd)
    return sys.A, sys.B


def _with_sum(A, B, C, mean, cov):
    """Augment (A, B) and the moments with a running sum of C z (initially zero)."""
    Aa, Ba = linear.augment_running_sum(A, B, C)
    d, n = mean.shape
    m = np.concatenate([mean, np.zeros((d, 1))], axis=1)
    c = np.zeros((d, n + 1, n + 1))
    c[:, :n, :n] = cov
    return Aa, Ba, m, c


def _buffer_block(h, rates, momentum: float, nesterov: bool, noise):
    """(A, B) per coordinate of x - w* moved by several optimizers on the same gradient g = h (x - sqrt(noise) xi),
    each with its own per-coordinate step R_j and buffer b_j (gradient units; torch convention):
    b_j' = mu b_j + g; x' = x - sum_j R_j b_j' (heavy ball), x - sum_j R_j (g + mu b_j') (Nesterov),
    x - (sum_j R_j) g (plain SGD, no buffers). State (x, b_1, ..); one buffer is SGD (nqp.closed_form.sgd_matrices),
    two are the additive late-phase mean model with theta's and the members' mean buffer."""
    R = np.stack([np.broadcast_to(r, h.shape) for r in rates], axis=-1)        # (d, m)
    tot = R.sum(axis=-1)
    sq = np.sqrt(noise) * h
    d, m = R.shape
    if not momentum:
        return (1 - tot * h)[:, None, None], (tot * sq)[:, None, None]
    mu = momentum
    A = np.zeros((d, m + 1, m + 1))
    B = np.zeros((d, m + 1, 1))
    lead = 1 + mu if nesterov else 1.0
    A[:, 0, 0] = 1 - lead * tot * h
    A[:, 0, 1:] = -(mu ** 2 if nesterov else mu) * R
    B[:, 0, 0] = lead * tot * sq
    A[:, 1:, 0] = h[:, None]
    A[:, np.arange(1, m + 1), np.arange(1, m + 1)] = mu
    B[:, 1:, 0] = -sq[:, None]
    return A, B


def _segments(problem, method, b0, steps_post, sel, delta=2e-3):
    """Segment boundaries (outer steps after the release, sorted, containing every step of `steps_post`) such that
    log b of the closed-form ODE changes by at most `delta` within a segment, for every coordinate. Candidates:
    the observation steps and 256 geometric steps per decade."""
    last = int(steps_post[-1])
    need = set(int(x) for x in steps_post) | {0}
    cand = np.unique(np.concatenate([np.fromiter(need, int), np.round(np.geomspace(1, max(last, 1), 1 + int(
        256 * np.log10(max(last, 10))))).astype(int)]))
    cand = cand[cand <= last]
    beta = np.log(bal.ode(problem, method, b0, "closed", sel)(cand * method.K))
    bounds = [0]
    for j in range(1, len(cand)):
        c = int(cand[j])
        if c in need:
            bounds.append(c)
        elif np.abs(beta[j] - beta[np.searchsorted(cand, bounds[-1])]).max() > delta:
            prev = int(cand[j - 1])
            bounds.append(prev if prev > bounds[-1] else c)
    return np.unique(np.asarray(bounds, int))


def _propagate(systems, mean0, cov0, bounds, obs, sum_C=None, sum_from=None):
    """Moments of z (shape (d, n)) over the segments [bounds[j], bounds[j+1]) with (A_j, B_j) = systems(j): the
    state keeps its meaning from one segment to the next (units that do not depend on the balance). With sum_C, a
    running sum S of sum_C z over the steps after `sum_from` (a boundary) is appended to the state. Returns the means
    and covariances at the steps `obs` (each a boundary)."""
    mean, cov = mean0, cov0
    out_m, out_c = {}, {}
    obs_set = set(int(x) for x in obs)
    summing = False

    def record(k):
        if k in obs_set:
            out_m[k], out_c[k] = mean, cov

    if sum_C is not None and sum_from == bounds[0]:
        mean, cov, summing = _append_sum(mean, cov)
    record(int(bounds[0]))
    for j in range(len(bounds) - 1):
        A, B = systems(j)
        if summing:
            A, B = linear.augment_running_sum(A, B, sum_C)
        n = int(bounds[j + 1] - bounds[j])
        Ak, Qk = linear._power(A, B @ np.swapaxes(B, -1, -2), n)
        mean = np.einsum("dij,dj->di", Ak, mean)
        cov = Ak @ cov @ np.swapaxes(Ak, -1, -2) + Qk
        if sum_C is not None and not summing and int(bounds[j + 1]) == sum_from:
            mean, cov, summing = _append_sum(mean, cov)
        record(int(bounds[j + 1]))
    return np.stack([out_m[int(k)] for k in obs]), np.stack([out_c[int(k)] for k in obs])


def _append_sum(mean, cov):
    d, n = mean.shape
    m = np.concatenate([mean, np.zeros((d, 1))], axis=1)
    c = np.zeros((d, n + 1, n + 1))
    c[:, :n, :n] = cov
    return m, c, True


def _release_balance(problem, method, mT, sigma0):
    """The balance b0 of the optimum-manifold point with the balance Q~ of the released mean SGD state
    (theta = sign(w) sqrt|w|, phi_k = sqrt|w| + sigma0 eps_k averaged over eps, v_theta = sqrt|w| v, u_k = 0).
    Where the mean release lies on the other side of zero from w*, or b0 would be an unstable balance, the release
    is too far from w* for the linearisation, and b0 = 1 (the point about which the release is linearised)."""
    w = problem.optimum + mT[:, 0]
    Q = (np.abs(w) / (method.gamma_theta * method.lr_theta)
         - method.K * (np.abs(w) + sigma0 ** 2) / method.lr_phi)
    if method.momentum:
        Q = Q - bal.coupling(method) * w * mT[:, 1] / method.gamma_theta
    b0 = bal.balance_of(Q, problem, method)
    lo, hi = bal.stable_interval(problem, method)
    ok = (np.sign(w) == np.sign(problem.optimum)) & (b0 > lo) & (b0 < hi)
    return np.where(ok, b0, 1.0)


def _multiplicative_ode(problem, method, mT, cT, steps_post, sigma0, path, k0):
    """The late-phase series of the multiplicative model with the balance following (B6): returns
    (E_mean, E_members, E_swa or None, b at steps_post)."""
    d, K = problem.dim, method.K
    b0 = _release_balance(problem, method, mT, sigma0)
    sel_closed = bal.select(problem, method, "closed", release=b0)
    bounds = _segments(problem, method, b0, steps_post, sel_closed)
    sel = sel_closed if path == "closed" else bal.select(problem, method, path, release=b0)
    traj = bal.ode(problem, method, b0, path, sel)
    b_mid = traj(0.5 * (bounds[1:] + bounds[:-1]) * K) if len(bounds) > 1 else np.ones((0, d))
    b_obs = traj(steps_post * K)
    late = _ode_closed if path == "closed" else _ode_linearised
    e_mean, e_mem, swa = late(problem, method, mT, cT, sigma0, bounds, steps_post, b_mid)
    e_swa = None if k0 is None else _ode_tail_average(problem.curvature, swa, bounds, steps_post, k0)
    return e_mean, e_mem, e_swa, b_obs


def _ode_closed(problem, method, mT, cT, sigma0, bounds, steps_post, b_mid):
    """The closed path along the balance's segments: (E_mean, E_members, (systems, mean, cov, C) for the tail
    average)."""
    d, K, h = problem.dim, method.K, problem.curvature
    mom = bool(method.momentum)
    n_sgd = 2 if mom else 1
    w = np.abs(problem.optimum)
    # Per segment, the linearised members are the additive model with the rates eta_theta'(b), eta_phi'(b):
    # the mean block is x with theta's and the members' mean buffer (gradient units, continuous between
    # segments), the deviation block SGD with eta_phi' and noise s (1 - 1/K).
    lt_lp = [bal.effective_rates(problem, method, bm) for bm in b_mid] or [bal.effective_rates(problem, method, 1.0)]
    mu, nest = method.momentum, method.nesterov

    def sys_m(j):
        lt, lp = lt_lp[j]
        return _buffer_block(h, [K * method.gamma_theta * lt, lp], mu, nest, problem.noise / K)

    def sys_d(j):
        return _buffer_block(h, [lt_lp[j][1]], mu, nest, problem.noise * (1 - 1 / K))
    n_m, n_d = (3, 2) if mom else (1, 1)
    # release: x = the SGD iterate; theta's buffer continues the SGD buffer v = gamma_theta K (gradient-unit
    # buffer of theta), the members' buffers start at zero
    Lm = np.zeros((d, n_m, n_sgd))
    Lm[:, 0, 0] = 1.0
    if mom:
        Lm[:, 1, 1] = 1.0 / (K * method.gamma_theta)
    mean_m = np.einsum("dnm,dm->dn", Lm, mT)
    cov_m = Lm @ cT @ np.swapaxes(Lm, -1, -2)
    cov_m[:, 0, 0] += w * sigma0 ** 2 / K
    cov_d = np.zeros((d, n_d, n_d))
    cov_d[:, 0, 0] = w * sigma0 ** 2 * (1 - 1 / K)
    C_m = np.zeros((d, n_m))
    C_m[:, 0] = 1.0
    mm, cm = _propagate(sys_m, mean_m, cov_m, bounds, steps_post)
    _, cd = _propagate(sys_d, np.zeros((d, n_d)), cov_d, bounds, steps_post)
    e_mean = _observe(h, C_m, mm, cm)
    e_mem = e_mean + 0.5 * (cd[..., 0, 0] * h).sum(axis=1)
    return e_mean, e_mem, (sys_m, mean_m, cov_m, C_m)


def _ode_linearised(problem, method, mT, cT, sigma0, bounds, steps_post, b_mid):
    """The Lyapunov path along the balance's segments (the literal step linearised at each segment's balance):
    (E_mean, E_members, (systems, mean, cov, C) for the tail average)."""
    d, K, h = problem.dim, method.K, problem.curvature
    mom = bool(method.momentum)
    n_sgd = 2 if mom else 1
    w = np.abs(problem.optimum)
    sys_list = {}

    def ysys(j):
        """The linearisation at b_mid[j] in the coordinates y = (x_1..x_K, buffers): A_y = M A M+, B_y = M B."""
        if j not in sys_list:
            sy = linear.linearize(problem, method, balance=b_mid[j])
            M = _y_map(sy, method, mom)
            Mp = np.swapaxes(M, -1, -2) @ np.linalg.inv(M @ np.swapaxes(M, -1, -2))
            sys_list.clear()
            sys_list[j] = (M @ sy.A @ Mp, M @ sy.B)
        return sys_list[j]
    # Release (about b = 1): x_k = x, theta's buffer sqrt|w*| v = gamma_theta K phi0 (v / (gamma_theta K)).
    ny = K + (K + 1 if mom else 0)
    R = np.zeros((d, ny, n_sgd))
    R[:, :K, 0] = 1.0
    if mom:
        R[:, K, 1] = 1.0 / (method.gamma_theta * K)
    mean_y = np.einsum("dnm,dm->dn", R, mT)
    cov_y = R @ cT @ np.swapaxes(R, -1, -2)
    cov_y[:, np.arange(K), np.arange(K)] += (w * sigma0 ** 2)[:, None]
    C_mean = np.zeros((d, ny))
    C_mean[:, :K] = 1.0 / K
    my, cy = _propagate(ysys, mean_y, cov_y, bounds, steps_post)
    e_mean = _observe(h, C_mean, my, cy)
    e_mem = np.mean([0.5 * ((my[..., k] ** 2 + cy[..., k, k]) * h).sum(axis=1) for k in range(K)], axis=0)
    return e_mean, e_mem, (ysys, mean_y, cov_y, C_mean)


def _ode_tail_average(h, swa, bounds, steps_post, k0):
    """The running average of the mean model from outer step k0 along the segments; NaN before (and at) k0."""
    systems, m0, c0, C = swa
    b2 = np.unique(np.concatenate([bounds, [k0]]))
    # the segments' systems on the boundaries refined by k0 (which splits at most one segment)
    owner = np.searchsorted(bounds, b2[:-1], side="right") - 1
    keep = steps_post >= k0
    obs = steps_post[keep]
    ms, cs = _propagate(lambda j: systems(int(owner[j])), m0, c0, b2, obs, sum_C=C, sum_from=int(k0))
    n_avg = obs - k0
    e_swa = np.full(len(steps_post), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_mean = ms[..., -1] / n_avg[:, None]
        s_var = cs[..., -1, -1] / (n_avg ** 2)[:, None]
        e_swa[keep] = 0.5 * ((s_mean ** 2 + s_var) * h).sum(axis=1)
    e_swa[keep & (steps_post == k0)] = np.nan
    return e_swa


def _y_map(sys, method, mom):
    """M: z - z0 -> y at the system's balance: the member deviations x_k = phi0 dtheta + theta0 dphi_k and the
    buffers in the units of the gradient h (x - xi), v_theta / (gamma_theta K phi0) and u_k / theta0 (the units in
    which the closed path carries them from segment to segment)."""
    K = method.K
    d, n = sys.z0.shape
    ny = K + (K + 1 if mom else 0)
    theta0, phi0 = sys.z0[:, 0], sys.z0[:, 1]
    M = np.zeros((d, ny, n))
    M[:, :K, 0] = phi0[:, None]
    M[:, np.arange(K), 1 + np.arange(K)] = theta0[:, None]
    if mom:
        M[:, K, K + 1] = 1.0 / (method.gamma_theta * K * phi0)
        M[:, K + 1 + np.arange(K), K + 2 + np.arange(K)] = (1.0 / theta0)[:, None]
    return M


def _finite(fn):
    """Run a curve computation with float overflow silenced, and refuse a curve that overflowed."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            curve = fn(*args, **kwargs)
        # (a tail-average series is NaN before its start, by design)
        if any(np.isinf(v).any() or ("swa" not in k and np.isnan(v).any()) for k, v in curve.series.items()):
            raise overflow("w0", "noise", "curvature", "optimum")
        return curve
    return run


@_finite
def learning_curve(problem: Problem, method: LatePhase, sgd: SGD, *, T0: int, horizon: int,
                   w0=0.0, sigma0: float = 0.0, points: int = 200, swa_start: int | None = None,
                   path: str = "closed", sgd_after: SGD | None = None, balance: str = "ode") -> Curve:
    """Exact expected excess loss vs t for `sgd` switching to `method` at T0, and the baselines.

    `sgd_after` (default `sgd`) is the SGD that the SGD baselines (continuing, K-times batch, tail
    average) use from T0 on, e.g. a lowered learning rate; the ensemble runs use `sgd` throughout.
    `balance` (multiplicative model): "ode" follows the balance's adiabatic ODE from the release (the default),
    "release" keeps it at the release value (lines valid for t - T0 << the relaxation time)."""
    if balance not in ("ode", "release"):
        raise NQPError(f"balance must be 'ode' or 'release', got {balance!r}")
    if isinstance(method, Block) or problem.hessian is not None or sgd.weight_decay or \
            getattr(method, "weight_decay", 0):
        from .block import learning_curve as block_curve
        if not isinstance(method, Block):
            raise NQPError(f"the curve models a full `hessian` and `weight_decay` for `method` block only, not "
                           f"{method.name}")
        if swa_start is not None or sgd_after is not None:
            raise NQPError("`swa_start` is not modelled for `method` block")
        return block_curve(problem, method, sgd, T0=T0, horizon=horizon, w0=w0, sigma0=sigma0, points=points)
    sgd_after = _check_curve(problem, method, sgd, sgd_after, path, sigma0)
    K = method.K
    t = time_grid(T0, horizon, K, points)
    if swa_start is not None and not (T0 <= swa_start < horizon and (swa_start - T0) % K == 0):
        raise NQPError(f"`swa_start` must be T0 + K n below the horizon (T0={T0}, K={K}), got {swa_start}")
    k0 = None if swa_start is None else (swa_start - T0) // K
    series, rel = _sgd_baselines(problem, sgd, sgd_after, start_weights(w0, problem.dim), t, T0, K)
    mult = method.kind == "multiplicative"
    b_curve = np.full((len(t), problem.dim), np.nan) if mult else None
    if mult:
        b_curve[rel.i0:] = 1.0
    ode = mult and balance == "ode" and not bal.frozen(method)
    if ode:
        lp_mean, lp_mem, e_swa, b_curve[rel.i0:] = _multiplicative_ode(problem, method, rel.m, rel.c, rel.steps_post,
                                                                       sigma0, path, k0)
    else:
        late = _late_closed if path == "closed" else _late_linearised
        lp_mean, lp_mem, swa = late(problem, method, sgd, rel, sigma0)
    series["latephase_mean"] = np.concatenate([series["sgd"][:rel.i0], lp_mean])
    series["latephase_members"] = np.concatenate([series["sgd"][:rel.i0], lp_mem])
    if swa_start is not None:
        runs = [("sgd_swa", (rel.A_after, rel.B_after, rel.C_x, rel.m, rel.c), K)]
        if ode:
            series["latephase_swa"] = np.full(len(t), np.nan)
            series["latephase_swa"][rel.i0:] = e_swa
        else:
            runs.insert(0, ("latephase_swa", swa, 1))
        series.update(_tail_averages(problem.curvature, runs, rel, k0, len(t)))
    label = path + (", balance ODE" if ode else (", balance fixed at the release" if mult else ""))
    return Curve(t, series, int(T0), K, label, balance=b_curve)


def _check_curve(problem, method, sgd, sgd_after, path, sigma0) -> SGD:
    """Validate the arguments of :func:`learning_curve` for the diagonal models; returns sgd_after (default sgd)."""
    if not isinstance(method, LatePhase) or not isinstance(sgd, SGD) or sgd.batch != 1:
        raise NQPError("learning_curve needs a late-phase method and a batch-1 SGD method")
    if path not in ("closed", "lyapunov"):
        raise NQPError(f"path must be 'closed' or 'lyapunov', got {path!r}")
    if sigma0 < 0 or not np.isfinite(sigma0):
        raise NQPError(f"`sigma0` must be >= 0, got {sigma0}")
    sgd_after = sgd if sgd_after is None else sgd_after
    check_stable(problem, sgd)
    check_stable(problem, sgd_after)
    check_stable(problem, method)
    if len({(m.momentum, m.nesterov) for m in (sgd, sgd_after, method)}) > 1:
        raise NQPError("SGD and the late-phase method must use the same momentum setting")
    if sgd_after.batch != 1:
        raise NQPError("sgd_after must be a batch-1 SGD method")
    return sgd_after


@dataclass
class _Release:
    """SGD's state moments at T0 (per coordinate, (x, v) or x) and what the late phase and tail averages need."""

    m: np.ndarray
    c: np.ndarray
    i0: int                   # index of T0 in the time grid
    steps_post: np.ndarray    # outer steps after T0 at the grid times from T0 on
    A_after: np.ndarray
    B_after: np.ndarray
    C_x: np.ndarray           # observes x of (x, v)
    n_sgd: int


def _sgd_baselines(problem, sgd, sgd_after, w0, t, T0, K):
    """The exact SGD phase, SGD continuing (with sgd_after from T0), the ensemble of K runs of floor(t/K) steps each
    and SGD with a K-times batch from T0; returns (series, the _Release at T0)."""
    h, d = problem.curvature, problem.dim
    n_sgd = 2 if sgd.momentum else 1
    A, B = _sgd_system(problem, sgd)
    mean0 = np.zeros((d, n_sgd))
    mean0[:, 0] = w0 - problem.optimum
    cov0 = np.zeros((d, n_sgd, n_sgd))
    ms, cs = linear.moments_at(A, B, mean0, cov0, t)
    C_x = np.zeros((d, n_sgd))
    C_x[:, 0] = 1.0
    series = {"sgd": _observe(h, C_x, ms, cs)}
    i0 = int(np.searchsorted(t, T0))
    mT, cT = ms[i0], cs[i0]
    post = t[i0:]
    steps_post = (post - T0) // K
    A_after, B_after = (A, B) if sgd_after == sgd else _sgd_system(problem, sgd_after)
    if sgd_after != sgd:
        ma, ca = linear.moments_at(A_after, B_after, mT, cT, post - T0)
        series["sgd"] = np.concatenate([series["sgd"][:i0], _observe(h, C_x, ma, ca)])
    # Ensemble of K independent runs from w0, floor(t/K) steps each.
    ts = t // K
    uts = np.unique(ts)
    me, ce = linear.moments_at(A, B, mean0, cov0, uts)
    idx = np.searchsorted(uts, ts)
    m_e = me[idx][..., 0]
    v_e = ce[idx][..., 0, 0]
    series["ensemble_K"] = 0.5 * ((m_e ** 2 + v_e / K) * h).sum(axis=1)
    # SGD with a K-times batch from T0.
    Ab, Bb = _sgd_system(problem, SGD(sgd_after.lr, sgd.momentum, sgd.nesterov, batch=K))
    mb, cb = linear.moments_at(Ab, Bb, mT, cT, steps_post)
    series["sgd_batch_K"] = np.concatenate([series["sgd"][:i0], _observe(h, C_x, mb, cb)])
    return series, _Release(mT, cT, i0, steps_post, A_after, B_after, C_x, n_sgd)


def _late_closed(problem, method, sgd, rel: _Release, sigma0):
    """The late phase from the closed forms: the mean model is SGD with lr_eff (rates x |w*| if multiplicative) and
    noise s/K, buffer (eta_t/eta_eff) v; the deviations SGD with lr_phi and noise s (1 - 1/K). Returns (mean,
    members, the mean model's system for the tail average)."""
    h, d, K = problem.curvature, problem.dim, method.K
    scale = np.abs(problem.optimum) if method.kind == "multiplicative" else np.ones(d)
    lr_eff = method.lr_eff
    Am, Bm = _sgd_system(problem, SGD(lr_eff, sgd.momentum, sgd.nesterov), scale, 1.0 / K)
    # (On the rescaled problem the buffer accumulates |w*| h (x - xi): hence the factor scale.)
    L = np.ones((d, rel.n_sgd))
    if sgd.momentum:
        L[:, 1] = scale * method.lr_theta / lr_eff
    mean_m = rel.m * L
    cov_m = rel.c * L[:, :, None] * L[:, None, :]
    cov_m[:, 0, 0] += scale * sigma0 ** 2 / K
    Ad, Bd = _sgd_system(problem, SGD(method.lr_phi, sgd.momentum, sgd.nesterov), scale, 1.0 - 1.0 / K)
    cov_d = np.zeros((d, rel.n_sgd, rel.n_sgd))
    cov_d[:, 0, 0] = scale * sigma0 ** 2 * (1 - 1 / K)
    mm, cm = linear.moments_at(Am, Bm, mean_m, cov_m, rel.steps_post)
    _, cd = linear.moments_at(Ad, Bd, np.zeros((d, rel.n_sgd)), cov_d, rel.steps_post)
    e_mean = _observe(h, rel.C_x, mm, cm)
    e_dev = 0.5 * (cd[..., 0, 0] * h).sum(axis=1)
    return e_mean, e_mean + e_dev, (Am, Bm, rel.C_x, mean_m, cov_m)


def _late_linearised(problem, method, sgd, rel: _Release, sigma0):
    """The late phase from the literal step linearised at the release (the Lyapunov path): the release maps SGD's
    (x, v) to the state z - z0. Returns (mean, members, the system for the tail average)."""
    h, d, K = problem.curvature, problem.dim, method.K
    sys = linear.linearize(problem, method)
    R = np.zeros((d, sys.n, rel.n_sgd))  # release map (x, v) -> z - z0
    if method.kind == "multiplicative":
        root = np.sqrt(np.abs(problem.optimum))
        R[:, 0, 0] = 1.0 / (2 * root)
        R[:, 1:K + 1, 0] = (np.sign(problem.optimum) / (2 * root))[:, None]
        if sgd.momentum:
            R[:, K + 1, 1] = root
    else:
        R[:, 0, 0] = 1.0
        if sgd.momentum:
            R[:, K + 1, 1] = 1.0
    mean_z = np.einsum("dnm,dm->dn", R, rel.m)
    cov_z = R @ rel.c @ np.swapaxes(R, -1, -2)
    cov_z[:, np.arange(1, K + 1), np.arange(1, K + 1)] += sigma0 ** 2 * np.ones((d, K))
    mz, cz = linear.moments_at(sys.A, sys.B, mean_z, cov_z, rel.steps_post)
    lp_mean = _observe(h, sys.C_mean, mz, cz)
    lp_mem = np.mean([_observe(h, sys.C_members[:, k], mz, cz) for k in range(K)], axis=0)
    return lp_mean, lp_mem, (sys.A, sys.B, sys.C_mean, mean_z, cov_z)


def _tail_averages(h, runs, rel: _Release, k0: int, n_times: int) -> dict:
    """The running average of each (name, system, steps per outer step) from swa_start = T0 + K k0: advance to
    swa_start, then add the running sum (over step boundaries); NaN before."""
    keep = rel.steps_post > k0
    n_avg = rel.steps_post[keep] - k0
    out = {}
    for name, (As, Bs, C, m_start, c_start), n_per in runs:
        m1, c1 = linear.moments_at(As, Bs, m_start, c_start, [k0 * n_per])
        Aa, Ba, ma, ca = _with_sum(As, Bs, C, m1[0], c1[0])
        m_all, c_all = linear.moments_at(Aa, Ba, ma, ca, n_avg * n_per)
        s_mean = m_all[..., -1] / (n_avg * n_per)[:, None]
        s_var = c_all[..., -1, -1] / ((n_avg * n_per) ** 2)[:, None]
        vals = np.full(n_times, np.nan)
        vals[rel.i0:][keep] = 0.5 * ((s_mean ** 2 + s_var) * h).sum(axis=1)
        out[name] = vals
    return out
