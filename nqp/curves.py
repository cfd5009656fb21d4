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
For the multiplicative model both are its small-noise linearisation about the balanced optimum (valid
while w stays near w*; before T0 the SGD phase is exact).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from . import linear
from .errors import NQPError
from .methods import SGD, LatePhase
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

    def to_dict(self) -> dict:
        out = {"t": self.t.tolist(), "T0": self.T0, "K": self.K, "path": self.path,
               "series": {k: v.tolist() for k, v in self.series.items()}}
        if self.stderr:
            out["stderr"] = {k: v.tolist() for k, v in self.stderr.items()}
        return out


def time_grid(T0: int, horizon: int, K: int, points: int = 200) -> np.ndarray:
    """About `points` evaluation times in [0, horizon]: any integer before T0, T0 + K n after it."""
    if int(T0) != T0 or T0 < 0:
        raise NQPError(f"--t0 must be a non-negative integer number of minibatches, got {T0}")
    if int(horizon) != horizon or horizon <= T0:
        raise NQPError(f"--horizon ({horizon}) must be an integer > --t0 ({T0})")
    if points < 2:
        raise NQPError(f"--points must be >= 2, got {points}")
    raw = np.linspace(0, horizon, int(points))
    pre = np.round(raw[raw < T0]).astype(int)
    post = T0 + K * np.round((raw[raw >= T0] - T0) / K).astype(int)
    t = np.unique(np.concatenate([pre, [T0], post[post <= horizon]]))
    if len(t) < 2:
        raise NQPError(f"--horizon ({horizon}) must reach at least one outer step past --t0: >= {T0 + K} (T0 + K)")
    return t


def start_weights(w0, dim: int) -> np.ndarray:
    """The start w_0 (one value broadcasts, or one per coordinate), checked finite."""
    w = np.asarray(w0, float).reshape(-1)
    if w.size not in (1, dim):
        raise NQPError(f"--w0 takes one value or one per coordinate ({dim}), got {w.size}")
    if not np.all(np.isfinite(w)):
        raise NQPError("--w0 must be finite")
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


