"""Monte Carlo simulation of every method, vectorised over independent runs and coordinates.

The simulator calls the literal steps of :mod:`nqp.dynamics`. Work is split into tiles of
(runs x coordinates); coordinates are independent, so each tile is simulated on its own with its
own random stream, derived from (seed, tile index) by numpy's SeedSequence: results do not depend on
the number of threads. Estimates are averages over runs of per-run time averages, with standard
errors from the spread across the (independent) runs.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import balance as bal
from . import dynamics as dyn
from . import linear
from .errors import NQPError
from .methods import SGD, Ensemble, LatePhase, TailAverage

TILE_BYTES = 1 << 18  # bytes per (runs x members x coordinates) array of a tile: 256 kB, stays in cache


class DivergedError(NQPError):
    """The simulated loss became non-finite."""


@dataclass
class MCResult:
    """Monte Carlo estimate of the stationary excess loss (loss units, summed over coordinates)."""

    method: str
    excess_loss_mean_model: float
    excess_loss_mean_model_stderr: float
    excess_loss_members: float
    excess_loss_members_stderr: float
    runs: int
    steps: int
    burn_in: int
    seed: int
    updates: int
    seconds: float
    per_run_mean_model: np.ndarray = field(repr=False)
    per_run_members: np.ndarray = field(repr=False)
    dtype: str = "float64"
    start: str = "balanced"
    # Multiplicative model: the balance b = theta^2/|w*| (per coordinate) at the start, its time average over the
    # recorded steps (the balance of the time-averaged Q~, averaged over runs) and the measured drift
    # E[Delta Q~] per outer step over the recorded steps, each with its standard error across runs.
    balance_start: np.ndarray | None = field(default=None, repr=False)
    balance_mean: np.ndarray | None = field(default=None, repr=False)
    balance_mean_stderr: np.ndarray | None = field(default=None, repr=False)
    drift_per_step: np.ndarray | None = field(default=None, repr=False)
    drift_per_step_stderr: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self, per_coordinate: bool = False) -> dict:
        out = {k: (float(v) if isinstance(v, (np.floating, float)) else v)
               for k, v in self.__dict__.items()
               if not k.startswith(("per_run", "balance_", "drift_"))}
        if self.balance_mean is not None:
            b = self.balance_mean
            out["balance"] = {"start": {"min": float(self.balance_start.min()),
                                        "median": float(np.median(self.balance_start)),
                                        "max": float(self.balance_start.max())},
                              "time_average": {"min": float(b.min()), "median": float(np.median(b)),
                                               "max": float(b.max())}}
            if per_coordinate:
                for k in ("balance_start", "balance_mean", "balance_mean_stderr", "drift_per_step",
                          "drift_per_step_stderr"):
                    out[k + "_per_coordinate"] = getattr(self, k).tolist()
        return out

    @property
    def updates_per_second(self) -> float:
        return self.updates / max(self.seconds, 1e-12)


# ----------------------------------------------------------------------------- helpers

def _core(method):
    """The method whose step is simulated (ensembles simulate K SGD runs, tail averages their base)."""
    return method.base if isinstance(method, (Ensemble, TailAverage)) else method


def _members(method) -> int:
    core = _core(method)
    if isinstance(method, Ensemble):
        return method.K
    return core.K if isinstance(core, LatePhase) else 1


def _is_mult(core) -> bool:
    return isinstance(core, LatePhase) and core.kind == "multiplicative"


def start_balance(problem, method, start="balanced") -> np.ndarray | None:
    """The balance b = theta^2/|w*| per coordinate at which a multiplicative run starts: "balanced" (b = 1, the
    release factorisation), "selected" (the noise-selected b* of :func:`nqp.balance.select`), or given values.
    None for every other method."""
    core = _core(method)
    if not _is_mult(core):
        if not (isinstance(start, str) and start == "balanced"):
            raise NQPError("`start` applies to the multiplicative model")
        return None
    if isinstance(start, str):
        if start == "balanced":
            return np.ones(problem.dim)
        if start == "selected":
            return bal.select(problem, core).selected
        raise NQPError(f"`start` must be 'balanced', 'selected' or balances > 0, got {start!r}")
    b = np.asarray(start, float).reshape(-1)
    if b.size not in (1, problem.dim) or not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise NQPError(f"start balances must be {problem.dim} (or one) finite values > 0")
    return np.broadcast_to(b, (problem.dim,)).copy()


def auto_burn_in(problem, method, tol: float = 1e-6, balance=None) -> int:
    """Minibatches until the variance transient of the (linearised) dynamics from the optimum decays
    below `tol` of its stationary value: n steps with rho^(2n) <= tol, rho the spectral radius (multiplicative:
    linearised at the start `balance`, default 1). The slow balance is not counted: see :func:`long_run_burn_in`."""
    core = _core(method)
    rho = float(linear.spectral_radius(linear.linearize(problem, core, balance=balance)).max())
    if rho >= 1:
        raise NQPError(f"cannot choose a burn-in: the slowest mode does not relax in float64 (spectral radius "
                       f"{rho:.17g}; a step times curvature below ~1e-16); give `burn_in`, or larger steps")
    steps = 1 if rho == 0 else math.ceil(math.log(tol) / (2 * math.log(rho)))
    return max(1, steps) * core.minibatches_per_step * (method.K if isinstance(method, Ensemble) else 1)


def long_run_burn_in(problem, method, tol: float = 1e-3, start=1.0) -> int:
    """Minibatches after which a multiplicative run started at balance `start` is within `tol` (relative) of its
    long-run losses, mean model and members, by the adiabatic ODE of the balance (:func:`nqp.balance.trajectory`):
    the first t from which |E(b(t)) - E(b*)| <= tol E(b*) for both, with E(b) the stationary losses of the fast modes
    at balance b. Not below the fast-mode burn-in. 0 for methods without a slow mode."""
    from .theory import steady_state

    core = _core(method)
    if not _is_mult(core) or bal.frozen(core):
        return 0
    start = np.broadcast_to(np.asarray(start, float), (problem.dim,))
    sel = bal.select(problem, core, release=start)
    tau = sel.relaxation_minibatches
    finite = tau[np.isfinite(tau)]
    fast = auto_burn_in(problem, method, balance=start)
    if not finite.size:
        return fast
    t = np.concatenate([[0.0], np.geomspace(1.0, 60 * finite.max(), 400)])
    b = bal.trajectory(problem, core, t, start, selected=sel)
    final = steady_state(problem, method, balance=sel.selected)
    bad = np.zeros(len(t), bool)
    for j in range(len(t)):
        e = steady_state(problem, method, balance=b[j])
        bad[j] = (abs(e.excess_loss_mean_model - final.excess_loss_mean_model) > tol * final.excess_loss_mean_model
                  or abs(e.excess_loss_members - final.excess_loss_members) > tol * final.excess_loss_members)
    idx = np.flatnonzero(bad)
    slow = 0 if not idx.size else t[min(idx[-1] + 1, len(t) - 1)]
    mpb = core.minibatches_per_step
    return max(fast, int(math.ceil(slow / mpb)) * mpb)


def _tiles(runs: int, dim: int, members: int, itemsize: int = 8):
    """Fixed tiling of (runs, coordinates) into blocks of about TILE_BYTES / itemsize member-coordinates."""
    elements = TILE_BYTES // itemsize
    d_block = max(1, min(dim, elements // max(1, members)))
    r_block = max(1, min(runs, elements // (members * d_block)))
    return [(r0, min(runs, r0 + r_block), c0, min(dim, c0 + d_block))
            for r0 in range(0, runs, r_block) for c0 in range(0, dim, d_block)]


def _run_tiles(run_tile, n: int, threads: int | None, bar) -> None:
    """run_tile(0..n-1) on a thread pool (numpy releases the GIL in the array work); closes the progress bar."""
    workers = threads or min(n, os.cpu_count() or 1)
    try:
        if workers <= 1:
            for j in range(n):
                run_tile(j)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(run_tile, range(n)))
    finally:
        bar.close()


def _check_runs_seed(runs, seed) -> None:
    """The Monte Carlo drivers' shared checks: at least two runs (for a standard error), a non-negative integer seed."""
    if int(runs) != runs or runs < 2:
        raise NQPError(f"`runs` must be an integer >= 2 (standard errors need two runs), got {runs}")
    _check_seed(seed)


