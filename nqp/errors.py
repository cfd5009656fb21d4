"""Errors raised for invalid or unstable input (the CLI prints them in one line and exits 2).

Messages name the library's parameters in backticks (`lr_theta`, `T0`, `runs`); the command line shows each as its
flag (:func:`nqp.cli.flags`: --lr-theta, --t0, --runs), so the library never speaks in command-line words."""


class NQPError(ValueError):
    """Invalid, inconsistent or unstable noisy-quadratic-problem input."""


class UnstableError(NQPError):
    """The requested dynamics have no stationary distribution (a stability bound is violated)."""


def overflow(*inputs: str) -> NQPError:
    """The error for a predicted or simulated loss beyond float64, naming the inputs to scale down.

    >>> str(overflow("noise", "curvature", "optimum")).split("; ")[1]
    'rescale the problem (smaller `noise`, `curvature` or `optimum`)'
    """
    names = [f"`{n}`" for n in inputs]
    which = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return NQPError(f"the predicted loss overflows float64 (values near 1e308); rescale the problem (smaller {which})")
