"""The `python -m nqp` contract: flags, JSON keys, tables, files, and one-line errors with exit 2."""
import json
import subprocess
import sys

import pytest

from nqp import LatePhase, Problem, steady_state
from nqp.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_predict_default_prints_paper_like_table(capsys):
    code, out, err = run(capsys, "predict")
    assert code == 0, err
    assert "SGD" in out and "late-phase additive, K=10" in out
    for g in ("gamma_theta=0.1", "gamma_theta=0.5", "gamma_theta=1"):
        assert g in out
    assert "ensemble of 10 SGD runs" in out


def test_predict_json_contract(capsys):
    d = run_json(capsys, "predict", "--method", "additive", "--K", "4", "--gamma-theta", "0.5", "--lr", "0.2",
                 "--lr-theta", "0.1", "--lr-phi", "0.3", "--momentum", "0.5", "--curvature", "1", "0.5",
                 "--noise", "2", "--optimum", "1", "-1")
    assert isinstance(d["excess_loss_mean_model"], float)
    assert isinstance(d["excess_loss_members"], float)
    exact = steady_state(Problem.from_values([1, 0.5], 2, [1, -1]), LatePhase(4, 0.1, 0.3, 0.5, 0.5))
    assert d["excess_loss_mean_model"] == pytest.approx(exact.excess_loss_mean_model, rel=1e-12)
    assert d["excess_loss_members"] == pytest.approx(exact.excess_loss_members, rel=1e-12)
    assert {"sgd", "sgd_batch_K", "ensemble_K"} <= set(d["baselines"])
    assert all(c["ok"] for c in d["stability"])


def test_predict_lyapunov_equals_closed_form(capsys):
    args = ["predict", "--spectrum", "powerlaw", "--dim", "30", "--power", "1.5", "--K", "3", "--nesterov",
            "--momentum", "0.5"]
    a, b = run_json(capsys, *args), run_json(capsys, *args, "--lyapunov")
    assert a["excess_loss_mean_model"] == pytest.approx(b["excess_loss_mean_model"], rel=1e-9)
    assert a["excess_loss_members"] == pytest.approx(b["excess_loss_members"], rel=1e-9)


@pytest.mark.parametrize("extra", [["--method", "sgd"], ["--method", "sgd", "--batch", "4"],
                                   ["--method", "sgd", "--ensemble", "--K", "3"], ["--swa-window", "50"],
                                   ["--method", "multiplicative", "--optimum", "0.5"]])
def test_predict_method_variants(capsys, extra):
    d = run_json(capsys, "predict", "--curvature", "1", "0.1", *extra)
    assert d["excess_loss_mean_model"] > 0 and d["excess_loss_members"] >= d["excess_loss_mean_model"] * 0.999


MULT = ["--method", "multiplicative", "--K", "4", "--gamma-theta", "0.25", "--lr", "0.05", "--curvature", "1", "0.5",
        "--noise", "0.3", "--optimum", "1", "-1.5"]


def test_predict_multiplicative_reports_the_long_run(capsys):
    """Default: the long run at the noise-selected balance, with the balance summarised, the relaxation time and the
    short-time prediction labelled; --short-time shows the balanced-start values and keeps the long run beside them."""
    from nqp import long_run

    d = run_json(capsys, "predict", *MULT)
    exact = long_run(Problem.from_values([1, 0.5], 0.3, [1, -1.5]), LatePhase(4, 0.05, 0.05, 0.25,
                                                                             kind="multiplicative"))
    assert d["excess_loss_mean_model"] == pytest.approx(exact.excess_loss_mean_model, rel=1e-12)
    assert d["excess_loss_members"] == pytest.approx(exact.excess_loss_members, rel=1e-12)
    assert d["relaxation_minibatches"] == pytest.approx(exact.relaxation_minibatches, rel=1e-12)
    assert d["relaxation_minibatches"] > 0
    assert d["balance"]["leading_order"] == pytest.approx(0.5)
    assert 0.5 < d["balance"]["selected"]["min"] <= d["balance"]["selected"]["max"] < 0.55
    assert "relaxation" in d["short_time"]["valid_for"]
    short = run_json(capsys, "predict", *MULT, "--short-time")
    assert short["excess_loss_mean_model"] == pytest.approx(d["short_time"]["excess_loss_mean_model"], rel=1e-12)
    assert short["long_run"]["excess_loss_members"] == pytest.approx(d["excess_loss_members"], rel=1e-12)
    assert short["relaxation_minibatches"] == pytest.approx(d["relaxation_minibatches"])
    assert short["excess_loss_mean_model"] < d["excess_loss_mean_model"]     # b* < 1: a larger effective step
    code, out, err = run(capsys, "predict", *MULT)
    assert code == 0 and "long run" in out and "relaxes" in out and "short-time prediction" in out
    lyap = run_json(capsys, "predict", *MULT, "--lyapunov")
    assert lyap["excess_loss_members"] == pytest.approx(d["excess_loss_members"], rel=1e-9)


