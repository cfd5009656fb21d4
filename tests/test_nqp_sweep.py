"""Vectorised sweep grids equal point-by-point predictions; value parsing; stability masks."""
import numpy as np
import pytest

from nqp import SGD, LatePhase, NQPError, Problem, steady_state
from nqp.sweep import grid, parse_values


def test_parse_values():
    np.testing.assert_allclose(parse_values("lr", ["0.1", "0.2"]), [0.1, 0.2])
    np.testing.assert_allclose(parse_values("lr", ["0:1:5"]), np.linspace(0, 1, 5))
    np.testing.assert_allclose(parse_values("lr", ["0.01:1:3:log"]), [0.01, 0.1, 1.0])
    np.testing.assert_array_equal(parse_values("K", ["1:5:5"]), [1, 2, 3, 4, 5])
    for bad in (["x"], ["1:2"], ["1:2:0"], ["0:1:3:log"], []):
        with pytest.raises(NQPError):
            parse_values("lr", bad)


@pytest.mark.parametrize("method,x,y", [
    ("additive", ("K", np.array([1, 3, 10.0])), ("gamma_theta", np.array([0.0, 0.1, 1.0]))),
    ("additive", ("lr_phi", np.array([0.05, 0.5])), ("momentum", np.array([0.0, 0.5]))),
    ("multiplicative", ("lr", np.array([0.05, 0.1])), ("K", np.array([2.0, 4.0]))),
    ("sgd", ("lr", np.array([0.1, 1.0, 2.5])), ("momentum", np.array([0.0, 0.3]))),
])
def test_grid_equals_pointwise(method, x, y):
    p = Problem.from_values([1.0, 0.3, 0.02], [1.0, 0.5, 2.0], [1.0, -0.5, 2.0])
    base = dict(K=4, gamma_theta=0.5, lr=0.1, lr_theta=None, lr_phi=None, momentum=0.0, nesterov=False)
    res = grid(p, method, base, x, y)
    for j, yv in enumerate(y[1]):
        for i, xv in enumerate(x[1]):
            prm = {**base, x[0]: xv, y[0]: yv}
            lt = prm["lr_theta"] if prm["lr_theta"] is not None else prm["lr"]
            lph = prm["lr_phi"] if prm["lr_phi"] is not None else prm["lr"]
            if method == "sgd":
                m = SGD(prm["lr"], prm["momentum"])
            else:
                m = LatePhase(int(prm["K"]), lt, lph, prm["gamma_theta"], prm["momentum"], kind=method)
            try:
                e = steady_state(p, m)
            except NQPError:
                assert not res.stable[j, i] and np.isnan(res.mean_model[j, i])
                continue
            assert res.stable[j, i]
            assert res.mean_model[j, i] == pytest.approx(e.excess_loss_mean_model, rel=1e-10)
            assert res.members[j, i] == pytest.approx(e.excess_loss_members, rel=1e-10)
            e_sgd = steady_state(p, SGD(prm["lr"], prm["momentum"])).excess_loss_mean_model
            assert res.sgd[j, i] == pytest.approx(e_sgd, rel=1e-10)
