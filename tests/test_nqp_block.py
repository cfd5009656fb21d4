"""The block model (late-phase weights on their own coordinates): closed form = Lyapunov (reduced and full) on
diagonal problems, Lyapunov = Monte Carlo on coupled ones, the three reductions, weight decay, and the CLI."""
import json

import numpy as np
import pytest

from nqp import block
from nqp.cli import main
from nqp.methods import SGD, Block, Ensemble
from nqp.problem import Problem
from nqp.theory import steady_state

DIAG = Problem.from_values([1.0, 0.5, 0.3, 0.2, 0.1], [1.0, 2.0, 0.5, 1.0, 1.5], [1.0, -1.0, 2.0, 0.5, 1.0])


def coupled(d=5, seed=0):
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((d, d))
    H = Q @ Q.T / d + 0.2 * np.eye(d)
    S = np.cov(rng.standard_normal((d, 3 * d)))
    return Problem.from_values(np.ones(d), 1.0, rng.standard_normal(d)).with_matrices(H, S)


def totals(problem, mom):
    return 0.5 * np.trace(problem.H @ mom.mean_model), 0.5 * np.trace(problem.H @ mom.members)


METHODS = [
    Block(3, 0.1, 0.2, 0.5, phi_coords=(1, 3)),
    Block(3, 0.1, 0.2, 0.5, 0.5, False, (1, 3), weight_decay=0.05),
    Block(4, 0.1, 0.2, 0.25, 0.6, True, (0, 1, 4), weight_decay=0.1),
    Block(2, 0.3, 0.1, 1.0, 0.3, False, (), weight_decay=0.02, batch=3),
    Block(5, 0.05, 0.3, 1.0, 0.0, False, (0, 1, 2, 3, 4), weight_decay=0.2),
    Block(4, 0.1, 0.2, 1.0, 0.5, True, (0, 2), weight_decay=0.05, weight_decay_theta=0.3),
]


