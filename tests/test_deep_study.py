"""python -m deep study: shared first epochs are exact (a forked run = the run from scratch), a study runs end to
end, resumes when half finished, and its statistics match a hand computation; the paper's CIFAR study runs on tiny
generated data."""
import dataclasses
import json
import math

import pytest
import torch

from deep.cli import main
from deep.config import get_config
from deep.errors import ConfigError
from deep.images import ImageRun
from deep.study import STUDIES, Arm, StudySpec, load_spec, make_report, mean_ci, paired, run_study
from deep.trainer import shareable

from data_files import write_cifar10, write_cifar100, write_fashion, write_svhn

TINY = dict(arch="wrn-10-1", epochs=3, batch_size=4, eval_batch_size=16, anneal_start=1, anneal_end=2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion(root / "FashionMNIST" / "raw", compressed=True, n_train=48, n_test=12)
    write_cifar10(root, per_batch=8, n_test=8)
    write_cifar100(root, n_train=16, n_test=8)
    write_svhn(root, n=8)
    return root


def _run(cfg, data_root, out, **kw):
    return ImageRun(cfg, data_dir=str(data_root), out=str(out), device="cpu", progress=False, quiet=True,
                    export="none", **kw)


def test_a_forked_run_is_bit_identical_to_the_run_from_scratch(data_root, tmp_path):
    """The first T0 epochs of a late-phase run with gamma_theta = 1 are those of its gamma_theta = 1/K and base twins:
    forking its trunk gives exactly the weights, optimizer states, logs and results of training from scratch."""
    trunk_run = get_config("fmnist_bn", T0=1, K=2, **TINY)
    _run(trunk_run, data_root, tmp_path / "a", seed=4, trunk_epoch=1).train()
    trunk = tmp_path / "a" / "trunk.pt"
    assert trunk.exists()
    for name, other in (("mean", get_config("fmnist_bn", T0=1, K=2, gamma_theta="1/K", swa_start=3, **TINY)),
                        ("base", get_config("fmnist_base", **TINY))):
        scratch = _run(other, data_root, tmp_path / f"{name}_scratch", seed=4)
        r_scratch = scratch.train()
        forked = _run(other, data_root, tmp_path / f"{name}_fork", seed=4, fork=str(trunk))
        assert forked.epoch == 1
        r_fork = forked.train()
        a, b = scratch.model.state_dict(), forked.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert [e["loss"] for e in scratch.log] == [e["loss"] for e in forked.log]
        assert r_scratch["models"] == r_fork["models"]


def test_shareable_names_why_not():
    base = get_config("fmnist_bn", T0=2, **TINY).to_dict()
    assert shareable(base, {**base, "gamma_theta": 0.5, "K": 3, "name": "x"}, 2) is None
    assert "differ in lr" in shareable(base, {**base, "lr": 0.2}, 2)
    assert "releases its late-phase weights at T0 = 1" in shareable(base, {**base, "T0": 1}, 2)
    assert "starts SWA at epoch 2" in shareable(base, {**base, "swa_start": 2}, 2)
    assert shareable(base, {**base, "ood": ["svhn"], "test_subset": 5}, 2) is None  # evaluation-only fields


def test_statistics_by_hand():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["sd"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx(2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5))
    d = paired({0: 91.0, 1: 92.5, 2: 90.0, 3: 93.0}, {0: 90.0, 1: 92.0, 2: 90.5, 4: 99.0})
    assert d["seeds"] == [0, 1, 2] and (d["positive"], d["negative"]) == (2, 1)
    diffs = [1.0, 0.5, -0.5]
    m = sum(diffs) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 2)
    assert d["mean"] == pytest.approx(m) and d["ci95"] == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    assert mean_ci([2.0])["ci95"] is None


def _spec(**kw):
    arms = (Arm("base", "fmnist_base", dict(TINY)),
            Arm("late", "fmnist_bn", dict(TINY, T0=1, K=2)),
            Arm("late_mean", "fmnist_bn", dict(TINY, T0=1, K=2, gamma_theta="1/K")),
            Arm("deep_ensemble", ensemble_of="base", size=2))
    return StudySpec(name="tiny", arms=arms, seeds=(0, 1), baseline="base", **kw).validate()


