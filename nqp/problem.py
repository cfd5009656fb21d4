"""The noisy quadratic problem (NQP).

Coordinates i = 1..d, each with curvature h_i > 0, noise variance s_i >= 0 and optimum w*_i.
Every minibatch draws a fresh target c with c_i ~ N(w*_i, s_i), independent across coordinates
and minibatches, and has loss

    l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2,        grad_w l = h * (w - c).

The excess loss of a weight vector is E(w) = 1/2 sum_i h_i (w_i - w*_i)^2 (the expected
minibatch loss minus its minimum 1/2 sum_i h_i s_i). Time t counts minibatches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NQPError
from .resources import FLOAT, check_memory


def _as_vector(name: str, value, dim: int | None) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    if arr.ndim != 1:
        raise NQPError(f"{name} must be a number or a 1-d list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise NQPError(f"{name} must be finite, got {arr.tolist()[:5]}")
    if dim is not None and arr.size not in (1, dim):
        raise NQPError(f"{name} has {arr.size} values but the problem has {dim} coordinates "
                       f"(give one value to broadcast or exactly {dim})")
    if dim is not None and arr.size == 1:
        arr = np.full(dim, arr[0])
    return arr


@dataclass(frozen=True, eq=False)
class Problem:
    """A d-dimensional noisy quadratic problem (curvature h, noise variance s, optimum w*).

    Use :meth:`from_values` (broadcasting scalars) or :meth:`powerlaw` (h_i = i^-P) to build one.
    """

    curvature: np.ndarray
    noise: np.ndarray
    optimum: np.ndarray

    def __post_init__(self):
        h, s, w = self.curvature, self.noise, self.optimum
        if not (h.shape == s.shape == w.shape and h.ndim == 1 and h.size >= 1):
            raise NQPError("curvature, noise and optimum must be 1-d arrays of one common length")
        if np.any(h <= 0):
            raise NQPError(f"curvature must be > 0 in every coordinate (min given: {h.min():g})")
        if np.any(s < 0):
            raise NQPError(f"noise variance must be >= 0 in every coordinate (min given: {s.min():g})")
        for a in (h, s, w):
            a.setflags(write=False)

    @classmethod
    def from_values(cls, curvature, noise=1.0, optimum=1.0) -> "Problem":
        """Build a problem; a single value of any argument broadcasts to all coordinates."""
        sizes = [np.size(v) for v in (curvature, noise, optimum)]
        dim = max(sizes)
        if any(n not in (1, dim) for n in sizes):
            raise NQPError(f"--curvature has {sizes[0]}, --noise {sizes[1]} and --optimum {sizes[2]} values; "
                           f"give each either one value (broadcast) or the same number")
        h = _as_vector("curvature", curvature, dim)
        return cls(h, _as_vector("noise", noise, dim), _as_vector("optimum", optimum, dim))

    @classmethod
    def powerlaw(cls, dim: int, power: float = 1.0, noise=1.0, optimum=1.0) -> "Problem":
        """Power-law spectrum h_i = i^(-power), i = 1..dim (Zhang et al. 2019 use power = 1)."""
        if int(dim) != dim or dim < 1:
            raise NQPError(f"--dim must be a positive integer, got {dim}")
        if not np.isfinite(power) or power < 0:
            raise NQPError(f"--power must be >= 0, got {power}")
        # the curvature, noise and optimum vectors and the closed forms' per-coordinate terms (a lower bound)
        check_memory([(f"--dim {int(dim):,} coordinates", 6 * FLOAT * int(dim), "--dim")], "the problem")
        h = np.arange(1, int(dim) + 1, dtype=float) ** (-float(power))
        return cls(h, _as_vector("noise", noise, int(dim)), _as_vector("optimum", optimum, int(dim)))

    @property
    def dim(self) -> int:
        return int(self.curvature.size)

    def excess(self, w: np.ndarray) -> np.ndarray:
        """E(w) = 1/2 sum_i h_i (w_i - w*_i)^2, summed over the last axis (units: loss)."""
        return 0.5 * np.sum(self.curvature * (w - self.optimum) ** 2, axis=-1)

    def describe(self) -> str:
        h = self.curvature
        return (f"d={self.dim}, h in [{h.min():.4g}, {h.max():.4g}], "
                f"s in [{self.noise.min():.4g}, {self.noise.max():.4g}], "
                f"w* in [{self.optimum.min():.4g}, {self.optimum.max():.4g}]")

    def to_dict(self) -> dict:
        return {"curvature": self.curvature.tolist(), "noise": self.noise.tolist(),
                "optimum": self.optimum.tolist()}