@pytest.mark.parametrize("method", METHODS)
def test_closed_form_equals_lyapunov_on_diagonal_problems(method):
    mean, mem = block.closed_form(DIAG, method)
    red = block.lyapunov_moments(DIAG, method)
    full = block.lyapunov_moments(DIAG, method, full=True)
    for mom in (red, full):
        np.testing.assert_allclose(block.per_coordinate(DIAG, mom.mean_model), mean, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(block.per_coordinate(DIAG, mom.members), mem, rtol=1e-9, atol=1e-14)


def test_a_diagonal_matrix_given_as_full_takes_the_lyapunov_path_and_agrees():
    p = Problem(DIAG.curvature.copy(), DIAG.noise.copy(), DIAG.optimum.copy(), np.diag(DIAG.curvature))
    m = METHODS[2]
    full = steady_state(p, m)
    assert full.path.startswith("lyapunov")
    closed = steady_state(DIAG, m)
    assert closed.path == "closed"
    assert full.excess_loss_mean_model == pytest.approx(closed.excess_loss_mean_model, rel=1e-9)
    assert full.excess_loss_members == pytest.approx(closed.excess_loss_members, rel=1e-9)


@pytest.mark.parametrize("method", METHODS[1:3])
def test_reduced_lyapunov_equals_the_full_state_on_a_coupled_problem(method):
    p = coupled()
    a, b = totals(p, block.lyapunov_moments(p, method)), totals(p, block.lyapunov_moments(p, method, full=True))
    np.testing.assert_allclose(a, b, rtol=1e-9)


@pytest.mark.parametrize("method", [Block(3, 0.1, 0.2, 0.5, 0.5, False, (1, 3), weight_decay=0.05,
                                          weight_decay_theta=0.2),
                                    Block(2, 0.15, 0.3, 1.0, 0.0, False, (0, 2), weight_decay=0.0)])
def test_lyapunov_equals_monte_carlo_within_4_standard_errors_on_a_coupled_problem(method):
    p = coupled()
    pred = steady_state(p, method)
    res = block.simulate(p, method, steps=40000, runs=16, seed=1)
    assert abs(res.excess_loss_mean_model - pred.excess_loss_mean_model) < 4 * res.excess_loss_mean_model_stderr
    assert abs(res.excess_loss_members - pred.excess_loss_members) < 4 * res.excess_loss_members_stderr


@pytest.mark.parametrize("mom,nest", [(0.0, False), (0.5, False), (0.5, True)])
def test_K1_gamma1_is_sgd(mom, nest):
    sgd = steady_state(DIAG, SGD(0.3, mom, nest))          # the existing SGD closed form
    for coords in ((), (0, 2), tuple(range(5))):
        m = Block(1, 0.3, 0.3, 1.0, mom, nest, coords)
        for path in ("closed", "lyapunov"):
            got = steady_state(DIAG, m, path)
            assert got.excess_loss_mean_model == pytest.approx(sgd.excess_loss_mean_model, rel=1e-9)
            assert got.excess_loss_members == pytest.approx(sgd.excess_loss_members, rel=1e-9)


@pytest.mark.parametrize("mom", [0.0, 0.6])
def test_no_phi_coordinates_is_sgd_with_a_K_times_batch_at_step_K_gamma_lr_theta(mom):
    K, g, lt = 4, 0.5, 0.1
    ref = steady_state(DIAG, SGD(K * g * lt, mom, batch=K))
    for path in ("closed", "lyapunov"):
        got = steady_state(DIAG, Block(K, lt, 0.2, g, mom, False, ()), path)
        assert got.excess_loss_mean_model == pytest.approx(ref.excess_loss_mean_model, rel=1e-9)
        assert got.excess_loss_members == pytest.approx(ref.excess_loss_mean_model, rel=1e-9)
    # with weight decay lambda on theta once per outer step: SGD's decay is lambda / (K gamma), on a coupled problem
    p = coupled()
    ref = steady_state(p, SGD(K * g * lt, mom, batch=K, weight_decay=0.08 / (K * g)))
    got = steady_state(p, Block(K, lt, 0.2, g, mom, False, (), weight_decay=0.08))
    assert got.excess_loss_mean_model == pytest.approx(ref.excess_loss_mean_model, rel=1e-9)


@pytest.mark.parametrize("mom", [0.0, 0.6])
def test_every_coordinate_phi_is_K_independent_runs_averaged_in_weight_space(mom):
    K = 5
    ref = steady_state(DIAG, Ensemble(SGD(0.2, mom), K))     # the existing ensemble closed form
    for path in ("closed", "lyapunov"):
        got = steady_state(DIAG, Block(K, 0.7, 0.2, 0.3, mom, False, tuple(range(5))), path)
        assert got.excess_loss_mean_model == pytest.approx(ref.excess_loss_mean_model, rel=1e-9)
        assert got.excess_loss_members == pytest.approx(ref.excess_loss_members, rel=1e-9)


def test_weight_decay_adds_the_bias_of_the_shrunk_optimum():
    p = Problem.from_values([2.0], [0.0], [3.0])          # no noise: the excess is the bias alone
    lam = 0.5
    got = steady_state(p, SGD(0.1, weight_decay=lam))
    assert got.excess_loss_mean_model == pytest.approx(0.5 * 2.0 * (lam * 3.0 / (2.0 + lam)) ** 2, rel=1e-12)


def test_sgd_with_weight_decay_monte_carlo_agrees():
    m = SGD(0.3, 0.5, weight_decay=0.1)
    pred = steady_state(DIAG, m)
    from nqp.montecarlo import simulate
    res = simulate(DIAG, m, steps=20000, runs=16, seed=3)
    assert abs(res.excess_loss_mean_model - pred.excess_loss_mean_model) < 4 * res.excess_loss_mean_model_stderr


# ----------------------------------------------------------------------------- CLI

def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_predict_block_json_and_conclusion(capsys):
    rc, out, _ = run(capsys, "predict", "--method", "block", "--phi-coords", "0", "1", "--curvature", "1", "0.5",
                     "0.2", "--K", "4", "--gamma-theta", "1", "--weight-decay", "0.01", "--momentum", "0.5", "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["excess_loss_mean_model"] > 0 and d["excess_loss_members"] >= d["excess_loss_mean_model"]
    assert d["params"]["phi_coords"] == [0, 1]
    rc, out, _ = run(capsys, "predict", "--method", "block", "--phi-coords", "0", "--curvature", "1", "0.5")
    assert rc == 0 and "conclusion:" in out


def test_cli_full_hessian_from_npy_and_text(capsys, tmp_path):
    p = coupled(4)
    np.save(tmp_path / "H.npy", p.H)
    np.savetxt(tmp_path / "S.txt", p.S)
    rc, out, err = run(capsys, "predict", "--method", "block", "--phi-coords", "1", "--hessian",
                       str(tmp_path / "H.npy"), "--noise-cov", str(tmp_path / "S.txt"), "--K", "3", "--lr", "0.2",
                       "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["path"].startswith("lyapunov")
    ref = steady_state(Problem.from_values(np.ones(4), 1.0, 1.0).with_matrices(p.H, p.S), Block(3, 0.2, 0.2, 1.0,
                                                                                                 phi_coords=(1,)))
    assert d["excess_loss_mean_model"] == pytest.approx(ref.excess_loss_mean_model, rel=1e-9)
    rc, out, err = run(capsys, "simulate", "--method", "block", "--phi-coords", "1", "--hessian",
                       str(tmp_path / "H.npy"), "--K", "3", "--lr", "0.2", "--steps", "6000", "--runs", "8", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert abs(d["excess_loss_mean_model_z"]) < 5


@pytest.mark.parametrize("content,expect", [
    (np.ones((2, 3)), "square"),
    (np.array([[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
    (np.array([[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
    (np.eye(3), "3 x 3 but the problem has 2"),
    ("garbage", "not a numeric matrix"),
    (None, "cannot read"),
])
def test_cli_bad_matrix_files_are_one_line(capsys, tmp_path, content, expect):
    f = tmp_path / "M.txt"
    if isinstance(content, str):
        f.write_text("a b\nc d\n")
    elif content is not None:
        np.savetxt(f, content)
    args = ["predict", "--method", "block", "--phi-coords", "0"]
    if expect.startswith("3 x 3"):
        args += ["--curvature", "1", "2", "--noise-cov", str(f)]
    else:
        args += ["--hessian", str(f)]
    rc, _, err = run(capsys, *args)
    assert rc == 2
    assert err.count("\n") == 1 and expect in err, err


@pytest.mark.parametrize("args,expect", [
    (["--method", "block", "--phi-coords", "0", "--curvature", "1", "--lr", "3"], "lr_phi * (h) on phi"),
    (["--method", "block", "--phi-coords", "0", "--curvature", "1", "1", "--lr", "1", "--K", "4"],
     "lr_theta * (K*gamma_theta*h) on theta"),
    (["--method", "block", "--phi-coords", "5", "--curvature", "1", "1"], "out of range"),
    (["--method", "block", "--curvature", "1", "1"], "needs --phi-coords"),
    (["--method", "block", "--phi-coords", "0", "--gamma-theta", "0", "--curvature", "1", "1"], "theta never moves"),
])
def test_cli_block_errors_exit_2_in_one_line(capsys, args, expect):
    rc, _, err = run(capsys, "predict", *args)
    assert rc == 2
    assert err.count("\n") == 1 and expect in err, err


def test_cli_full_hessian_rejects_the_additive_model(capsys, tmp_path):
    np.save(tmp_path / "H.npy", coupled(3).H)
    rc, _, err = run(capsys, "predict", "--method", "additive", "--hessian", str(tmp_path / "H.npy"))
    assert rc == 2 and "--method block" in err


def test_cli_sweep_block(capsys, tmp_path):
    rc, out, err = run(capsys, "sweep", "--method", "block", "--phi-coords", "0", "1", "--curvature", "1", "0.5",
                       "0.2", "--x", "K", "1", "2", "4", "--y", "gamma_theta", "0.25", "1", "--out", str(tmp_path),
                       "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert len(d["points"]) == 6 and all(p["stable"] for p in d["points"])


def test_exact_curve_agrees_with_monte_carlo():
    m = Block(3, 0.1, 0.2, 0.5, 0.5, False, (1, 3), weight_decay=0.05)
    sgd = SGD(0.2, 0.5, weight_decay=0.05)
    kw = dict(T0=100, horizon=400, w0=0.0, sigma0=0.1, points=12)
    exact = block.learning_curve(DIAG, m, sgd, **kw)
    mc = block.simulate_curve(DIAG, m, sgd, runs=200, seed=2, **kw)
    for k, v in mc.series.items():
        se = mc.stderr[k]
        ok = se > 1e-9 * np.abs(v)  # t = 0 is deterministic
        assert np.all(np.abs(v[ok] - exact.series[k][ok]) < 4.5 * se[ok]), k
    # long after T0 the exact curve reaches the stationary prediction
    late = block.learning_curve(DIAG, m, sgd, T0=100, horizon=20000, points=5)
    pred = steady_state(DIAG, m)
    assert late.series["latephase_mean"][-1] == pytest.approx(pred.excess_loss_mean_model, rel=1e-6)
    assert late.series["latephase_members"][-1] == pytest.approx(pred.excess_loss_members, rel=1e-6)


def test_cli_curve_block_names_the_simulated_series(capsys, tmp_path):
    rc, out, err = run(capsys, "curve", "--method", "block", "--phi-coords", "0", "--curvature", "1", "0.5", "--K",
                       "2", "--t0", "20", "--horizon", "60", "--points", "8", "--simulate", "--runs", "4", "--out",
                       str(tmp_path / "c.png"), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert set(d["simulation"]["series"]) == {"sgd", "latephase_mean", "latephase_members"}
    assert (tmp_path / "c.png").exists()


@pytest.mark.parametrize("nest", [False, True])
def test_twin_equals_latephase_gamma1_on_a_coupled_problem(nest):
    from nqp.arms import arms
    p = coupled()
    a = arms((1, 3), K=3, lr=0.05, momentum=0.5, nesterov=nest, weight_decay=0.05)
    lp, twin = steady_state(p, a["late-phase, gamma_theta = 1"]), steady_state(p, a["large-batch twin"])
    assert twin.excess_loss_mean_model == pytest.approx(lp.excess_loss_mean_model, rel=1e-9)
    assert twin.excess_loss_members == pytest.approx(twin.excess_loss_mean_model, rel=1e-12)  # no members


@pytest.mark.parametrize("mom", [0.0, 0.9])
def test_gain_is_at_most_phis_share(mom):
    from nqp.arms import block_problem
    for placement in ("stiffest", "spread", "flattest"):
        p, phi = block_problem(30, 5, placement)
        e_sgd = steady_state(p, SGD(0.05, mom)).mean_model_per_coordinate
        for K in (2, 4, 8):
            got = steady_state(p, Block(K, 0.05, 0.05, 1.0, mom, False, phi)).mean_model_per_coordinate
            assert got[list(phi)].sum() == pytest.approx(e_sgd[list(phi)].sum() / K, rel=1e-9)
            assert got.sum() >= e_sgd.sum() - e_sgd[list(phi)].sum() * (1 - 1 / K) - 1e-12


def test_cli_arms(capsys):
    rc, out, err = run(capsys, "arms", "--dim", "20", "--phi-count", "4", "--json")
    assert rc == 0, err
    d = json.loads(out)
    names = [r["arm"] for r in d["arms"]]
    assert names[0] == "base SGD" and "large-batch twin" in names
    assert "large-batch twin = late-phase, gamma_theta = 1" in d["order"] or \
        "late-phase, gamma_theta = 1 = large-batch twin" in d["order"]
    rc, _, err = run(capsys, "arms", "--phi-count", "100")
    assert rc == 2 and "--phi-count" in err


def test_cli_sweep_headline_compares_with_the_best_fair_baseline(capsys, tmp_path):
    rc, out, err = run(capsys, "sweep", "--curvature", "1", "0.5", "--x", "K", "1", "4", "--y", "gamma_theta", "0.25",
                       "1", "--out", str(tmp_path))
    assert rc == 0, err
    assert "best fair baseline" in out and "largest gain over single-batch SGD" in out
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["excess_loss_best_baseline", "gain_over_best_baseline"]


def test_cli_predict_other_K_rows(capsys):
    rc, out, _ = run(capsys, "predict", "--method", "block", "--phi-coords", "0", "--curvature", "1", "0.5", "--K",
                     "4", "--json")
    d = json.loads(out)
    assert [r["K"] for r in d["other_K"]] == [2, 4, 8]
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in d["other_K"])


def test_block_simulation_in_float32_agrees():
    m = Block(3, 0.1, 0.2, 0.5, 0.5, False, (1, 3), weight_decay=0.05)
    pred = steady_state(DIAG, m)
    res = block.simulate(DIAG, m, steps=12000, runs=8, seed=4, dtype=np.float32)
    assert res.dtype == "float32"
    assert abs(res.excess_loss_mean_model - pred.excess_loss_mean_model) < 4 * res.excess_loss_mean_model_stderr


@pytest.mark.parametrize("mom,nest", [(0.0, False), (0.5, True)])
def test_additive_with_weight_decay(mom, nest):
    from nqp.methods import LatePhase
    m = LatePhase(3, 0.1, 0.2, 0.5, mom, nest, weight_decay=0.05)
    pred = steady_state(DIAG, m)
    assert pred.path.startswith("lyapunov")
    full = block.lyapunov_moments(DIAG, m, full=True)
    assert pred.excess_loss_mean_model == pytest.approx(totals(DIAG, full)[0], rel=1e-8)
    assert pred.excess_loss_members == pytest.approx(totals(DIAG, full)[1], rel=1e-8)
    # a vanishing decay approaches the additive closed form without decay
    tiny = steady_state(DIAG, LatePhase(3, 0.1, 0.2, 0.5, mom, nest, weight_decay=1e-7))
    ref = steady_state(DIAG, LatePhase(3, 0.1, 0.2, 0.5, mom, nest))
    assert tiny.excess_loss_mean_model == pytest.approx(ref.excess_loss_mean_model, rel=1e-3)
    assert tiny.excess_loss_members == pytest.approx(ref.excess_loss_members, rel=1e-3)
    res = block.simulate(DIAG, m, steps=30000, runs=16, seed=5)
    assert abs(res.excess_loss_mean_model - pred.excess_loss_mean_model) < 4 * res.excess_loss_mean_model_stderr
    assert abs(res.excess_loss_members - pred.excess_loss_members) < 4 * res.excess_loss_members_stderr


def test_multiplicative_with_weight_decay_is_refused(capsys):
    rc, _, err = run(capsys, "predict", "--method", "multiplicative", "--weight-decay", "0.1", "--curvature", "1")
    assert rc == 2 and "not modelled for --method multiplicative" in err


def test_ensemble_shortcut_equals_the_literal_K_member_step():
    p = coupled()
    sgd = SGD(0.2, 0.5, True, weight_decay=0.05)
    block._cache.clear()
    lit = block._lyapunov_moments(p, Ensemble(sgd, 3), full=False)      # K members, every coordinate phi
    short = block.lyapunov_moments(p, Ensemble(sgd, 3))                   # SGD with a 3-times batch, and SGD
    np.testing.assert_allclose(totals(p, short), totals(p, lit), rtol=1e-9)


def test_conclusion_names_a_lower_step_as_the_source_of_a_gain(capsys):
    rc, out, _ = run(capsys, "predict", "--method", "block", "--phi-coords", "0", "1", "2", "--K", "4", "--lr", "0.5",
                     "--lr-phi", "0.2", "--gamma-theta", "1")
    last = out.strip().splitlines()[-1]
    assert rc == 0 and last.startswith("conclusion: late-phase") and "lr_phi < 0.5" in last
    rc, out, _ = run(capsys, "predict", "--method", "block", "--phi-coords", "0", "1", "2", "--K", "4", "--lr", "0.5",
                     "--gamma-theta", "1")
    assert out.strip().splitlines()[-1].startswith("conclusion: the fair baseline SGD, batch x4 is best")


def test_sweep_over_weight_decay_matches_predict(tmp_path, capsys):
    rc, out, err = run(capsys, "sweep", "--method", "block", "--phi-coords", "0", "--curvature", "1", "0.5", "--x",
                       "weight_decay", "0", "0.1", "--y", "K", "2", "4", "--out", str(tmp_path), "--json")
    assert rc == 0, err
    pts = {(p["weight_decay"], p["K"]): p for p in json.loads(out)["points"]}
    ref = steady_state(Problem.from_values([1.0, 0.5]), Block(4, 0.1, 0.1, 1.0, phi_coords=(0,), weight_decay=0.1))
    assert pts[(0.1, 4.0)]["excess_loss_mean_model"] == pytest.approx(ref.excess_loss_mean_model, rel=1e-12)
