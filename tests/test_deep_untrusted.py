"""Files from someone else -- exports, run folders, study folders, study specs -- never run code, never make the
project write or delete through a symbolic link, and never make a study report what it did not run: planted
models.json builders, bit flips, symlinks, edited specs, copied seeds, NaN runs and damaged files each end in one line
(exit 2) or a note in the report, with the planted targets untouched."""
import json
import os
import shutil

import pytest
import torch

import deep.models
from deep.cli import main
from deep.errors import DeepError
from deep.runfolder import LOCK_NAME, RunLock
from deep.study import Arm, StudySpec, load_spec, make_report, run_study
from shared.checkpoint import atomic_write


SMALL = ["--arch", "wrn-10-1", "--batch-size", "4", "--eval-batch-size", "16", "--device", "cpu", "--quiet"]


def one_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for p in parts:
        assert p in err, err
    return err


@pytest.fixture(scope="module")
def exported(data_root, tmp_path_factory):
    """A finished one-epoch base run with its exports."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", "--config", "fmnist_base", "--data-dir", str(data_root), "--epochs", "1", "--out",
                 str(out)] + SMALL) == 0
    return out


def _copy(run, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------------------------------------------------ exports

def test_exports_record_and_check_a_sha256_per_file(exported, tmp_path):
    manifest = json.load(open(exported / "export" / "models.json"))
    assert set(manifest["sha256"]) == set(manifest["files"]) == {"averaged"}
    assert deep.models.load_exported(str(exported)).training is False
    run = _copy(exported, tmp_path)
    data = bytearray((run / "export" / "averaged.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    (run / "export" / "averaged.pt").write_bytes(bytes(data))
    with pytest.raises(DeepError, match="does not match the SHA-256"):
        deep.models.load_exported(str(run))
    (run / "export" / "averaged.pt").write_bytes(bytes(data[:100]))  # truncated
    with pytest.raises(DeepError, match="does not match the SHA-256"):
        deep.models.load_exported(str(run))


def test_a_planted_builder_runs_nothing(exported, tmp_path):
    run = _copy(exported, tmp_path)
    path = run / "export" / "models.json"
    manifest = json.load(open(path))
    witness = tmp_path / "witness"
    for build in ({"builder": "os.system", "name": f"touch {witness}"},
                  {"builder": "builtins.exec", "name": f"open({str(witness)!r}, 'w')"},
                  {"builder": "builtins.eval", "name": f"open({str(witness)!r}, 'w')"},
                  {"builder": "subprocess.getoutput", "name": f"touch {witness}"},
                  {"builder": "deep.models.image_model", "kwargs": {"arch": {"__class__": "x"}}},
                  "os.system"):
        path.write_text(json.dumps({**manifest, "build": build}))
        with pytest.raises(DeepError) as e:
            deep.models.load_exported(str(run))
        assert "\n" not in str(e.value)
        with pytest.raises(DeepError):
            deep.models.build(build)
    assert not witness.exists()


def test_damaged_manifests_and_files_are_one_line(exported, tmp_path):
    run = _copy(exported, tmp_path)
    path = run / "export" / "models.json"
    manifest = json.load(open(path))
    outside = tmp_path / "outside.pt"
    shutil.copy(run / "export" / "averaged.pt", outside)
    other = torch.nn.Linear(3, 2).state_dict()  # another architecture's weights, with a valid digest
    torch.save(other, run / "export" / "other.pt")
    import hashlib
    other_digest = hashlib.sha256((run / "export" / "other.pt").read_bytes()).hexdigest()
    cases = [("{not json", "not an export's manifest"), ("[1, 2]", "not an export's manifest"),
             (json.dumps({**manifest, "sha256": None}), "sha256"),
             (json.dumps({**manifest, "files": {"averaged": "../../outside.pt"}}), "a plain name inside export/"),
             (json.dumps({**manifest, "files": {"averaged": str(outside)}}), "a plain name inside export/"),
             (json.dumps({**manifest, "files": {"averaged": "other.pt"}, "sha256": {"averaged": other_digest}}),
              "does not load into deep.models.image_model"),
             (json.dumps({**manifest, "build": {**manifest["build"], "kwargs": {"arch": "wrn-x"}}}), "refuses")]
    for text, msg in cases:
        path.write_text(text)
        with pytest.raises(DeepError, match=msg) as e:
            deep.models.load_exported(str(run))
        assert "\n" not in str(e.value)
    path.write_text(json.dumps(manifest))
    os.remove(run / "export" / "averaged.pt")
    os.symlink(outside, run / "export" / "averaged.pt")  # a link, even to identical bytes, is not followed
    with pytest.raises(DeepError, match="symbolic link"):
        deep.models.load_exported(str(run))


def test_exports_are_written_before_the_results(data_root, tmp_path, monkeypatch):
    """A kill between the two leaves a run without results.json, which a resume finishes (and exports again)."""
    import deep.trainer
    seen = []
    real = deep.trainer.Trainer.export

    def export(self):
        seen.append(os.path.exists(os.path.join(self.out, "results.json")))
        return real(self)
    monkeypatch.setattr(deep.trainer.Trainer, "export", export)
    assert main(["train", "--config", "fmnist_base", "--data-dir", str(data_root), "--epochs", "1", "--out",
                 str(tmp_path / "r")] + SMALL) == 0
    assert seen == [False] and (tmp_path / "r" / "results.json").exists()


# ----------------------------------------------------------------------------------------------------------- symlinks

def test_a_lock_symlink_is_refused_and_its_target_untouched(exported, data_root, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = _copy(exported, tmp_path)
    os.symlink(target, run / LOCK_NAME)
    with pytest.raises(DeepError, match="symbolic link"):
        RunLock(str(run))
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--device", "cpu", "--quiet"]) == 2
    one_error(capsys, "symbolic link")
    assert main(["train", "--resume", "--out", str(run), "--data-dir", str(data_root), "--quiet"]) == 2
    one_error(capsys, "symbolic link")
    assert target.read_text() == "keep me" and os.path.islink(run / LOCK_NAME)
    os.remove(run / LOCK_NAME)
    os.mkfifo(run / LOCK_NAME)  # not a regular file either
    with pytest.raises(DeepError, match="not a regular file"):
        RunLock(str(run))


def test_a_lock_swapped_for_a_link_while_held_is_not_deleted_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "run").mkdir()
    lock = RunLock(str(tmp_path / "run"))
    os.remove(tmp_path / "run" / LOCK_NAME)
    os.symlink(target, tmp_path / "run" / LOCK_NAME)
    lock.release()
    assert target.read_text() == "keep me"


def test_atomic_writes_replace_links_never_write_through_them(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "report.md")
    atomic_write(str(tmp_path / "report.md"), "mine")
    assert not os.path.islink(tmp_path / "report.md") and (tmp_path / "report.md").read_text() == "mine"
    os.symlink(target, tmp_path / f"out.json.tmp{os.getpid()}")  # the temporary file's name, planted
    atomic_write(str(tmp_path / "out.json"), "{}")
    assert target.read_text() == "keep me" and (tmp_path / "out.json").read_text() == "{}"


def test_plot_out_symlink_target_untouched(exported, tmp_path):
    target = tmp_path / "precious.png"
    target.write_bytes(b"keep me")
    os.symlink(target, tmp_path / "fig.png")
    assert main(["plot", str(exported), "--out", str(tmp_path / "fig.png")]) == 0
    assert target.read_bytes() == b"keep me" and (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ study specs and runs

TINY = dict(arch="wrn-10-1", epochs=1, batch_size=4, eval_batch_size=16)


def _spec(**kw):
    arms = (Arm("base", "fmnist_base", dict(TINY)), Arm("late", "fmnist_bn", dict(TINY, T0=0, K=2)),
            Arm("ens", ensemble_of="base", size=2))
    return StudySpec(name="s", arms=arms, seeds=(0, 1), baseline="base", **kw).validate()


def _fake_runner(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
    """A finished run without training: the files a run leaves, with made-up metrics (the report reads only these)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed + 100 * cfg.K)
    probs = torch.softmax(torch.randn(12, 10, generator=g), 1)
    labels = torch.randint(0, 10, (12,), generator=g)
    torch.save({"reestimated": {"test": probs.half(), "labels": labels}}, os.path.join(folder, "predictions.pt"))
    metrics = {"accuracy": 10.0 + seed + cfg.K, "nll": 2.0 + 0.1 * seed, "ece": 5.0}
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 1, "phase": "pre", "loss": 2.0, "test_accuracy": 10.0}) + "\n")
    json.dump({"kind": "image", "config": cfg.to_dict(), "seed": seed}, open(os.path.join(folder, "config.json"), "w"))
    json.dump({"config": cfg.to_dict(), "seed": seed, "train_seconds": 1.0, "cost": {"training_flops": 6.0},
               "models": {"averaged": {"reestimated": metrics, "stored": metrics}}},
              open(os.path.join(folder, "results.json"), "w"))


