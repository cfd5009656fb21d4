"""The multiplicative model's balance (nqp.balance): the exact change of Q~ in one literal step, the drift's closed form
= the Lyapunov path on the literal step, the selected balance and its leading order, the adiabatic ODE, and Monte
Carlo = theory in standard errors (seeded, bounded sizes)."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nqp import LatePhase, Problem, SGD
from nqp import balance as bal
from nqp import dynamics as dyn
from nqp.curves import learning_curve
from nqp.montecarlo import long_run_burn_in, simulate, simulate_curve
from nqp.theory import long_run, steady_state

from nqp_strategies import latephase_methods, momenta, problems

Z = 4.0


def _random_state(rng, method, d, runs):
    K = method.K
    st_ = dyn.LatePhaseState(rng.normal(0, 1.5, (runs, d)), rng.normal(0, 1.5, (runs, K, d)))
    if method.momentum:
        st_.v_theta, st_.v_phi = rng.normal(0, 1, (runs, d)), rng.normal(0, 1, (runs, K, d))
    return st_


@given(st.data())
def test_balance_change_of_one_literal_step_is_exact(data):
    """(B3) on the literal step, from arbitrary states: Delta Q~ = eta_theta/gamma (D_theta^2 + c D_theta v_theta')
    - eta_phi sum_k (D_k^2 + c D_k u_k'); for plain SGD also (B2) with g_k = h (theta phi_k - c_k)."""
    p = data.draw(problems(max_dim=3, nonzero_optimum=True))
    lp = data.draw(latephase_methods(p, "multiplicative", max_K=5))
    assume(lp.gamma_theta * lp.lr_theta > 1e-3)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    state = _random_state(rng, lp, p.dim, 4)
    before = dyn.LatePhaseState(*[None if a is None else a.copy() for a in
                                  (state.theta, state.phi, state.v_theta, state.v_phi)])
    xi = rng.standard_normal((4, lp.K, p.dim))
    targets = p.optimum + np.sqrt(p.noise) * xi
    dyn.latephase_step(state, xi.copy(), dyn.Coeffs.of(p), lp)
    dQ = bal.quantity(state, lp) - bal.quantity(before, lp)
    c = bal.coupling(lp)
    D_th = -(state.theta - before.theta) / lp.lr_theta
    D_k = -(state.phi - before.phi) / lp.lr_phi
    pred = lp.lr_theta / lp.gamma_theta * D_th ** 2 - lp.lr_phi * np.sum(D_k ** 2, axis=-2)
    if c:
        pred += c * (lp.lr_theta / lp.gamma_theta * D_th * state.v_theta
                     - lp.lr_phi * np.sum(D_k * state.v_phi, axis=-2))
    scale = np.abs(bal.quantity(before, lp)) + np.abs(pred) + 1.0
    np.testing.assert_array_less(np.abs(dQ - pred), 1e-10 * scale)
    if not lp.momentum:
        g = p.curvature * (before.theta[:, None, :] * before.phi - targets)
        b2 = (lp.gamma_theta * lp.lr_theta * np.sum(before.phi * g, axis=-2) ** 2
              - lp.lr_phi * before.theta ** 2 * np.sum(g ** 2, axis=-2))
        np.testing.assert_array_less(np.abs(dQ - b2), 1e-10 * scale)


def _stable_balance(data, p, lp):
    lo, hi = bal.stable_interval(p, lp)
    f = data.draw(st.floats(0.05, 0.95))
    return np.exp(np.log(lo) + f * (np.log(hi) - np.log(lo)))


@settings(max_examples=25)
@given(st.data())
def test_drift_closed_form_equals_lyapunov_on_the_literal_step(data):
    """(B4) (the additive reduction at balance b) = (B3) with the Lyapunov moments of the literal step linearised at b,
    and the selected balance, its relaxation time and the long-run losses agree between the two paths."""
    p = data.draw(problems(max_dim=2, nonzero_optimum=True))
    lp = data.draw(latephase_methods(p, "multiplicative", max_K=4))
    assume(lp.gamma_theta * lp.lr_theta > 1e-4 and p.noise.min() > 1e-3)
    b = _stable_balance(data, p, lp)
    a, c = bal.drift(p, lp, b, "closed"), bal.drift(p, lp, b, "lyapunov")
    lt, lph = bal.effective_rates(p, lp, b)
    scale = lp.K * p.curvature ** 2 * p.noise * (lp.gamma_theta * lt + lph)   # size of the two terms of (B4)
    np.testing.assert_allclose(a, c, rtol=1e-8, atol=1e-10 * scale.max())
    sa, sc = bal.select(p, lp, "closed"), bal.select(p, lp, "lyapunov")
    np.testing.assert_allclose(sa.selected, sc.selected, rtol=1e-9)
    np.testing.assert_allclose(sa.relaxation_steps, sc.relaxation_steps, rtol=1e-5)
    la, lc = long_run(p, lp, "closed"), long_run(p, lp, "lyapunov")
    assert la.excess_loss_mean_model == pytest.approx(lc.excess_loss_mean_model, rel=1e-8)
    assert la.excess_loss_members == pytest.approx(lc.excess_loss_members, rel=1e-8)
    lt, lph = bal.effective_rates(p, lp, sa.selected)
    scale = lp.K * p.curvature ** 2 * p.noise * (lp.gamma_theta * lt + lph)
    assert np.all(np.abs(bal.drift(p, lp, sa.selected)) <= 1e-12 * scale)


@pytest.mark.parametrize("K,gamma,ratio,mu,nest", [(4, 0.25, 1.0, 0.0, False), (10, 0.1, 1.0, 0.0, False),
                                                   (3, 1.0, 0.3, 0.0, False), (4, 0.5, 2.0, 0.6, False),
                                                   (5, 0.2, 1.0, 0.5, True)])
def test_leading_order_balance_error_shrinks_with_the_steps(K, gamma, ratio, mu, nest):
    """b* -> b*_0 = sqrt(gamma eta_theta / eta_phi) as the steps shrink, with an error proportional to the step:
    scaling both steps by 1/4 scales |b* - b*_0| by 1/4 (to 10 %, once the steps are small)."""
    p = Problem.from_values([1.0], [0.5], [2.0])
    errs = []
    for eta in (0.05, 0.0125, 0.003125, 0.00078125):
        lp = LatePhase(K, eta * ratio, eta, gamma, mu, nest, kind="multiplicative")
        errs.append(abs(bal.select(p, lp).selected[0] / bal.leading_order(lp) - 1))
    errs = np.array(errs)
    assert np.all(errs[1:] < errs[:-1])
    np.testing.assert_allclose(errs[2:] / errs[1:-1], 0.25, rtol=0.1)


def test_single_member_balance_is_the_leading_order_exactly():
    """K = 1: Delta Q = g^2 (gamma eta_theta phi^2 - eta_phi theta^2), so b* = b*_0 for any step."""
    p = Problem.from_values([1.0, 0.4], [1.0, 0.3], [1.0, -3.0])
    lp = LatePhase(1, 0.2, 0.5, 0.7, kind="multiplicative")
    np.testing.assert_allclose(bal.select(p, lp).selected, bal.leading_order(lp), rtol=1e-13)


def test_ode_matches_a_reference_integrator():
    """(B6) by quadrature = scipy's LSODA on dlog b/dt = E[Delta Q~] / (K dQ/dlog b), momentum included."""
    from scipy.integrate import solve_ivp

    p = Problem.from_values([1.0, 0.3, 0.1], [0.3, 1.0, 0.0], [1.0, -2.0, 1.0])
    for mu in (0.0, 0.6):
        lp = LatePhase(4, 0.05, 0.05, 0.25, mu, kind="multiplicative")
        t = np.array([0, 10, 100, 1e3, 3e3, 1e4, 3e4, 1e5, 1e6])

        def f(_, beta):
            b = np.exp(beta)
            return bal.drift(p, lp, b) / (lp.K * bal._dq_dlogb(p, lp, b))
        ref = solve_ivp(f, (0, t[-1]), np.zeros(3), t_eval=t, rtol=1e-12, atol=1e-14, method="LSODA")
        np.testing.assert_allclose(bal.trajectory(p, lp, t), np.exp(ref.y.T), rtol=1e-8)


@st.composite
def small_step_settings(draw):
    """Small steps (eta h |w*| <= 0.08, s <= 0.3 w*^2), d <= 2, K <= 4, any momentum."""
    d = draw(st.integers(1, 2))
    h = np.array(draw(st.lists(st.floats(0.3, 1.0), min_size=d, max_size=d)))
    w = np.array(draw(st.lists(st.floats(0.5, 2.0), min_size=d, max_size=d)))
    w = w * np.array(draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=d, max_size=d)))
    s = np.array(draw(st.lists(st.floats(0.05, 0.3), min_size=d, max_size=d))) * w ** 2
    mu, nest = draw(momenta())
    mu = min(mu, 0.6)
    nest = nest and mu > 0
    K = draw(st.integers(2, 4))
    gamma = draw(st.sampled_from([1.0 / K, 0.5, 1.0]))
    a_phi = draw(st.floats(0.01, 0.04)) * (1 - mu)
    lr_phi = a_phi / np.max(h * np.abs(w))
    lr_theta = draw(st.floats(0.3, 3.0)) * lr_phi / gamma / K
    return Problem.from_values(h, s, w), LatePhase(K, lr_theta, lr_phi, gamma, mu, nest, "multiplicative")


