"""The tools around a run, end to end on tiny data: console lines without a TTY, --quiet and --json, the evaluate
command, exported models, plots, the table's grouping by effective config, and the provenance in results.json."""
import json
import os
import subprocess
import sys

import pytest
import torch

import shared
from deep.cli import main
from deep.config import get_config
from deep.images import ImageRun


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--arch", "wrn-10-1", "--batch-size", "4", "--eval-batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """A finished late-phase run with SWA (3 epochs, release after 1, SWA from epoch 3), run as a subprocess whose
    output is not a terminal."""
    out = tmp_path_factory.mktemp("runs") / "lp"
    cmd = [sys.executable, "-m", "deep", "train", "--config", "fmnist_bn", "--data-dir", str(data_root), "--out",
           str(out), "--epochs", "3", "--T0", "1", "--K", "2", "--swa-start", "3", "--anneal-start", "1",
           "--anneal-end", "2"] + SMALL
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r.stdout, r.stderr


def test_console_lines_without_a_tty(finished):
    out, stdout, stderr = finished
    lines = stdout.strip().splitlines()
    epochs = [line for line in lines if " epoch " in line and "ETA" in line]
    assert len(epochs) == 3 and all(line.startswith("[fmnist_bn] epoch ") for line in epochs)
    assert "pre" in epochs[0] and "late K=2" in epochs[1] and "test " in epochs[0] and "img/s" in epochs[0]
    assert epochs[-1].endswith("ETA 0s")
    release = next(line for line in lines if "release at epoch 2" in line)
    assert "K=2 members of bn+head" in release and "theta moves at 1x the plain rate" in release
    assert "one 2x step every 2 minibatches" in release and "average phi at 0.5x" in release
    assert any("SWA from epoch 3" in line for line in lines)
    assert any("averaged (reestimated)" in line for line in lines)
    assert any(line.endswith("results.json") for line in lines) and any("exported 3 model(s)" in line for line in lines)
    assert "Traceback" not in stderr and "\r" not in stdout  # no progress bars without a TTY


