"""Tolerances for comparing one quantity computed along two different code paths.

Bit-equality holds only where the same kernels compute both sides (a resumed or forked run, the same path run
twice). Two code paths -- a batched matmul and a plain one, a stacked batch and K member passes, one process and two,
compiled and eager -- may add the same products in another order, fuse multiply-adds or not, and pick other vector
kernels on another CPU (AVX-512, AVX2, SSE4.2: MKL and ATen choose at run time). The difference is then the float
rounding of the sums involved, bounded by the classical error bound of a sum of n terms (Higham, "Accuracy and
Stability of Numerical Algorithms", §4.2):

    |computed - exact| <= (n - 1) u * sum_i |term_i| + O(u^2),    u = eps / 2  (unit roundoff of the dtype),

so two computations differ by at most 2 (n - 1) u sum |term_i| <= n eps scale, where ``scale`` bounds
sum_i |term_i| / n, the mean magnitude of the terms. :func:`rounding_tol` turns that into ``rtol`` and ``atol`` for
``torch.testing.assert_close`` (``atol`` covers results that cancel to near zero, where a relative bound says
nothing). It is a worst-case bound, independent of the machine, so a test that uses it passes on every CPU.

Example::

    torch.testing.assert_close(batched, plain, **rounding_tol(n=in_features + 1))  # y = x W^T + b
"""
from __future__ import annotations

EPS = {"float64": 2.220446049250313e-16, "float32": 1.1920928955078125e-07, "bfloat16": 0.0078125,
       "float16": 0.0009765625}


def rounding_tol(n: int, dtype="float32", scale: float = 1.0, chain: int = 1) -> dict:
    """``dict(rtol=..., atol=...)`` for two code paths that each sum ``n`` terms of mean magnitude at most ``scale``:
    rtol = chain n eps, atol = chain n eps scale. ``chain`` (default 1) multiplies the bound for results computed
    through that many such sums in a row (layers, steps), whose errors add to first order. ``dtype``: a torch dtype
    or its name ("float32", "float64", ...)."""
    if n < 1 or chain < 1:
        raise ValueError(f"n and chain must be >= 1, got n={n}, chain={chain}")
    eps = EPS[str(dtype).removeprefix("torch.")]
    bound = chain * n * eps
    return dict(rtol=bound, atol=bound * scale)
