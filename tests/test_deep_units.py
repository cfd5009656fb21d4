"""Metrics, schedules, configs and the results table (no training)."""
import json
import math

import numpy as np
import pytest
import torch

from deep import metrics
from deep.config import PRESETS, ConfigError, get_config
from deep.schedule import annealing_lr, lr_factor
from deep.table import TableError, load_results, render


def test_accuracy_nll_ece_by_hand():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 1, 1])
    assert metrics.accuracy(p, y) == 0.75
    assert metrics.nll(p, y) == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4) + np.log(0.7)) / 4)
    # confidences 0.9, 0.8, 0.6, 0.7 in 15 bins: each in its own bin; |acc - conf| = .1, .2, .6, .3
    assert metrics.ece(p, y, bins=15) == pytest.approx((0.1 + 0.2 + 0.6 + 0.3) / 4)
    assert metrics.ece(p, y, bins=1) == pytest.approx(abs(0.75 - 0.75))


def test_ece_perfectly_calibrated_is_small():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200000)
    correct = rng.uniform(size=conf.size) < conf
    p = np.stack([conf, 1 - conf], 1)
    y = np.where(correct, 0, 1)
    assert metrics.ece(p, y) < 0.005


def test_auroc_rank_statistic():
    assert metrics.auroc([0, 1, 2], [3, 4]) == 1.0
    assert metrics.auroc([3, 4], [0, 1, 2]) == 0.0
    assert metrics.auroc([1, 1], [1, 1]) == 0.5
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=3000), rng.normal(1.0, size=3000)
    # P(N(1,1) > N(0,1)) = Phi(1/sqrt(2))
    assert metrics.auroc(a, b) == pytest.approx(0.5 * (1 + math.erf(0.5)), abs=0.015)


def test_ood_scores_orientation():
    confident = np.array([[0.99, 0.01]] * 10)
    unsure = np.array([[0.55, 0.45]] * 10)
    r = metrics.ood_auroc(confident, unsure)
    assert r["auroc_entropy"] == 1.0 and r["auroc_max_softmax"] == 1.0
    s = metrics.summary(torch.tensor(confident), torch.zeros(10, dtype=torch.long), {"x": unsure})
    assert s["accuracy"] == 100.0 and s["ood"]["x"]["auroc_entropy"] == 100.0


def test_annealing_schedule_matches_reference_definition():
    assert annealing_lr(0, 0.1, 100, 180, 0.01) == 0.1
    assert annealing_lr(99, 0.1, 100, 180, 0.01) == 0.1
    assert annealing_lr(140, 0.1, 100, 180, 0.01) == pytest.approx(0.1 * (1 - 0.99 * 0.5))
    assert annealing_lr(180, 0.1, 100, 180, 0.01) == pytest.approx(0.001)
    assert annealing_lr(199, 0.1, 100, 180, 0.01) == pytest.approx(0.001)
    c = get_config("cifar10_bn_swa")
    assert lr_factor(c, 150) * c.lr == pytest.approx(0.05)
    assert lr_factor(c, 170) * c.lr == pytest.approx(0.05)
    assert lr_factor(c, 0) == 1.0


def test_presets_follow_the_reference_table():
    c = PRESETS["cifar10_bn"]
    assert (c.K, c.phi, c.T0, c.epochs, c.anneal_start, c.anneal_end, c.anneal_end_lr) == \
        (10, ("bn", "head"), 120, 200, 100, 180, 0.001)
    c = PRESETS["cifar10_wrn14_bn_swa"]
    assert (c.arch, c.epochs, c.T0, c.swa_start, c.cutout) == ("wrn-28-14", 300, 120, 241, 16)
    assert PRESETS["cifar100_bn"].phi_weight_decay == 5e-3
    assert PRESETS["cifar100_bn_swa"].phi_weight_decay == 5e-4
    for name, cfg in PRESETS.items():
        cfg.validate()
        if "_bn" in name:
            base = PRESETS[name.replace("_bn", "_base")]
            diff = {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}
            assert diff <= {"name", "phi", "K", "weight_decay_phi"} and not base.late_phase


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown config"):
        get_config("cifar11_bn")
    with pytest.raises(ConfigError, match="unknown config key"):
        get_config("cifar10_bn", epoch=3)
    with pytest.raises(ConfigError, match="K must be"):
        get_config("cifar10_bn", K=0)
    with pytest.raises(ConfigError, match="arch must be"):
        get_config("cifar10_bn", arch="wrn-27-10")
    with pytest.raises(ConfigError, match="rank1"):
        get_config("cifar10_bn", phi=("rank1",))


