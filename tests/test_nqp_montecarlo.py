"""Monte Carlo = exact predictions within 4 standard errors (seeded, bounded sizes)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nqp import SGD, Ensemble, LatePhase, NQPError, Problem, TailAverage, long_run, steady_state
from nqp.curves import learning_curve
from nqp import dynamics as dyn
from nqp.montecarlo import box_muller, simulate, simulate_curve

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


def test_box_muller_variates_are_standard_normal():
    """The float32 noise source: mean 0, variance 1, third moment 0, fourth moment 3, uncorrelated pairs, within 4
    standard errors of 2*10^6 variates, and a Kolmogorov-Smirnov distance below its 4-sigma band."""
    x = np.empty(2 * 10 ** 6, np.float32)
    box_muller(np.random.SFC64(3), x)
    y = x.astype(float)
    n = y.size
    assert abs(y.mean()) < 4 / np.sqrt(n)
    assert abs(y.var() - 1) < 4 * np.sqrt(2 / n)
    assert abs((y ** 3).mean()) < 4 * np.sqrt(15 / n)
    assert abs((y ** 4).mean() - 3) < 4 * np.sqrt(96 / n)
    assert abs(np.mean(y[: n // 2] * y[n // 2:])) < 4 / np.sqrt(n / 2)
    from math import erf
    ys = np.sort(y[:200000])
    cdf = 0.5 * (1 + np.vectorize(erf)(ys / np.sqrt(2)))
    ks = np.max(np.abs(cdf - np.arange(1, ys.size + 1) / ys.size))
    assert ks < 4 * 0.5 / np.sqrt(ys.size)


@pytest.mark.parametrize("s", [0.3, 1e-4])
def test_float32_rounding_error_is_far_below_the_standard_error(s):
    """The literal step in float32 and in float64, driven by the same normal variates: the time-averaged losses differ
    by less than 1 % of their standard error across runs (multiplicative, at a balance away from the balanced start)."""
    p = Problem.from_values([1.0, 0.3], [s, s], [1.0, -2.0])
    lp = LatePhase(4, 0.05, 0.05, 0.25, kind="multiplicative")
    rng = np.random.default_rng(0)
    runs, steps = 32, 3000
    st = {dt: dyn.fixed_point(p, lp, shape=(runs,), dtype=dt, balance=0.5) for dt in (np.float64, np.float32)}
    co = {dt: dyn.Coeffs(*(a.astype(dt) for a in (p.curvature, np.sqrt(p.noise), p.optimum))) for dt in st}
    acc = {dt: np.zeros((2, runs)) for dt in st}
    for _ in range(steps):
        xi = rng.standard_normal((runs, lp.K, p.dim))
        for dt in st:
            dyn.latephase_step(st[dt], xi.astype(dt), co[dt], lp)
            w = dyn.members(st[dt], lp).astype(float) - p.optimum
            m = dyn.mean_model(st[dt], lp).astype(float) - p.optimum
            acc[dt][0] += 0.5 * (m * m) @ p.curvature
            acc[dt][1] += 0.5 * np.einsum("rkd,rkd,d->r", w, w, p.curvature) / lp.K
    for q in range(2):
        diff = np.mean(acc[np.float32][q] - acc[np.float64][q]) / steps
        se = acc[np.float64][q].std(ddof=1) / steps / np.sqrt(runs)
        assert abs(diff) < 0.01 * se, (q, diff, se)


@pytest.mark.parametrize("method", [LatePhase(3, 0.1, 0.2, 0.5), LatePhase(3, 0.05, 0.05, 1 / 3, 0.3,
                                                                          kind="multiplicative")])
def test_float32_simulation_matches_theory(method):
    p = Problem.from_values([1.0, 0.4], [0.2, 0.5], [1.0, -1.5])
    pred = steady_state(p, method) if method.kind == "additive" else long_run(p, method)
    res = simulate(p, method, steps=12000, runs=32, seed=6, dtype=np.float32,
                   start="balanced" if method.kind == "additive" else "selected")
    assert res.dtype == "float32"
    assert_within(pred, res)


def test_simulation_input_errors():
    p = Problem.from_values([1.0])
    with pytest.raises(NQPError, match="runs"):
        simulate(p, SGD(0.1), steps=100, runs=1)
    with pytest.raises(NQPError, match="steps"):
        simulate(p, LatePhase(10, 0.1, 0.1), steps=5, runs=4)
    with pytest.raises(NQPError, match="`burn_in`"):
        simulate(p, SGD(0.1), steps=100, runs=4, burn_in=-1)