def _assert_within(pred, res, z=Z):
    for key in ("excess_loss_mean_model", "excess_loss_members"):
        est, se, exact = getattr(res, key), getattr(res, key + "_stderr"), getattr(pred, key)
        assert abs(est - exact) <= z * se, f"{key}: simulated {est:.6g} ± {se:.2g}, theory {exact:.6g}"


@settings(max_examples=6)
@given(small_step_settings(), st.integers(0, 1000))
def test_monte_carlo_at_the_selected_balance_matches_the_long_run(setting, seed):
    """Started at b*, the simulation stays there: its losses equal long_run's and its time-averaged balance equals b*,
    within 4 standard errors (runs far shorter than the relaxation time suffice)."""
    p, lp = setting
    pred = long_run(p, lp)
    res = simulate(p, lp, steps=3000 * lp.K, runs=32, seed=seed, start="selected")
    _assert_within(pred, res)
    assert np.all(np.abs(res.balance_mean - pred.balance.selected) <= Z * res.balance_mean_stderr)


@settings(max_examples=6)
@given(small_step_settings(), st.integers(0, 1000))
def test_monte_carlo_drift_at_the_balanced_start_matches_theory(setting, seed):
    """From the balanced start, over a run short against the relaxation time, the measured E[Delta Q~] per outer step
    equals (B4) at b = 1 within 4 standard errors (and the balance moves the predicted way)."""
    p, lp = setting
    res = simulate(p, lp, steps=400 * lp.K, runs=64, seed=seed, start="balanced")
    pred = bal.drift(p, lp, res.balance_mean)        # the balance has moved a little during the burn-in
    assert np.all(np.abs(res.drift_per_step - pred) <= Z * res.drift_per_step_stderr)
    assert np.all(np.sign(res.drift_per_step) == np.sign(bal.drift(p, lp, 1.0)))


