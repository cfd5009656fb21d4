"""Optimisation methods on the noisy quadratic problem, as hyperparameter records.

All optimizers follow torch.optim.SGD's momentum convention (dampening 0), each parameter tensor
with its own buffer v:

    heavy ball:  v <- mu v + g;  x <- x - lr v
    Nesterov:    v <- mu v + g;  x <- x - lr (g + mu v)

Time t counts minibatches: an SGD step with `batch` = B consumes B minibatches, one late-phase outer
step consumes K minibatches (one per member).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .errors import NQPError


def _check_rate(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise NQPError(f"`{name}` must be {bound}, got {value}")


def _check_momentum(momentum: float, nesterov: bool) -> None:
    if not (math.isfinite(momentum) and 0.0 <= momentum < 1.0):
        raise NQPError(f"`momentum` must be in [0, 1), got {momentum}")
    if nesterov and momentum == 0.0:
        raise NQPError("Nesterov momentum needs `momentum` > 0")


@dataclass(frozen=True)
class SGD:
    """Minibatch SGD on w: w <- w - lr * (grad + weight_decay * w), grad averaged over `batch` minibatches
    (weight decay inside the gradient, as torch.optim.SGD applies it).

    A step with batch B sees target noise of variance s/B and consumes B minibatches of time.
    """

    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    batch: int = 1
    weight_decay: float = 0.0
    name: str = field(default="sgd", init=False)

    def __post_init__(self):
        _check_rate("lr", self.lr)
        _check_momentum(self.momentum, self.nesterov)
        _check_rate("weight_decay", self.weight_decay, allow_zero=True)
        if int(self.batch) != self.batch or self.batch < 1:
            raise NQPError(f"batch must be a positive integer, got {self.batch}")

    @property
    def minibatches_per_step(self) -> int:
        return int(self.batch)


@dataclass(frozen=True)
class _OuterStep:
    """What every late-phase method has (Algorithm 1's outer step): K members, theta's and phi's learning rates,
    theta's gradient scale gamma_theta and torch-style momentum; checked on construction. Its fields come first, in
    this order, in :class:`LatePhase` and :class:`Block`."""

    K: int
    lr_theta: float
    lr_phi: float
    gamma_theta: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False

    def __post_init__(self):
        if int(self.K) != self.K or self.K < 1:
            raise NQPError(f"`K` must be a positive integer, got {self.K}")
        _check_rate("lr_theta", self.lr_theta, allow_zero=True)
        _check_rate("lr_phi", self.lr_phi)
        _check_rate("gamma_theta", self.gamma_theta, allow_zero=True)
        _check_momentum(self.momentum, self.nesterov)


@dataclass(frozen=True)
class LatePhase(_OuterStep):
    """Late-phase learning (Algorithm 1) with K members w_k = theta + phi_k (additive) or
    w_k = theta * phi_k (multiplicative, elementwise).

    One outer step: for k = 1..K, g_k = grad_w l(w_k; c_k) with a fresh c_k;
    phi_k <- U_phi(phi_k, dl/dphi_k); then theta <- U_theta(theta, gamma_theta * sum_k dl/dtheta|_k),
    theta held fixed inside the loop. Additive: dl/dphi_k = dl/dtheta|_k = g_k.
    Multiplicative: dl/dphi_k = theta * g_k, dl/dtheta|_k = phi_k * g_k.
    Additive with weight_decay lambda (torch convention, inside each gradient): phi_k's gradient gains lambda phi_k,
    theta's (once per outer step) lambda theta; computed by :mod:`nqp.block` (no closed form).
    """

    kind: str = "additive"
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in ("additive", "multiplicative"):
            raise NQPError(f"late-phase kind must be 'additive' or 'multiplicative', got {self.kind!r}")
        _check_rate("weight_decay", self.weight_decay, allow_zero=True)
        if self.weight_decay and self.kind == "multiplicative":
            raise NQPError("`weight_decay` is not modelled for `method` multiplicative (its linearisation about the "
                           "balanced optimum assumes no decay); use `method` additive, block or sgd")

    @property
    def name(self) -> str:
        return self.kind

    @property
    def minibatches_per_step(self) -> int:
        return int(self.K)

    @property
    def lr_eff(self) -> float:
        """Effective step of the mean model per outer step: lr_phi + K * gamma_theta * lr_theta."""
        return self.lr_phi + self.K * self.gamma_theta * self.lr_theta

    def with_(self, **changes) -> "LatePhase":
        return replace(self, **changes)


@dataclass(frozen=True)
class Block(_OuterStep):
    """Late-phase weights on their own coordinates (the block model; BatchNorm + head in a network).

    Coordinates `phi_coords` (0-based) are late-phase weights, the others are theta: member k's weights are theta on
    the theta coordinates and phi_k on the others. One outer step (Algorithm 1, every gradient at the start-of-step
    values), with g_k = H (w_k - c_k) averaged over `batch` minibatches per member:

        phi_k <- phi_k - lr_phi (g_k[phi] + weight_decay phi_k)
        theta <- theta - lr_theta (gamma_theta sum_k g_k[theta] + lambda_theta theta)

    (plain SGD shown; momentum in the torch convention with the decay inside the gradient). lambda_theta is
    `weight_decay_theta` (default: weight_decay). theta is decayed once per outer step, i.e. 1/K of SGD's decay per
    minibatch. One outer step consumes K * batch minibatches. shared=True puts theta on every coordinate too,
    w_k = theta + phi_k (the additive model; how :mod:`nqp.block` computes it with weight decay).

    >>> Block(K=4, lr_theta=0.1, lr_phi=0.1, gamma_theta=0.25, phi_coords=(0, 1)).minibatches_per_step
    4
    """

    phi_coords: tuple = ()
    weight_decay: float = 0.0
    batch: int = 1
    weight_decay_theta: float | None = None
    shared: bool = False
    name: str = field(default="block", init=False)

    def __post_init__(self):
        super().__post_init__()
        _check_rate("weight_decay", self.weight_decay, allow_zero=True)
        if self.weight_decay_theta is not None:
            _check_rate("weight_decay_theta", self.weight_decay_theta, allow_zero=True)
        if int(self.batch) != self.batch or self.batch < 1:
            raise NQPError(f"batch must be a positive integer, got {self.batch}")
        coords = tuple(int(i) for i in self.phi_coords)
        if any(i != j for i, j in zip(coords, self.phi_coords)) or any(i < 0 for i in coords):
            raise NQPError(f"`phi_coords` must be non-negative integers, got {list(self.phi_coords)}")
        if len(set(coords)) != len(coords):
            raise NQPError(f"`phi_coords` lists a coordinate twice: {list(self.phi_coords)}")
        object.__setattr__(self, "phi_coords", tuple(sorted(coords)))

    @property
    def minibatches_per_step(self) -> int:
        return int(self.K) * int(self.batch)

    @property
    def lambda_theta(self) -> float:
        """theta's weight decay per outer step."""
        return self.weight_decay if self.weight_decay_theta is None else self.weight_decay_theta

    def with_(self, **changes) -> "Block":
        return replace(self, **changes)


@dataclass(frozen=True)
class Ensemble:
    """K independent SGD runs whose final weights are averaged (a full ensemble, K x the cost).

    Per minibatch consumed, each run advances 1/K of a step; the mean model is (1/K) sum_k w_k.
    """

    base: SGD
    K: int
    name: str = field(default="ensemble", init=False)

    def __post_init__(self):
        if not isinstance(self.base, SGD):
            raise NQPError("an ensemble is built from SGD runs")
        if int(self.K) != self.K or self.K < 1:
            raise NQPError(f"`K` must be a positive integer, got {self.K}")

    @property
    def minibatches_per_step(self) -> int:
        return int(self.K) * self.base.minibatches_per_step


@dataclass(frozen=True)
class TailAverage:
    """Tail iterate averaging (SWA-style) of the mean model of `base` over the last `window`
    minibatches, i.e. over window / minibatches_per_step consecutive steps at stationarity."""

    base: object
    window: int
    name: str = field(default="tail-average", init=False)

    def __post_init__(self):
        if not isinstance(self.base, (SGD, LatePhase)):
            raise NQPError("tail averaging applies to SGD or late-phase methods")
        if int(self.window) != self.window or self.window < 1:
            raise NQPError(f"`window` must be a positive integer number of minibatches, got {self.window}")
        if self.window % self.base.minibatches_per_step:
            raise NQPError(f"`window` ({self.window}) must be a multiple of the minibatches per step "
                           f"({self.base.minibatches_per_step})")

    @property
    def steps(self) -> int:
        return int(self.window) // self.base.minibatches_per_step

    @property
    def minibatches_per_step(self) -> int:
        return self.base.minibatches_per_step


def make_method(method: str = "additive", *, K: int = 10, gamma_theta: float = 1.0, lr: float = 0.1,
                lr_theta: float | None = None, lr_phi: float | None = None, momentum: float = 0.0,
                nesterov: bool = False, batch: int = 1, ensemble: bool = False,
                swa_window: int | None = None, phi_coords=None, weight_decay: float = 0.0,
                weight_decay_theta: float | None = None):
    """Build a method from flat parameters (the CLI's flags). lr_theta and lr_phi default to lr.

    method "sgd" uses lr, momentum, nesterov, batch; with ensemble=True it is an ensemble of K SGD
    runs. "additive"/"multiplicative" build LatePhase, "block" builds Block (late-phase weights on the coordinates
    phi_coords). swa_window wraps the result in TailAverage.
    """
    _check_rate("lr", lr)
    _check_applies(method, phi_coords, weight_decay_theta, lr_theta, lr_phi, batch, ensemble)
    lr_theta, lr_phi = (lr if lr_theta is None else lr_theta), (lr if lr_phi is None else lr_phi)
    if method == "sgd":
        m = SGD(lr, momentum, nesterov, batch, weight_decay)
        m = Ensemble(m, K) if ensemble else m
    elif method == "block":
        m = Block(K, lr_theta, lr_phi, gamma_theta, momentum, nesterov, tuple(phi_coords), weight_decay, 1,
                  weight_decay_theta)
    else:
        m = LatePhase(K, lr_theta, lr_phi, gamma_theta, momentum, nesterov, method, weight_decay)
    if swa_window is not None:
        if isinstance(m, Block) or weight_decay:
            raise NQPError("`swa_window` is not modelled for `method` block or with `weight_decay`")
        if isinstance(m, Ensemble):
            raise NQPError("`swa_window` does not combine with `ensemble`")
        m = TailAverage(m, swa_window)
    return m


def _check_applies(method, phi_coords, weight_decay_theta, lr_theta, lr_phi, batch, ensemble) -> None:
    """Each of make_method's parameters given only to the methods it applies to."""
    if phi_coords is not None and method != "block":
        raise NQPError("`phi_coords` applies to `method` block")
    if weight_decay_theta is not None and method != "block":
        raise NQPError("`weight_decay_theta` applies to `method` block")
    if method not in ("sgd", "additive", "multiplicative", "block"):
        raise NQPError(f"`method` must be one of sgd, additive, multiplicative, block; got {method!r}")
    if method == "sgd":
        if lr_theta is not None or lr_phi is not None:
            raise NQPError("`lr_theta`/`lr_phi` apply to late-phase methods; use `lr` with `method` sgd")
        return
    if batch != 1 or ensemble:
        raise NQPError("`batch` and `ensemble` apply to `method` sgd")
    if method == "block" and phi_coords is None:
        raise NQPError("`method` block needs `phi_coords` I [I ...] (the 0-based coordinates that are late-phase "
                       "weights)")
