"""Metrics, schedules, configs and the results table (no training)."""
import json
import math

import numpy as np
import pytest
import torch

from deep import metrics
from deep.config import ARM_TWINS, PRESETS, annealing_lr, get_config
from deep.errors import ConfigError, DeepError
from deep.table import load_results, render


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
    assert c.lr_factor(150) * c.lr == pytest.approx(0.05)
    assert c.lr_factor(170) * c.lr == pytest.approx(0.05)
    assert c.lr_factor(0) == 1.0
    f = get_config("imagenet_resnet50")
    assert [f.lr_factor(e, "theta") for e in (9, 10)] == [1.0, 0.1] and f.lr_factor(15, "phi") == 1.0


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
            assert diff == {"name", "phi"} and not base.late_phase
    assert PRESETS["imagenet_resnet50"].theta_scale == 0.1 and PRESETS["imagenet_resnet50_base"].K == 1
    for late in ("cifar10_bn", "cifar100_bn", "fmnist_cpu_bn"):  # the other arms: twins of one late-phase preset
        for arm, kw in ARM_TWINS.items():
            twin = PRESETS[late.replace("_bn", "_" + arm)].to_dict()
            diff = {k for k, v in twin.items() if PRESETS[late].to_dict()[k] != v}
            assert "name" in diff and diff <= {"name"} | set(kw)  # same data, model, schedule, budget


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


@pytest.mark.parametrize("override, msg", [
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(lr=1e300), "lr must be a finite number"),
    (dict(lr=math.inf), "lr must be a finite number"),
    (dict(lr=math.nan), "lr must be a finite number"),
    (dict(lr_phi=math.nan), "lr_phi must be a finite number"),
    (dict(weight_decay_phi=math.inf), "weight_decay_phi must be a finite number"),
    (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(grad_clip=math.nan), "grad_clip must be a finite number"),
    (dict(anneal_end_lr=-0.001), "anneal_end_lr must be >= 0"),
    (dict(anneal_end_lr=math.nan), "anneal_end_lr must be a finite number"),
    (dict(gamma_theta=math.inf), "gamma_theta must be a finite number"),
    (dict(swa_lr=-0.05), "swa_lr must be >= 0"),
    (dict(bn_images=-1), "bn_images must be >= 0"),
    (dict(momentum=0.0), "nesterov needs momentum > 0"),
    (dict(anneal_start=300), "anneal_start (300) must be in 0..anneal_end (180)"),
    (dict(cutout=33), "cutout must be <= the image side (32 pixels for cifar10)"),
    (dict(cutout=-1), "cutout must be >= 0"),
    (dict(train_subset=-1), "train_subset must be >= 0"),
    (dict(test_subset=-1), "test_subset must be >= 0"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(ood=("svhn", "foo")), "unknown OOD set(s) foo in --ood; known: svhn, cifar10, cifar100"),
])
def test_config_rejects_values_that_would_crash_or_mislead(override, msg):
    with pytest.raises(ConfigError) as e:
        get_config("cifar10_bn", **override)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_config_limits_match_the_data_layer():
    from deep import config
    from deep.data import OOD_SETS
    assert set(config.OOD_NAMES) == {n for names in OOD_SETS.values() for n in names}
    assert get_config("fmnist_bn", cutout=28).cutout == 28
    with pytest.raises(ConfigError, match="28 pixels for fashion_mnist"):
        get_config("fmnist_bn", cutout=29)


def test_train_help_shows_plain_type_names_and_the_config_class_flags(capsys):
    from deep.cli import main
    assert main(["train", "-h"]) == 0
    out = capsys.readouterr().out
    assert "<class" not in out and "tuple[str, ...]" in out and "--cutout" in out and "--bptt" not in out
    assert " ".join(out.split()).count("--lr LR float") == 1
    assert main(["train", "--config", "enwik8_lstm_lp", "-h"]) == 0
    out = capsys.readouterr().out
    assert "--bptt" in out and "--cutout" not in out


def _result(name, seed, acc, ens=None):
    return {"config": {"name": name}, "seed": seed,
            "models": {"averaged": {"stored": {"accuracy": acc, "nll": 0.2, "ece": 1.0, "ood": {"svhn": {
                "auroc_entropy": 90.0, "auroc_max_softmax": 89.0}}}, "reestimated": {"accuracy": acc + 1}},
                **({"ensemble": {"stored": {"accuracy": ens, "nll": 0.19, "ece": 0.8}}} if ens else {})}}


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
    row = next(line for line in render(load_results(files), "reestimated").splitlines()
               if line.startswith("| CIFAR-10, WRN-28-10, SGD"))
    assert "97.20 ± 0.28 (n=2)" in row and "96.90 (n=1)" in row
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DeepError, match="not a results file"):
        load_results([str(tmp_path / "bad.json")])
    with pytest.raises(DeepError, match="no results"):
        load_results([])