def test_long_run_from_the_balanced_start():
    """From the balanced start with a burn-in from the balance ODE, the simulation reaches the selected balance and the
    long-run losses (the short-time prediction at b = 1 is far off: K = 4, gamma_theta = 1/4, so b* ~ 1/2)."""
    p = Problem.from_values([1.0], [0.3], [1.0])
    lp = LatePhase(4, 0.05, 0.05, 0.25, kind="multiplicative")
    pred = long_run(p, lp)
    burn = long_run_burn_in(p, lp)
    assert 3 * pred.relaxation_minibatches < burn < 20 * pred.relaxation_minibatches
    res = simulate(p, lp, steps=40000, burn_in=burn, runs=32, seed=4)
    _assert_within(pred, res)
    assert abs(res.balance_mean[0] - pred.balance.selected[0]) <= Z * res.balance_mean_stderr[0]
    short = pred.short_time
    assert abs(res.excess_loss_mean_model / short.excess_loss_mean_model - 1.25) < 0.03
    assert res.excess_loss_members < short.excess_loss_members - 20 * res.excess_loss_members_stderr


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_curve_follows_the_balance_ode(mu):
    """After the release the simulated learning curve follows the ODE lines (within 4 standard errors) and departs
    from the fixed-balance (short-time) lines by more than 4 standard errors; the balance moves from 1 towards b*."""
    p = Problem.from_values([1.0], [0.3], [1.0])
    lp, sgd = LatePhase(4, 0.1, 0.1, 0.25, mu, kind="multiplicative"), SGD(0.1, mu)
    kw = dict(T0=200, horizon=200 + 12000, w0=1.0, points=13)
    exact = learning_curve(p, lp, sgd, **kw)
    short = learning_curve(p, lp, sgd, balance="release", **kw)
    mc = simulate_curve(p, lp, sgd, runs=2000, seed=9, **kw)
    for k in ("latephase_mean", "latephase_members"):
        ok = mc.t > kw["T0"]
        z = (mc.series[k][ok] - exact.series[k][ok]) / mc.stderr[k][ok]
        assert np.all(np.abs(z) < Z), (k, z)
        z_short = (mc.series[k][-1] - short.series[k][-1]) / mc.stderr[k][-1]
        assert abs(z_short) > Z, (k, z_short)
    b = exact.balance[exact.t >= kw["T0"], 0]
    assert b[0] == pytest.approx(1.0, abs=0.01) and np.all(np.diff(b) < 0)
    assert b[-1] == pytest.approx(bal.select(p, lp).selected[0], rel=0.05)