def _study(tmp_path, spec=None):
    out = tmp_path / "study"
    run_study(spec or _spec(), str(out), quiet=True, runner=_fake_runner)
    return out


def _no_training(*a, **kw):
    raise AssertionError("the study trained a run")


def test_spec_mistakes_are_one_line_before_any_run(tmp_path, capsys):
    good = {"name": "s", "seeds": [0, 1], "baseline": "base",
            "arms": {"base": {"config": "fmnist_base", "overrides": TINY}, "ens": {"ensemble_of": "base", "size": 2}}}
    arms = good["arms"]
    cases = [({**good, "rules": "stored"}, "unknown key 'rules' (did you mean 'rule'?)"),
             ({**good, "arms": {**arms, "late": {"config": "fmnist_bn", "overides": {"K": 2}}}},
              "arms.late: unknown key 'overides' (did you mean 'overrides'?)"),
             ({**good, "arms": {**arms, "../escaped": {"config": "fmnist_base"}}}, "not a plain folder name"),
             ({**good, "arms": {**arms, str(tmp_path / "abs"): {"config": "fmnist_base"}}}, "not a plain folder"),
             ({**good, "arms": {**arms, "": {"config": "fmnist_base"}}}, "not a plain folder name"),
             ({**good, "arms": {**arms, ".": {"config": "fmnist_base"}}}, "not a plain folder name"),
             ({**good, "arms": {**arms, "a/b": {"config": "fmnist_base"}}}, "not a plain folder name"),
             ({**good, "seeds": [0, 2 ** 32]}, "seeds[1] must be an integer in 0..4294967295"),
             ({**good, "seeds": [True]}, "seeds[0] must be an integer"),
             ({**good, "seeds": [0, 1.5]}, "seeds[1] must be an integer"),
             ({**good, "arms": {**arms, "late": {"config": "fmnist_bn", "seeds": [2 ** 40]}}},
              "arms.late.seeds[0] must be an integer"),
             ({**good, "arms": {**arms, "ens": {"ensemble_of": "base", "size": 1.5}}}, "must be an integer"),
             ({**good, "arms": {**arms, "ens": {"ensemble_of": "base", "size": 2, "seeds": [0]}}},
              "takes the seeds of its arm"),
             ({**good, "arms": {**arms, "late": {"config": "fmnist_bn", "overrides": {"K": 0}}}}, "arm late: "),
             ({**good, "arms": []}, "arms must be an object"),
             ({**good, "arms": {**arms, "late": "fmnist_bn"}}, "arms.late must be an object")]
    path = tmp_path / "spec.json"
    for content, msg in cases:
        path.write_text(json.dumps(content))
        assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2, msg
        one_error(capsys, msg)
    path.write_text('{"name": "s", "seeds": [0], "baseline": "base", "arms": {"base": {"config": "fmnist_base"}, '
                    '"base": {"config": "fmnist_bn"}}}')  # two arms of one name: json would keep the last
    assert main(["study", str(path), "--out", str(tmp_path / "out")]) == 2
    one_error(capsys, "'base' appears twice")
    path.write_text(json.dumps(good))
    for out in ("", " ", "a\nb"):
        assert main(["study", str(path), "--out", out]) == 2
        one_error(capsys, "--out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()
    assert load_spec(str(path)).arms[1].size == 2


def test_a_study_refuses_runs_that_are_not_its_spec(tmp_path):
    out = _study(tmp_path)
    edited = StudySpec(name="s", arms=(Arm("base", "fmnist_base", dict(TINY, lr=0.05)),) + _spec().arms[1:],
                       seeds=(0, 1), baseline="base").validate()
    with pytest.raises(DeepError, match=r"arm base, seed 0: .* was run with lr 0.1 where the spec says 0.05"):
        run_study(edited, str(out), quiet=True, runner=_no_training)
    report = make_report(edited, str(out))  # --report-only: named and left out
    assert report["arms"]["base"]["seeds"] == [] and "lr 0.1" in report["left_out"]["base"]["0"]
    assert "Left out, not the runs this spec asks for" in (out / "report.md").read_text()
    # a run folder copied to another seed
    shutil.rmtree(out / "late" / "seed1")
    shutil.copytree(out / "late" / "seed0", out / "late" / "seed1")
    with pytest.raises(DeepError, match="arm late, seed 1: .* was run with seed 0 where the spec says 1"):
        run_study(_spec(), str(out), quiet=True, runner=_no_training)
    assert make_report(_spec(), str(out))["arms"]["late"]["seeds"] == [0]
    # a field that the run's version did not have yet counts as its default (as RunConfig.from_dict reads it)
    r = json.load(open(out / "late" / "seed0" / "results.json"))
    del r["config"]["swa_lr"]
    json.dump(r, open(out / "late" / "seed0" / "results.json", "w"))
    assert make_report(_spec(), str(out))["arms"]["late"]["seeds"] == [0]
    # an interrupted run (checkpoint, no results) of another config is refused before anything trains
    shutil.rmtree(out / "late" / "seed1")
    os.makedirs(out / "late" / "seed1")
    (out / "late" / "seed1" / "checkpoint.pt").write_bytes(b"x")
    json.dump({"kind": "image", "config": {**_spec().arms[1].resolved().to_dict(), "K": 3}, "seed": 1},
              open(out / "late" / "seed1" / "config.json", "w"))
    with pytest.raises(DeepError, match="arm late, seed 1: .* was started with K 3 where the spec says 2"):
        run_study(_spec(), str(out), quiet=True, runner=_no_training)


def test_nan_runs_missing_predictions_and_damaged_files_are_named_not_tracebacks(tmp_path, capsys):
    out = _study(tmp_path)
    r = json.load(open(out / "late" / "seed1" / "results.json"))
    r["models"]["averaged"]["reestimated"]["nll"] = float("nan")
    json.dump(r, open(out / "late" / "seed1" / "results.json", "w"))
    os.remove(out / "base" / "seed1" / "predictions.pt")
    report = make_report(_spec(), str(out))
    nll = report["arms"]["late"]["metrics"]["reestimated"]["averaged"]["nll"]
    assert nll["n"] == 1 and list(nll["per_seed"]) == [0]
    assert report["arms"]["late"]["metrics"]["reestimated"]["averaged"]["accuracy"]["n"] == 2
    md = (out / "report.md").read_text()
    assert "Not finite (a diverged run?), left out of the means and n: `late` seed 1: averaged nll (reestimated)" in md
    assert "Not finished yet (deep ensembles): `ens` seed 0 (" in md and "predictions.pt is missing" in md
    # damaged files: one line from the study, a note in --report-only; never a traceback
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"name": "s", "seeds": [0, 1], "baseline": "base", "arms": {
        "base": {"config": "fmnist_base", "overrides": TINY}, "late": {"config": "fmnist_bn",
                                                                       "overrides": dict(TINY, T0=0, K=2)},
        "ens": {"ensemble_of": "base", "size": 2}}}))
    torch.save({"reestimated": {"test": torch.zeros(3)}}, out / "base" / "seed1" / "predictions.pt")
    (out / "base" / "seed0" / "log.jsonl").write_text("garbage\n{\"no\": \"epoch\"}\n")
    cases = [("{truncated", "cannot be read"), (json.dumps({"config": {}, "seed": 0}), "no models or config"),
             (json.dumps({"config": [], "models": {}}), "damaged")]
    for text, msg in cases:
        (out / "late" / "seed0" / "results.json").write_text(text)
        assert main(["study", str(spec_path), "--out", str(out), "--quiet"]) == 2
        one_error(capsys, "arm late, seed 0", msg, "delete that run folder")
        assert main(["study", str(spec_path), "--out", str(out), "--report-only"]) == 0
        assert msg in (out / "report.md").read_text()
    r = json.load(open(out / "base" / "seed0" / "results.json"))
    del r["train_seconds"]
    json.dump(r, open(out / "base" / "seed0" / "results.json", "w"))
    assert main(["study", str(spec_path), "--out", str(out), "--report-only"]) == 0
    assert "do not fit together" in (out / "report.md").read_text()


