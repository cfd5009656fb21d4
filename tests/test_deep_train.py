"""python -m deep train: every image config end to end on tiny generated data, resume, results, table, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from deep.cli import main
from deep.config import PRESETS, get_config
from deep.train import Run

from data_files import write_cifar10, write_cifar100, write_fashion, write_svhn

IMAGE_CONFIGS = sorted(n for n, c in PRESETS.items() if c.dataset in ("cifar10", "cifar100", "fashion_mnist"))
TINY = dict(arch="wrn-10-1", epochs=3, batch_size=4, eval_batch_size=16, anneal_start=1, anneal_end=2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, per_batch=16, n_test=12)
    write_cifar100(root, n_train=80, n_test=12)
    write_svhn(root, n=10)
    write_fashion(root / "FashionMNIST" / "raw", compressed=True, n_train=80, n_test=12)
    return root


def tiny(name, **extra):
    cfg = PRESETS[name]
    over = dict(TINY, **extra)
    if cfg.late_phase:
        over["T0"] = 1
    if cfg.swa:
        over["swa_start"] = 2
    return get_config(name, **over)


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_image_config_runs_end_to_end(name, data_root, tmp_path):
    cfg = tiny(name)
    r = Run(cfg, seed=1, data_dir=str(data_root), out=str(tmp_path / "run"), progress=False).train()
    models = r["models"]
    assert set(models) == ({"averaged", "ensemble", "members"} if cfg.late_phase else {"averaged"})
    for m in [models["averaged"]] + ([models["ensemble"]] + models["members"] if cfg.late_phase else []):
        assert 0 <= m["accuracy"] <= 100 and m["nll"] > 0 and 0 <= m["ece"] <= 100
        for ood in cfg.ood:
            assert 0 <= m["ood"][ood]["auroc_entropy"] <= 100 and 0 <= m["ood"][ood]["auroc_max_softmax"] <= 100
    if cfg.late_phase:
        assert len(models["members"]) == cfg.K
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert [e["phase"] for e in log] == (["pre", "late", "late"] if cfg.late_phase else ["pre"] * 3)
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["config"]["name"] == name and saved["schema"] == "late-phase-results/1"


def _params(run):
    return {k: v.clone() for k, v in run.model.state_dict().items()}


@pytest.mark.parametrize("stop_after", [1, 2])
def test_resume_is_bit_identical(stop_after, data_root, tmp_path):
    """Interrupt after `stop_after` epochs (before / after the release at T0 = 1, with SWA from epoch 2), resume in a
    fresh Run, and compare with an uninterrupted run: identical weights, optimizer-driven losses and results."""
    cfg = tiny("cifar10_bn_swa", K=2, sigma0=0.1)
    full = Run(cfg, seed=3, data_dir=str(data_root), out=str(tmp_path / "a"), progress=False)
    r_full = full.train()
    part = Run(cfg, seed=3, data_dir=str(data_root), out=str(tmp_path / "b"), progress=False)
    for _ in range(stop_after):
        part.run_epoch()
    del part
    resumed = Run(cfg, seed=3, data_dir=str(data_root), out=str(tmp_path / "b"), progress=False, resume=True)
    assert resumed.epoch == stop_after
    r_res = resumed.train()
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in full.log] == [e["loss"] for e in resumed.log]
    assert r_full["models"] == r_res["models"]


def test_cli_train_table_and_errors(data_root, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--config", "fmnist_bn", "--data-dir", str(data_root), "--out", str(out), "--no-progress",
            "--arch", "wrn-10-1", "--epochs", "2", "--T0", "1", "--batch_size", "4", "--K", "3"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"] == "fmnist_bn" and "ensemble" in printed["models"]
    # A second start into the same folder must not overwrite the run.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume of a finished run evaluates again without training.
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    table = capsys.readouterr().out
    assert "fmnist_bn" in table and "| averaged |" in table
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    damaged = {"empty": b"", "garbage": b"garbage \x00\x01"}
    for name, content in damaged.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(content)
    fmnist = ["train", "--config", "fmnist_bn", "--data-dir", str(data_root), "--arch", "wrn-10-1", "--batch_size", "4"]
    for bad, msg in ([["train", "--config", "cifar10_bn", "--device", "bogus"],
                      "--device bogus: not a torch device (use cpu, cuda or cuda:N)"],
                     [["train", "--config", "cifar10_bn", "--device", "cuda:99"], "--device cuda:99: "],
                     [["train", "--config", "cifar10_bn", "--out", str(a_file)], "is a file, not a folder"],
                     [["train", "--config", "cifar10_bn", "--out", str(a_file / "run")], "cannot create the run"],
                     [fmnist + ["--out", str(tmp_path / "empty"), "--resume"], "cannot be read as a checkpoint"],
                     [fmnist + ["--out", str(tmp_path / "garbage"), "--resume"], "delete it to start afresh"],
                     [["train", "--config", "cifar10_bn", "--eval_batch_size", "0"], "eval_batch_size must be >= 1"],
                     [["train", "--config", "cifar10_bn", "--ood", "svhn", "foo"], "unknown OOD set(s) foo"],
                     [["train", "--config", "cifar10_bn", "--lr", "nan"], "lr must be a finite number"],
                     [["train", "--config", "cifar10_bn", "--grad_clip", "-1"], "grad_clip must be >= 0"],
                     [["train", "--config", "cifar10_bn", "--cutout", "-1"], "cutout must be >= 0"],
                     [["table", str(a_file)], "cannot read results file"],
                     [["train", "--config", "cifar11"], "unknown config"],
                     [["train", "--config", "cifar10_bn", "--epochz", "3"], "unrecognized arguments"],
                     [["train", "--config", "cifar10_bn", "--K", "0"], "K must be"],
                     [["train", "--config", "cifar10_bn", "--data-dir", str(tmp_path / "none")], "CIFAR-10 not found"],
                     [["train", "--config", "cifar10_bn", "--out", str(tmp_path / "x"), "--resume"], "no checkpoint"],
                     [["train", "--config", "fmnist_bn", "--data-dir", str(data_root), "--out", str(out), "--resume",
                       "--arch", "wrn-10-1", "--epochs", "2", "--T0", "1", "--batch_size", "4", "--K", "3",
                       "--lr", "0.2"], "different settings"],
                     [["table", str(tmp_path / "nothing.json")], "cannot read"]):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


def test_fashion_mnist_fallback_is_reported(data_root, tmp_path, monkeypatch, capsys):
    """Fashion-MNIST missing under --data-dir is read from the system folder, with one note saying so."""
    import deep.train
    from deep.data import load_dataset
    system = data_root / "FashionMNIST" / "raw"
    monkeypatch.setattr(deep.train, "load_dataset",
                        lambda name, root, split, download, **kw: load_dataset(name, root, split, download,
                                                                               system_dir=system, **kw))
    Run(tiny("fmnist_bn"), data_dir=str(tmp_path / "none"), out=str(tmp_path / "run"), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: fashion_mnist not found under --data-dir {tmp_path / 'none'}; reading it from {system}"]
    Run(tiny("fmnist_bn"), data_dir=str(data_root), out=str(tmp_path / "run2"), progress=False)
    assert capsys.readouterr().err == ""


def test_torchrun_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m deep train` on the CPU (gloo): each member's minibatch is sharded over the two
    ranks; the run finishes and rank 0 writes the results."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deep",
           "train", "--config", "synthetic_bench", "--out", str(tmp_path / "ddp"), "--no-progress",
           "--arch", "wrn-10-1", "--epochs", "2", "--T0", "1", "--K", "2", "--batch_size", "8",
           "--synthetic_size", "64", "--eval_batch_size", "32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "ddp" / "results.json"))
    assert res["world_size"] == 2 and len(res["models"]["members"]) == 2
