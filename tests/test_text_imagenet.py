"""enwik8 loading and BPTT batching, the character LSTM, ImageNet folders and loaders, torchvision model builder."""
import math
import urllib.error
import zipfile

import pytest
import torch
from torch import nn

from deep.data.imagenet import EpochSampler, imagenet_datasets, imagenet_loader
from deep.data.text import (ENWIK8_URL, BPTTBatcher, DataError, bits_per_character, distinct_symbols, load_enwik8,
                            split_sizes)
from deep.models.lstm import PAPER_PARAMETERS, CharLSTM, LSTMCell, detach_state, parameter_count
from deep.models.torchvision_models import (ModelError, build_pretrained, cached_weights_path,
                                            weights_unavailable_message)


# ----------------------------------------------------------------------------------------------------------------
# enwik8 files and splits

def _text(n: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(32, 127, (n,), generator=generator, dtype=torch.uint8).tolist())


def test_standard_split_arithmetic():
    assert split_sizes(100_000_000) == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(100_000_000, "proportional") == (90_000_000, 5_000_000, 5_000_000)
    assert split_sizes(1000, "proportional") == (900, 50, 50)
    assert split_sizes(1001, "proportional") == (901, 50, 50)
    assert split_sizes(10, (4, 3, 3)) == (4, 3, 3)
    with pytest.raises(DataError, match="summing"):
        split_sizes(10, (4, 3, 2))
    with pytest.raises(DataError, match="fewer than 2"):
        split_sizes(10, (8, 1, 1))


def test_load_explicit_sizes_raw_zip_and_folder(tmp_path):
    raw = _text(1000)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "enwik8").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", raw)
    expected = torch.tensor(list(raw), dtype=torch.uint8)
    for source in (tmp_path / "raw" / "enwik8", tmp_path / "raw", tmp_path / "enwik8.zip", tmp_path):
        train, valid, test = load_enwik8(source, split=(900, 60, 40))
        assert train.dtype == torch.uint8 and (train.numel(), valid.numel(), test.numel()) == (900, 60, 40)
        assert torch.equal(torch.cat([train, valid, test]), expected)
    train, valid, test = load_enwik8(tmp_path / "enwik8.zip", split="proportional")
    assert torch.equal(test, expected[950:])


def test_size_check_and_missing_file_messages(tmp_path):
    (tmp_path / "enwik8").write_bytes(_text(500))
    with pytest.raises(DataError, match=r"500 bytes, not the 100,000,000.*--text_split N_TRAIN N_VALID N_TEST"):
        load_enwik8(tmp_path / "enwik8")
    with pytest.raises(DataError, match="enwik8.zip") as missing:
        load_enwik8(tmp_path / "nowhere")
    assert ENWIK8_URL in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no 'enwik8' or 'enwik8.zip' in folder.*{ENWIK8_URL}"):
        load_enwik8(tmp_path / "empty")


