"""The noisy quadratic problem (NQP).

Coordinates i = 1..d, each with curvature h_i > 0, noise variance s_i >= 0 and optimum w*_i.
Every minibatch draws a fresh target c with c_i ~ N(w*_i, s_i), independent across coordinates
and minibatches, and has loss

    l(w; c) = 1/2 sum_i h_i (w_i - c_i)^2,        grad_w l = h * (w - c).

The excess loss of a weight vector is E(w) = 1/2 sum_i h_i (w_i - w*_i)^2 (the expected
minibatch loss minus its minimum 1/2 sum_i h_i s_i). Time t counts minibatches.

A problem may also carry a full curvature H (d x d, symmetric positive definite) and a full noise covariance S
(d x d, positive semi-definite): l(w; c) = 1/2 (w - c)^T H (w - c), c ~ N(w*, S), E(w) = 1/2 (w - w*)^T H (w - w*).
Then `curvature` and `noise` hold their diagonals; `hessian` / `noise_cov` are None when the matrix is diagonal.
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
    hessian: np.ndarray | None = None
    noise_cov: np.ndarray | None = None

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
        for name, m in (("hessian", self.hessian), ("noise_cov", self.noise_cov)):
            if m is not None:
                if m.shape != (h.size, h.size):
                    raise NQPError(f"{name} must be {h.size} x {h.size}, got {m.shape}")
                m.setflags(write=False)

    def with_matrices(self, hessian=None, noise_cov=None) -> "Problem":
        """This problem with a full curvature H and/or noise covariance S (checked: square, of the problem's size,
        symmetric; H positive definite, S positive semi-definite). The diagonals replace `curvature` / `noise`."""
        d = self.dim
        h, s, H, S = self.curvature, self.noise, self.hessian, self.noise_cov
        if hessian is not None:
            H = check_matrix(hessian, "`hessian`", d, definite=True)
            h = np.diag(H).copy()
            H = None if _is_diagonal(H) else H
        if noise_cov is not None:
            S = check_matrix(noise_cov, "`noise_cov`", d, definite=False)
            s = np.diag(S).copy()
            S = None if _is_diagonal(S) else S
        return Problem(h, s, self.optimum.copy(), H, S)

    @property
    def H(self) -> np.ndarray:
        """The curvature as a d x d matrix."""
        return np.diag(self.curvature) if self.hessian is None else np.asarray(self.hessian)

    @property
    def S(self) -> np.ndarray:
        """The target-noise covariance as a d x d matrix."""
        return np.diag(self.noise) if self.noise_cov is None else np.asarray(self.noise_cov)

    @property
    def diagonal(self) -> bool:
        """True when H is diagonal: the coordinates then decouple (whatever S's off-diagonal)."""
        return self.hessian is None

    @classmethod
    def from_values(cls, curvature, noise=1.0, optimum=1.0) -> "Problem":
        """Build a problem; a single value of any argument broadcasts to all coordinates."""
        sizes = [np.size(v) for v in (curvature, noise, optimum)]
        dim = max(sizes)
        if any(n not in (1, dim) for n in sizes):
            raise NQPError(f"`curvature` has {sizes[0]}, `noise` {sizes[1]} and `optimum` {sizes[2]} values; "
                           f"give each either one value (broadcast) or the same number")
        h = _as_vector("curvature", curvature, dim)
        return cls(h, _as_vector("noise", noise, dim), _as_vector("optimum", optimum, dim))

    @classmethod
    def powerlaw(cls, dim: int, power: float = 1.0, noise=1.0, optimum=1.0) -> "Problem":
        """Power-law spectrum h_i = i^(-power), i = 1..dim (Zhang et al. 2019 use power = 1)."""
        if int(dim) != dim or dim < 1:
            raise NQPError(f"`dim` must be a positive integer, got {dim}")
        if not np.isfinite(power) or power < 0:
            raise NQPError(f"`power` must be >= 0, got {power}")
        # the curvature, noise and optimum vectors and the closed forms' per-coordinate terms (a lower bound)
        check_memory([(f"`dim` {int(dim):,} coordinates", 6 * FLOAT * int(dim), "`dim`")], "the problem")
        h = np.arange(1, int(dim) + 1, dtype=float) ** (-float(power))
        return cls(h, _as_vector("noise", noise, int(dim)), _as_vector("optimum", optimum, int(dim)))

    @property
    def dim(self) -> int:
        return int(self.curvature.size)

    def excess(self, w: np.ndarray) -> np.ndarray:
        """E(w) = 1/2 (w - w*)^T H (w - w*), over the last axis (units: loss)."""
        x = w - self.optimum
        if self.hessian is None:
            return 0.5 * np.sum(self.curvature * x ** 2, axis=-1)
        return 0.5 * np.einsum("...i,ij,...j->...", x, self.hessian, x)

    def describe(self) -> str:
        h = self.curvature
        full = "".join(f", full {n}" for n, m in (("H", self.hessian), ("S", self.noise_cov)) if m is not None)
        return (f"d={self.dim}{full}, h in [{h.min():.4g}, {h.max():.4g}], "
                f"s in [{self.noise.min():.4g}, {self.noise.max():.4g}], "
                f"w* in [{self.optimum.min():.4g}, {self.optimum.max():.4g}]")

    def to_dict(self) -> dict:
        out = {"curvature": self.curvature.tolist(), "noise": self.noise.tolist(), "optimum": self.optimum.tolist()}
        for k in ("hessian", "noise_cov"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k).tolist()
        return out


def _is_diagonal(m: np.ndarray) -> bool:
    return not np.any(m - np.diag(np.diag(m)))


def check_matrix(value, flag: str, dim: int, definite: bool) -> np.ndarray:
    """A d x d symmetric matrix, positive definite (definite=True) or semi-definite, as float64 (one-line errors)."""
    m = np.asarray(value, dtype=float)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise NQPError(f"{flag} must be a square matrix, got shape {m.shape}")
    if m.shape[0] != dim:
        raise NQPError(f"{flag} is {m.shape[0]} x {m.shape[0]} but the problem has {dim} coordinates")
    if not np.all(np.isfinite(m)):
        raise NQPError(f"{flag} must be finite")
    scale = max(np.abs(m).max(), np.finfo(float).tiny)
    if np.abs(m - m.T).max() > 1e-10 * scale:
        raise NQPError(f"{flag} must be symmetric (largest |M - M^T| = {np.abs(m - m.T).max():.3g})")
    m = 0.5 * (m + m.T)
    low = float(np.linalg.eigvalsh(m).min())
    if definite and low <= 1e-12 * scale:
        raise NQPError(f"{flag} must be positive definite (smallest eigenvalue {low:.3g})")
    if not definite and low < -1e-10 * scale:
        raise NQPError(f"{flag} must be positive semi-definite (smallest eigenvalue {low:.3g})")
    return m


def load_matrix(path: str, flag: str) -> np.ndarray:
    """Read a matrix from a .npy file (no pickles: reading never runs code) or a text file numpy.loadtxt reads."""
    try:
        if str(path).lower().endswith(".npy"):
            m = np.load(path, allow_pickle=False)
        else:
            m = np.loadtxt(path, dtype=float, ndmin=2)
    except OSError as e:
        raise NQPError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, TypeError, EOFError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NQPError(f"{flag} {path}: not a numeric matrix ({first})") from None
    if m.dtype.kind not in "biuf":
        raise NQPError(f"{flag} {path}: not a numeric matrix (dtype {m.dtype})")
    return m
