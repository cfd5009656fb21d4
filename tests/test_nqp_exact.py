"""Exact paths: closed forms (sympy) = Lyapunov (scipy on the literal step), limits, reductions."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nqp import SGD, Ensemble, LatePhase, Problem, TailAverage, UnstableError, steady_state
from nqp import closed_form as cf
from nqp import linear
from nqp.curves import learning_curve

from nqp_strategies import latephase_methods, problems, sgd_methods

REL = 1e-9


def close(a, b, rel=REL):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def assert_paths_agree(problem, method):
    a = steady_state(problem, method, "closed")
    b = steady_state(problem, method, "lyapunov")
    assert close(a.excess_loss_mean_model, b.excess_loss_mean_model), (a, b)
    assert close(a.excess_loss_members, b.excess_loss_members), (a, b)
    np.testing.assert_allclose(a.mean_model_per_coordinate, b.mean_model_per_coordinate, rtol=REL, atol=1e-300)


@given(st.data())
def test_sgd_closed_form_equals_lyapunov(data):
    p = data.draw(problems())
    assert_paths_agree(p, data.draw(sgd_methods(p)))


@given(st.data())
def test_additive_closed_form_equals_lyapunov(data):
    p = data.draw(problems())
    assert_paths_agree(p, data.draw(latephase_methods(p, "additive")))


@given(st.data())
def test_multiplicative_linearisation_closed_form_equals_lyapunov(data):
    p = data.draw(problems(nonzero_optimum=True))
    assert_paths_agree(p, data.draw(latephase_methods(p, "multiplicative", max_K=4)))


@given(st.data())
def test_ensemble_and_tail_average_paths_agree(data):
    p = data.draw(problems(max_dim=3))
    sgd = data.draw(sgd_methods(p))
    K = data.draw(st.integers(1, 5))
    assert_paths_agree(p, Ensemble(sgd, K))
    n = data.draw(st.integers(1, 40))
    assert_paths_agree(p, TailAverage(sgd, n * sgd.batch))
    lp = data.draw(latephase_methods(p, "additive", max_K=4))
    assert_paths_agree(p, TailAverage(lp, n * lp.K))


def test_known_sgd_variance():
    """Var(w) = eta h s / (2 - eta h) for plain SGD (the classical one-dimensional result)."""
    for lr, h, s in [(0.1, 1.0, 1.0), (1.5, 1.0, 0.3), (0.01, 7.0, 2.0)]:
        assert close(cf.sgd_variance(lr, h, s), lr * h * s / (2 - lr * h), 1e-13)


def test_stability_edges_from_the_denominators():
    assert cf.stability_edge() == pytest.approx(2.0)
    assert cf.stability_edge(0.5) == pytest.approx(3.0)
    assert cf.stability_edge(0.5, True) == pytest.approx(1.5)


@pytest.mark.parametrize("mu,nest", [(0.0, False), (0.6, False), (0.6, True)])
def test_spectral_radius_crosses_one_at_the_edge(mu, nest):
    p = Problem.from_values([1.0, 0.2])
    edge = cf.stability_edge(mu, nest)
    below = linear.spectral_radius(linear.linearize(p, SGD(edge * 0.999, mu, nest))).max()
    above = linear.spectral_radius(linear.linearize(p, SGD(edge * 1.001, mu, nest))).max()
    assert below < 1 < above
    lp = LatePhase(3, 0.0, edge * 0.999, 1.0, mu, nest)
    assert linear.spectral_radius(linear.linearize(p, lp)).max() < 1
    with pytest.raises(UnstableError, match="must be <"):
        steady_state(p, LatePhase(3, 0.0, edge * 1.001, 1.0, mu, nest))
    with pytest.raises(UnstableError):
        linear.stationary(p, SGD(edge * 1.001, mu, nest))


@pytest.mark.parametrize("mu,nest", [(0.0, False), (0.6, False), (0.6, True)])
def test_latephase_edge_is_the_effective_step_of_the_literal_step(mu, nest):
    """Additive late-phase learning with theta moving: the literal step's quotient spectral radius crosses 1 where
    (lr_phi + K gamma_theta lr_theta) h_max reaches the SGD edge (docs 2.4), and steady_state refuses beyond it."""
    p = Problem.from_values([1.0, 0.2])
    edge, K, gamma, lr_phi = cf.stability_edge(mu, nest), 4, 1.0, 0.3 * cf.stability_edge(mu, nest)

    def at(factor):
        return LatePhase(K, (edge * factor - lr_phi) / (K * gamma), lr_phi, gamma, mu, nest)
    assert at(0.999).lr_eff == pytest.approx(edge * 0.999)
    assert linear.spectral_radius(linear.linearize(p, at(0.999))).max() < 1
    assert linear.spectral_radius(linear.linearize(p, at(1.001))).max() > 1
    steady_state(p, at(0.999), "lyapunov")
    with pytest.raises(UnstableError, match="must be <"):
        steady_state(p, at(1.001))


def test_loss_diverges_towards_the_edge():
    p = Problem.from_values([1.0])
    vals = [steady_state(p, SGD(2 * (1 - eps))).excess_loss_mean_model for eps in (1e-1, 1e-2, 1e-3)]
    assert vals[0] < vals[1] < vals[2]
    assert vals[2] * 1e-3 == pytest.approx(0.5, rel=1e-2)  # E = (1 - eps) / (2 eps) for h = s = 1


@given(st.data())
def test_small_learning_rate_limit(data):
    """eta -> 0: E_sgd / eta -> 1/4 sum h^2 s (noise floor proportional to the step)."""
    p = data.draw(problems())
    mu, = data.draw(st.sampled_from([(0.0,), (0.5,)]))
    lr = 1e-7
    e = steady_state(p, SGD(lr, mu)).excess_loss_mean_model
    expect = 0.25 * np.sum(p.curvature ** 2 * p.noise) / (1 - mu)
    assert e / lr == pytest.approx(expect, rel=1e-5, abs=1e-300)


@given(st.data())
def test_K1_reduces_to_sgd(data):
    """K = 1: members = mean model = SGD with lr = lr_phi + gamma_theta lr_theta."""
    p = data.draw(problems())
    lp = data.draw(latephase_methods(p, "additive")).with_(K=1)
    pred = steady_state(p, lp, "lyapunov")  # the literal late-phase step
    sgd = steady_state(p, SGD(lp.lr_phi + lp.gamma_theta * lp.lr_theta, lp.momentum, lp.nesterov), "closed")
    assert close(pred.excess_loss_mean_model, sgd.excess_loss_mean_model)
    assert close(pred.excess_loss_members, sgd.excess_loss_members)


@given(st.data())
def test_mean_model_is_large_batch_sgd_with_effective_lr(data):
    """The additive mean model is exactly SGD with a K-times batch and lr_eff = lr_phi + K gamma lr_theta."""
    p = data.draw(problems())
    lp = data.draw(latephase_methods(p, "additive"))
    big = SGD(lp.lr_eff, lp.momentum, lp.nesterov, batch=lp.K)
    # the literal late-phase step (Lyapunov) against the large-batch SGD closed form
    assert close(steady_state(p, lp, "lyapunov").excess_loss_mean_model,
                 steady_state(p, big, "closed").excess_loss_mean_model)


@given(st.data())
def test_docs_monotonicity_claims(data):
    """Checked on the literal step (Lyapunov path), independently of the closed forms."""
    p = data.draw(problems())
    lp = data.draw(latephase_methods(p, "additive"))
    pred = steady_state(p, lp, "lyapunov")
    # Members are never better than the mean model (strictly worse when K > 1 and there is noise).
    assert pred.excess_loss_members >= pred.excess_loss_mean_model * (1 - 1e-12)
    if lp.K > 1 and p.noise.max() > 1e-6:
        assert pred.excess_loss_members > pred.excess_loss_mean_model
    # The mean model's loss grows with gamma_theta (a larger effective step), all else fixed.
    if lp.lr_theta > 1e-6 and p.noise.max() > 1e-6:
        lp2 = lp.with_(gamma_theta=lp.gamma_theta * 1.2 + 0.01)
        if lp2.lr_eff * p.curvature.max() < cf.stability_edge(lp.momentum, lp.nesterov):
            assert steady_state(p, lp2, "lyapunov").excess_loss_mean_model > pred.excess_loss_mean_model
    # With gamma_theta = c / K (averaging), the mean model improves as 1/K.
    if lp.K > 1:
        c = lp.gamma_theta * lp.K
        e1 = steady_state(p, lp.with_(K=1, gamma_theta=c), "lyapunov").excess_loss_mean_model
        assert close(pred.excess_loss_mean_model, e1 / lp.K, 1e-9)


def test_gamma_zero_is_an_ensemble_at_steady_state():
    """gamma_theta = 0 freezes theta: the members are independent SGD runs with lr_phi."""
    p = Problem.powerlaw(20, 1.0)
    lp = LatePhase(5, 0.3, 0.2, 0.0)
    ens = Ensemble(SGD(0.2), 5)
    a, b = steady_state(p, lp, "lyapunov"), steady_state(p, ens, "lyapunov")
    assert close(a.excess_loss_mean_model, b.excess_loss_mean_model)
    assert close(a.excess_loss_members, b.excess_loss_members)


def test_linearisation_matches_hand_derived_matrices():
    p = Problem.from_values([0.7], [1.3], [2.0])
    A = linear.linearize(p, SGD(0.3, 0.5, nesterov=False)).A[0]
    np.testing.assert_allclose(A, [[1 - 0.3 * 0.7, -0.3 * 0.5], [0.7, 0.5]], rtol=1e-14)
    A = linear.linearize(p, SGD(0.3, 0.5, nesterov=True)).A[0]
    np.testing.assert_allclose(A, [[1 - 0.3 * 0.7 * 1.5, -0.3 * 0.25], [0.7, 0.5]], rtol=1e-14)
    sys = linear.linearize(p, LatePhase(2, 0.1, 0.2, 0.5))
    # Neutral direction (theta + a, phi_k - a) is invariant and invisible to every member.
    np.testing.assert_allclose(sys.A[0] @ sys.r[0], sys.r[0], atol=1e-15)
    assert np.abs(sys.C_members[0] @ sys.r[0]).max() < 1e-15


def test_moments_match_brute_force_iteration():
    p = Problem.from_values([0.9, 0.4], [1.0, 0.5], [1.0, -1.0])
    sys = linear.linearize(p, LatePhase(3, 0.05, 0.2, 1.0, momentum=0.4))
    rng = np.random.default_rng(0)
    mean0 = rng.normal(size=sys.z0.shape)
    L = rng.normal(size=sys.A.shape)
    cov0 = L @ np.swapaxes(L, -1, -2)
    means, covs = linear.moments_at(sys.A, sys.B, mean0, cov0, [0, 1, 7, 20])
    m, c = mean0, cov0
    for n in range(21):
        if n in (0, 1, 7, 20):
            i = [0, 1, 7, 20].index(n)
            np.testing.assert_allclose(means[i], m, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(covs[i], c, rtol=1e-12, atol=1e-12)
        m = np.einsum("dij,dj->di", sys.A, m)
        c = sys.A @ c @ np.swapaxes(sys.A, -1, -2) + sys.B @ np.swapaxes(sys.B, -1, -2)


def test_tail_average_matches_brute_force_sum():
    p = Problem.from_values([0.8], [1.0])
    st_ = linear.stationary(p, SGD(0.3, 0.5))
    n = 9
    A, S, C = st_.Abar[0], st_.sigma_q[0], st_.Cbar_mean[0]
    tot = sum(C @ np.linalg.matrix_power(A, abs(i - j)) @ S @ C if i >= j else
              C @ S @ np.linalg.matrix_power(A, j - i).T @ C for i in range(n) for j in range(n))
    assert close(linear.tail_average_variance(st_, n)[0], tot / n ** 2, 1e-12)


@given(st.data())
def test_learning_curve_paths_agree(data):
    """Transient moments: the reduced closed-form path = the full (theta, phi_1..K) propagation."""
    kind = data.draw(st.sampled_from(["additive", "multiplicative"]))
    p = data.draw(problems(max_dim=3, nonzero_optimum=kind == "multiplicative"))
    lp = data.draw(latephase_methods(p, kind, max_K=4))
    sgd_edge = cf.stability_edge(lp.momentum, lp.nesterov) / p.curvature.max()
    sgd = SGD(min(lp.lr_phi, 0.9 * sgd_edge), lp.momentum, lp.nesterov)
    T0 = data.draw(st.integers(0, 30))
    kw = dict(T0=T0, horizon=T0 + 20 * lp.K, w0=0.3, sigma0=data.draw(st.sampled_from([0.0, 0.2])), points=15,
              swa_start=T0 + lp.K)
    a = learning_curve(p, lp, sgd, **kw)
    b = learning_curve(p, lp, sgd, path="lyapunov", **kw)
    for k in a.series:
        scale = np.nanmax(np.abs(b.series[k]))  # values decaying to ~0 agree to rounding of the scale
        np.testing.assert_allclose(a.series[k], b.series[k], rtol=1e-9, atol=1e-13 * scale)


def test_learning_curve_converges_to_steady_state():
    p = Problem.powerlaw(10, 1.0)
    lp = LatePhase(4, 0.05, 0.1, 1.0)
    c = learning_curve(p, lp, SGD(0.1), T0=100, horizon=40000, points=20)
    assert c.series["latephase_mean"][-1] == pytest.approx(steady_state(p, lp).excess_loss_mean_model, rel=1e-3)
    assert c.series["latephase_members"][-1] == pytest.approx(steady_state(p, lp).excess_loss_members, rel=1e-3)
    assert c.series["sgd"][-1] == pytest.approx(steady_state(p, SGD(0.1)).excess_loss_mean_model, rel=1e-3)


def test_generated_closed_forms_equal_sympy():
    """nqp/_closed_forms.py (what the package evaluates, without sympy) = a fresh sympy derivation: each stored
    expression simplifies to the derived one, and each generated function equals sympy's lambdified expression."""
    import sympy as sp

    from nqp import _closed_forms as gen

    derived = cf.generated_expressions()
    assert set(derived) == set(gen.EXPRESSIONS)
    rng = np.random.default_rng(0)
    for name, (expr, args) in derived.items():
        text, arg_names = gen.EXPRESSIONS[name]
        assert arg_names == tuple(str(a) for a in args)
        parsed = sp.sympify(text, locals={str(a): a for a in args})
        assert sp.simplify(parsed - expr) == 0, name
        # stable points: a = eta h inside (0, edge), mu in [0, 0.95)
        mu = rng.uniform(0, 0.95, 200)
        edge = np.array([cf.stability_edge(m, "nesterov" in name) for m in mu])
        vals = {"mu": mu, "a": rng.uniform(0.01, 0.99, 200) * edge, "h": rng.uniform(0.1, 3, 200),
                "s": rng.uniform(0, 2, 200)}
        vals["eta"] = vals["a"] / vals["h"]
        x = [vals[str(a)] for a in args]
        np.testing.assert_allclose(getattr(gen, name)(*x), sp.lambdify(args, expr, "numpy")(*x) + 0 * x[0],
                                   rtol=1e-12, err_msg=name)