def test_study_end_to_end_resume_and_report(data_root, tmp_path, capsys):
    spec = _spec()
    calls = []

    def interrupted(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
        calls.append((cfg.name, seed, resume, fork is not None, trunk_epoch))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the study stops in its third run
        from deep.study import _train
        _train(cfg, seed, folder, resume, fork, trunk_epoch, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, str(tmp_path), str(data_root), "cpu", quiet=True, runner=interrupted)
    # seed 0: base from scratch keeps the trunk at T0 = 1; late forks it
    assert calls[:2] == [("fmnist_base", 0, False, False, 1), ("fmnist_bn", 0, False, True, None)]
    report = run_study(spec, str(tmp_path), str(data_root), "cpu", stream=None)
    out = capsys.readouterr().out
    assert "late_mean seed 0 (forking" in out and "base seed 0" not in out  # finished runs are skipped
    assert set(report["arms"]) == {"base", "late", "late_mean", "deep_ensemble"}
    # the report's numbers are the results files' numbers
    per_seed = {s: json.load(open(tmp_path / "late" / f"seed{s}" / "results.json"))["models"]["averaged"]
                ["reestimated"]["accuracy"] for s in (0, 1)}
    base = {s: json.load(open(tmp_path / "base" / f"seed{s}" / "results.json"))["models"]["averaged"]
            ["reestimated"]["accuracy"] for s in (0, 1)}
    stats = report["arms"]["late"]["metrics"]["reestimated"]["averaged"]["accuracy"]
    assert stats["mean"] == pytest.approx(sum(per_seed.values()) / 2)
    diffs = [per_seed[s] - base[s] for s in (0, 1)]
    d = report["paired"]["late"]["reestimated"]["averaged"]["accuracy"]
    assert d["mean"] == pytest.approx(sum(diffs) / 2) and d["positive"] == sum(x > 0 for x in diffs)
    members = json.load(open(tmp_path / "late" / "seed0" / "results.json"))["models"]["members"]["reestimated"]
    member_nll = report["arms"]["late"]["metrics"]["reestimated"]["members"]["nll"]["per_seed"][0]
    assert member_nll == pytest.approx(sum(m["nll"] for m in members) / len(members))
    # the deep ensemble: the mean of the base runs' probabilities of seeds 0 and 1; with size = the number of
    # seeds every cyclic window holds the same two runs, so it is one ensemble (n = 1), not two copies of it
    import torch
    from deep.evaluate import summarize
    p0, p1 = (torch.load(tmp_path / "base" / f"seed{s}" / "predictions.pt")["reestimated"] for s in (0, 1))
    mean = {"test": (p0["test"].float() + p1["test"].float()) / 2, "labels": p0["labels"]}
    ens = report["arms"]["deep_ensemble"]
    nll = ens["metrics"]["reestimated"]["averaged"]["nll"]
    assert nll["per_seed"] == {0: pytest.approx(summarize(mean, [])["nll"])} and nll["n"] == 1
    assert ens["relative_training_flops"] == pytest.approx(2.0)
    assert report["arms"]["late"]["relative_training_flops"] == pytest.approx(1.0, rel=0.05)
    md = (tmp_path / "report.md").read_text()
    assert "## Paired differences to `base`" in md and "| late | ensemble |" in md and "![curves.png]" in md
    for png in ("curves.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    saved = json.load(open(tmp_path / "report.json"))
    assert saved["paired"]["late"]["reestimated"]["averaged"]["accuracy"]["seeds"] == [0, 1]
    # a contrast between two arms other than the baseline: d_s = late - late_mean, averaged models, both rules
    report = make_report(dataclasses.replace(spec, contrasts=(("late", "late_mean"),)), str(tmp_path))
    mean_gamma = report["arms"]["late_mean"]["metrics"]["reestimated"]["averaged"]["accuracy"]["per_seed"]
    c = report["contrasts"]["late - late_mean"]["reestimated"]["accuracy"]
    assert c["mean"] == pytest.approx(sum(per_seed[s] - mean_gamma[s] for s in (0, 1)) / 2) and c["seeds"] == [0, 1]
    assert "stored" in report["contrasts"]["late - late_mean"]
    assert "| late - late_mean |" in (tmp_path / "report.md").read_text()
    # paired per-epoch differences of the logged test accuracy: by hand from log.jsonl, from the first epoch at
    # which a seed's two runs differ (the shared epoch before the release differs in none)
    def logged(arm):
        return {s: {e["epoch"]: e["test_accuracy"] for e in map(json.loads, open(tmp_path / arm / f"seed{s}" /
                                                                                    "log.jsonl"))
                    if "test_accuracy" in e} for s in (0, 1)}
    curves = report["paired_curves"]
    assert (curves["metric"], curves["model"]) == ("test_accuracy", "averaged")
    for name, (first, second) in (("late", ("late", "base")), ("late - late_mean", ("late", "late_mean"))):
        a, b = logged(first), logged(second)
        d = {e: [a[s][e] - b[s][e] for s in (0, 1)] for e in sorted(a[0])}
        rows = curves["contrasts" if " - " in name else "arms"].get(name, [])
        differ = [e for e in d if any(d[e])]
        assert [r["epoch"] for r in rows] == ([e for e in d if e >= differ[0]] if differ else [])
        assert 1 not in differ  # the trunk before the release is the same run
        for r in rows:
            assert r["mean"] == pytest.approx(sum(d[r["epoch"]]) / 2) and r["n"] == 2
            assert r["positive"] == sum(x > 0 for x in d[r["epoch"]])


@pytest.mark.parametrize("contrasts,msg", [
    ([["late", "nope"]], "pair of two different arms"), ([["late", "late"]], "pair of two different arms"),
    ([["late"]], "pair of two different arms"), ("late", "list of \\[arm, other arm\\] pairs"),
    ([[1, 2]], "pair of two different arms")])
def test_spec_contrasts_are_checked(contrasts, msg):
    from deep.study import parse_spec
    d = {"seeds": [0], "baseline": "base", "arms": {"base": {"config": "fmnist_cpu_base"},
                                                    "late": {"config": "fmnist_cpu_bn"}}, "contrasts": contrasts}
    with pytest.raises(ConfigError, match=msg):
        parse_spec(d, "x")
    ok = parse_spec({**d, "contrasts": [["late", "base"]]}, "x")
    assert ok.contrasts == (("late", "base"),)


def test_spec_files_and_cli(data_root, tmp_path, capsys):
    spec = {"name": "one", "seeds": [0], "baseline": "base",
            "arms": {"base": {"config": "fmnist_base", "overrides": dict(TINY, epochs=1)}}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert load_spec(str(path)).arms[0].overrides["epochs"] == 1
    assert main(["study", str(path), "--out", str(tmp_path / "s"), "--data-dir", str(data_root), "--device", "cpu",
                 "--quiet"]) == 0
    assert (tmp_path / "s" / "report.md").exists()
    capsys.readouterr()
    assert main(["study", "--list"]) == 0 and "cifar10:" in capsys.readouterr().out
    bad = [({**spec, "baseline": "nope"}, "baseline 'nope' is not one of its arms"),
           ({**spec, "seeds": [0, 0]}, "seeds must be distinct"),
           ({**spec, "arms": {"base": {"config": "fmnist_base", "overrides": {"K": 0}}}}, "K must be >= 1"),
           ({"seeds": [0]}, "not a study spec")]
    for content, msg in bad:
        path.write_text(json.dumps(content))
        assert main(["study", str(path), "--out", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    few = {**spec, "seeds": [0, 1], "arms": {**spec["arms"], "late": {"config": "fmnist_bn", "seeds": [1]}}}
    assert [a.seeds for a in (path.write_text(json.dumps(few)), load_spec(str(path)))[1].arms] == [(), (1,)]
    for arms, msg in (({"late": {"config": "fmnist_bn", "seeds": [2]}}, "must be distinct seeds of the study"),
                      ({"base": {"config": "fmnist_base", "seeds": [0]}}, "runs on every seed of the study")):
        path.write_text(json.dumps({**few, "arms": {**few["arms"], **arms}}))
        assert main(["study", str(path), "--out", str(tmp_path / "t")]) == 2
        assert msg in capsys.readouterr().err
    assert main(["study", "nothing", "--out", str(tmp_path / "t")]) == 2
    assert "neither a named study" in capsys.readouterr().err


def test_the_paper_cifar_study_on_tiny_data(data_root, tmp_path):
    """The named cifar10 study (base, late-phase, SWA, late-phase + SWA), shrunk to tiny runs: the late-phase and
    the SWA arms share the base arm's first epoch."""
    named = STUDIES["cifar10"]
    tiny = dict(TINY, T0=1, K=2, epochs=3)
    arms = tuple(Arm(a.name, a.config, {**tiny, **({"swa_start": 3} if "swa" in a.name else {}),
                                        **({"T0": 1} if "swa" in a.name else {})}) for a in named.arms)
    spec = dataclasses.replace(named, arms=arms, seeds=(0,)).validate()
    report = run_study(spec, str(tmp_path), str(data_root), "cpu", quiet=True)
    assert set(report["arms"]) == {"base", "late_phase", "swa", "late_phase_swa"}
    ood = report["arms"]["late_phase"]["metrics"]["reestimated"]["ensemble"]
    assert "ood:svhn:auroc_entropy" in ood and "ood:mean:auroc_entropy" in ood
    make_report(spec, str(tmp_path))  # the report alone, again


def test_named_cpu_studies_share_the_first_T0_epochs():
    from deep.study import STUDIES, _trunk_plan
    plan = _trunk_plan(STUDIES["fmnist_cpu"].validate())
    assert plan["base"] == (4, ["base", "late_phase", "late_phase_inv_K", "swa", "late_phase_swa"])
    arms = _trunk_plan(STUDIES["fmnist_cpu_arms"].validate())
    assert arms["base"] == (4, ["base", "late_phase", "full_ensemble", "hypernetwork"])
    assert "batchensemble" not in arms and "late_phase_T0_0" not in arms  # trained as K members from step 0
    for name in ("cifar10_arms", "cifar100_arms"):
        assert STUDIES[name].validate().arms[-1].size == 10


def test_the_named_arms_study_on_tiny_data(data_root, tmp_path):
    """Every arm of fmnist_cpu_arms (base, late-phase BN + head, full ensemble, hypernetwork, BatchEnsemble,
    MC dropout, late-phase from T0 = 0, a deep ensemble) through the study on tiny runs: MC dropout's sampled
    model has its own rows, and every arm names its training and its test-time cost."""
    named = STUDIES["fmnist_cpu_arms"]
    assert named.arms[2].name == "full_ensemble" and named.arms[2].seeds == (0, 1, 2, 3)  # the costly arms: fewer
    small = dict(TINY, epochs=2, K=2, bn_images=16, ood=())
    arms = tuple(dataclasses.replace(a, size=2) if a.ensemble_of else dataclasses.replace(
        a, overrides={**small, **({"T0": 1} if a.resolved().T0 else {})},
        seeds=(0,) if a.name in ("full_ensemble", "hypernetwork") else ())
        for a in named.arms)
    spec = dataclasses.replace(named, arms=arms, seeds=(0, 1)).validate()
    report = run_study(spec, str(tmp_path), str(data_root), "cpu", quiet=True)
    arms = report["arms"]
    assert set(arms) == {a.name for a in named.arms}
    assert not (tmp_path / "full_ensemble" / "seed1").exists() and arms["full_ensemble"]["seeds"] == [0]
    assert all(a["seeds"] == ([0] if a["ensemble_of"] or a["planned_seeds"] == [0] else [0, 1])
               for a in arms.values())
    mc = arms["mc_dropout"]
    assert set(mc["metrics"]["reestimated"]) == {"averaged", "mc_dropout"}
    assert mc["test_passes"] == {"averaged": 1, "mc_dropout": 10}
    assert report["paired"]["mc_dropout"]["reestimated"]["mc_dropout"]["accuracy"]["n"] == 2
    assert arms["late_phase"]["test_passes"] == {"averaged": 1, "ensemble": 2, "members": 1}
    assert arms["batchensemble"]["T0"] == 0 and arms["late_phase_T0_0"]["T0"] == 0
    assert arms["full_ensemble"]["parameters"] == 2 * arms["base"]["parameters"]
    assert arms["deep_ensemble"]["metrics"]["reestimated"]["averaged"]["accuracy"]["n"] == 1  # size 2 of 2 seeds
    md = (tmp_path / "report.md").read_text()
    assert "| mc_dropout | mc_dropout |" in md and "dropout 0.1, 10 passes at test" in md
    assert "late-phase rank1+bn K=2, gamma_theta=1, T0=0" in md and "mc_dropout 10" in md
    assert "Arms on fewer seeds (their cost): `full_ensemble` [0], `hypernetwork` [0]." in md
    (tmp_path / "mc_dropout" / "seed1" / "results.json").unlink()  # an unfinished run is named, not hidden
    assert make_report(spec, str(tmp_path))["arms"]["mc_dropout"]["seeds"] == [0]
    assert "Not finished yet: `mc_dropout` (1 of 2) runs." in (tmp_path / "report.md").read_text()


def test_the_extending_guide_study_spec():
    """docs/extending.md's study spec, as written: parsed, validated, each arm resolved to its preset + overrides."""
    import os
    import re
    from deep.study import parse_spec
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "extending.md")).read()
    spec = parse_spec(json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1)), "unused")
    arms = {a.name: a for a in spec.arms}
    assert spec.name == "fmnist_wd" and spec.baseline == "base" and spec.seeds == (0, 1)
    assert arms["late_phase_no_decay"].resolved() == dataclasses.replace(get_config("fmnist_cpu_bn"),
                                                                         weight_decay_phi=0.0)
    assert arms["late_phase_no_decay"].seeds_in(spec) == (0,) and arms["deep_ensemble"].seeds_in(spec) == (0, 1)
    assert spec.contrasts == (("late_phase_no_decay", "late_phase"),)
