"""Monte Carlo = exact predictions within 4 standard errors (seeded, bounded sizes)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nqp import SGD, Ensemble, LatePhase, NQPError, Problem, TailAverage, steady_state
from nqp.curves import learning_curve
from nqp.montecarlo import simulate, simulate_curve

from nqp_strategies import latephase_methods, problems, sgd_methods

Z = 4.0


def assert_within(pred, res, z=Z):
    for key in ("excess_loss_mean_model", "excess_loss_members"):
        est, se, exact = getattr(res, key), getattr(res, key + "_stderr"), getattr(pred, key)
        if se == 0:  # no noise: the runs stay at the optimum
            assert est == pytest.approx(exact, abs=1e-12)
            continue
        assert abs(est - exact) <= z * se, f"{key}: simulated {est:.6g} ± {se:.2g}, exact {exact:.6g}"


def _check(problem, method, steps=6000, runs=32, seed=0):
    pred = steady_state(problem, method)
    res = simulate(problem, method, steps=steps, runs=runs, seed=seed)
    assert_within(pred, res)


@settings(max_examples=8)
@given(st.data())
def test_sgd_simulation_matches_closed_form(data):
    p = data.draw(problems(max_dim=3))
    _check(p, data.draw(sgd_methods(p)), seed=data.draw(st.integers(0, 1000)))


@settings(max_examples=8)
@given(st.data())
def test_additive_simulation_matches_closed_form(data):
    p = data.draw(problems(max_dim=3))
    lp = data.draw(latephase_methods(p, "additive", max_K=5))
    _check(p, lp, steps=1500 * lp.K, seed=data.draw(st.integers(0, 1000)))


@pytest.mark.parametrize("method", [
    Ensemble(SGD(0.4), 4),
    TailAverage(SGD(0.4), 12),
    TailAverage(LatePhase(3, 0.1, 0.4, 0.5), 15),
    TailAverage(SGD(0.2, momentum=0.5, nesterov=True), 10),
    LatePhase(4, 0.05, 0.3, 1.0, momentum=0.5, nesterov=True),
])
def test_baselines_simulation_matches_closed_form(method):
    p = Problem.from_values([1.0, 0.4, 0.1], [1.0, 2.0, 0.5], [1.0, -1.0, 0.5])
    _check(p, method, steps=12000, runs=32, seed=3)


def test_multiplicative_small_noise_prediction_holds_at_small_noise():
    """The linearised prediction is accurate when the noise is small (s << w*^2) over moderate runs."""
    p = Problem.from_values([1.0, 0.5], [1e-5, 2e-5], [1.0, -2.0])
    lp = LatePhase(3, 0.05, 0.2, 1.0, kind="multiplicative")
    _check(p, lp, steps=3000, runs=32, seed=1)


def test_multiplicative_departs_from_linearisation_at_large_noise():
    """At s ~ w*^2 the exact (simulated) member loss is clearly below the small-noise prediction."""
    p = Problem.from_values([1.0], [0.5], [1.0])
    lp = LatePhase(3, 0.05, 0.2, 1.0, kind="multiplicative")
    pred = steady_state(p, lp)
    res = simulate(p, lp, steps=30000, runs=16, seed=2)
    assert res.excess_loss_members < pred.excess_loss_members - 10 * res.excess_loss_members_stderr


def test_reproducible_and_thread_independent():
    p = Problem.powerlaw(300, 1.0)
    lp = LatePhase(3, 0.05, 0.1, 1.0)
    a = simulate(p, lp, steps=300, burn_in=30, runs=4, seed=7, threads=1)
    b = simulate(p, lp, steps=300, burn_in=30, runs=4, seed=7, threads=2)
    c = simulate(p, lp, steps=300, burn_in=30, runs=4, seed=8, threads=2)
    np.testing.assert_array_equal(a.per_run_mean_model, b.per_run_mean_model)
    assert not np.array_equal(a.per_run_mean_model, c.per_run_mean_model)


def test_curve_simulation_matches_exact_moments():
    p = Problem.from_values([1.0, 0.3, 0.05], [1.0, 2.0, 0.5], [1.0, -2.0, 0.7])
    lp, sgd = LatePhase(4, 0.05, 0.1, 0.7, momentum=0.3), SGD(0.1, momentum=0.3)
    kw = dict(T0=40, horizon=400, w0=0.5, sigma0=0.1, points=12, swa_start=80)
    exact = learning_curve(p, lp, sgd, **kw)
    mc = simulate_curve(p, lp, sgd, runs=400, seed=5, **kw)
    np.testing.assert_array_equal(exact.t, mc.t)
    for k, v in mc.series.items():
        ok = mc.stderr[k] > 1e-9 * np.abs(v)  # t = 0 is deterministic
        z = (v[ok] - exact.series[k][ok]) / mc.stderr[k][ok]
        assert np.all(np.abs(z) < Z), (k, z)


def test_simulation_input_errors():
    p = Problem.from_values([1.0])
    with pytest.raises(NQPError, match="runs"):
        simulate(p, SGD(0.1), steps=100, runs=1)
    with pytest.raises(NQPError, match="steps"):
        simulate(p, LatePhase(10, 0.1, 0.1), steps=5, runs=4)
    with pytest.raises(NQPError, match="burn-in"):
        simulate(p, SGD(0.1), steps=100, runs=4, burn_in=-1)