def test_distinct_symbols_and_bits_per_character():
    data = torch.tensor([65, 66, 65, 0, 255], dtype=torch.uint8)
    assert distinct_symbols(data) == 4
    assert distinct_symbols(data[:2], torch.tensor([7], dtype=torch.uint8)) == 3
    assert bits_per_character(math.log(2.0)) == pytest.approx(1.0)
    uniform = nn.functional.cross_entropy(torch.zeros(3, 256), torch.tensor([1, 2, 3]))
    assert float(bits_per_character(uniform)) == pytest.approx(8.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# BPTT batching

def _stream(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % 251


def test_bptt_shapes_shift_and_column_continuity():
    data = _stream(1003)
    batcher = BPTTBatcher(data, batch_size=4, bptt=7)
    columns = (1003 - 1) // 4
    windows = list(batcher)
    assert len(windows) == math.ceil(columns / 7) and batcher.epoch == 1 and batcher.at_epoch_start
    for inputs, targets in windows:
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape
        assert inputs.shape[0] == 4 and inputs.shape[1] <= 7
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert windows[-1][0].shape[1] == columns % 7
    inputs = torch.cat([w[0] for w in windows], dim=1)
    targets = torch.cat([w[1] for w in windows], dim=1)
    for j in range(4):  # each row is one contiguous column of the stream, continued window after window
        assert torch.equal(inputs[j], data[j * columns:(j + 1) * columns])
        assert torch.equal(targets[j], data[j * columns + 1:(j + 1) * columns + 1])
    assert torch.equal(targets[:-1, -1], inputs[1:, 0])  # column ends continue into the next column


def test_bptt_drop_last_and_seeded_boundaries():
    data = _stream(1001)
    assert all(x.shape[1] == 10 for x, _ in BPTTBatcher(data, 5, 10, drop_last=True))
    batcher = BPTTBatcher(data, 5, 10, seed=3)
    firsts = set()
    for epoch in range(6):
        bounds = batcher.windows(epoch)
        assert bounds[0][0] == 0 and bounds[-1][1] == batcher.columns
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(end - start == 10 for start, end in bounds[1:-1])
        firsts.add(bounds[0][1])
    assert len(firsts) > 1 and bounds == BPTTBatcher(data, 5, 10, seed=3).windows(5)


def test_bptt_member_column_blocks_and_rotation():
    data = _stream(2001)
    batcher = BPTTBatcher(data, batch_size=6, bptt=5, members=3)
    assert [batcher.member_rows(k) for k in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    inputs, _ = next(iter(batcher))
    blocks = batcher.split_members(inputs)
    assert blocks.shape == (3, 2, 5) and torch.equal(blocks[1], inputs[2:4])
    with pytest.raises(DataError, match="divide"):
        batcher.set_members(4)
    rotating = BPTTBatcher(data, batch_size=6, bptt=50, members=3, rotate_members=True)
    epoch0 = torch.cat([x for x, _ in rotating], dim=1)
    epoch1 = torch.cat([x for x, _ in rotating], dim=1)
    assert torch.equal(epoch1[0:2], epoch0[2:4]) and torch.equal(epoch1[4:6], epoch0[0:2])
    next(iter(rotating))
    with pytest.raises(DataError, match="start of an epoch"):
        rotating.set_members(2)


def test_bptt_resume_mid_epoch_and_at_epoch_end():
    data = _stream(3001)
    reference = BPTTBatcher(data, 4, 9, seed=1)
    stream = [w for _ in range(2) for w in reference]  # two epochs
    batcher = BPTTBatcher(data, 4, 9, seed=1)
    iterator = iter(batcher)
    for _ in range(5):
        next(iterator)
    state = batcher.state_dict()
    resumed = BPTTBatcher(data, 4, 9, seed=1)
    resumed.load_state_dict(state)
    rest = list(resumed)  # the rest of epoch 0
    rest += list(resumed)  # epoch 1
    assert len(rest) == len(stream) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, stream[5:]))
    with pytest.raises(DataError, match="differ"):
        BPTTBatcher(data, 4, 10, seed=1).load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# character LSTM

def test_lstm_paper_parameter_count():
    model = CharLSTM()
    count = sum(p.numel() for p in model.parameters())
    assert count == PAPER_PARAMETERS == 1_558_896 and round(count / 1e6, 2) == 1.56
    assert sum(p.numel() for p in CharLSTM(11, 5, 7).parameters()) == parameter_count(11, 5, 7)
    assert isinstance(model.cell.input_proj, nn.Linear) and isinstance(model.cell.hidden_proj, nn.Linear)


def test_lstm_fused_equals_step_by_step_values_and_gradients():
    torch.manual_seed(0)
    model = CharLSTM(vocab_size=20, embedding_dim=6, hidden_size=8).double()
    inputs = torch.randint(0, 20, (3, 9))
    state = tuple(torch.randn(3, 8, dtype=torch.float64) for _ in range(2))
    grads = []
    for fused in (True, False):
        model.zero_grad()
        logits, (h, c) = model(inputs, state, fused=fused)
        (logits.sum() + h.sum() + c.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if fused:
            expected = (logits.detach(), h.detach(), c.detach())
    assert logits.shape == (3, 9, 20)
    for got, want in zip((logits, h, c), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lstm_matches_torch_nn_lstm():
    torch.manual_seed(1)
    cell = LSTMCell(5, 7).double()
    reference = nn.LSTM(5, 7, batch_first=True).double()
    with torch.no_grad():
        reference.weight_ih_l0.copy_(cell.input_proj.weight)
        reference.bias_ih_l0.copy_(cell.input_proj.bias)
        reference.weight_hh_l0.copy_(cell.hidden_proj.weight)
        reference.bias_hh_l0.zero_()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    h0, c0 = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    out, (h, c) = cell(x, (h0, c0))
    ref_out, (ref_h, ref_c) = reference(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, ref_h[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, ref_c[0], rtol=1e-12, atol=1e-12)


def test_lstm_carried_state_equals_one_long_sequence():
    torch.manual_seed(2)
    model = CharLSTM(vocab_size=30, embedding_dim=4, hidden_size=6)
    inputs = torch.randint(0, 30, (2, 10))
    full, _ = model(inputs)
    first, state = model(inputs[:, :4])
    state = detach_state(state)
    assert not state[0].requires_grad
    second, _ = model(inputs[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), full)
    with pytest.raises(ValueError, match="does not match"):
        model(inputs, model.init_state(3))


# ----------------------------------------------------------------------------------------------------------------
# ImageNet folders and loaders

def _image_tree(root, classes=("n01440764", "n01443537"), per_class=3, splits=("train", "val")):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for split in splits:
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (20 + 7 * i, 30, 3), generator=generator, dtype=torch.uint8)
                suffix = ".JPEG" if i % 2 == 0 else ".png"
                Image.fromarray(pixels.numpy()).save(root / split / wnid / f"{wnid}_{i}{suffix}")


def test_imagefolder_datasets_and_loader_batch(tmp_path):
    _image_tree(tmp_path)
    train, val = imagenet_datasets(tmp_path)
    assert len(train) == len(val) == 6 and train.classes == val.classes == ["n01440764", "n01443537"]
    image, label = val[5]
    assert image.shape == (3, 224, 224) and label == 1
    loader = imagenet_loader(train, batch_size=4, train=True, seed=5, workers=0)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32 and labels.shape == (4,)
    assert len(loader) == 1  # 6 samples, batch 4, last incomplete batch dropped for training
    evaluation = imagenet_loader(val, batch_size=4, train=False, workers=0)
    assert sum(len(labels) for _, labels in evaluation) == 6
    halves = [imagenet_loader(val, batch_size=4, train=False, rank=r, world=2, workers=0) for r in (0, 1)]
    assert sorted(int(y) for ld in halves for _, ys in ld for y in ys) == sorted(int(y) for _, y in val)


def test_torchvision_imagenet_layout_is_preferred(tmp_path):
    _image_tree(tmp_path)
    names = {"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")}
    torch.save((names, ["n01440764"] * 3 + ["n01443537"] * 3), tmp_path / "meta.bin")
    train, val = imagenet_datasets(tmp_path)
    assert type(train).__name__ == "ImageNet" and train.classes[1] == ("goldfish", "Carassius auratus")
    assert train.wnids == ["n01440764", "n01443537"] and val[0][0].shape == (3, 224, 224)


def test_imagenet_error_messages(tmp_path):
    with pytest.raises(DataError, match=r"not a folder; expected <root>/train/<wnid>/\*\.JPEG"):
        imagenet_datasets(tmp_path / "missing")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        imagenet_datasets(tmp_path)
    _image_tree(tmp_path / "flat", splits=("train",))
    (tmp_path / "flat" / "val").mkdir()
    (tmp_path / "flat" / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="holds images directly.*ILSVRC2012_devkit_t12"):
        imagenet_datasets(tmp_path / "flat")
    _image_tree(tmp_path / "mismatch", splits=("train",))
    _image_tree(tmp_path / "mismatch", classes=("n01440764", "n09999999"), splits=("val",))
    with pytest.raises(DataError, match="class folders differ"):
        imagenet_datasets(tmp_path / "mismatch")
    (tmp_path / "tars").mkdir()
    (tmp_path / "tars" / "ILSVRC2012_img_val.tar").write_bytes(b"")
    (tmp_path / "tars" / "ILSVRC2012_img_train.tar").write_bytes(b"")
    with pytest.raises(DataError, match="put the devkit next to it"):
        imagenet_datasets(tmp_path / "tars")


def test_epoch_sampler_matches_distributed_sampler_and_resumes():
    from torch.utils.data import DistributedSampler
    dataset = list(range(23))
    for rank in range(3):
        ours = EpochSampler(23, shuffle=True, seed=4, num_replicas=3, rank=rank)
        theirs = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=True, seed=4)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
        ours.set_epoch(1, skip=5)
        assert list(ours) == list(theirs)[5:] and len(ours) == len(theirs) - 5
    shards = [list(EpochSampler(23, shuffle=False, num_replicas=3, rank=r, pad=False)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == dataset  # exact evaluation: every sample once
    first, second = EpochSampler(23, shuffle=True, seed=4), EpochSampler(23, shuffle=True, seed=4)
    second.set_epoch(1)
    assert sorted(first) == dataset and list(first) != list(second)


# ----------------------------------------------------------------------------------------------------------------
# torchvision models

def test_build_random_and_from_local_file(tmp_path):
    torch.manual_seed(0)
    model = build_pretrained("resnet18", weights=None, num_classes=10)
    assert model.fc.out_features == 10
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    wrapped = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(wrapped, tmp_path / "checkpoint.pt")
    for name in ("plain.pt", "checkpoint.pt"):
        loaded = build_pretrained("resnet18", weights=tmp_path / name, num_classes=10)
        for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), key
    with pytest.raises(ModelError, match="num_classes"):
        build_pretrained("resnet18", weights=tmp_path / "plain.pt")
    with pytest.raises(ModelError, match="neither an existing file"):
        build_pretrained("resnet18", weights=tmp_path / "absent.pth")
    with pytest.raises(ModelError, match="unknown torchvision"):
        build_pretrained("resnet9000", weights=None)


def test_legacy_densenet_keys_are_renamed(tmp_path):
    model = build_pretrained("densenet121", weights=None, num_classes=3)
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in model.state_dict().items()}
    assert any(".norm.1." in k for k in legacy)
    torch.save(legacy, tmp_path / "legacy.pth")
    loaded = build_pretrained("densenet121", weights=tmp_path / "legacy.pth", num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_named_weights_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = cached_weights_path("resnet18")
    assert tmp_path in expected.parents and expected.name == "resnet18-f37072fd.pth"
    with pytest.raises(ModelError) as missing:
        build_pretrained("resnet18", allow_download=False)
    message = str(missing.value)
    assert "resnet18-f37072fd.pth" in message and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "weights=PATH" in message and "\n" not in message

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError, match="download failed.*resnet18-f37072fd.pth"):
        build_pretrained("resnet18")
    # A file already in torchvision's cache is used without any network access.
    torch.manual_seed(3)
    reference = build_pretrained("resnet18", weights=None)
    expected.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), expected)
    loaded = build_pretrained("resnet18", weights="IMAGENET1K_V1")
    assert torch.equal(loaded.fc.weight, reference.fc.weight)


def test_weights_names_and_message_builder():
    message = weights_unavailable_message("resnet50", "paper")
    assert "IMAGENET1K_V1" in message and "resnet50-0676ba61.pth" in message
    from torchvision.models import get_model_weights
    assert get_model_weights("densenet161").DEFAULT.url in weights_unavailable_message("densenet161")
    with pytest.raises(ModelError, match="neither an existing file nor"):
        build_pretrained("resnet152", weights="IMAGENET9K")
