"""python -m deep finetune (ImageNet late-phase BatchNorm fine-tuning) and the enwik8 LSTM runs, on generated data:
end to end, resume, gradient accumulation, rank-1 LSTM paths, streamed metrics and one-line errors."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import shared
from deep import metrics
from deep.cli import main
from deep.config import PRESETS, get_config
from deep.finetune import FineTune, accumulated_step
from deep.lm import LMRun, StatefulLM, sequence_loss, stream_nats
from deep.table import render

TOL = dict(rtol=1e-9, atol=1e-12)
WNIDS = ("n01440764", "n01443537")


# ----------------------------------------------------------------------------------------------------------------
# generated data

@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """A tiny ImageFolder tree: 2 classes, 12 training and 4 validation images each (40 x 44 px)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagenet")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for c, wnid in enumerate(WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 44, 3), generator=g, dtype=torch.uint8)
                pixels[..., c] = pixels[..., c] // 2 + 128  # a learnable colour cue
                Image.fromarray(pixels.numpy()).save(root / split / wnid / f"{wnid}_{i}.png")
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A local weights file (a 2-class resnet18 state_dict), as a machine without internet would use."""
    torch.manual_seed(5)
    model = __import__("torchvision").models.resnet18(num_classes=2)
    path = tmp_path_factory.mktemp("weights") / "resnet18_2class.pth"
    torch.save(model.state_dict(), path)
    return path


TEXT_SPLIT = (2400, 300, 300)


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    """A 3,000-byte text written as 'enwik8' (words drawn at random: learnable, far from uniform)."""
    root = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    words = [b"the ", b"late ", b"phase ", b"weights ", b"of ", b"a ", b"network ", b"<page>", b"\n", b"[[", b"]]"]
    text = b"".join(words[i] for i in torch.randint(0, len(words), (2000,), generator=g).tolist())
    (root / "enwik8").write_bytes(text[:sum(TEXT_SPLIT)])
    return root


FT = ["--arch", "resnet18", "--epochs", "2", "--K", "2", "--batch-size", "4", "--accum", "2", "--crop", "32",
      "--resize", "36", "--workers", "0", "--lr", "0.05", "--lr-drop-epoch", "1", "--bn-images", "8",
      "--eval-batch-size", "8", "--no-progress", "--device", "cpu", "--json"]


def ft_config(**kw):
    base = dict(name="imagenet_resnet18", arch="resnet18", weights="none", epochs=2, K=2, lr=0.05, batch_size=4,
                accum=2, crop=32, resize=36, lr_drop_epoch=1, bn_images=8, eval_batch_size=8, workers=0)
    return dataclasses.replace(PRESETS["imagenet_resnet50"], **{**base, **kw}).validate()


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning

def test_finetune_late_phase_and_baseline_end_to_end(image_root, tmp_path, capsys):
    out = tmp_path / "lp"
    assert main(["finetune", "--data-dir", str(image_root), "--weights", "none", "--out", str(out)] + FT) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"] == "imagenet_resnet18" and {"averaged", "ensemble"} <= set(printed["models"])
    res = json.load(open(out / "results.json"))
    assert res["schema"] == "late-phase-results/2" and res["world_size"] == 1 and res["kind"] == "finetune"
    cfg = res["config"]
    assert cfg["name"] == "imagenet_resnet18" and cfg["K"] == 2 and cfg["gamma_theta"] == "1/K"
    models = res["models"]
    assert set(models["averaged"]) == {"stored", "reestimated", "reference"}
    assert len(models["members"]["stored"]) == 2 == len(models["members"]["reestimated"])
    for m in [models["averaged"]["stored"], models["averaged"]["reestimated"], models["ensemble"]["stored"]] + \
            models["members"]["stored"]:
        assert 0 <= m["accuracy"] <= 100 and "top5" not in m  # 2 classes: top-5 would always be 100
        assert m["nll"] > 0 and 0 <= m["ece"] <= 100
    assert res["train_images"] == 24 and res["val_images"] == 8 and res["num_classes"] == 2
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1, 2] and log[0]["phase"] == "pretrained"
    # 24 images per epoch, K = 2 member minibatches of 4 per outer step: 3 outer steps, t = 6 minibatches
    assert [e["t"] for e in log[1:]] == [6, 12]
    # theta's lr carries gamma_theta = 1/K (as the reference ImageNet script) and drops by 10 after --lr-drop-epoch 1;
    # phi's stays
    assert [e["lr"] for e in log[1:]] == pytest.approx([0.05 / 2, 0.005 / 2])
    assert [e["lr_phi"] for e in log[1:]] == [0.05, 0.05]
    assert all(len(e["members_accuracy"]) == 2 and "ensemble_accuracy" in e for e in log[1:])

    base = tmp_path / "base"
    assert main(["finetune", "--data-dir", str(image_root), "--weights", "none", "--out", str(base),
                 "--baseline"] + FT[:4] + FT[6:]) == 0
    capsys.readouterr()
    res_b = json.load(open(base / "results.json"))
    assert res_b["config"]["name"] == "imagenet_resnet18_base" and res_b["config"]["K"] == 1
    assert set(res_b["models"]) == {"averaged", "ensemble", "members"}  # one member: ensemble = member = averaged
    log_b = [json.loads(line) for line in open(base / "log.jsonl")]
    assert [e["t"] for e in log_b[1:]] == [6, 12] and "ensemble_accuracy" not in log_b[1]
    assert main(["finetune", "--baseline", "--K", "5", "--data-dir", str(image_root)] + FT[2:]) == 2
    assert "is the baseline (one member)" in capsys.readouterr().err
    assert main(["table", str(out), str(base)]) == 0
    table = capsys.readouterr().out
    rows = table.splitlines()
    assert any(r.startswith("| imagenet_resnet18 (K=2, arch=resnet18,") and "| stored | ensemble |" in r for r in rows)
    assert any(r.startswith("| imagenet_resnet18_base (arch=resnet18,") and "| stored | averaged |" in r for r in rows)


def test_table_has_the_paper_imagenet_and_enwik8_rows():
    def result(name, models):
        return {"config": {"name": name}, "seed": 0, "models": models}
    def stored(**m):
        return {"stored": m}
    rows = [result("imagenet_resnet50_base", {"averaged": stored(accuracy=76.5, nll=1, ece=2)}),
            result("imagenet_resnet50", {"averaged": stored(accuracy=76.9, nll=1, ece=2),
                                         "ensemble": stored(accuracy=77.0, nll=1, ece=2)}),
            result("enwik8_lstm_lp", {"averaged": stored(bpc_valid=1.6, bpc_test=1.64),
                                      "ensemble": stored(bpc_valid=1.59, bpc_test=1.63)})]
    table = render(rows)
    assert "| ImageNet fine-tune, ResNet-50 | 76.62 | 76.50 (n=1) | 76.87 | 76.90 (n=1) | 77.00 (n=1) |" in table
    assert "| enwik8, LSTM-500, SGD (bits/char) | 1.695 | — | 1.633 | 1.640 (n=1) | 1.630 (n=1) |" in table


def test_finetune_resume_is_bit_identical_and_local_weights(image_root, weights_file, tmp_path):
    cfg = ft_config(weights=str(weights_file))
    kw = dict(data_dir=str(image_root), seed=3, progress=False, device="cpu")
    full = FineTune(cfg, out=str(tmp_path / "a"), **kw)
    pretrained = torch.load(weights_file)
    assert torch.equal(full.model.fc.weight, pretrained["fc.weight"])  # the weights file was loaded
    r_full = full.train()
    part = FineTune(cfg, out=str(tmp_path / "b"), **kw)
    part.run_epoch()
    del part
    resumed = FineTune(cfg, out=str(tmp_path / "b"), resume=True, **kw)
    assert resumed.epoch == 1
    r_res = resumed.train()
    a, b = full.lp.model.state_dict(), resumed.lp.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in full.log[1:]] == [e["loss"] for e in resumed.log[1:]]
    assert r_full["models"] == r_res["models"]
    with pytest.raises(ValueError, match="different settings"):
        FineTune(ft_config(weights=str(weights_file), lr=0.1), out=str(tmp_path / "b"), resume=True, **kw)
    assert [e["t"] for e in resumed.log[1:]] == [6, 12]
    # a fine-tuning batch is one outer step's cfg.accum micro-batches: in the epoch loader's order, none twice
    from deep.data.imagenet import loader_seed
    K = cfg.K
    steps = [list(batch) for batch in resumed.epoch_batches(1, K)]
    assert len(steps) == resumed.steps_per_epoch(K) == 3 and all(len(s) == cfg.accum for s in steps)
    torch.manual_seed(loader_seed(resumed.seed, 1, 0))
    loader = list(resumed._loader(resumed.train_data, K * resumed.micro, True, resumed.seed, 1))
    flat = [xy for s in steps for xy in s]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(flat, loader[:len(flat)]))


def _small_convnet():
    """Conv-BN-ReLU twice and a linear head, float64 (the BatchNorm statistics stay well conditioned for
    micro-batches of 2 images, unlike a ResNet's 1 x 1 last stage on small inputs)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()


def _assert_same_training_state(a: shared.LatePhase, b: shared.LatePhase):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{name}: {m}")
    for oa, ob in zip(a.optimizers, b.optimizers):
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            torch.testing.assert_close(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"], **TOL)


def _micro(x, K, A):
    """The A micro-steps of one outer step: micro-step a stacks part a of every member's minibatch."""
    B = x.shape[0] // K
    b = B // A
    parts = x.reshape(K, A, b, *x.shape[1:])
    return [parts[:, a].reshape(K * b, *x.shape[1:]) for a in range(A)]


@pytest.mark.parametrize("K", [1, 2])
def test_accumulated_step_equals_one_step_float64(K):
    """Accumulating A micro-steps gives the same theta, phi_k and momentum buffers as one step on the whole member
    minibatches (float64), on both paths: (i) with BatchNorm normalising by running statistics, so any data works;
    (ii) with batch statistics, where each member minibatch is A copies of one micro-batch (then the micro-batch
    statistics are the minibatch's)."""
    B, A, steps = 4, 2, 2
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(K * B, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(steps)]
    ys = [torch.randint(0, 3, (K * B,), generator=g) for _ in range(steps)]
    opt = shared.sgd(0.05, 0.9, False, 1e-4)
    for batch_stats in (False, True):
        for path in ("vectorized", "sequential"):
            runs = []
            for accum in (1, A):
                model = _small_convnet()
                lp = shared.LatePhase(model, K, [shared.BatchNorm()], gamma_theta=1 / K, sigma0=0.1, path=path,
                                      theta_optimizer=opt, phi_optimizer=opt,
                                      generator=torch.Generator().manual_seed(2))
                if not batch_stats:
                    lp.model.eval()
                for x, y in zip(xs, ys):
                    if batch_stats:  # member k's minibatch = A copies of its first B / A samples
                        x = x.reshape(K, A, B // A, *x.shape[1:])[:, :1].expand(K, A, B // A, *x.shape[1:])
                        x = x.reshape(K * B, *x.shape[3:])
                        y = y.reshape(K, A, B // A)[:, :1].expand(K, A, B // A).reshape(-1)
                    batches = list(zip(_micro(x, K, accum), _micro(y, K, accum)))
                    losses = accumulated_step(lp, iter(batches), F.cross_entropy, accum)
                    assert losses.shape == (K,)
                runs.append((lp, losses))
            (one, l1), (acc, la) = runs
            torch.testing.assert_close(l1, la, **TOL)
            _assert_same_training_state(one, acc)
            assert one.outer_step == acc.outer_step == steps


def test_streamed_scores_match_the_array_metrics():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(300, 7, generator=g, dtype=torch.float64), 1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])  # confidence exactly 1 and a zero probability
    labels = torch.randint(0, 7, (300,), generator=g)
    labels[0] = 3
    sums = metrics.Scores()
    for part in range(3):
        sums.add(probs[part * 100:(part + 1) * 100].float(), labels[part * 100:(part + 1) * 100])
    got = sums.summary()
    p, y = probs.numpy(), labels.numpy()
    assert got["accuracy"] == pytest.approx(100 * (p.argmax(1) == y).mean())
    assert got["nll"] == pytest.approx(-np.log(np.clip(p[np.arange(300), y], 1e-12, None)).mean(), rel=1e-6)
    conf, hit = p.max(1), (p.argmax(1) == y)
    bins = np.clip(np.searchsorted(np.linspace(0, 1, 16), conf, side="left") - 1, 0, 14)
    ece = sum((bins == b).mean() * abs(hit[bins == b].mean() - conf[bins == b].mean()) for b in range(15)
              if (bins == b).any())
    assert got["ece"] == pytest.approx(100 * ece, rel=1e-6)
    top5 = (probs.topk(5, 1).indices == labels[:, None]).any(1).double().mean()
    assert got["top5"] == pytest.approx(100 * float(top5))


def test_finetune_cli_errors(image_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    run = ["finetune", "--data-dir", str(image_root), "--out", str(tmp_path / "run")] + FT

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    from deep.models.torchvision_models import cached_weights_path
    a_file, empty, damaged = tmp_path / "a_file", tmp_path / "empty.pth", tmp_path / "damaged"
    a_file.write_text("not a folder")
    empty.write_bytes(b"")
    damaged.mkdir()
    (damaged / "checkpoint.pt").write_bytes(b"garbage")
    (damaged / "config.json").write_text(json.dumps({"kind": "finetune", "config": dataclasses.replace(
        ft_config(), crop=32).to_dict(), "seed": 0}))
    for split, n in (("train", 8), ("val", 1)):  # .png files that are not images
        (tmp_path / "bad" / split / WNIDS[0]).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "bad" / split / WNIDS[0] / f"{i}.png").write_text("not a png")
    bad_images = ["finetune", "--data-dir", str(tmp_path / "bad"), "--out", str(tmp_path / "bad_run")] + FT + [
        "--weights", "none"]
    cases = [
        (["finetune", "--data-dir", str(tmp_path / "nowhere"), "--weights", "none"], "not a folder"),
        (run + ["--download"], "cannot obtain resnet18 weights IMAGENET1K_V1 (download failed"),
        (run, "downloads are off"),
        (run + ["--weights", "none", "--accum", "3"], "multiple of 3"),
        (run + ["--weights", "none", "--batch-size", "64"], "fewer than one outer step"),
        (run + ["--weights", "IMAGENET9K"], "neither an existing file"),
        (run + ["--weights", "none", "--arch", "squeezenet1_0"], "no BatchNorm layer"),
        (run + ["--weights", "none", "--arch", "squeezenet1_0", "--crop", "16", "--resize", "16"],
         "no BatchNorm layer"),
        (run + ["--weights", "none", "--arch", "vgg11_bn", "--crop", "16", "--resize", "16"],
         "--crop 16 is too small for vgg11_bn"),
        (run + ["--weights", "none", "--resume"], "no run in"),
        (run + ["--weights", "none", "--device", "bogus"], "--device bogus: not a torch device"),
        (run + ["--weights", "none", "--device", "cuda:99"], "--device cuda:99: "),
        (run + ["--weights", "none", "--out", str(a_file)], "is a file, not a folder"),
        (run + ["--weights", "none", "--lr-drop", "inf"], "lr_drop must be a finite number"),
        (run + ["--weights", "none", "--lr-drop", "2"], "lr_drop must be in (0, 1]"),
        (run + ["--weights", "none", "--lr", "nan"], "lr must be a finite number"),
        (run + ["--weights", "none", "--bn-images", "-1"], "bn_images must be >= 0"),
        (run + ["--weights", "none", "--train-subset", "-1"], "train_subset must be >= 0"),
        (run + ["--weights", "none", "--test-subset", "-1"], "test_subset must be >= 0"),
        (run + ["--weights", "none", "--swa-start", "1"], "SWA is not part of the fine-tuning protocol"),
        (run + ["--weights", str(empty)], f"cannot read weights file {empty}: EOFError (the file is empty"),
        (run + ["--weights", "none", "--out", str(damaged), "--resume"], "cannot be read as a checkpoint"),
        (bad_images + ["--workers", "0"], "not an image PIL can identify; remove or replace the file"),
        (bad_images + ["--workers", "1"], "not an image PIL can identify; remove or replace the file"),
    ]
    for args, msg in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (msg, err)
    # cached ImageNet weights (1000 classes) with a 2-class folder tree
    torch.manual_seed(0)
    path = cached_weights_path("resnet18", "paper")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(__import__("torchvision").models.resnet18().state_dict(), path)
    assert main(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "classify 1000 classes but the data has 2 class folders" in err[0]


def test_finetune_torchrun_two_processes(image_root, tmp_path):
    """`torchrun --nproc_per_node 2 -m deep finetune` on the CPU (gloo): each member minibatch is split over the
    ranks, validation metrics are reduced, rank 0 writes the results."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deep",
           "finetune", "--data-dir", str(image_root), "--weights", "none", "--out", str(tmp_path / "ddp")] + FT
    cmd[cmd.index("--epochs") + 1] = "1"
    cmd[cmd.index("--accum") + 1] = "1"  # micro-batches of 4 / (1 * 2 ranks) = 2 images per member and rank
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(tmp_path / "ddp" / "results.json"))
    assert res["world_size"] == 2 and len(res["models"]["members"]["stored"]) == 2 and res["val_images"] == 8
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert log[1]["t"] == 6  # 12 images per rank, K * 4 / 2 per rank and outer step: 3 outer steps


# ----------------------------------------------------------------------------------------------------------------
# enwik8 LSTM

LSTM_CONFIGS = sorted(n for n, c in PRESETS.items() if c.dataset == "enwik8")
TINY_LM = dict(hidden_size=16, embedding_dim=8, bptt=12, batch_size=4, epochs=3, eval_batch_size=8,
               text_split=TEXT_SPLIT, anneal_start=1, anneal_end=3)


def tiny_lm(name, **extra):
    cfg = PRESETS[name]
    over = dict(TINY_LM, **extra)
    if cfg.late_phase and cfg.K > 1:
        over.update(T0=1, K=over.get("K", 3))
    if cfg.swa:
        over["swa_start"] = 2
    return get_config(name, **over)


def test_lstm_presets():
    assert LSTM_CONFIGS == ["enwik8_lstm_base", "enwik8_lstm_base_swa", "enwik8_lstm_lp", "enwik8_lstm_lp_swa",
                            "enwik8_lstm_rank1", "enwik8_lstm_rank1_swa"]
    for name in LSTM_CONFIGS:
        c = PRESETS[name]
        assert (c.hidden_size, c.embedding_dim, c.bptt, c.weight_decay, c.momentum) == (500, 190, 100, 0.0, 0.0)
        assert c.text_split == () and c.swa == name.endswith("_swa")
    assert not PRESETS["enwik8_lstm_base"].late_phase
    assert PRESETS["enwik8_lstm_rank1"].K == 1 and PRESETS["enwik8_lstm_rank1"].T0 == 0
    assert PRESETS["enwik8_lstm_lp"].K == 10 and PRESETS["enwik8_lstm_lp"].phi == ("rank1",)


@pytest.mark.parametrize("name", LSTM_CONFIGS)
def test_every_enwik8_config_runs(name, text_root, tmp_path):
    cfg = tiny_lm(name)
    r = LMRun(cfg, seed=1, data_dir=str(text_root), out=str(tmp_path / "run"), progress=False, device="cpu").train()
    models = {name: by_rule["stored"] for name, by_rule in r["models"].items()}
    assert all(set(by_rule) == {"stored"} for by_rule in r["models"].values())  # no BatchNorm: one rule
    K = cfg.K if cfg.late_phase else 1
    assert set(models) == ({"averaged", "ensemble", "members"} if K > 1 else {"averaged"})
    for m in [models["averaged"]] + ([models["ensemble"]] + models["members"] if K > 1 else []):
        assert 0 < m["bpc_valid"] < 8 and 0 < m["bpc_test"] < 8
    if K > 1:
        assert len(models["members"]) == K
        # the ensemble's log of mean probabilities is never worse than the members' mean
        assert models["ensemble"]["bpc_test"] <= sum(m["bpc_test"] for m in models["members"]) / K + 1e-9
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    phases = ["late"] * 3 if cfg.late_phase and cfg.T0 == 0 else ["pre"] + (["late"] * 2 if cfg.late_phase else
                                                                           ["pre"] * 2)
    assert [e["phase"] for e in log] == phases
    assert log[-1]["bpc_valid"] < log[0]["bpc_valid"] < 8 and all(e["chars_per_s"] > 0 for e in log)
    saved = json.load(open(tmp_path / "run" / "results.json"))
    assert saved["config"]["name"] == name and saved["schema"] == "late-phase-results/2"
    assert saved["parameters"] == sum(p.numel() for p in StatefulLM(256, 8, 16).parameters())
    assert (saved["train_chars"], saved["valid_chars"], saved["test_chars"]) == TEXT_SPLIT


def test_lstm_bits_per_character_at_init_is_8(text_root):
    torch.manual_seed(0)
    model = StatefulLM(256, 190, 500)
    data = torch.frombuffer(bytearray((text_root / "enwik8").read_bytes()[:600]), dtype=torch.uint8)
    nats, _, count = stream_nats(model, data, rows=4, bptt=50)
    assert count == 596 and float(nats[0]) / count / math.log(2) == pytest.approx(8.0, abs=0.05)


@pytest.mark.parametrize("stop_after", [1, 2])
def test_lm_resume_is_bit_identical(stop_after, text_root, tmp_path):
    """Interrupt after 1 epoch (before the release at T0 = 1) or 2 (after it, SWA from epoch 2), resume in a fresh
    run, compare with an uninterrupted one."""
    cfg = tiny_lm("enwik8_lstm_lp_swa", K=2, sigma0=0.1)
    kw = dict(seed=2, data_dir=str(text_root), progress=False, device="cpu")
    full = LMRun(cfg, out=str(tmp_path / "a"), **kw)
    r_full = full.train()
    part = LMRun(cfg, out=str(tmp_path / "b"), **kw)
    for _ in range(stop_after):
        part.run_epoch()
    del part
    resumed = LMRun(cfg, out=str(tmp_path / "b"), resume=True, **kw)
    assert resumed.epoch == stop_after
    r_res = resumed.train()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = full.swa.model.state_dict(), resumed.swa.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [e["loss"] for e in full.log] == [e["loss"] for e in resumed.log]
    assert r_full["models"] == r_res["models"]


@pytest.mark.kernels
def test_lm_torchrun_two_processes_equals_one(text_root, tmp_path):
    """`torchrun --nproc_per_node 2 -m deep train --config enwik8_lstm_lp_swa` on the CPU (gloo): each member's rows
    are split over the ranks (each carries the state of its rows); the results equal a one-process run up to float32
    summation order."""
    cfg = tiny_lm("enwik8_lstm_lp_swa", K=2)
    one = LMRun(cfg, seed=0, data_dir=str(text_root), out=str(tmp_path / "one"), progress=False,
                device="cpu").train()
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    fields = ("hidden_size", "embedding_dim", "bptt", "batch_size", "epochs", "eval_batch_size", "anneal_start",
              "anneal_end", "T0", "K", "swa_start")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deep",
           "train", "--config", "enwik8_lstm_lp_swa", "--data-dir", str(text_root), "--out", str(tmp_path / "ddp"),
           "--no-progress", "--device", "cpu", "--text-split", *map(str, TEXT_SPLIT)]
    for field in fields:
        cmd += ["--" + field.replace("_", "-"), str(getattr(cfg, field))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "ddp" / "results.json"))
    assert two["world_size"] == 2 and two["config"] == one["config"]
    for name in ("averaged", "ensemble"):
        for key in ("bpc_valid", "bpc_test"):
            assert two["models"][name]["stored"][key] == pytest.approx(one["models"][name]["stored"][key], rel=1e-3)


def _lstm_lp(path, K=3, B=2):
    torch.manual_seed(0)
    model = StatefulLM(11, 5, 6).double()
    lp = shared.LatePhase(model, K, [shared.Rank1("cell.input_proj", "cell.hidden_proj")], sigma0=0.3,
                          gamma_theta=0.7, path=path, generator=torch.Generator().manual_seed(1),
                          theta_optimizer=shared.sgd(0.5, 0.9, False, 1e-3),
                          phi_optimizer=shared.sgd(0.3, 0.9, True, 0.0))
    g = torch.Generator().manual_seed(3)
    model.carry = tuple(torch.randn(K * B, 6, generator=g, dtype=torch.float64) for _ in range(2))
    return lp


@pytest.mark.kernels
def test_rank1_lstm_vectorized_equals_sequential_float64():
    """Two windows with the state carried per member, clipping active: theta, every phi_k, the optimizer states and
    the carried state agree between the stacked and the member-by-member path."""
    K, B, T = 3, 2, 5
    vec, seq = _lstm_lp("vectorized"), _lstm_lp("sequential")
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        x = torch.randint(0, 11, (K * B, T), generator=g)
        y = torch.randint(0, 11, (K * B, T), generator=g)
        losses = []
        for lp, path in ((vec, "vectorized"), (seq, "sequential")):
            losses.append(lp.forward_backward(x, y, sequence_loss, path))
            lp.clip_grad_norm_(0.5)
            lp.update()
        torch.testing.assert_close(*losses, **TOL)
    sv, ss = vec.model.state_dict(), seq.model.state_dict()
    assert any(k.endswith(".r.1") for k in sv)
    for k in sv:
        torch.testing.assert_close(sv[k], ss[k], **TOL, msg=lambda m: f"{k}: {m}")
    for oa, ob in zip(vec.optimizers, seq.optimizers):
        for i, st in oa.state_dict()["state"].items():
            torch.testing.assert_close(st["momentum_buffer"], ob.state_dict()["state"][i]["momentum_buffer"], **TOL)
    for a, b in zip(vec.model.carry, seq.model.carry):
        torch.testing.assert_close(a, b, **TOL)


def test_lstm_clip_is_the_mean_members_norm():
    """K = 1: the same as clip_grad_norm_ over all parameters; K members: the mean member's gradient is clipped."""
    lp = _lstm_lp("vectorized", K=1)
    ref = copy.deepcopy(lp)
    x = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))
    for m in (lp, ref):
        m.forward_backward(x, x, lambda o, t: F.cross_entropy(o.reshape(-1, 11), t.reshape(-1)))
    norm = lp.clip_grad_norm_(0.01)
    ref_norm = nn.utils.clip_grad_norm_(list(ref.model.parameters()), 0.01)
    torch.testing.assert_close(norm, ref_norm.double(), **TOL)
    for p, q in zip(lp.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    lp = _lstm_lp("vectorized", K=2)
    for p in lp.model.parameters():
        p.grad = torch.ones_like(p)
    n_theta = sum(p.numel() for p in lp.theta_params)
    n_phi = sum(p.numel() for p in lp.phi_params[0])
    expected = math.sqrt(n_theta / 4 + n_phi)
    assert float(lp.clip_grad_norm_(1e9)) == pytest.approx(expected)


def test_lm_cli_errors(text_root, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    small = ["--hidden-size", "8", "--embedding-dim", "4", "--epochs", "1", "--no-progress", "--device", "cpu"]
    cases = [
        (["--data-dir", str(tmp_path / "none")], "enwik8 file"),
        (["--data-dir", str(tmp_path / "none"), "--download"], "could not download http://mattmahoney.net"),
        (["--data-dir", str(text_root)], "not the 100,000,000 of enwik8"),
        (["--data-dir", str(text_root), "--text-split", "5", "5"], "text_split must be three"),
        (["--data-dir", str(text_root), "--text-split", "2000", "500", "100"], "summing to"),
        (["--data-dir", str(text_root), "--phi", "bn"], "rank-1 late-phase weights only"),
    ]
    for extra, msg in cases:
        args = ["train", "--config", "enwik8_lstm_lp", "--out", str(tmp_path / "run"), "--T0", "0"] + small + extra
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (msg, err)
    args = ["train", "--config", "enwik8_lstm_rank1", "--data-dir", str(text_root), "--out", str(tmp_path / "ok"),
            "--text-split", *map(str, TEXT_SPLIT), "--batch-size", "2", "--bptt", "20", "--eval-batch-size", "4"]
    assert main(args + small + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"] == "enwik8_lstm_rank1" and set(printed["models"]) == {"averaged"}
    assert np.isfinite(printed["models"]["averaged"]["stored"]["bpc_test"])