def test_study_symlinks_are_replaced_or_refused(tmp_path):
    out = _study(tmp_path)
    targets = {}
    for name in ("report.md", "curves.png", "reliability.png", "report.json"):
        targets[name] = tmp_path / f"precious_{name}"
        targets[name].write_text("keep me")
        os.remove(out / name)
        os.symlink(targets[name], out / name)
    make_report(_spec(), str(out))
    for name, target in targets.items():
        assert target.read_text() == "keep me" and not os.path.islink(out / name)
    # an arm folder that is a link would put runs (and reads) outside the study folder
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "late", elsewhere)
    os.symlink(elsewhere, out / "late")
    with pytest.raises(DeepError, match="symbolic link"):
        run_study(_spec(), str(out), quiet=True, runner=_no_training)
    assert "symbolic link" in make_report(_spec(), str(out))["left_out"]["late"]["0"]
    assert sorted(os.listdir(elsewhere)) == ["seed0", "seed1"]


# ------------------------------------------------------------------------------------- evaluate, plot, table: one line

def test_evaluate_lines_name_its_own_flags_and_refuse_empty_results(exported, data_root, tmp_path, capsys):
    run = _copy(exported, tmp_path)
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--device", "cpu", "--quiet", "--bn-rule",
                 "reference"]) == 2
    one_error(capsys, "--bn-rule reference: nothing to evaluate", "choose --bn-rule stored")
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--device", "cpu", "--quiet",
                 "--ood-folders", f"lsun={tmp_path / 'missing'}"]) == 2
    one_error(capsys, "lsun")
    assert not [f for f in os.listdir(run) if f.startswith("results_")]
    before = {f: (run / f).read_bytes() for f in ("checkpoint.pt", "results.json", "config.json")}
    for name in ("checkpoint.pt", "results.json", "config.json", "../x.json", "x.txt", ""):
        assert main(["evaluate", str(run), "--data-dir", str(data_root), "--device", "cpu", "--quiet",
                     "--name", name]) == 2
        one_error(capsys, "--name")
    assert before == {f: (run / f).read_bytes() for f in before} and not (tmp_path / "x.json").exists()
    for damage in ("checkpoint", "config", "nothing", "folder"):
        bad = _copy(exported, tmp_path, damage)
        if damage == "checkpoint":
            (bad / "checkpoint.pt").write_bytes(b"garbage")
        elif damage == "folder":
            os.remove(bad / "checkpoint.pt")
            os.mkdir(bad / "checkpoint.pt")
        elif damage == "config":
            (bad / "config.json").write_text("[")
        else:
            shutil.rmtree(bad)
        assert main(["evaluate", str(bad), "--data-dir", str(data_root), "--device", "cpu", "--quiet"]) == 2
        err = one_error(capsys)
        assert "--resume" not in err and "--out" not in err, err


