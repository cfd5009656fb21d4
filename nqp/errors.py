"""Errors raised for invalid or unstable input (the CLI prints them in one line and exits 2)."""


class NQPError(ValueError):
    """Invalid, inconsistent or unstable noisy-quadratic-problem input."""


class UnstableError(NQPError):
    """The requested dynamics have no stationary distribution (a stability bound is violated)."""