@given(st.floats(1e-12, 1.99), st.integers(1, 10 ** 7))
def test_tail_average_factor_is_precise_at_tiny_steps(eps, n):
    """The tail-average factor keeps full precision as eta h -> 0 (the direct formula loses digits like 1/(n eta h)):
    against the sympy expression evaluated with 60 digits."""
    import mpmath

    rho = 1.0 - eps
    expr, r = cf.tail_average_factor_expr()
    with mpmath.workdps(60):
        exact = float(expr.subs({r: mpmath.mpf(rho), cf._symbols()["n"]: n}).evalf(60))
    assert cf.tail_average_factor(rho, n) == pytest.approx(exact, rel=1e-13)


def test_latex_export_is_generated():
    tex = cf.latex()
    for v in cf.VARIANTS:
        assert r"\eta" in tex[f"sgd_variance_{v}"]
        assert "K" in tex[f"additive_mean_{v}"]
    assert r"\rho" in tex["tail_average_factor"]


def test_sgd_after_switches_the_sgd_baselines_at_T0():
    p = Problem.from_values([1.0, 0.2], [1.0, 0.5])
    lp = LatePhase(3, 0.05, 0.1, 0.5)
    a = learning_curve(p, lp, SGD(0.3), T0=0, horizon=90, points=10, swa_start=0, sgd_after=SGD(0.05))
    b = learning_curve(p, lp, SGD(0.05), T0=0, horizon=90, points=10, swa_start=0)
    for k in ("sgd", "sgd_batch_K", "sgd_swa", "latephase_mean"):
        np.testing.assert_allclose(a.series[k], b.series[k], rtol=1e-12)
    c = learning_curve(p, lp, SGD(0.3), T0=30, horizon=90, points=10, sgd_after=SGD(0.3))
    d = learning_curve(p, lp, SGD(0.3), T0=30, horizon=90, points=10)
    np.testing.assert_allclose(c.series["sgd"], d.series["sgd"], rtol=1e-12)


def _guide_block(language: str, first_line: str) -> str:
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "extending.md")).read()
    return re.search(rf"```{language}\n({re.escape(first_line)}.*?)```", text, re.S).group(1)


def test_the_extending_guide_method_composes():
    """docs/extending.md's NQP example, as written: a composed method, its closed form equal to Lyapunov."""
    import nqp
    scope = {"nqp": nqp}
    exec(_guide_block("python", "problem = nqp.Problem"), scope)
    a, b = scope["closed"], scope["lyapunov"]
    assert close(a.excess_loss_mean_model, b.excess_loss_mean_model), (a, b)
    assert close(a.excess_loss_members, b.excess_loss_members), (a, b)
    assert a.excess_loss_mean_model < a.excess_loss_members  # the tail average is better than a member
