"""nqp: a long `curve --simulate` says its estimated time up front and prints progress off a terminal (or is refused
beyond its bound, named); the multiplicative tail average with momentum takes the Lyapunov path by itself, as the
additive one does."""
import json

import pytest

import nqp.cli
from nqp import LatePhase, Problem
from nqp.cli import main
from nqp.methods import TailAverage
from nqp.theory import long_run


def test_curve_simulate_refuses_beyond_its_bound_in_a_moment(capsys):
    assert main(["curve", "--method", "additive", "--simulate", "--horizon", "100000000", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "beyond the bound of 5e+11" in err and "lower --runs or --horizon" in err


def test_curve_simulate_estimates_and_reports_progress_off_a_tty(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(nqp.cli, "CURVE_NOTE_SECONDS", 0.0)  # a tiny curve as if it were a long one
    argv = ["curve", "--dim", "3", "--K", "2", "--t0", "10", "--horizon", "20000", "--points", "5", "--simulate",
            "--runs", "4", "--out", str(tmp_path / "c.png"), "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["simulation"]["runs"] == 4
    lines = err.splitlines()
    assert lines[0].startswith("note: --simulate: ") and "roughly" in lines[0]
    progress = [line for line in lines if line.startswith("simulate curve: ")]
    assert progress and all("% after" in line and "s left" in line for line in progress)


@pytest.mark.parametrize("extra", [[], ["--short-time"]])
def test_multiplicative_tail_average_with_momentum_takes_the_lyapunov_path(capsys, extra):
    argv = ["predict", "--method", "multiplicative", "--momentum", "0.5", "--swa-window", "10", "--dim", "4"] + extra
    assert main(argv + ["--json"]) == 0, capsys.readouterr().err
    auto = json.loads(capsys.readouterr().out)
    assert main(argv + ["--json", "--lyapunov"]) == 0
    explicit = json.loads(capsys.readouterr().out)
    assert auto["excess_loss_mean_model"] == pytest.approx(explicit["excess_loss_mean_model"], rel=1e-9)
    p = Problem.powerlaw(4)
    method = TailAverage(LatePhase(K=5, lr_theta=0.1, lr_phi=0.1, momentum=0.5, kind="multiplicative"), 10)
    assert long_run(p, method).path.startswith("lyapunov")