def test_simulate_multiplicative_default_agrees_with_predict(capsys):
    """The default run starts balanced, burns in over the relaxation of the balance (from its ODE) and agrees with the
    long-run prediction within 4 standard errors; --start selected skips that relaxation."""
    d = run_json(capsys, "simulate", *MULT, "--steps", "8000", "--runs", "16", "--seed", "2")
    assert d["burn_in"] >= d["burn_in_for_long_run"] > 3 * d["prediction"]["relaxation_minibatches"]
    assert abs(d["excess_loss_mean_model_z"]) < 4 and abs(d["excess_loss_members_z"]) < 4
    assert d["balance"]["start"]["max"] == 1.0 and d["balance"]["time_average"]["max"] < 0.6
    d = run_json(capsys, "simulate", *MULT, "--steps", "8000", "--runs", "16", "--seed", "3", "--start", "selected")
    assert d["burn_in"] < 3 * d["prediction"]["relaxation_minibatches"]
    assert abs(d["excess_loss_mean_model_z"]) < 4 and abs(d["excess_loss_members_z"]) < 4
    d = run_json(capsys, "simulate", *MULT, "--steps", "800", "--runs", "4", "--burn-in", "100")
    assert "shorter than" in d["warning"]


def test_curve_and_sweep_multiplicative_follow_the_balance(capsys, tmp_path):
    png = tmp_path / "c.png"
    d = run_json(capsys, "curve", *MULT, "--t0", "40", "--horizon", "8040", "--points", "20", "--out", str(png))
    b = [x for x in d["balance"]["median"] if x is not None]
    assert b[0] == pytest.approx(1.0, abs=0.05) and b[-1] < 0.8 and "balance ODE" in d["path"]
    short = run_json(capsys, "curve", *MULT, "--t0", "40", "--horizon", "8040", "--points", "20", "--out", str(png),
                     "--short-time")
    assert short["series"]["latephase_mean"][-1] < d["series"]["latephase_mean"][-1]
    fixed = [v for i, v in enumerate(MULT) if v not in ("--K", "--lr") and MULT[i - 1] not in ("--K", "--lr")]
    sw = run_json(capsys, "sweep", *fixed, "--x", "K", "2", "4", "--y", "lr", "0.05", "--out", str(tmp_path / "s"))
    pred = run_json(capsys, "predict", *MULT)
    point = [p for p in sw["points"] if p["K"] == 4][0]
    assert point["excess_loss_mean_model"] == pytest.approx(pred["excess_loss_mean_model"], rel=1e-10)
    assert "long run" in sw["prediction"]


def test_simulate_json_contract(capsys):
    d = run_json(capsys, "simulate", "--method", "additive", "--K", "3", "--curvature", "1", "0.4",
                 "--steps", "3000", "--runs", "8", "--seed", "1")
    for k in ("excess_loss_mean_model", "excess_loss_members", "excess_loss_mean_model_stderr",
              "excess_loss_members_stderr"):
        assert isinstance(d[k], float)
    assert abs(d["excess_loss_mean_model_z"]) < 5
    code, out, err = run(capsys, "simulate", "--curvature", "1", "--steps", "500", "--runs", "4", "--K", "2")
    assert code == 0 and "std. error" in out


