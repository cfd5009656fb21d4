"""The fmnist_paper_shape study's tooling: the arms' config fields (batch_size_late for the large-batch twin,
weight_decay_theta), the members' diagnostics in log.jsonl, --eval-every, the final metrics on the console, and a
study rebuilt and continued from its finished runs' small files alone."""
import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import shared
from deep.cli import main
from deep.config import PRESETS, describe, get_config
from deep.errors import ConfigError
from deep.evaluate import member_disagreement, phi_spread
from deep.images import ImageRun
from deep.study import STUDIES, Arm, StudySpec, _trunk_plan, make_report, run_study
from deep.trainer import final_lines


TINY = dict(arch="cnn-4-8", epochs=3, batch_size=4, eval_batch_size=16, anneal_start=1, anneal_end=2,
            train_subset=0, bn_images=16, ood=())


def _run(cfg, data_root, out, **kw):
    return ImageRun(cfg, data_dir=str(data_root), out=str(out), device="cpu", progress=False, quiet=True,
                    export="none", **kw)


# ----------------------------------------------------------------------------- the config fields

def test_the_named_study_has_the_paper_shape():
    """15,000 images, 60 epochs, T0 = 36, lr constant to epoch 30, annealed per epoch to 0.001 at epoch 54,
    batch 128 per member, K = 4, at least 600 steps per member after the release; all arms share the first T0."""
    spec = STUDIES["fmnist_paper_shape"].validate()
    assert [a.name for a in spec.arms] == ["base", "late_phase", "late_phase_inv_K", "large_batch_twin",
                                           "late_phase_wd_K", "deep_ensemble"]
    assert spec.seeds == tuple(range(8)) and spec.arms[-1].size == 4
    cfgs = {a.name: a.resolved() for a in spec.arms if a.ensemble_of is None}
    late = cfgs["late_phase"]
    assert (late.train_subset, late.epochs, late.T0, late.batch_size, late.K, late.phi) == \
        (15000, 60, 36, 128, 4, ("bn", "head"))
    lrs = [late.lr * late.lr_factor(e) for e in range(late.epochs)]
    # the reference's convention (deep.config.annealing_lr, 0-based epochs): constant through e = 30, the floor from
    # e = 54 (1-based: epochs 1-31 at 0.1, annealed over 32-54, epochs 55-60 at 0.001)
    assert lrs[:31] == [0.1] * 31 and 0.1 > lrs[31] > lrs[53] > 0.001 and lrs[54:] == pytest.approx([0.001] * 6)
    assert (late.train_subset // (late.K * late.batch_size)) * (late.epochs - late.T0) >= 600
    assert cfgs["late_phase_inv_K"].theta_scale == 0.25 and late.theta_scale == 1.0
    twin = cfgs["large_batch_twin"]
    assert (twin.K, twin.theta_scale, twin.late_batch_size, twin.phi) == (1, 4.0, 512, ("bn", "head"))
    wd = cfgs["late_phase_wd_K"]
    assert wd.theta_weight_decay == pytest.approx(4 * late.weight_decay) and wd.phi_weight_decay == late.weight_decay
    assert late.theta_weight_decay == late.weight_decay and late.late_batch_size == 128
    assert not cfgs["base"].late_phase
    assert _trunk_plan(spec)["base"] == (36, ["base", "late_phase", "late_phase_inv_K", "large_batch_twin",
                                              "late_phase_wd_K"])
    text = describe()
    assert "fmnist_paper_shape_twin" in text and "B'=512" in text and "lambda_theta=0.002" in text


@pytest.mark.parametrize("overrides, msg", [
    (dict(batch_size_late=-1), "batch_size_late must be >= 0"),
    (dict(phi=(), batch_size_late=256), "apply after the release of late-phase weights"),
    (dict(phi=(), weight_decay_theta=1e-3), "apply after the release of late-phase weights"),
    (dict(eval_every=0), "eval_every must be >= 1"),
])
def test_new_fields_are_validated(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        get_config("fmnist_paper_shape_bn", **overrides)
    assert get_config("fmnist_paper_shape_bn", gamma_theta=8.0).theta_scale == 8.0  # gamma_theta > 1 is allowed
    with pytest.raises(ConfigError, match="image runs only"):
        get_config("enwik8_lstm_lp", batch_size_late=64)


def test_cli_flags_of_the_new_fields(capsys):
    assert main(["train", "--config", "fmnist_paper_shape_base", "--batch-size-late", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size_late" in err[0]
    assert main(["configs", "fmnist_paper_shape_twin", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["batch_size_late"] == 512 and shown["gamma_theta"] == 4.0 and shown["weight_decay_theta"] is None
    assert main(["study", "fmnist_paper_shape", "--out", "x", "--eval-every", "0"]) == 2
    assert "--eval-every must be >= 1" in capsys.readouterr().err


def test_the_large_batch_twin_steps_as_stated(data_root, tmp_path):
    """After the release the twin (K = 1, B' = K0 B, gamma_theta = K0) takes one SGD step per batch of K0 B images:
    theta <- theta - eta (K0 grad_theta + lambda theta), phi <- phi - eta (grad_phi + lambda phi), the gradients
    those of the mean loss over the batch (checked against a hand-written step, momentum off)."""
    K0, lam = 3, 0.01
    cfg = get_config("fmnist_paper_shape_twin", **{**TINY, "epochs": 2, "T0": 1, "momentum": 0.0,
                                                   "nesterov": False, "weight_decay": lam, "K": 1,
                                                   "gamma_theta": float(K0), "batch_size_late": K0 * 4})
    run = _run(cfg, data_root, tmp_path / "twin")
    run.run_epoch()
    plain = copy.deepcopy(run.model)
    run.release()
    lr = run.lp.phi_optimizers[0].param_groups[0]["lr"]
    assert run.steps_per_epoch(1) == 48 // (K0 * 4)
    x, y = next(iter(run.epoch_batches(1, 1)))
    assert x.shape[0] == K0 * 4
    run.late_step((x, y))
    loss = F.cross_entropy(plain(x), y)
    grads = torch.autograd.grad(loss, list(plain.parameters()))
    phi_names = {n for n, m in plain.named_modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Linear))}
    got = dict(shared.collapse(run.lp.model).named_parameters())
    for (name, p), g in zip(plain.named_parameters(), grads):
        scale = 1.0 if name.rsplit(".", 1)[0] in phi_names else float(K0)
        want = p.detach() - lr * (scale * g + lam * p.detach())
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


def test_theta_weight_decay_after_the_release(data_root, tmp_path):
    cfg = get_config("fmnist_paper_shape_wdK", **{**TINY, "T0": 1, "K": 2, "weight_decay": 1e-3,
                                                  "weight_decay_theta": 4e-3})
    run = _run(cfg, data_root, tmp_path / "wd")
    run.run_epoch()
    run.run_epoch()
    assert run.lp.theta_optimizer.param_groups[0]["weight_decay"] == 4e-3
    assert all(o.param_groups[0]["weight_decay"] == 1e-3 for o in run.lp.phi_optimizers)


# ----------------------------------------------------------------------------- diagnostics and --eval-every

def test_member_diagnostics_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5))
    lp = shared.LatePhase(net, 3, [shared.BatchNorm(), shared.Head()], theta_optimizer=shared.sgd(0.1), phi_optimizer=shared.sgd(0.1))
    assert phi_spread(lp.model) == 0.0  # sigma0 = 0: the members are copies at the release
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 5, (10,))
    assert member_disagreement(lp.model, lambda: iter([(x, y)]))["disagreement"] == 0.0
    with torch.no_grad():
        for _, m in shared.modules.late_modules(lp.model):
            for plist in (pl for _, pl in m.phi_lists()):
                for p in plist:
                    p.add_(torch.randn_like(p))
    stacked = [torch.stack(list(pl)) for _, m in shared.modules.late_modules(lp.model) for _, pl in m.phi_lists()]
    flat = torch.cat([s.detach().reshape(3, -1) for s in stacked], 1)
    bar = flat.mean(0)
    want = float((flat - bar).norm(dim=1).mean() / bar.norm())
    assert phi_spread(lp.model) == pytest.approx(want, rel=1e-5)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    got = member_disagreement(lp.model, lambda: iter(batches))
    top = shared.ensemble_logits(lp.model, x).argmax(-1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert got["disagreement"] == pytest.approx(100 * sum(float((top[a] != top[b]).float().mean())
                                                          for a, b in pairs) / 3)
    ens = shared.ensemble_probs(lp.model, x).argmax(-1)
    assert got["ensemble_accuracy"] == pytest.approx(100 * float((ens == y).float().mean()))


def test_log_diagnostics_every_n_epochs_and_resume_with_another_n(data_root, tmp_path, capsys):
    out = tmp_path / "lp"
    cfg_epochs = 5
    # stop after 3 epochs (a run of 5 interrupted), then resume with another --eval-every
    cfg = get_config("fmnist_paper_shape_bn", **{**TINY, "epochs": cfg_epochs, "anneal_end": 4, "T0": 1, "K": 2,
                                                 "eval_every": 2})
    run = _run(cfg, data_root, out)
    for _ in range(3):
        run.run_epoch()
    run.close()
    assert main(["train", "--resume", "--out", str(out), "--eval-every", "4", "--device", "cpu", "--no-progress",
                 "--data-dir", str(data_root), "--export", "none"]) == 0
    printed = capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluated = [e["epoch"] for e in log if "test_accuracy" in e]
    assert evaluated == [2, 4, 5]  # every 2 epochs, then every 4 after the resume, and always the last
    for e in log:
        late_eval = e["phase"] == "late" and "test_accuracy" in e
        assert ("members_disagreement" in e) == late_eval and ("phi_spread" in e) == late_eval
        assert ("eval_seconds" in e) == ("test_accuracy" in e)
    assert all(0 <= e["members_disagreement"] <= 100 and e["phi_spread"] > 0 for e in log if "phi_spread" in e)
    # the final metrics in a few lines: averaged, ensemble, members
    lines = [line for line in printed.splitlines() if line.startswith("[fmnist_paper_shape_bn]   ")]
    assert [line.split()[1] for line in lines[-3:]] == ["averaged", "ensemble", "members"]
    assert "reestimated: acc" in lines[-3] and "mean of 2 acc" in lines[-1]
    assert main(["evaluate", str(out), "--bn-rule", "stored", "--device", "cpu", "--data-dir", str(data_root)]) == 0
    shown = [line.split()[1] for line in capsys.readouterr().out.splitlines() if "stored: " in line]
    assert shown == ["averaged", "ensemble", "members"]  # deep evaluate prints them too
    result = json.loads((out / "results.json").read_text())
    steps = result["eval_step_seconds"]
    assert "averaged (stored)" in steps and "networks for the reestimated rule" in steps
    assert sum(steps.values()) == pytest.approx(result["eval_seconds"], rel=1e-6)
    assert result["epoch_eval_seconds"] == pytest.approx(sum(e.get("eval_seconds", 0) for e in log))


def test_final_lines():
    models = {"averaged": {"stored": {"accuracy": 91.234, "nll": 0.25, "ece": 1.5,
                                      "ood_mean": {"auroc_entropy": 88.0}}},
              "members": {"stored": [{"accuracy": 90.0, "nll": 0.3}, {"accuracy": 92.0, "nll": 0.2}]}}
    lines = final_lines(models)
    assert lines == ["  averaged  stored: acc 91.23% NLL 0.2500 ECE 1.50% AUROC 88.0%",
                     "  members   stored: mean of 2 acc 91.00% NLL 0.2500 (range 90.00-92.00)"]


# ----------------------------------------------------------------------------- the study from its small files

SMALL_FILES = ("config.json", "results.json", "log.jsonl", "predictions.pt")


def _tiny_paper_study(seeds=(0, 1)) -> StudySpec:
    named = STUDIES["fmnist_paper_shape"]
    small = dict(TINY, epochs=3, T0=1, eval_every=2)
    arms = []
    for a in named.arms:
        if a.ensemble_of:
            arms.append(dataclasses.replace(a, size=2))
        else:
            extra = {"K": 2} if a.resolved().K > 1 else {"batch_size_late": 8, "gamma_theta": 2.0}
            if a.name == "base":
                extra = {}
            arms.append(dataclasses.replace(a, overrides={**a.overrides, **small, **extra}))
    return dataclasses.replace(named, arms=tuple(arms), seeds=seeds).validate()


def test_a_study_rebuilds_and_continues_from_small_files(data_root, tmp_path, capsys):
    spec = _tiny_paper_study()
    first = tmp_path / "first"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": spec.name, "seeds": list(spec.seeds), "baseline": "base",
                                     "description": spec.description,
                                     "arms": {a.name: ({"ensemble_of": a.ensemble_of, "size": a.size}
                                                       if a.ensemble_of else
                                                       {"config": a.config, "overrides": a.overrides})
                                              for a in spec.arms}}))
    assert main(["study", str(spec_file), "--out", str(first), "--data-dir", str(data_root), "--device", "cpu",
                 "--eval-every", "1", "--quiet"]) == 0
    report = json.loads((first / "report.json").read_text())
    assert set(report["arms"]) == {a.name for a in spec.arms}
    log = [json.loads(x) for x in (first / "late_phase" / "seed0" / "log.jsonl").read_text().splitlines()]
    assert all("test_accuracy" in e for e in log)  # --eval-every 1 over the arms' eval_every 2
    assert "members_disagreement" in log[-1] and "phi_spread" in log[-1]
    # a copy holding only the finished runs' small files (no checkpoints, trunks, exports, locks)
    copy_dir = tmp_path / "copy"
    kept = 0
    for f in first.rglob("*"):
        if f.is_file() and f.name in SMALL_FILES and f.parent.name.startswith("seed"):
            target = copy_dir / f.relative_to(first)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
            kept += 1
    assert kept == 4 * 5 * 2  # 5 trained arms x 2 seeds x 4 files (every run of a study keeps its predictions)
    assert main(["study", str(spec_file), "--report-only", "--out", str(copy_dir), "--quiet"]) == 0
    capsys.readouterr()
    again = json.loads((copy_dir / "report.json").read_text())
    assert again == json.loads((first / "report.json").read_text())
    for png in ("curves.png", "reliability.png"):
        assert (copy_dir / png).read_bytes()[:4] == b"\x89PNG"
    # continuing: finished runs are not trained again; a missing one (seed 1 of late_phase) is
    shutil.rmtree(copy_dir / "late_phase" / "seed1")
    calls = []

    def runner(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
        calls.append((cfg.name, seed, resume))
        from deep.study import _train
        _train(cfg, seed, folder, resume, fork, trunk_epoch, **kw)

    run_study(spec, str(copy_dir), str(data_root), "cpu", quiet=True, runner=runner)
    assert calls == [("fmnist_paper_shape_bn", 1, False)]
    assert make_report(spec, str(copy_dir))["arms"]["late_phase"]["seeds"] == [0, 1]
    md = (copy_dir / "report.md").read_text()
    assert "| large_batch_twin | late-phase bn+head K=1, gamma_theta=2, T0=1; minibatch 8 after T0 |" in md
    assert "| late_phase_wd_K | late-phase bn+head K=2, gamma_theta=1, T0=1; theta's weight decay 0.002 after T0 |" \
        in md


def test_presets_are_listed():
    for name in ("fmnist_paper_shape_base", "fmnist_paper_shape_bn", "fmnist_paper_shape_twin",
                 "fmnist_paper_shape_wdK"):
        assert name in PRESETS and PRESETS[name].eval_every == 3


def test_a_late_batch_larger_than_the_data_fails_at_once(data_root, tmp_path):
    from deep.data import DataError
    cfg = get_config("fmnist_paper_shape_twin", **{**TINY, "T0": 1, "batch_size_late": 64})
    with pytest.raises(DataError, match="minibatches of batch_size_late 64 need 64 training images per step, the "
                                        "training set has 48; lower --K or --batch-size-late"):
        _run(cfg, data_root, tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_a_resumed_lead_run_still_keeps_the_trunk(data_root, tmp_path):
    """The run that trains a seed's shared first T0 epochs keeps them (trunk.pt) for the other arms also when it was
    interrupted before T0 and resumed, so the late-phase arms fork instead of training those epochs again."""
    arms = (Arm("base", "fmnist_paper_shape_base", dict(TINY, epochs=3)),
            Arm("late_phase", "fmnist_paper_shape_bn", dict(TINY, epochs=3, T0=2, K=2)))
    spec = StudySpec(name="lead", arms=arms, seeds=(0,), baseline="base").validate()
    first = _run(arms[0].resolved(), data_root, tmp_path / "base" / "seed0", seed=0)
    first.run_epoch()  # interrupted after one of the two shared epochs
    first.close()
    calls = []

    def runner(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
        calls.append((cfg.name, resume, fork is not None, trunk_epoch))
        from deep.study import _train
        _train(cfg, seed, folder, resume, fork, trunk_epoch, **kw)

    run_study(spec, str(tmp_path), str(data_root), "cpu", quiet=True, runner=runner)
    assert calls == [("fmnist_paper_shape_base", True, False, 2), ("fmnist_paper_shape_bn", False, True, None)]


def test_the_spec_s_eval_every_reaches_every_run_and_round_trips(tmp_path):
    """A JSON spec's top-level eval_every (or --eval-every) sets every training arm's eval_every for the runner,
    survives the spec file written for SLURM jobs, and bad values are one line."""
    from deep.errors import ConfigError
    from deep.launch import spec_json
    from deep.study import parse_spec, run_one, with_eval_every
    d = {"seeds": [0, 1], "baseline": "base", "eval_every": 5,
         "arms": {"base": {"config": "fmnist_paper_shape_base"}, "ens": {"ensemble_of": "base", "size": 2}}}
    spec = parse_spec(d, "s")
    assert spec.eval_every == 5 and parse_spec(spec_json(spec), "s") == spec
    named = STUDIES["fmnist_paper_shape"]  # its contrast (late_phase - large_batch_twin) survives the jobs' file too
    assert named.contrasts and parse_spec(spec_json(named), named.name) == named
    seen = []
    run_one(spec, str(tmp_path), 0, spec.arms[0], runner=lambda cfg, *a, **kw: seen.append(cfg.eval_every))
    assert seen == [5]
    assert with_eval_every(spec, 2).eval_every == 2 and with_eval_every(spec, None) is spec
    for bad in (0, True, 1.5, "3"):
        with pytest.raises(ConfigError, match="eval_every must be an integer >= 1"):
            parse_spec({**d, "eval_every": bad}, "s")


def test_unset_fields_are_none_and_shown_as_what_they_stand_for(capsys, tmp_path):
    """lr_phi, weight_decay_phi and weight_decay_theta are None when unset ("same as lr / weight_decay"), gamma_theta
    is a number or "1/K"; `deep configs NAME` shows what they stand for; configs stored with the older -1 sentinels
    read as today's (from_dict, and the comparisons of resume, fork, study and table go through the same upgrade)."""
    from deep.config import ImageConfig, upgrade
    assert main(["configs", "imagenet_resnet50"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines["lr_phi"] == "same as lr (0.001)" and lines["weight_decay_theta"] == "same as weight_decay (0.0001)"
    assert lines["gamma_theta"] == "1/K (0.1 at K = 10)" and lines["batch_size_late"] == "same as batch_size (256)"
    # a weight decay of 0 is set (no decay), not "same as weight_decay"
    from deep.config import show
    shown = dict(line.split(None, 1) for line in show(get_config("fmnist_paper_shape_bn", weight_decay_phi=0.0,
                                                                   weight_decay_theta=0.0)).splitlines())
    assert shown["weight_decay_phi"] == "0.0" and shown["weight_decay_theta"] == "0.0"
    cfg = get_config("fmnist_paper_shape_bn", gamma_theta="1/K")
    assert cfg.theta_scale == 0.25 and cfg.phi_lr == cfg.lr and cfg.theta_weight_decay == cfg.weight_decay
    legacy = {**cfg.to_dict(), "gamma_theta": -1.0, "lr_phi": -1.0, "weight_decay_phi": -1.0,
              "weight_decay_theta": -1.0}
    assert upgrade(legacy) == cfg.to_dict() and ImageConfig.from_dict(legacy) == cfg
    assert upgrade({"gamma_theta": 0.5, "lr_phi": 0.01}) == {"gamma_theta": 0.5, "lr_phi": 0.01}
    # the command line: 1/K spelled out; the old -1 is refused with one line that names the new spelling
    rc = main(["train", "--config", "fmnist_paper_shape_bn", "--gamma-theta", "-1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1/K" in err[0] and not (tmp_path / "r").exists()
    rc = main(["train", "--config", "fmnist_paper_shape_bn", "--lr-phi", "-1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "lr_phi must be > 0" in err[0]
    rc = main(["train", "--config", "fmnist_paper_shape_bn", "--gamma-theta", "one", "--out", str(tmp_path / "r")])
    assert rc == 2 and "1/K" in capsys.readouterr().err


def _close(a, b, path="report.json"):
    """Equal structures, floats to 1e-9 relative (a deep ensemble's NLL is a reduction: the last bits depend on the
    CPU's kernels)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


def test_the_committed_study_rebuilds_from_its_committed_files(tmp_path):
    """docs/results/fmnist_paper_shape holds only the finished runs' small files: `--report-only` rebuilds the
    committed report.json from them (every arm on its 8 seeds), without reaching a checkpoint or the data."""
    import pathlib
    committed = pathlib.Path(__file__).resolve().parent.parent / "docs" / "results" / "fmnist_paper_shape"
    if not committed.is_dir():
        pytest.skip("no committed fmnist_paper_shape study in this checkout")
    out = tmp_path / "study"
    shutil.copytree(committed, out)
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("checkpoint*"))
    assert main(["study", "fmnist_paper_shape", "--report-only", "--out", str(out)]) == 0
    rebuilt = json.loads((out / "report.json").read_text())
    _close(rebuilt, json.loads((committed / "report.json").read_text()))
    assert all(len(a["seeds"]) == 8 for a in rebuilt["arms"].values() if not a["ensemble_of"])
    assert rebuilt["contrasts"] and rebuilt["paired_curves"]["arms"]