def _result(name, seed, acc, ens=None):
    return {"config": {"name": name}, "seed": seed,
            "models": {"averaged": {"accuracy": acc, "nll": 0.2, "ece": 1.0, "ood": {"svhn": {
                "auroc_entropy": 90.0, "auroc_max_softmax": 89.0}}},
                **({"ensemble": {"accuracy": ens, "nll": 0.19, "ece": 0.8}} if ens else {})}}


def test_table_aggregates_seeds(tmp_path):
    files = []
    for i, (name, acc, ens) in enumerate([("cifar10_bn", 96.0, 96.2), ("cifar10_bn", 96.4, 96.6),
                                          ("cifar10_base", 95.9, None)]):
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps(_result(name, i, acc, ens)))
        files.append(str(f))
    md = render(load_results(files))
    row = next(line for line in md.splitlines() if line.startswith("| CIFAR-10, WRN-28-10, SGD"))
    assert "96.16 ± 0.12" in row and "96.46 ± 0.15" in row
    assert "96.20 ± 0.28 (n=2)" in row and "95.90 (n=1)" in row and "96.40 ± 0.28 (n=2)" in row
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TableError, match="not a results file"):
        load_results([str(tmp_path / "bad.json")])
    with pytest.raises(TableError, match="no results"):
        load_results([])


def test_checkpoint_bookkeeping_refuses_foreign_checkpoints(tmp_path):
    """deep.runs: a checkpoint of another format, other settings, seed or number of processes is refused with a
    one-line message; a matching one round-trips the plain (pre-release) state."""
    from types import SimpleNamespace

    from deep import runs

    class Cfg:
        def __init__(self, lr):
            self.lr = lr

        def to_dict(self):
            return {"lr": self.lr, "sizes": [1, 2]}

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = SimpleNamespace(cfg=Cfg(0.1), seed=0, epoch=3, log=[{"epoch": 3}], out=str(tmp_path), lp=None,
                          model=model, opt=opt, sched=torch.optim.lr_scheduler.StepLR(opt, 1),
                          ckpt_path=str(tmp_path / "checkpoint.pt"))
    runs.save_checkpoint(run, "fmt/1", world_size=2)
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 3}\n'
    with pytest.raises(ValueError, match="is not a test checkpoint"):
        runs.load_checkpoint(run, "other/1", "a test", ValueError)
    with pytest.raises(ValueError, match="process"):
        runs.load_checkpoint(run, "fmt/1", "a test", ValueError, world=1)
    for change in ({"cfg": Cfg(0.2)}, {"seed": 1}):
        other = SimpleNamespace(**{**vars(run), **change})
        with pytest.raises(ValueError, match="different settings"):
            runs.load_checkpoint(other, "fmt/1", "a test", ValueError, world=2)
    fresh_model = torch.nn.Linear(2, 1)
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.1)
    fresh = SimpleNamespace(**{**vars(run), "epoch": 0, "log": [], "model": fresh_model, "opt": fresh_opt,
                               "sched": torch.optim.lr_scheduler.StepLR(fresh_opt, 1)})
    runs.restore(fresh, runs.load_checkpoint(fresh, "fmt/1", "a test", ValueError, world=2))
    assert fresh.epoch == 3 and fresh.log == [{"epoch": 3}]
    assert torch.equal(fresh_model.weight, model.weight)