def test_frozen_theta_keeps_the_release_balance():
    """gamma_theta = 0: theta never moves, the model is linear in phi and the long run is the release linearisation."""
    p = Problem.from_values([1.0, 0.2], [1.0, 0.5], [1.0, -1.0])
    lp = LatePhase(3, 0.1, 0.2, 0.0, kind="multiplicative")
    pred = long_run(p, lp)
    assert pred.balance.frozen and pred.relaxation_minibatches is None
    assert pred.excess_loss_mean_model == steady_state(p, lp).excess_loss_mean_model


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.6, True)])
def test_select_grid_equals_the_per_setting_root_finder(momentum, nesterov):
    """The vectorised b* of the sweep (safeguarded Newton on every setting and coordinate at once) is the root that
    select's bracketing finds per setting; settings unstable at the release are NaN; frozen theta and no noise: 1."""
    p = Problem.from_values([1.0, 0.3, 0.05, 2.0, 0.7], [0.3, 0.5, 0.1, 0.0, 0.2], [1.0, -2.0, 0.5, 1.5, -0.3])
    rows = [(K, g, et, ep) for K in (1, 2, 7) for g in (0.0, 0.05, 1.0) for et, ep in ((0.02, 0.02), (0.1, 0.03),
                                                                                       (0.3, 0.4))]
    K, g, et, ep = (np.array(c, float)[:, None] for c in zip(*rows))
    b = bal.select_grid(p, K, g, et, ep, momentum, nesterov)
    assert b.shape == (len(rows), p.dim)
    checked = 0
    for i, (Ki, gi, eti, epi) in enumerate(rows):
        lp = LatePhase(Ki, eti, epi, gi, momentum, nesterov, kind="multiplicative")
        try:
            ref = bal.select(p, lp).selected
        except bal.UnstableError:
            assert np.isnan(b[i]).any()
            continue
        ref = np.where(p.noise > 0, ref, 1.0)
        np.testing.assert_allclose(b[i], ref, rtol=1e-12)
        checked += 1
    assert checked >= len(rows) // 2


def test_long_run_sweep_equals_long_run_per_point():
    """sweep.grid(balance="long-run") in chunks of two points on all cores = theory.long_run point by point."""
    from nqp.sweep import grid

    p = Problem.from_values([1.0, 0.3, 0.05, 0.6], [0.3, 0.5, 0.1, 0.2], [1.0, -2.0, 0.5, 1.5])
    base = {"lr": 0.05, "momentum": 0.5, "nesterov": False}
    Ks, gammas = np.array([1.0, 2.0, 5.0]), np.array([0.01, 0.2, 1.0])
    res = grid(p, "multiplicative", base, ("K", Ks), ("gamma_theta", gammas), chunk_elements=8, balance="long-run")
    for j, gm in enumerate(gammas):
        for i, K in enumerate(Ks):
            pred = long_run(p, LatePhase(int(K), 0.05, 0.05, gm, 0.5, kind="multiplicative"))
            assert res.mean_model[j, i] == pytest.approx(pred.excess_loss_mean_model, rel=1e-10)
            assert res.members[j, i] == pytest.approx(pred.excess_loss_members, rel=1e-10)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_drift_has_one_stable_root_without_nesterov(momentum):
    """Plain SGD and heavy ball: (B4) changes sign once on the stable interval, from + to -, below sqrt(K) b*_0 --
    why the sweep's root finder needs no evaluation at the release."""
    p = Problem.from_values([1.0, 0.3, 2.0], [0.3, 0.5, 0.2], [1.0, -2.0, 0.7])
    for K, g, et, ep in ((2, 1.0, 0.1, 0.1), (7, 0.3, 0.05, 0.2), (30, 0.02, 0.4, 0.01)):
        lp = LatePhase(K, et, ep, g, momentum, kind="multiplicative")
        lo, hi = bal.stable_interval(p, lp)
        for i in range(p.dim):
            b = np.geomspace(lo[i], hi[i], 402)[1:-1]
            sign = np.sign([bal.drift(p, lp, bb)[i] for bb in b])
            assert sign[0] > 0 and sign[-1] < 0 and np.count_nonzero(np.diff(sign)) == 1
            top = np.sqrt(K) * bal.leading_order(lp)                   # x = sqrt(kappa): the root lies below
            if top < hi[i]:
                assert bal.drift(p, lp, top)[i] < 0
