"""Noisy quadratic problem: exact and Monte Carlo predictions for SGD and late-phase learning."""
from .errors import NQPError, UnstableError
from .methods import SGD, Block, Ensemble, LatePhase, TailAverage
from .problem import Problem
from .theory import Prediction, baselines, check_stable, long_run, stability, steady_state

__all__ = ["NQPError", "UnstableError", "SGD", "Block", "Ensemble", "LatePhase", "TailAverage", "Problem",
           "Prediction", "baselines", "check_stable", "long_run", "stability", "steady_state"]
