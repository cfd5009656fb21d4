"""Bounded hypothesis strategies for stable noisy-quadratic problems and methods."""
import numpy as np
from hypothesis import strategies as st

from nqp import SGD, LatePhase, Problem
from nqp import closed_form as cf


@st.composite
def problems(draw, max_dim=4, nonzero_optimum=False):
    d = draw(st.integers(1, max_dim))
    h = draw(st.lists(st.floats(0.05, 2.0), min_size=d, max_size=d))
    s = draw(st.lists(st.floats(0.0, 3.0), min_size=d, max_size=d))
    w = draw(st.lists(st.floats(0.3, 2.0), min_size=d, max_size=d))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=d, max_size=d))
    wstar = np.array(w) * (np.array(signs) if nonzero_optimum else 1.0)
    return Problem.from_values(h, s, wstar)


@st.composite
def momenta(draw):
    mu = draw(st.sampled_from([0.0, 0.0, 0.3, 0.6, 0.9]))
    nesterov = bool(mu) and draw(st.booleans())
    return mu, nesterov


@st.composite
def sgd_methods(draw, problem):
    mu, nest = draw(momenta())
    edge = cf.stability_edge(mu, nest) / problem.curvature.max()
    frac = draw(st.floats(0.02, 0.95))
    batch = draw(st.integers(1, 4))
    return SGD(frac * edge, mu, nest, batch)


@st.composite
def latephase_methods(draw, problem, kind="additive", max_K=6):
    mu, nest = draw(momenta())
    h = problem.curvature * (np.abs(problem.optimum) if kind == "multiplicative" else 1.0)
    edge = cf.stability_edge(mu, nest) / h.max()
    K = draw(st.integers(1, max_K))
    gamma = draw(st.sampled_from([0.0, 1.0 / K, 0.5, 1.0, 1.7]))
    f_phi = draw(st.floats(0.02, 0.9))
    lr_phi = f_phi * edge
    room = 0.95 * edge - lr_phi          # lr_eff = lr_phi + K gamma lr_theta < 0.95 edge
    f_theta = draw(st.floats(0.0, 1.0))
    lr_theta = f_theta * room / (K * gamma) if gamma > 0 and room > 0 else draw(st.floats(0.0, 1.0)) * edge
    return LatePhase(K, lr_theta, lr_phi, gamma, mu, nest, kind)