def test_plot_and_table_of_damaged_runs_are_one_line(exported, tmp_path, capsys):
    cases = {"log.jsonl": ['{"loss": 1}\n', "garbage\n"],
             "results.json": ['{"config": {"name": "x"}}', '{"config": {"name": "x", "epochs": "3"}, "models": {}}'],
             "config.json": ["[1]", '{"config": [1], "seed": 0}', '{"config": {"name": "x", "swa_start": "2"}}']}
    for name, texts in cases.items():
        for text in texts:
            run = _copy(exported, tmp_path, "damaged")
            (run / name).write_text(text)
            assert main(["plot", str(run), "--out", str(tmp_path / "f.png")]) == 2, (name, text)
            one_error(capsys, name)
            shutil.rmtree(run)
    run = _copy(exported, tmp_path, "table")
    r = json.load(open(run / "results.json"))
    for field, value in (("epochs", "many"), ("swa_start", [1]), ("phi", "bn")):
        json.dump({**r, "config": {**r["config"], field: value}}, open(run / "results.json", "w"))
        assert main(["table", str(run / "results.json")]) == 2
        one_error(capsys, f"config.{field}")


class _Payload:
    """A pickle that would run a command when unpickled by plain pickle (torch.load(weights_only=True) refuses it)."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def test_pickled_payloads_run_nothing_and_are_one_line(exported, data_root, tmp_path, capsys):
    import pickle
    witness = tmp_path / "witness"
    run = _copy(exported, tmp_path)
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"state": _Payload(witness)}, f)
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--device", "cpu", "--quiet"]) == 2
    one_error(capsys, "cannot be read as a checkpoint")  # no torch warning lines before it
    with open(run / "export" / "averaged.pt", "wb") as f:
        pickle.dump(_Payload(witness), f)
    import hashlib
    manifest = json.load(open(run / "export" / "models.json"))
    manifest["sha256"]["averaged"] = hashlib.sha256((run / "export" / "averaged.pt").read_bytes()).hexdigest()
    (run / "export" / "models.json").write_text(json.dumps(manifest))  # a matching digest does not make it trusted
    with pytest.raises(DeepError, match="does not load"):
        deep.models.load_exported(str(run))
    out = _study(tmp_path)
    with open(out / "base" / "seed0" / "predictions.pt", "wb") as f:
        pickle.dump(_Payload(witness), f)
    assert "cannot be read" in make_report(_spec(), str(out))["left_out"]["ens"]["0"]
    assert not witness.exists()


def test_an_export_without_digests_is_refused_and_exported_again_by_resume(exported, data_root, tmp_path):
    run = _copy(exported, tmp_path)
    manifest = json.load(open(run / "export" / "models.json"))
    del manifest["sha256"]  # as written before digests existed
    (run / "export" / "models.json").write_text(json.dumps(manifest))
    with pytest.raises(DeepError, match="train --resume --out"):
        deep.models.load_exported(str(run))
    assert main(["train", "--resume", "--out", str(run), "--data-dir", str(data_root), "--quiet"]) == 0
    assert deep.models.load_exported(str(run)).training is False


def test_a_study_exports_again_a_run_with_results_but_no_exports(tmp_path):
    """A run killed between results.json and its exports by an earlier version (which wrote the results first) is
    resumed from its finished checkpoint, which evaluates and exports it again; complete runs are skipped."""
    out = _study(tmp_path)
    (out / "late" / "seed1" / "checkpoint.pt").write_bytes(b"finished")
    for seed in (0, 1):
        (out / "base" / f"seed{seed}" / "export").mkdir()
        (out / "base" / f"seed{seed}" / "export" / "models.json").write_text("{}")
    (out / "late" / "seed0" / "export").mkdir()
    (out / "late" / "seed0" / "export" / "models.json").write_text("{}")
    calls = []

    def runner(cfg, seed, folder, resume, fork, trunk_epoch, **kw):
        calls.append((os.path.relpath(folder, out), resume))
        _fake_runner(cfg, seed, folder, resume, fork, trunk_epoch)
        os.makedirs(os.path.join(folder, "export"), exist_ok=True)  # as the trainer's resume exports again
        with open(os.path.join(folder, "export", "models.json"), "w") as f:
            f.write("{}")
    run_study(_spec(), str(out), quiet=True, runner=runner)
    assert calls == [(os.path.join("late", "seed1"), True)]


def test_study_workers_never_lock_or_submit_through_a_planted_link(tmp_path):
    """deep.launch: an arm folder or the slurm folder that is a link is refused before anything is written through
    it, and a jobs record that is a link reads as no record."""
    from deep.errors import DeepError
    from deep.launch import _jobs_record, _take
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "study"
    out.mkdir()
    (out / "late").symlink_to(outside)
    with pytest.raises(DeepError, match="symbolic link"):
        _take(str(out), "late", 0)
    assert list(outside.iterdir()) == []
    (out / "slurm").mkdir()
    (outside / "jobs.json").write_text('[{"job_id": "1", "runs": ["late/seed0"]}]')
    (out / "slurm" / "jobs.json").symlink_to(outside / "jobs.json")
    assert _jobs_record(str(out / "slurm")) == []