def test_sweep_writes_csv_json_png(capsys, tmp_path):
    d = run_json(capsys, "sweep", "--dim", "50", "--spectrum", "powerlaw", "--x", "K", "1", "2", "4", "8",
                 "--y", "gamma_theta", "0.1:1:3", "--out", str(tmp_path))
    assert len(d["points"]) == 12
    for f in ("sweep.csv", "sweep.json", "sweep_gain.png", "sweep_lines.png"):
        assert (tmp_path / f).stat().st_size > 0
    rows = (tmp_path / "sweep.csv").read_text().strip().splitlines()
    assert rows[0].startswith("K,gamma_theta,excess_loss_mean_model") and len(rows) == 13
    # An unstable corner is reported, not an error.
    d = run_json(capsys, "sweep", "--curvature", "1", "--x", "lr", "0.5", "1.5", "--y", "K", "1", "10",
                 "--out", str(tmp_path / "b"))
    assert any(not p["stable"] for p in d["points"]) and any(p["stable"] for p in d["points"])


def test_curve_writes_png_and_json(capsys, tmp_path):
    png = tmp_path / "c.png"
    d = run_json(capsys, "curve", "--curvature", "1", "0.2", "--K", "3", "--t0", "30", "--horizon", "150",
                 "--sigma0", "0.1", "--swa-start", "60", "--simulate", "--runs", "20", "--out", str(png))
    assert png.stat().st_size > 0
    assert set(d["series"]) >= {"sgd", "latephase_mean", "latephase_members", "sgd_batch_K", "ensemble_K",
                                "latephase_swa", "sgd_swa"}
    assert "stderr" in d["simulation"]
    assert all(t == 30 or t < 30 or (t - 30) % 3 == 0 for t in d["t"])


