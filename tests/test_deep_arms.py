"""The arms the paper compares, end to end on tiny data: the late-phase full ensemble, BatchEnsemble, MC dropout,
late-phase from T0 = 0, their costs in results.json, OOD sets from image folders and the digits OOD set."""
import json

import pytest
import torch
from PIL import Image

from deep.cli import main
from deep.config import get_config
from deep.images import ImageRun

from data_files import write_fashion

TINY = dict(arch="wrn-10-1", epochs=2, batch_size=4, eval_batch_size=16, anneal_start=1, anneal_end=2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fashion(root / "FashionMNIST" / "raw", compressed=True, n_train=32, n_test=12)
    folder = root / "ood_folder" / "things"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(5):  # RGB images of another size: converted to grey 28 x 28
        Image.fromarray(torch.randint(0, 256, (40, 36, 3), generator=g, dtype=torch.uint8).numpy()).save(
            folder / f"{i}.png")
    return root


def _run(cfg, data_root, tmp_path, name):
    return ImageRun(cfg, data_dir=str(data_root), out=str(tmp_path / name), device="cpu", progress=False,
                    quiet=True, export="none").train()


def test_late_phase_full_ensemble_replicates_every_weight(data_root, tmp_path):
    base = _run(get_config("fmnist_base", **TINY), data_root, tmp_path, "base")
    full = _run(get_config("fmnist_bn", phi=("all",), K=2, T0=1, **TINY), data_root, tmp_path, "full")
    n = base["cost"]["network_parameters"]
    assert full["cost"]["network_parameters"] == n and full["cost"]["parameters"] == 2 * n  # nothing shared
    assert len(full["models"]["members"]["stored"]) == 2
    ratio = full["cost"]["training_flops"] / base["cost"]["training_flops"]
    assert ratio == pytest.approx(1.0, rel=0.05)  # each member sees 1/K of the data per epoch
    assert full["cost"]["training_flops_vs_base"] == pytest.approx(ratio, rel=1e-6)  # named in results.json
    assert base["cost"]["training_flops_vs_base"] == pytest.approx(1.0)
    assert full["cost"]["test_passes"] == {"averaged": 1, "ensemble": 2, "members": 1}


def test_batchensemble_members_start_apart_and_are_an_ensemble(data_root, tmp_path):
    cfg = get_config("fmnist_bn", phi=("rank1", "bn"), rank1_layers=("*",), K=2, T0=0, sigma0=0.5, **TINY)
    r = _run(cfg, data_root, tmp_path, "be")
    members = r["models"]["members"]["stored"]
    assert members[0]["nll"] != members[1]["nll"] and "ensemble" in r["models"]
    log = [json.loads(line) for line in open(tmp_path / "be" / "log.jsonl")]
    assert [e["phase"] for e in log] == ["late", "late"]  # trained as an ensemble from the start


def test_hypernetwork_late_phase(data_root, tmp_path):
    base = _run(get_config("fmnist_base", **TINY), data_root, tmp_path, "base")
    r = _run(get_config("fmnist_bn", phi=("hyper", "bn"), K=2, T0=1, **TINY), data_root, tmp_path, "hyper")
    assert r["cost"]["network_parameters"] == base["cost"]["network_parameters"]  # collapses to the same network
    assert r["cost"]["parameters"] > base["cost"]["parameters"]  # template banks + per-member coefficients
    assert len(r["models"]["members"]["stored"]) == 2 and "reference" in r["models"]["averaged"]


def test_mc_dropout_and_its_cost(data_root, tmp_path):
    cfg = get_config("fmnist_base", dropout=0.3, mc_samples=3, **TINY)
    r = _run(cfg, data_root, tmp_path, "mc")
    assert set(r["models"]) == {"averaged", "mc_dropout"} and set(r["models"]["mc_dropout"]) == {"stored",
                                                                                                  "reestimated"}
    assert r["models"]["mc_dropout"]["stored"]["nll"] != r["models"]["averaged"]["stored"]["nll"]
    assert r["cost"]["test_passes"] == {"averaged": 1, "mc_dropout": 3}
    with pytest.raises(ValueError, match="needs dropout > 0"):
        get_config("fmnist_base", mc_samples=3)


def test_late_phase_from_step_zero(data_root, tmp_path):
    r = _run(get_config("fmnist_bn", K=2, T0=0, **TINY), data_root, tmp_path, "t0")
    log = [json.loads(line) for line in open(tmp_path / "t0" / "log.jsonl")]
    assert log[0]["phase"] == "late" and len(r["models"]["members"]["stored"]) == 2


def test_ood_folders_digits_and_the_mean_auroc(data_root, tmp_path, capsys):
    pytest.importorskip("sklearn")
    folder = data_root / "ood_folder"
    cfg = get_config("fmnist_bn", K=2, T0=1, ood=("digits",), ood_folders=(f"noise={folder}",), **TINY)
    r = _run(cfg, data_root, tmp_path, "ood")
    m = r["models"]["ensemble"]["reestimated"]
    assert set(m["ood"]) == {"digits", "noise"}
    assert m["ood_mean"]["auroc_entropy"] == pytest.approx((m["ood"]["digits"]["auroc_entropy"] +
                                                            m["ood"]["noise"]["auroc_entropy"]) / 2)
    # re-evaluation with another folder, from the run folder alone
    assert main(["evaluate", str(tmp_path / "ood"), "--data-dir", str(data_root), "--ood-folders", str(folder),
                 "--bn-rule", "stored", "--device", "cpu", "--quiet"]) == 0
    again = json.load(open(tmp_path / "ood" / "results_stored_ood-digits-ood_folder.json"))
    assert set(again["models"]["averaged"]["stored"]["ood"]) == {"digits", "ood_folder"}
    with pytest.raises(ValueError, match="must be distinct"):
        get_config("fmnist_bn", ood=("digits",), ood_folders=("digits=/x",))