def _run_stats(per_mean, per_mem):
    """(mean, standard error) of the per-run mean-model and member losses: std across runs / sqrt(runs)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return tuple(f(a) for a in (per_mean, per_mem)
                     for f in (lambda a: float(a.mean()), lambda a: float(a.std(ddof=1) / math.sqrt(a.size))))


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise NQPError(f"`seed` must be a non-negative integer, got {seed}")


def box_muller(bit_generator, out: np.ndarray) -> None:
    """Fill the float32 array `out` with independent standard normal variates (the Box-Muller transform, about twice
    as fast as numpy's float32 ziggurat): from pairs of 23-bit uniforms u1 in (0, 1], u2 in [0, 1) made of raw 64-bit
    words, z = sqrt(-2 log u1) cos(2 pi u2) and sqrt(-2 log u1) sin(2 pi u2). The 23-bit u1 cuts the tails at
    |z| = sqrt(46 log 2) = 5.65 (probability 1.6e-8; the variance is short by 5e-7 of itself)."""
    flat = out.reshape(-1)
    n = flat.size
    half = (n + 1) // 2
    words = bit_generator.random_raw(half).view(np.uint32)          # 2 * half independent 32-bit words
    np.right_shift(words, 9, out=words)                             # uniform in [1, 2): exponent 0, 23 random bits
    np.bitwise_or(words, 0x3F800000, out=words)
    u, t = words[:half].view(np.float32), words[half:].view(np.float32)
    np.subtract(2, u, out=u)                                        # u1 in (0, 1]
    np.log(u, out=u)
    u *= -2
    np.sqrt(u, out=u)
    t -= 1
    t *= np.float32(2 * np.pi)                                      # 2 pi u2 in [0, 2 pi)
    np.multiply(u, np.cos(t), out=flat[:half])
    np.sin(t, out=t)
    np.multiply(u[:n - half], t[:n - half], out=flat[half:])


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed, spawn_key=(index,))))


class _Progress:
    """A tqdm bar (``enabled`` True, for a terminal), one line per tenth done on stderr with the time left
    (``enabled == "lines"``: a log file or a pipe), or nothing."""

    def __init__(self, total: int, enabled, desc: str):
        self.bar = None
        self.lines = enabled == "lines"
        if enabled and not self.lines:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="upd", unit_scale=True, leave=False)
        self.lock = threading.Lock()
        self.total, self.done, self.tenth, self.desc, self.start = max(int(total), 1), 0, 0, desc, time.perf_counter()

    def update(self, n: int):
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)
        elif self.lines:
            with self.lock:
                self.done += n
                tenth = 10 * self.done // self.total
                if tenth > self.tenth and tenth < 10:
                    self.tenth = tenth
                    spent = time.perf_counter() - self.start
                    left = spent * (self.total - self.done) / max(self.done, 1)
                    print(f"{self.desc}: {10 * tenth}% after {spent:.0f} s, about {left:.0f} s left", file=sys.stderr,
                          flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Tile:
    """State, noise buffer and observables of one (runs x coordinates) block, in float64 or float32."""

    def __init__(self, problem, method, r0, r1, c0, c1, balance=None, dtype=np.float64):
        self.method, self.core = method, _core(method)
        self.dtype = np.dtype(dtype)
        self.h = problem.curvature[c0:c1].astype(dtype)
        self.wstar = problem.optimum[c0:c1].astype(dtype)
        sub = type(problem)(problem.curvature[c0:c1], problem.noise[c0:c1], problem.optimum[c0:c1])
        c = dyn.Coeffs.of(sub)
        self.coeffs = dyn.Coeffs(c.h.astype(dtype), c.sqrt_s.astype(dtype), c.wstar.astype(dtype))
        runs = r1 - r0
        b = None if balance is None else balance[c0:c1]
        if isinstance(method, Ensemble):
            self.state = dyn.fixed_point(sub, self.core, shape=(runs, method.K), dtype=dtype)
            self.xi = np.empty((runs, method.K, c1 - c0), dtype)
        elif isinstance(self.core, SGD):
            self.state = dyn.fixed_point(sub, self.core, shape=(runs,), dtype=dtype)
            self.xi = np.empty((runs, c1 - c0), dtype)
        else:
            self.state = dyn.fixed_point(sub, self.core, shape=(runs,), dtype=dtype, balance=b)
            self.xi = np.empty((runs, self.core.K, c1 - c0), dtype)
        self.members = self.xi.size // (runs * (c1 - c0))
        self.track = _is_mult(self.core) and not bal.frozen(self.core)
        self.work = np.empty_like(self.xi) if isinstance(self.core, LatePhase) else None
        # what record() accumulates: the per-run sums of the losses (tail averages: of each closed window's average)
        self.window = method.steps if isinstance(method, TailAverage) else None
        self.s_mean, self.s_mem, self.seen = np.zeros(runs), np.zeros(runs), 0
        self.sum_m = self.sum_mem = None
        self.q_sum = np.zeros((runs, c1 - c0)) if self.track else None
        self.q_first = self.q_last = None

    def step(self, rng):
        if self.dtype == np.float32:
            box_muller(rng.bit_generator, self.xi)
        else:
            rng.standard_normal(out=self.xi)
        if isinstance(self.core, SGD):
            dyn.sgd_step(self.state, self.xi, self.coeffs, self.core)
        else:
            dyn.latephase_step(self.state, self.xi, self.coeffs, self.core, self.work)

    def observe(self):
        """(mean-model weights - w*, per-run member excess averaged over members, summed over coordinates).

        Additive member excess via sums over members, without forming the member weights:
        sum_k (u + phi_k)^2 = K u^2 + 2 u S1 + S2, S1 = sum_k phi_k, S2 = sum_k phi_k^2 (u = theta - w*);
        multiplicative: sum_k (theta phi_k - w*)^2 from the member deviations, formed in the work buffer."""
        st, core, h = self.state, self.core, self.h
        if isinstance(self.method, Ensemble):
            w = st.w
            dev = w - self.wstar
            mem = np.einsum("rkd,rkd->rd", dev, dev) @ h
            return w.mean(axis=1) - self.wstar, 0.5 * mem / self.method.K
        if isinstance(core, SGD):
            x = st.w - self.wstar
            return x, _excess(x, h)
        K = core.K
        s1 = st.phi.sum(axis=-2)
        s2 = np.einsum("rkd,rkd->rd", st.phi, st.phi) if (core.kind == "additive" or self.track) else None
        if core.kind == "additive":
            u = st.theta - self.wstar
            m = u + s1 / K
            tot = K * u * u + 2 * u * s1 + s2
            return m, 0.5 * (tot @ h) / K
        # member deviations theta phi_k - w* formed directly (the expansion theta^2 S2 - 2 theta w* S1 + K w*^2 would
        # cancel to a small difference of large terms, which float32 cannot afford)
        th = st.theta
        e = np.multiply(st.phi, th[..., None, :], out=self.work)
        e -= self.wstar
        mem = np.einsum("rkd,rkd->rd", e, e) @ h * (0.5 / K)
        if self.track:
            self.theta2 = th * th
            self.s2 = s2
        s1 *= th
        s1 *= 1.0 / K
        s1 -= self.wstar
        return s1, mem

    def record(self):
        """Add the current losses to the per-run sums: every step, or for a tail average the average weights of each
        window of `method.steps` steps once it closes; multiplicative: Q~ too (its sum, first and last value)."""
        m, mem = self.observe()
        self.seen += 1
        if self.track:
            self.q_last = self.balance_quantity()
            self.q_sum += self.q_last
            if self.q_first is None:
                self.q_first = self.q_last.astype(float)
        if self.window is None:
            self.s_mean += _excess(m, self.h)
            self.s_mem += mem
            return
        wk = m[:, None, :] if isinstance(self.core, SGD) else dyn.members(self.state, self.core) - self.wstar
        if self.sum_m is None:
            self.sum_m, self.sum_mem = np.zeros_like(m), np.zeros_like(wk)
        self.sum_m += m
        self.sum_mem += wk
        if self.seen % self.window == 0:
            self.s_mean += _excess(self.sum_m / self.window, self.h)
            avg = self.sum_mem / self.window
            self.s_mem += 0.5 * np.einsum("rkd,rkd,d->r", avg, avg, self.h) / avg.shape[1]
            self.sum_m[:] = 0
            self.sum_mem[:] = 0

    def check(self, minibatch: int) -> None:
        """Raise DivergedError once the state (seen through the last noise buffer it produced) is not finite."""
        if not np.all(np.isfinite(self.xi)):
            raise DivergedError(f"simulation diverged (non-finite values by minibatch {minibatch}); "
                                "lower the learning rates or the noise")

    def result(self):
        """(per-run loss sums, per-run member-loss sums, per-coordinate mean of Q~, its drift per recorded step);
        the last two are None without a moving balance."""
        if not (np.all(np.isfinite(self.s_mean)) and np.all(np.isfinite(self.s_mem))):
            raise DivergedError("simulation diverged (non-finite loss); lower the learning rates or the noise")
        if not self.track:
            return self.s_mean, self.s_mem, None, None
        n = self.seen
        return self.s_mean, self.s_mem, self.q_sum / n, (self.q_last.astype(float) - self.q_first) / max(1, n - 1)

    def balance_quantity(self):
        """Q~ of the multiplicative state after :meth:`observe` (which computed theta^2 and sum_k phi_k^2)."""
        st, core = self.state, self.core
        Q = self.theta2 * (1.0 / (core.gamma_theta * core.lr_theta))
        Q -= self.s2 * (1.0 / core.lr_phi)
        if core.momentum:
            P = st.theta * st.v_theta / core.gamma_theta - np.einsum("rkd,rkd->rd", st.phi, st.v_phi)
            Q -= bal.coupling(core) * P
        return Q


def _excess(x, h):
    """1/2 sum_i h_i x_i^2 per run (x of shape (runs, d))."""
    return 0.5 * ((x * x) @ h)


# ----------------------------------------------------------------------------- stationary estimates

def simulate(problem, method, *, steps: int, burn_in: int | None = None, runs: int = 32, seed: int = 0,
             threads: int | None = None, progress: bool = False, start="balanced", dtype=np.float64) -> MCResult:
    """Estimate the stationary excess loss of the mean model and the members' average by simulation.

    Starts every run at the optimum (members equal, buffers zero; multiplicative: at the balance `start`, see
    :func:`start_balance`), discards `burn_in` minibatches (default: :func:`auto_burn_in`, the fast modes only; for
    the long run of a multiplicative model from the balanced start use :func:`long_run_burn_in`, or start at
    "selected"), then averages over `steps` minibatches (recording at every step boundary; tail averages over
    consecutive windows of `method.window` minibatches). Returns the mean over `runs` independent runs and its
    standard error (std across runs / sqrt(runs)). dtype float32 runs the state and the noise in single precision
    (accumulators stay float64).
    """
    from . import block
    if block.needs_block(problem, method):   # the block model, or SGD / ensembles with weight decay or a full H
        if burn_in is not None and (int(burn_in) != burn_in or burn_in < 0):
            raise NQPError(f"`burn_in` must be a non-negative integer, got {burn_in}")
        start_balance(problem, method, start)
        return block.simulate(problem, method, steps=steps, burn_in=burn_in, runs=runs, seed=seed, threads=threads,
                              progress=progress, dtype=dtype)
    plan = _Plan.of(problem, method, steps, burn_in, runs, seed, start, dtype)
    tiles = _tiles(plan.runs, problem.dim, _members(method), plan.dtype.itemsize)
    total = plan.n_burn + plan.n_steps
    sums = _Sums(plan.runs, problem.dim)
    bar = _Progress(len(tiles) * total, progress, f"simulate {method.name}")

    def run_tile(index):
        r0, r1, c0, c1 = tiles[index]
        tile = _Tile(problem, method, r0, r1, c0, c1, plan.b_start, plan.dtype)
        rng = _rng(seed, index)
        for i in range(total):
            tile.step(rng)
            if i >= plan.n_burn:
                tile.record()
            if (i + 1) % 256 == 0:
                bar.update(256)
                tile.check((i + 1) * plan.mpb)
        bar.update(total % 256)
        sums.add((r0, r1, c0, c1), *tile.result())

    t0 = time.perf_counter()
    _run_tiles(run_tile, len(tiles), threads, bar)
    return plan.result(problem, method, sums, time.perf_counter() - t0, start)


@dataclass
class _Plan:
    """The validated budget of :func:`simulate`: outer steps to burn and to record, in the given precision."""

    runs: int
    seed: int
    dtype: np.dtype
    b_start: np.ndarray | None
    mpb: int
    n_steps: int
    n_burn: int
    window: int | None

    @classmethod
    def of(cls, problem, method, steps, burn_in, runs, seed, start, dtype) -> _Plan:
        _check_runs_seed(runs, seed)
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
            raise NQPError(f"dtype must be float64 or float32, got {dtype}")
        b_start = start_balance(problem, method, start)
        mpb = method.minibatches_per_step
        if isinstance(method, TailAverage):
            if steps < method.window:
                raise NQPError(f"`steps` ({steps}) must be >= the averaging window ({method.window})")
            n_steps = (steps // method.window) * method.steps
        else:
            if steps < mpb:
                raise NQPError(f"`steps` ({steps}) must be >= the minibatches per step ({mpb})")
            n_steps = steps // mpb
        if burn_in is None:
            burn_in = auto_burn_in(problem, method, balance=b_start)
        if int(burn_in) != burn_in or burn_in < 0:
            raise NQPError(f"`burn_in` must be a non-negative integer, got {burn_in}")
        window = method.steps if isinstance(method, TailAverage) else None
        return cls(int(runs), int(seed), dtype, b_start, mpb, n_steps, -(-int(burn_in) // mpb), window)

    def result(self, problem, method, sums: _Sums, seconds: float, start) -> MCResult:
        """The run means and standard errors of the tiles' sums (multiplicative: with the balance and its drift)."""
        n_rec = self.n_steps // self.window if self.window else self.n_steps
        per_mean, per_mem = sums.mean / n_rec, sums.mem / n_rec
        updates = self.runs * problem.dim * _members(method) * (self.n_burn + self.n_steps)
        stats = _run_stats(per_mean, per_mem)
        if not all(math.isfinite(v) for v in stats):
            raise DivergedError("the simulated losses overflow float64 (values near 1e308); rescale the problem "
                                "(smaller `noise`, `curvature` or `optimum`)")
        res = MCResult(method.name, *stats, self.runs, self.n_steps * self.mpb, self.n_burn * self.mpb, self.seed,
                       updates, seconds, per_mean, per_mem, self.dtype.name,
                       start if isinstance(start, str) else "given")
        if sums.q_mean is not None:
            res.balance_start = self.b_start
            b_runs = bal.balance_of(sums.q_mean, problem, _core(method))
            res.balance_mean = b_runs.mean(axis=0)
            res.balance_mean_stderr = b_runs.std(axis=0, ddof=1) / math.sqrt(self.runs)
            res.drift_per_step = sums.q_drift.mean(axis=0)
            res.drift_per_step_stderr = sums.q_drift.std(axis=0, ddof=1) / math.sqrt(self.runs)
        return res


class _Sums:
    """The tiles' results gathered per run (and per coordinate for the balance), under a lock."""

    def __init__(self, runs: int, dim: int):
        self.mean, self.mem = np.zeros(runs), np.zeros(runs)
        self.q_mean = self.q_drift = None
        self.dim, self.lock = dim, threading.Lock()

    def add(self, bounds, s_mean, s_mem, q_mean, q_drift) -> None:
        r0, r1, c0, c1 = bounds
        with self.lock:
            self.mean[r0:r1] += s_mean
            self.mem[r0:r1] += s_mem
            if q_mean is not None:
                if self.q_mean is None:
                    shape = (self.mean.size, self.dim)
                    self.q_mean, self.q_drift = np.zeros(shape), np.zeros(shape)
                self.q_mean[r0:r1, c0:c1] = q_mean
                self.q_drift[r0:r1, c0:c1] = q_drift


# ----------------------------------------------------------------------------- learning curves

def simulate_curve(problem, method: LatePhase, sgd: SGD, *, T0: int, horizon: int, w0=0.0,
                   sigma0: float = 0.0, points: int = 200, swa_start: int | None = None, runs: int = 32,
                   seed: int = 0, threads: int | None = None, progress: bool = False):
    """Simulate the protocol of :func:`nqp.curves.learning_curve` (SGD until T0, then `method`;
    SGD continuing beside it on the same noise up to T0). Returns a Curve of the run means with
    standard errors for the series sgd, latephase_mean, latephase_members (and latephase_swa)."""
    from .curves import start_weights, time_grid

    if _block_curve(problem, method, sgd, swa_start):
        from . import block
        return block.simulate_curve(problem, method, sgd, T0=T0, horizon=horizon, w0=w0, sigma0=sigma0, points=points,
                                    runs=runs, seed=seed, threads=threads, progress=progress)
    _check_runs_seed(runs, seed)
    t = time_grid(T0, horizon, method.K, points)
    if swa_start is not None and not (T0 <= swa_start < horizon and (swa_start - T0) % method.K == 0):
        raise NQPError(f"`swa_start` must be T0 + K n below the horizon (T0={T0}, K={method.K}), got {swa_start}")
    names = ["sgd", "latephase_mean", "latephase_members"] + (["latephase_swa"] if swa_start is not None else [])
    track = _is_mult(method) and not bal.frozen(method)
    sums = _CurveSums(names, int(runs), len(t), problem.dim, track)
    w0 = start_weights(w0, problem.dim)
    tiles = _tiles(int(runs), problem.dim, method.K)
    bar = _Progress(len(tiles) * int(horizon), progress, "simulate curve")
    record = {int(x): i for i, x in enumerate(t)}

    def run_tile(index):
        tile = _CurveTile(problem, method, sgd, tiles[index], w0, names, len(t), track, T0, sigma0, swa_start)
        rng = _rng(seed, index)
        if T0 == 0:
            tile.release(rng)
        if 0 in record:
            tile.record(record[0])
        pending = 0
        while tile.now < horizon:
            pending += tile.step(rng)
            if tile.now in record:
                tile.record(record[tile.now])
            if pending >= 1024:
                bar.update(pending)
                pending = 0
        bar.update(pending)
        sums.add(tiles[index], *tile.result())

    _run_tiles(run_tile, len(tiles), threads, bar)
    return sums.curve(t, int(T0), method.K)


def _block_curve(problem, method, sgd, swa_start) -> bool:
    """Whether the curve is the block model's (weight decay and a full H are simulated for `method` block only)."""
    from .methods import Block

    if not isinstance(method, Block):
        if getattr(method, "weight_decay", 0) or sgd.weight_decay or problem.hessian is not None:
            raise NQPError(f"weight decay and a full `hessian` are simulated along a curve for `method` block only, "
                           f"not {method.name}")
        return False
    if swa_start is not None:
        raise NQPError("`swa_start` is not modelled for `method` block")
    return True


class _CurveSums:
    """The tiles' recorded losses gathered per run (and the balances per run and coordinate), under a lock."""

    def __init__(self, names, runs: int, n_times: int, dim: int, track: bool):
        self.out = {k: np.zeros((runs, n_times)) for k in names}
        self.b_runs = np.full((runs, n_times, dim), np.nan) if track else None
        self.lock = threading.Lock()

    def add(self, bounds, local, b_local) -> None:
        r0, r1, c0, c1 = bounds
        with self.lock:
            for k, v in self.out.items():
                v[r0:r1] += local[k]
            if self.b_runs is not None:
                self.b_runs[r0:r1, :, c0:c1] = b_local

    def curve(self, t, T0: int, K: int):
        """The Curve of the run means with their standard errors (std across runs / sqrt(runs))."""
        from .curves import Curve

        series = {k: v.mean(axis=0) for k, v in self.out.items()}
        stderr = {k: v.std(axis=0, ddof=1) / math.sqrt(v.shape[0]) for k, v in self.out.items()}
        curve = Curve(t, series, T0, K, "monte carlo", stderr)
        if self.b_runs is not None:   # the balance b = theta^2/|w*| of the manifold point with each run's Q~, run means
            curve.balance = self.b_runs.mean(axis=0)
            curve.balance_stderr = self.b_runs.std(axis=0, ddof=1) / math.sqrt(self.b_runs.shape[0])
        return curve


class _CurveTile:
    """One (runs x coordinates) block of the curve protocol: SGD until T0, then `method`, with SGD continuing beside it
    on the same number of minibatches (K per outer step, each on its own noise); record(i) stores the losses at the
    i-th time of the grid. The random stream is drawn in this order: SGD's minibatches, then the release (its
    perturbation sigma0), then per outer step K SGD minibatches and the K members' noise."""

    def __init__(self, problem, method, sgd, bounds, w0, names, n_times, track, T0, sigma0, swa_start):
        r0, r1, c0, c1 = bounds
        self.h, self.ws = problem.curvature[c0:c1], problem.optimum[c0:c1]
        self.sub = type(problem)(self.h, problem.noise[c0:c1], self.ws)
        self.coeffs = dyn.Coeffs.of(self.sub)
        w = np.broadcast_to(w0[c0:c1], (r1 - r0, c1 - c0)).copy()
        self.sgd_state = dyn.SGDState(w, np.zeros_like(w) if sgd.momentum else None)
        self.xi1 = np.empty_like(w)
        self.xik = np.empty((r1 - r0, method.K, c1 - c0))
        self.local = {k: np.zeros((r1 - r0, n_times)) for k in names}
        self.b_local = np.full((r1 - r0, n_times, c1 - c0), np.nan) if track else None
        self.method, self.sgd, self.T0, self.sigma0, self.swa_start = method, sgd, T0, sigma0, swa_start
        self.lp, self.swa_sum, self.swa_n, self.now = None, None, 0, 0

    def release(self, rng) -> None:
        """The late phase starts from SGD's weights (members perturbed by sigma0)."""
        self.lp = dyn.release(self.sgd_state.w, self.sgd_state.v, self.method, self.sigma0, rng)

    def _sgd_step(self, rng) -> None:
        rng.standard_normal(out=self.xi1)
        dyn.sgd_step(self.sgd_state, self.xi1, self.coeffs, self.sgd)

    def step(self, rng) -> int:
        """One SGD minibatch before T0 (releasing at T0), else one outer step; returns the minibatches it took."""
        if self.lp is None:
            self._sgd_step(rng)
            self.now += 1
            if self.now == self.T0:
                self.release(rng)
            return 1
        K = self.method.K
        for _ in range(K):
            self._sgd_step(rng)
        rng.standard_normal(out=self.xik)
        dyn.latephase_step(self.lp, self.xik, self.coeffs, self.method)
        self.now += K
        if self.swa_start is not None and self.now > self.swa_start:
            m = dyn.mean_model(self.lp, self.method)
            self.swa_sum = m.copy() if self.swa_sum is None else self.swa_sum + m
            self.swa_n += 1
        return K

    def record(self, i: int) -> None:
        """The excess losses at grid index i: SGD's, the mean model's, the members' average (before the release: SGD's),
        SWA's; multiplicative: each run's balance."""
        local, h, ws, lp, method = self.local, self.h, self.ws, self.lp, self.method
        local["sgd"][:, i] = _excess(self.sgd_state.w - ws, h)
        if lp is None:
            local["latephase_mean"][:, i] = local["sgd"][:, i]
            local["latephase_members"][:, i] = local["sgd"][:, i]
        else:
            wk = dyn.members(lp, method) - ws
            local["latephase_mean"][:, i] = _excess(dyn.mean_model(lp, method) - ws, h)
            local["latephase_members"][:, i] = 0.5 * np.einsum("rkd,rkd,d->r", wk, wk, h) / method.K
        if "latephase_swa" in local:
            local["latephase_swa"][:, i] = _excess(self.swa_sum / self.swa_n - ws, h) if self.swa_n else np.nan
        if self.b_local is not None and lp is not None:
            self.b_local[:, i] = bal.balance_of(bal.quantity(lp, method), self.sub, method)

    def result(self):
        """(the recorded losses by series, the balances or None); DivergedError if a loss is not finite."""
        if not all(np.all(np.isfinite(v[~np.isnan(v)])) for v in self.local.values()):
            raise DivergedError("simulation diverged (non-finite loss); lower the learning rates or the noise")
        return self.local, self.b_local