def _finite(fn):
    """Run a curve computation with float overflow silenced, and refuse a curve that overflowed."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore"):
            curve = fn(*args, **kwargs)
        # (a tail-average series is NaN before its start, by design)
        if any(np.isinf(v).any() or ("swa" not in k and np.isnan(v).any()) for k, v in curve.series.items()):
            raise NQPError("the predicted loss overflows float64 (values near 1e308); rescale the problem "
                           "(smaller --w0, --noise, --curvature or --optimum)")
        return curve
    return run


@_finite
def learning_curve(problem: Problem, method: LatePhase, sgd: SGD, *, T0: int, horizon: int,
                   w0=0.0, sigma0: float = 0.0, points: int = 200, swa_start: int | None = None,
                   path: str = "closed", sgd_after: SGD | None = None) -> Curve:
    """Exact expected excess loss vs t for `sgd` switching to `method` at T0, and the baselines.

    `sgd_after` (default `sgd`) is the SGD that the SGD baselines (continuing, K-times batch, tail
    average) use from T0 on, e.g. a lowered learning rate; the ensemble runs use `sgd` throughout."""
    if not isinstance(method, LatePhase) or not isinstance(sgd, SGD) or sgd.batch != 1:
        raise NQPError("learning_curve needs a late-phase method and a batch-1 SGD method")
    if path not in ("closed", "lyapunov"):
        raise NQPError(f"path must be 'closed' or 'lyapunov', got {path!r}")
    if sigma0 < 0 or not np.isfinite(sigma0):
        raise NQPError(f"--sigma0 must be >= 0, got {sigma0}")
    sgd_after = sgd if sgd_after is None else sgd_after
    check_stable(problem, sgd)
    check_stable(problem, sgd_after)
    check_stable(problem, method)
    K = method.K
    if len({(m.momentum, m.nesterov) for m in (sgd, sgd_after, method)}) > 1:
        raise NQPError("SGD and the late-phase method must use the same momentum setting")
    if sgd_after.batch != 1:
        raise NQPError("sgd_after must be a batch-1 SGD method")
    t = time_grid(T0, horizon, K, points)
    if swa_start is not None and not (T0 <= swa_start < horizon and (swa_start - T0) % K == 0):
        raise NQPError(f"--swa-start must be T0 + K n below the horizon (T0={T0}, K={K}), got {swa_start}")
    h, d = problem.curvature, problem.dim
    w0 = start_weights(w0, d)
    mom = bool(sgd.momentum)
    n_sgd = 2 if mom else 1

    # --- SGD phase and SGD continuing (exact).
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

    # --- Ensemble of K independent runs from w0, floor(t/K) steps each.
    ts = t // K
    uts = np.unique(ts)
    me, ce = linear.moments_at(A, B, mean0, cov0, uts)
    idx = np.searchsorted(uts, ts)
    m_e = me[idx][..., 0]
    v_e = ce[idx][..., 0, 0]
    series["ensemble_K"] = 0.5 * ((m_e ** 2 + v_e / K) * h).sum(axis=1)

    # --- SGD with a K-times batch from T0.
    Ab, Bb = _sgd_system(problem, SGD(sgd_after.lr, sgd.momentum, sgd.nesterov, batch=K))
    mb, cb = linear.moments_at(Ab, Bb, mT, cT, steps_post)
    series["sgd_batch_K"] = np.concatenate([series["sgd"][:i0], _observe(h, C_x, mb, cb)])

    # --- Late phase.
    mult = method.kind == "multiplicative"
    scale = np.abs(problem.optimum) if mult else np.ones(d)
    if path == "closed":
        lr_eff = method.lr_eff
        # Mean block: SGD with lr_eff (rates x |w*| if multiplicative), noise s/K; buffer (eta_t/eta_eff) v.
        Am, Bm = _sgd_system(problem, SGD(lr_eff, sgd.momentum, sgd.nesterov), scale, 1.0 / K)
        # (On the rescaled problem the buffer accumulates |w*| h (x - xi): hence the factor scale.)
        L = np.ones((d, n_sgd))
        if mom:
            L[:, 1] = scale * method.lr_theta / lr_eff
        mean_m = mT * L
        cov_m = cT * L[:, :, None] * L[:, None, :]
        cov_m[:, 0, 0] += scale * sigma0 ** 2 / K
        Ad, Bd = _sgd_system(problem, SGD(method.lr_phi, sgd.momentum, sgd.nesterov), scale, 1.0 - 1.0 / K)
        cov_d = np.zeros((d, n_sgd, n_sgd))
        cov_d[:, 0, 0] = scale * sigma0 ** 2 * (1 - 1 / K)
        mm, cm = linear.moments_at(Am, Bm, mean_m, cov_m, steps_post)
        _, cd = linear.moments_at(Ad, Bd, np.zeros((d, n_sgd)), cov_d, steps_post)
        e_mean = _observe(h, C_x, mm, cm)
        e_dev = 0.5 * (cd[..., 0, 0] * h).sum(axis=1)
        lp_mean, lp_mem = e_mean, e_mean + e_dev
        swa = (Am, Bm, C_x, mean_m, cov_m)
    else:
        sys = linear.linearize(problem, method)
        n = sys.n
        R = np.zeros((d, n, n_sgd))  # release map (x, v) -> z - z0
        if mult:
            root = np.sqrt(scale)
            R[:, 0, 0] = 1.0 / (2 * root)
            R[:, 1:K + 1, 0] = (np.sign(problem.optimum) / (2 * root))[:, None]
            if mom:
                R[:, K + 1, 1] = root
        else:
            R[:, 0, 0] = 1.0
            if mom:
                R[:, K + 1, 1] = 1.0
        mean_z = np.einsum("dnm,dm->dn", R, mT)
        cov_z = R @ cT @ np.swapaxes(R, -1, -2)
        jitter = sigma0 ** 2 * np.ones((d, K))
        cov_z[:, np.arange(1, K + 1), np.arange(1, K + 1)] += jitter
        mz, cz = linear.moments_at(sys.A, sys.B, mean_z, cov_z, steps_post)
        lp_mean = _observe(h, sys.C_mean, mz, cz)
        lp_mem = np.mean([_observe(h, sys.C_members[:, k], mz, cz) for k in range(K)], axis=0)
        swa = (sys.A, sys.B, sys.C_mean, mean_z, cov_z)
    series["latephase_mean"] = np.concatenate([series["sgd"][:i0], lp_mean])
    series["latephase_members"] = np.concatenate([series["sgd"][:i0], lp_mem])

    # --- Tail averaging (running average of the mean model from swa_start).
    if swa_start is not None:
        k0 = (swa_start - T0) // K
        keep = steps_post > k0
        n_avg = steps_post[keep] - k0
        for name, (As, Bs, C, m_start, c_start), n_per in (
                ("latephase_swa", swa, 1),
                ("sgd_swa", (A_after, B_after, C_x, mT, cT), K)):
            # Advance to swa_start, then add the running sum (over step boundaries).
            m1, c1 = linear.moments_at(As, Bs, m_start, c_start, [k0 * n_per])
            Aa, Ba, ma, ca = _with_sum(As, Bs, C, m1[0], c1[0])
            m_all, c_all = linear.moments_at(Aa, Ba, ma, ca, n_avg * n_per)
            s_mean = m_all[..., -1] / (n_avg * n_per)[:, None]
            s_var = c_all[..., -1, -1] / ((n_avg * n_per) ** 2)[:, None]
            vals = np.full(len(t), np.nan)
            vals[i0:][keep] = 0.5 * ((s_mean ** 2 + s_var) * h).sum(axis=1)
            series[name] = vals
    return Curve(t, series, int(T0), K, path)