ERRORS = [
    (["predict", "--lr", "-0.1"], "--lr must be > 0"),
    (["predict", "--K", "0"], "--K must be a positive integer"),
    (["predict", "--lr", "3", "--method", "sgd"], "lr * h = 3 must be < 2"),
    (["predict", "--lr", "0.2", "--gamma-theta", "1"], "(lr_phi + K*gamma_theta*lr_theta) * h = 2.2 must be < 2"),
    (["predict", "--momentum", "0.5", "--lr", "3.5", "--method", "sgd"], "must be < 3"),
    (["predict", "--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["predict", "--nesterov"], "Nesterov momentum needs --momentum > 0"),
    (["predict", "--curvature", "1", "--spectrum", "powerlaw"], "not both"),
    (["predict", "--curvature", "1", "2", "--noise", "1", "2", "3"], "--curvature has 2, --noise 3 and --optimum 1 values"),
    (["predict", "--curvature", "0"], "curvature must be > 0"),
    (["predict", "--noise", "-1"], "noise variance must be >= 0"),
    (["predict", "--method", "multiplicative", "--optimum", "0"], "nonzero optimum"),
    (["predict", "--method", "sgd", "--gamma-theta", "0.5"], "--gamma-theta applies to late-phase"),
    (["predict", "--method", "sgd", "--lr-phi", "0.5"], "--lr-theta/--lr-phi apply to late-phase"),
    (["predict", "--method", "bogus"], "invalid choice"),
    (["predict", "--frobnicate"], "unrecognized arguments"),
    (["predict", "--lr", "nan"], "must be"),
    (["predict", "--spectrum", "powerlaw", "--dim", "0"], "--dim must be a positive integer"),
    (["predict", "--swa-window", "15", "--K", "10"], "must be a multiple"),
    (["simulate", "--runs", "1", "--curvature", "1"], "--runs must be an integer >= 2"),
    (["simulate", "--steps", "5", "--curvature", "1"], "--steps (5) must be >="),
    (["sweep", "--x", "bogus", "1", "2"], "cannot sweep 'bogus'"),
    (["sweep", "--x", "K", "a:b"], "cannot read"),
    (["curve", "--t0", "100", "--horizon", "50"], "--horizon (50) must be an integer > --t0 (100)"),
    (["curve", "--method", "sgd"], "use --method additive, multiplicative or block"),
    (["predict", "--short-time"], "--short-time applies to --method multiplicative"),
    (["simulate", "--start", "selected", "--curvature", "1"], "--start applies to --method multiplicative"),
    (["simulate", "--method", "multiplicative", "--short-time", "--start", "selected", "--curvature", "1"],
     "drop --start selected"),
    (["simulate", "--method", "multiplicative", "--K", "4", "--gamma-theta", "0.25", "--noise", "1e-4"],
     "use --start selected"),
    ([], "required"),
]


@pytest.mark.parametrize("argv,message", ERRORS)
def test_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err


def test_module_entry_point_subprocess():
    """`python -m nqp predict --json` as a user runs it; an error exits 2 with one stderr line."""
    r = subprocess.run([sys.executable, "-m", "nqp", "predict", "--json", "--dim", "10", "--spectrum", "powerlaw"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "excess_loss_mean_model" in json.loads(r.stdout)
    r = subprocess.run([sys.executable, "-m", "nqp", "predict", "--lr", "5"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_predict_loads_neither_sympy_nor_scipy():
    """`python -m nqp predict` evaluates generated closed forms: sympy (seconds to derive) and scipy stay unloaded, so
    the command answers in a fraction of a second."""
    code = ("import sys; from nqp.cli import main; main(['predict', '--json']); "
            "main(['predict', '--method', 'multiplicative', '--json']); "
            "print('LOADED', sorted(m for m in ('sympy', 'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "LOADED []"


def test_readme_python_example_runs():
    """The README's nqp snippet runs as written (a few seconds), and its closed form and Lyapunov paths agree."""
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    section = text.split("From Python:", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(code, ns)
    p, lp = ns["p"], ns["lp"]
    a = ns["steady_state"](p, lp).excess_loss_mean_model
    assert a == pytest.approx(ns["steady_state"](p, lp, "lyapunov").excess_loss_mean_model, rel=1e-9)


ERRORS_MORE = [
    (["simulate", "--dim", "3", "--K", "2", "--runs", "2", "--steps", "50", "--method", "multiplicative",
      "--optimum", "1e-300"], "the slowest mode does not relax in float64"),
    (["simulate", "--dim", "3", "--K", "2", "--runs", "2", "--steps", "50", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["simulate", "--dim", "3", "--K", "2", "--runs", "2", "--steps", "50", "--threads", "0"], "--threads: expected an integer >= 1"),
    (["simulate", "--dim", "3", "--K", "2", "--runs", "2", "--steps", "50", "--noise", "1e308"], "overflow float64"),
    (["predict", "--curvature", "1e300", "--noise", "1e300", "--lr", "1e-301"], "overflows float64"),
    (["sweep", "--dim", "5", "--x", "K", "nan", "--y", "lr", "0.1"], "K: values must be finite"),
    (["sweep", "--dim", "5", "--x", "K", "1e30", "--y", "lr", "0.1"], "K values must be between 1 and 2^31"),
    (["sweep", "--dim", "5", "--x", "K", "2.5", "--y", "lr", "0.1"], "K values must be integers, got 2.5"),
    (["sweep", "--dim", "5", "--x", "K", "2", "--y", "lr", "0:1:3:log"], "a log range needs positive ends"),
    (["sweep", "--dim", "5", "--x", "K", "2", "--y", "lr", "0.1", "--method", "multiplicative", "--optimum", "0", "1",
      "1", "1", "1"], "nonzero optimum"),
    (["sweep", "--curvature", "1e300", "--noise", "1e300", "--x", "K", "2", "3", "--y", "lr", "1e-301"],
     "overflows float64"),
    (["curve", "--dim", "5", "--K", "2", "--t0", "20", "--horizon", "60", "--w0", "nan"], "--w0 must be finite"),
    (["curve", "--dim", "5", "--K", "2", "--t0", "20", "--horizon", "60", "--w0", "1", "2"],
     "--w0 takes one value or one per coordinate (5), got 2"),
    (["curve", "--dim", "5", "--K", "2", "--t0", "20", "--horizon", "60", "--w0", "1e200"], "overflows float64"),
    (["curve", "--dim", "5", "--K", "2", "--t0", "0", "--horizon", "1"], ">= 2 (T0 + K)"),
    (["curve", "--dim", "5", "--K", "2", "--t0", "20", "--horizon", "60", "--out", "c.pdf"], "must end in .png"),
]


@pytest.mark.parametrize("argv,message", ERRORS_MORE)
def test_more_errors_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # any output lands in a scratch folder
    test_errors_exit_2_with_one_line(capsys, argv, message)


def test_output_path_errors(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    (tmp_path / "folder").mkdir()
    sweep = ["sweep", "--dim", "3", "--x", "K", "2", "--y", "lr", "0.1", "--out"]
    curve = ["curve", "--dim", "3", "--K", "2", "--t0", "10", "--horizon", "30", "--points", "5", "--out"]
    for argv, message in [(sweep + [str(afile)], "exists and is not a folder"),
                          (sweep + [str(afile / "sub")], "cannot write"),
                          (sweep + [""], "--out must name a folder"),
                          (curve + [str(afile / "x.png")], "exists and is not a folder"),
                          (curve + [str(tmp_path / "folder")], "must end in .png"),
                          (["docs", "--quick", "--out", str(afile)], "exists and is not a folder")]:
        test_errors_exit_2_with_one_line(capsys, argv, message)


def test_sweep_without_noise_has_no_gain_but_succeeds(capsys, tmp_path):
    code, out, err = run(capsys, "sweep", "--dim", "3", "--noise", "0", "--x", "K", "2", "3", "--y", "lr", "0.1",
                         "--out", str(tmp_path))
    assert code == 0, err
    assert "no gain over SGD is defined" in out
    d = json.loads((tmp_path / "sweep.json").read_text())
    assert all(p["gain_over_sgd"] is None for p in d["points"])


def test_predict_prints_the_library_scan_and_other_K(capsys):
    """The gamma_theta scan and the other-K rows of `predict` are nqp.theory's gamma_theta_scan and other_K."""
    from nqp import SGD, long_run
    from nqp.theory import gamma_theta_scan, other_K

    d = run_json(capsys, "predict", "--method", "additive", "--K", "4", "--dim", "5", "--lr", "0.3")
    p, lp = Problem.powerlaw(5, 1.0), LatePhase(4, 0.3, 0.3, 1.0)
    scan = gamma_theta_scan(p, lp)
    assert [r["gamma_theta"] for r in d["gamma_theta_scan"]] == [r["gamma_theta"] for r in scan] == [0, 0.25, 0.5, 1]
    for cli, lib in zip(d["gamma_theta_scan"], scan):
        assert cli["excess_loss_mean_model"] == pytest.approx(lib["prediction"].excess_loss_mean_model, rel=1e-12)
    rows = other_K(p, lp, SGD(0.3))
    assert [r["K"] for r in rows] == [r["K"] for r in d["other_K"]] == [2, 4, 8]
    for cli, lib in zip(d["other_K"], rows):
        assert cli["best_baseline"] == pytest.approx(lib["best_baseline"], rel=1e-12)
    assert rows[0]["excess_loss_mean_model"] == pytest.approx(
        long_run(p, LatePhase(2, 0.3, 0.3, 1.0)).excess_loss_mean_model, rel=1e-12)
    unstable = gamma_theta_scan(p, LatePhase(4, 0.3, 0.3, 1.0).with_(lr_theta=0.9))
    assert any("unstable" in r for r in unstable)


def test_library_errors_name_parameters_and_the_cli_names_flags(capsys):
    """The library's messages name its parameters in backticks; the command line shows each as its flag
    (nqp.cli.flags), and no string of a library module (docstrings aside) names a flag."""
    import ast
    import pathlib
    import re

    import nqp
    from nqp import NQPError
    from nqp.cli import flags

    with pytest.raises(NQPError, match="^`lr_phi` must be > 0, got 0"):
        LatePhase(4, 0.1, 0.0)
    assert flags("`lr_phi` must be > 0; `T0`, `window`, `placement`") == \
        "--lr-phi must be > 0; --t0, --swa-window, --phi"
    code, _, err = run(capsys, "predict", "--lr-phi", "0")
    assert code == 2 and "--lr-phi must be > 0" in err
    root = pathlib.Path(nqp.__file__).parent
    for path in sorted(root.glob("*.py")):
        if path.name in ("cli.py", "console.py", "docs.py", "codegen.py", "files.py", "__main__.py"):
            # the CLIs and console.py, the command line's own parser and stdout; files takes a flag
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                assert not re.search(r"(?<![\w-])--[a-z]", node.value), f"{path.name}: {node.value!r}"