@pytest.mark.parametrize("content, msg", [
    ({"config": {}, "models": {}}, "'config' must be an object with a string 'name'"),
    ({"config": "fmnist_bn", "models": {}}, "'config' must be an object"),
    ({"config": {"name": "x"}, "models": []}, "'models' must be an object"),
    ({"config": {"name": "x"}, "models": {"averaged": 3}}, "models.averaged must be an object"),
    ({"config": {"name": "x"}, "models": {"averaged": {"stored": {"accuracy": "high"}}}},
     "models.averaged.stored.accuracy must be"),
    ({"config": {"name": "x"}, "models": {"members": {"stored": [{"accuracy": [1]}]}}},
     "models.members.stored.accuracy must be"),
    ({"config": {"name": "x"}, "models": {"averaged": {"stored": {"ood": {"svhn": 3}}}}},
     "models.averaged.stored.ood must map"),
    ({"config": {"name": "x"}, "seed": "one", "models": {}}, "'seed' must be an integer"),
])
def test_table_rejects_malformed_results(tmp_path, content, msg):
    f = tmp_path / "results.json"
    f.write_text(json.dumps(content))
    with pytest.raises(DeepError) as e:
        load_results([str(f)])
    assert str(f) in str(e.value) and msg in str(e.value)


def test_table_binary_file_duplicates_and_missing_seed(tmp_path, capsys):
    binary = tmp_path / "binary.json"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(DeepError, match="cannot read results file .*binary.json"):
        load_results([str(binary)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_result("cifar10_bn", 1, 96.0)))
    no_seed = _result("cifar10_bn", None, 95.0)
    del no_seed["seed"]
    (tmp_path / "other.json").write_text(json.dumps(no_seed))
    results = load_results([str(run), str(run / "results.json"), str(tmp_path / "other.json")])
    assert len(results) == 2
    assert "given more than once; counted once" in capsys.readouterr().err
    md = render(results)
    assert "Seeds: cifar10_bn: [1, None]" in md and "95.50 ± 0.71 (n=2)" in md


@pytest.mark.parametrize("args, msg", [
    (["--device", "bogus"], "--device bogus: not a torch device (use cpu, cuda or cuda:N)"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--device", "meta"], "not supported"),
    (["--arch", "bogus"], "--arch bogus: expected WRN DEPTH-WIDTH"),
    (["--arch", "15-4"], "depth must be 6n + 4"),
    (["--arch", "wrn-15-4"], "depth must be 6n + 4"),
    (["--arch", "16-0"], "width must be >= 1"),
    (["--K", "-1"], "--K must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--batch", "-2"], "--batch must be >= 1"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--image-size", "2"], "--image-size must be >= 8"),
    (["--classes", "0"], "--classes must be >= 1"),
])
def test_bench_rejects_bad_arguments(args, msg, capsys):
    from deep.cli import main
    assert main(["bench"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_cli_reports_os_errors_in_one_line(monkeypatch, capsys):
    """Last resort: an OSError about a path the user gave is one line naming the path and the reason, exit 2."""
    import deep.table
    from deep.cli import main

    def refuse(paths):
        raise PermissionError(13, "Permission denied", paths[0])
    monkeypatch.setattr(deep.table, "load_results", refuse)
    assert main(["table", "/some/results"]) == 2
    assert capsys.readouterr().err == "error: /some/results: Permission denied\n"


def test_bench_accepts_the_wrn_prefix(capsys):
    from deep.cli import main
    args = ["bench", "--device", "cpu", "--arch", "wrn-10-1", "--K", "2", "--batch", "2", "--rounds", "1",
            "--warmup", "0", "--image-size", "8", "--threads", "1", "--system-malloc"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "WRN-10-1" in out and "K=2, B=2 per member" in out


@pytest.mark.parametrize("content", [b"", b"garbage \x00\x01 not a checkpoint", "truncated"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, content):
    import shared
    path = tmp_path / "checkpoint.pt"
    if content == "truncated":
        shared.save(path, {"w": torch.zeros(100)})
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(shared.CheckpointError) as e:
        shared.load(path)
    assert isinstance(e.value, ValueError) and "cannot be read as a checkpoint" in str(e.value)
    assert "\n" not in str(e.value)