def test_quiet_and_json(data_root, tmp_path, capsys):
    args = ["train", "--config", "fmnist_base", "--data-dir", str(data_root), "--epochs", "1", "--no-progress"] + SMALL
    assert main(args + ["--out", str(tmp_path / "q"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert main(args + ["--out", str(tmp_path / "j"), "--json", "--export", "none"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["config"] == "fmnist_base" and "[fmnist_base] epoch 1/1" in captured.err
    assert not (tmp_path / "j" / "export").exists()


def test_evaluate_a_finished_run_from_its_folder(finished, data_root, capsys):
    out, _, _ = finished
    original = json.load(open(out / "results.json"))
    assert main(["evaluate", str(out), "--data-dir", str(data_root), "--bn-rule", "stored", "--device", "cpu",
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    again = json.load(open(out / "results_stored.json"))
    assert set(again["models"]["averaged"]) == {"stored"}
    assert again["models"]["averaged"]["stored"] == original["models"]["averaged"]["stored"]
    assert printed["models"]["members"]["stored"][0]["accuracy"] == again["models"]["members"]["stored"][0]["accuracy"]
    assert json.load(open(out / "results.json")) == original  # the original results are left alone


def test_evaluate_an_interrupted_run(data_root, tmp_path, capsys):
    cfg = get_config("fmnist_bn", epochs=3, T0=1, K=2, arch="wrn-10-1", batch_size=4, eval_batch_size=16)
    run = ImageRun(cfg, data_dir=str(data_root), out=str(tmp_path / "r"), device="cpu", progress=False, quiet=True)
    run.run_epoch()
    run.run_epoch()
    assert main(["evaluate", str(tmp_path / "r"), "--data-dir", str(data_root), "--device", "cpu", "--quiet"]) == 0
    res = json.load(open(tmp_path / "r" / "results_all.json"))
    assert res["epochs_trained"] == 2 and set(res["models"]) == {"averaged", "ensemble", "members"}
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "no run in" in capsys.readouterr().err


def test_exported_models_load_in_three_lines(finished, data_root):
    out, _, _ = finished
    import deep.models
    spec = json.load(open(out / "export" / "models.json"))
    assert spec["bn_rule"] == "reestimated" and set(spec["files"]) == {"averaged", "member_0", "member_1"}
    model = deep.models.build(spec["build"])
    model.load_state_dict(torch.load(out / "export" / "averaged.pt", weights_only=True))
    member = deep.models.load_exported(str(out), "member_1")
    assert type(model).__name__ == type(member).__name__ == "WRN"
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model.eval()(x).shape == member(x).shape == (3, 10)
    # the exported averaged model is the one evaluated under its rule
    from deep.data import GPULoader, load_dataset
    test = load_dataset("fashion_mnist", str(data_root), "test")
    from deep.evaluate import score_plain
    loader = GPULoader(test, 16, device="cpu")
    acc = score_plain(model, lambda: iter(loader), {})["accuracy"]
    assert acc == pytest.approx(json.load(open(out / "results.json"))["models"]["averaged"]["reestimated"]["accuracy"])


def test_plot_of_runs(finished, data_root, tmp_path):
    out, _, _ = finished
    base = tmp_path / "base"
    assert main(["train", "--config", "fmnist_base", "--data-dir", str(data_root), "--epochs", "2", "--out",
                 str(base), "--quiet"] + SMALL) == 0
    fig = tmp_path / "fig.png"
    assert main(["plot", str(out), str(base), "--out", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 20_000
    assert main(["plot", str(out), "--out", str(tmp_path / "fig.pdf")]) == 2
    assert main(["plot", str(tmp_path), "--out", str(fig)]) == 2


def test_results_provenance_and_one_log_schema(finished):
    out, _, _ = finished
    res = json.load(open(out / "results.json"))
    hw = res["hardware"]
    assert hw["precision"] == "float32" and hw["memory_format"] == "channels_last" and hw["cpu"] not in ("", None)
    assert hw["torch"] == torch.__version__ and "git_commit" in hw and "package_version" in hw
    assert res["epochs_trained"] == 3 and "reliability" in res["models"]["averaged"]["stored"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    common = {"epoch", "t", "phase", "K", "lr", "lr_phi", "loss", "images_per_s", "seconds", "wall_seconds",
              "test_accuracy"}
    assert all(common <= set(e) for e in log)


def _result(name, seed, acc, **config):
    from deep.config import PRESETS
    return {"config": {**PRESETS[name].to_dict(), **config}, "seed": seed, "epochs_trained": None,
            "models": {"averaged": {"stored": {"accuracy": acc, "nll": 0.3, "ece": 1.0}}}}


def test_table_groups_by_effective_config_and_keeps_overrides_away_from_the_paper(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, (seed, acc, over) in enumerate([(0, 96.0, {}), (1, 96.4, {}), (0, 61.0, {"K": 4}),
                                           (0, 62.0, {"K": 4}), (2, 50.0, {"arch": "wrn-16-2", "K": 2})]):
        (runs / f"group{i % 2}" / f"r{i}").mkdir(parents=True)
        (runs / f"group{i % 2}" / f"r{i}" / "results.json").write_text(json.dumps(_result("cifar10_bn", seed, acc,
                                                                                           **over)))
    assert main(["table", str(runs)]) == 0  # folders are searched recursively
    captured = capsys.readouterr()
    table = captured.out
    paper_row = next(line for line in table.splitlines() if line.startswith("| CIFAR-10, WRN-28-10, SGD"))
    assert "96.20 ± 0.28 (n=2)" in paper_row  # only the two runs that follow the preset exactly
    assert "| cifar10_bn (K=4) | stored | averaged | 61.50 ± 0.71 (n=2) |" in table
    assert "| cifar10_bn (K=2, arch=wrn-16-2) | stored | averaged | 50.00 (n=1) |" in table
    assert "cifar10_bn (K=4): seed(s) [0] appear more than once" in captured.err


def test_table_lists_the_members_bits_per_character(tmp_path, capsys):
    from deep.config import PRESETS
    r = {"config": PRESETS["enwik8_lstm_lp"].to_dict(), "seed": 0,
         "models": {"averaged": {"stored": {"bpc_valid": 1.60, "bpc_test": 1.64}},
                    "ensemble": {"stored": {"bpc_valid": 1.58, "bpc_test": 1.62}},
                    "members": {"stored": [{"bpc_valid": 1.7, "bpc_test": 1.72}, {"bpc_valid": 1.8,
                                                                                   "bpc_test": 1.74}]}}}
    (tmp_path / "results.json").write_text(json.dumps(r))
    assert main(["table", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| enwik8_lstm_lp | members (each) | 1.750 ± 0.071 (n=2) | 1.730 ± 0.014 (n=2) |" in table
    assert "| enwik8, LSTM-500, SGD (bits/char) | 1.695 | — | 1.633 | 1.640 (n=1) | 1.620 (n=1) |" in table
    short = dict(r, config=dict(r["config"], train_subset=12000))
    (tmp_path / "results.json").write_text(json.dumps(short))
    assert main(["table", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "No run follows a paper preset's protocol exactly" in table and "(train_subset=12000)" in table


def test_checkpoints_of_another_kind_or_world_are_refused(data_root, tmp_path):
    cfg = get_config("fmnist_base", epochs=2, arch="wrn-10-1", batch_size=4, eval_batch_size=16)
    run = ImageRun(cfg, data_dir=str(data_root), out=str(tmp_path / "r"), device="cpu", progress=False, quiet=True)
    run.run_epoch()
    state = shared.load(tmp_path / "r" / "checkpoint.pt")
    for change, msg in (({"world_size": 2}, "used 2 process"), ({"kind": "text"}, "is not a checkpoint of"),
                        ({"seed": 5}, "different settings")):
        shared.save(tmp_path / "r" / "checkpoint.pt", {**state, **change})
        with pytest.raises(ValueError, match=msg):
            ImageRun(cfg, data_dir=str(data_root), out=str(tmp_path / "r"), device="cpu", resume=True, quiet=True)


def test_plot_labels_show_the_value_an_unset_field_stands_for():
    """`deep plot`'s legend names the fields that differ between runs, an unset field (None; 0 for batch_size_late)
    as the value it stands for: the twin's batch 512 against the late-phase run's 128, not against 0."""
    from deep.plots import _label
    late = {"config": {**get_config("fmnist_paper_shape_bn").to_dict(), "name": "late"}, "seed": 0}
    twin = {"config": {**get_config("fmnist_paper_shape_twin").to_dict(), "name": "twin"}, "seed": 0}
    assert late["config"]["batch_size_late"] in (None, 0)
    runs = [late, twin]
    assert "batch_size_late=128" in _label(late, runs) and "batch_size_late=512" in _label(twin, runs)
    assert "lr_phi" not in _label(late, runs)  # None (same as lr) in both
    no_decay = {"config": {**late["config"], "name": "no_decay", "weight_decay_theta": 0.0}, "seed": 0}
    assert "weight_decay_theta=0.0" in _label(no_decay, [late, no_decay])  # 0 is no decay, not "same as"
