"""Tests of deep.data: the real loaders on tiny files written in each dataset's on-disk format, and GPULoader."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deep.data import (DEBIAN_FASHION_MNIST, STATS, DataError, GPULoader, ImageData, channel_stats, load_dataset,
                       load_image_folder, load_ood_sets)
from deep.data.loader import crop_flip, cutout_

from data_files import (RNG, idx_bytes, random_images, write_cifar10, write_cifar100, write_fashion, write_pickle,
                        write_svhn)


# ---------------------------------------------------------------- dataset loaders

def check(data, images, labels, num_classes, name):
    assert isinstance(data, ImageData) and data.name == name and data.num_classes == num_classes
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert data.images.shape == images.shape and len(data) == len(labels)
    assert torch.equal(data.images, torch.from_numpy(images))  # every written pixel comes back unchanged
    assert torch.equal(data.labels, torch.from_numpy(labels.astype(np.int64)))
    assert 0 <= data.labels.min() and data.labels.max() < num_classes
    assert data.mean == STATS[name][0] and data.std == STATS[name][1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_roundtrip(tmp_path, split):
    written = write_cifar10(tmp_path)
    check(load_dataset("cifar10", tmp_path, split), *written[split], 10, "cifar10")


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar100_roundtrip(tmp_path, split):
    written = write_cifar100(tmp_path)
    check(load_dataset("cifar100", tmp_path, split), *written[split], 100, "cifar100")


def test_svhn_roundtrip_maps_label_10_to_digit_0(tmp_path):
    images, digits = write_svhn(tmp_path)
    data = load_dataset("svhn", tmp_path, "test")
    check(data, images, digits, 10, "svhn")
    assert (data.labels == 0).sum() == (digits == 0).sum() > 0


@pytest.mark.parametrize("layout", ["torchvision", "debian"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_layouts(tmp_path, layout, split):
    if layout == "torchvision":  # torchvision's download leaves uncompressed files in <root>/FashionMNIST/raw
        written = write_fashion(tmp_path / "FashionMNIST" / "raw", compressed=False)
    else:  # Debian's dataset-fashion-mnist: the .gz files in one system folder
        written = write_fashion(tmp_path / "system", compressed=True)
    data = load_dataset("fashion_mnist", tmp_path, split, system_dir=tmp_path / "system")
    images, labels = written[split]
    check(data, images[:, None], labels, 10, "fashion_mnist")


def test_fashion_mnist_prefers_root_over_system_dir(tmp_path):
    mine = write_fashion(tmp_path / "FashionMNIST" / "raw", compressed=True)
    write_fashion(tmp_path / "system", compressed=True)
    data = load_dataset("fashion_mnist", tmp_path, "train", system_dir=tmp_path / "system")
    assert torch.equal(data.images[:, 0], torch.from_numpy(mine["train"][0]))
    assert data.source == ""  # read under root: nothing to report


def test_fashion_mnist_fallback_records_its_folder(tmp_path):
    """The fallback to system_dir is recorded in `source` (the trainer prints a note naming it)."""
    write_fashion(tmp_path / "system", compressed=True)
    data = load_dataset("fashion_mnist", tmp_path / "elsewhere", "test", system_dir=tmp_path / "system")
    assert data.source == str(tmp_path / "system")


@pytest.mark.parametrize("name, expected", [
    ("cifar10", ["CIFAR-10 not found", "{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch}}", "--download",
                 "cifar-10-python.tar.gz"]),
    ("cifar100", ["CIFAR-100 not found", "{root}/cifar-100-python/{{train,test}}", "cifar-100-python.tar.gz"]),
    ("svhn", ["SVHN not found", "{root}/test_32x32.mat", "--download"]),
    ("fashion_mnist", ["Fashion-MNIST not found", "{root}/FashionMNIST/raw", "{root}/system",
                       "t10k-images-idx3-ubyte", "apt-get install dataset-fashion-mnist"]),
])
def test_missing_data_names_the_expected_files(tmp_path, name, expected):
    options = {"system_dir": tmp_path / "system"} if name == "fashion_mnist" else {}
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path, "test", **options)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part.format(root=tmp_path) in message


def test_download_goes_through_torchvision_then_reads_the_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_cifar10(root, download, train):  # stands in for the network: leaves the archive's files in root
        calls.append((root, download, train))
        write_cifar10(tmp_path)

    monkeypatch.setattr(tvd, "CIFAR10", fake_cifar10)
    assert len(load_dataset("cifar10", tmp_path, "test", download=True)) == 9
    assert calls == [(str(tmp_path), True, False)]
    load_dataset("cifar10", tmp_path, "train", download=True)  # files present: no second download
    assert len(calls) == 1


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets as tvd

    def offline(root, download, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(tvd, "SVHN", offline)
    with pytest.raises(DataError, match=r"SVHN download into .* failed \(URLError.*\); check the internet"):
        load_dataset("svhn", tmp_path, "test", download=True)


def test_missing_single_cifar_batch_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path, "train")
    assert len(load_dataset("cifar10", tmp_path, "test")) == 9  # the other split is still readable


def test_corrupt_cifar_files(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="test_batch.*corrupt"):
        load_dataset("cifar10", tmp_path, "test")
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"expected uint8 \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, "test")
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(DataError, match="labels outside"):
        load_dataset("cifar10", tmp_path, "test")
    write_pickle(folder / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match="2 images but 1 labels"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_pickle_with_foreign_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    write_cifar10(tmp_path)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Payload(), b"labels": []})
    with pytest.raises(DataError, match="unexpected global .*print"):
        load_dataset("cifar10", tmp_path, "test")


def test_corrupt_idx_and_svhn_files(tmp_path):
    folder = tmp_path / "FashionMNIST" / "raw"
    write_fashion(folder, compressed=False)
    kwargs = dict(system_dir=None)
    images = folder / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("fashion_mnist", tmp_path, "test", **kwargs)
    images.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(DataError, match="not an idx file"):
        load_dataset("fashion_mnist", tmp_path, "test", **kwargs)
    images.write_bytes(idx_bytes(np.zeros((3, 28, 28))))  # 3 images, 7 labels
    with pytest.raises(DataError, match="mismatched or corrupt"):
        load_dataset("fashion_mnist", tmp_path, "test", **kwargs)
    (folder / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="not an idx file"):
        load_dataset("fashion_mnist", tmp_path, "train", **kwargs)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 truncated")
    with pytest.raises(DataError, match="cannot read SVHN file"):
        load_dataset("svhn", tmp_path, "test")


def test_synthetic_is_deterministic():
    a = load_dataset("synthetic", split="train", size=20, shape=(3, 8, 8), num_classes=5, seed=3)
    b = load_dataset("synthetic", split="train", size=20, shape=(3, 8, 8), num_classes=5, seed=3)
    c = load_dataset("synthetic", split="test", size=20, shape=(3, 8, 8), num_classes=5, seed=3)
    assert a.images.shape == (20, 3, 8, 8) and a.images.dtype == torch.uint8 and a.num_classes == 5
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.labels.max() < 5 and len(a.mean) == 3
    big = load_dataset("synthetic", split="train", size=2000)
    mean, std = channel_stats(big.images)
    assert np.allclose(mean, big.mean, atol=2e-3) and np.allclose(std, big.std, atol=2e-3)


def test_bad_names_and_splits(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_dataset("cifar10", tmp_path, "val")


def test_channel_stats_matches_numpy():
    images = random_images(7, 3, 5, 4)
    mean, std = channel_stats(torch.from_numpy(images), chunk=3)
    x = images.astype(np.float64) / 255
    assert np.allclose(mean, x.mean(axis=(0, 2, 3))) and np.allclose(std, x.std(axis=(0, 2, 3)))


def write_png_folder(folder, n=3, size=36):
    from PIL import Image

    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")


def test_ood_sets_found_missing_and_normalised_like_in_distribution(tmp_path):
    write_cifar10(tmp_path)
    write_cifar100(tmp_path)
    write_png_folder(tmp_path / "LSUN")
    cifar10 = load_dataset("cifar10", tmp_path, "train")
    found, missing = load_ood_sets(cifar10, tmp_path, folders={"lsun_resize": tmp_path / "LSUN",
                                                               "tin_resize": tmp_path / "nowhere"})
    assert sorted(found) == ["cifar100", "lsun_resize"] and sorted(missing) == ["svhn", "tin_resize"]
    assert "SVHN not found" in missing["svhn"] and "no images" in missing["tin_resize"]
    for data in found.values():
        assert data.mean == cifar10.mean and data.std == cifar10.std and data.shape == (3, 32, 32)
    assert len(found["cifar100"]) == 5 and found["cifar100"].split == "test"
    assert found["lsun_resize"].labels.tolist() == [0, 0, 0, 1, 1, 1]
    write_svhn(tmp_path)
    found, missing = load_ood_sets(cifar10, tmp_path)
    assert sorted(found) == ["cifar100", "svhn"] and not missing


def test_image_folder_keeps_exact_pixels_at_native_size(tmp_path):
    from PIL import Image

    (tmp_path / "x").mkdir()
    img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "x" / "0.png")
    data = load_image_folder(tmp_path, size=32)
    assert torch.equal(data.images[0], torch.from_numpy(img).permute(2, 0, 1))


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    train = load_dataset("fashion_mnist", tmp_path, "train")
    test = load_dataset("fashion_mnist", tmp_path, "test")
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean, std = channel_stats(train.images)
    assert np.allclose(mean, STATS["fashion_mnist"][0], atol=5e-5) and np.allclose(std, STATS["fashion_mnist"][1],
                                                                                   atol=5e-5)


# ---------------------------------------------------------------- GPULoader

def make_data(n=50, c=3, h=8, w=8, mean=0.5, std=0.25):
    images = torch.from_numpy(random_images(n, c, h, w))
    return ImageData("toy", "train", images, torch.arange(n), n, (mean,) * c, (std,) * c)  # label = image index


def normalise(images, mean, std):
    return (images.double() / 255 - mean) / std


def collect(loader, count=None):
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def test_eval_loader_is_ordered_complete_and_normalised():
    data = make_data(n=23)
    loader = GPULoader(data, 5, device="cpu")
    assert len(loader) == 5
    batches = collect(loader)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    x = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), data.labels)
    assert torch.allclose(x.double(), normalise(data.images, 0.5, 0.25), atol=1e-5)
    collect(loader, count=2)  # an interrupted pass ...
    assert torch.equal(torch.cat([b[0] for b in collect(loader)]), x)  # ... does not shift the next one


def test_train_loader_drop_last_and_epoch_permutation():
    data = make_data(n=50)
    loader = GPULoader(data, 8, train=True, device="cpu", pad=0, flip=False)
    assert len(loader) == 6
    epoch0, epoch1 = collect(loader), collect(loader)
    assert len(epoch0) == len(epoch1) == 6 and all(len(y) == 8 for _, y in epoch0 + epoch1)
    for epoch in (epoch0, epoch1):
        x, idx = torch.cat([b[0] for b in epoch]), torch.cat([b[1] for b in epoch])
        assert len(set(idx.tolist())) == 48  # 48 distinct images of the 50, none repeated
        assert torch.allclose(x.double(), normalise(data.images[idx], 0.5, 0.25), atol=1e-5)
    assert not torch.equal(epoch0[0][0], epoch1[0][0])
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["step"] == 0


@pytest.fixture
def index_data():
    """Images whose pixel values encode the image index (value = index), so an output batch reveals its order."""
    n = 40
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ImageData("idx", "train", images, torch.arange(n), 40, (0.0,) * 3, (1 / 255,) * 3)


def test_train_order_deterministic_by_seed(index_data):
    def run(seed):
        return [y for _, y in collect(GPULoader(index_data, 8, train=True, seed=seed, device="cpu", pad=1))]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not all(torch.equal(p, q) for p, q in zip(a, c))


def test_resume_from_state_dict_gives_identical_remaining_batches(index_data):
    kwargs = dict(train=True, seed=7, device="cpu", pad=1, cutout=2)
    reference = GPULoader(index_data, 6, **kwargs)
    full = collect(reference) + collect(reference)  # two epochs of 6 batches
    interrupted = GPULoader(index_data, 6, **kwargs)
    collect(interrupted)
    first = collect(interrupted, count=2)  # stop inside epoch 1
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["step"] == 2
    resumed = GPULoader(index_data, 6, **kwargs)
    resumed.load_state_dict(state)
    rest = collect(resumed)
    assert len(first) + len(rest) == 6
    for (x, y), (x_ref, y_ref) in zip(first + rest, full[6:]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.state_dict()["epoch"] == 2


def test_state_from_other_settings_is_refused(index_data):
    state = GPULoader(index_data, 6, train=True, seed=7, device="cpu").state_dict()
    with pytest.raises(DataError, match="seed"):
        GPULoader(index_data, 6, train=True, seed=8, device="cpu").load_state_dict(state)
    with pytest.raises(DataError, match="batch_size"):
        GPULoader(index_data, 5, train=True, seed=7, device="cpu").load_state_dict(state)


def windows(image, pad):
    """All (2·pad+1)² crops of the zero-padded image and their mirror images, as a (M, C, H, W) tensor."""
    _, h, w = image.shape
    padded = F.pad(image, (pad,) * 4)
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_random_crop_is_a_translation_of_the_zero_padded_image():
    image = (torch.arange(3 * 6 * 6) % 251 + 1).to(torch.uint8).view(1, 3, 6, 6)  # no zero pixel, all distinct
    data = ImageData("one", "train", image.expand(64, 3, 6, 6).contiguous(), torch.zeros(64, dtype=torch.int64), 1,
                     (0.0,) * 3, (1 / 255,) * 3)  # normalisation is the identity: x = pixel value
    loader = GPULoader(data, 64, train=True, device="cpu", pad=2, flip=True)
    x, _ = next(iter(loader))
    candidates = windows(image[0].float(), 2)
    matches = [(candidates == xi).flatten(1).all(1).nonzero().flatten().tolist() for xi in x]
    assert all(len(m) == 1 for m in matches)  # every output is exactly one shifted (and maybe mirrored) window
    kinds = {m[0] for m in matches}
    assert len(kinds) > 10 and any(k >= 25 for k in kinds) and any(k < 25 for k in kinds)


def test_crop_flip_explicit_parameters():
    x = torch.from_numpy(random_images(3, 2, 5, 7))
    b = len(x)
    centre = torch.full((b,), 3)
    assert torch.equal(crop_flip(x, centre, centre, torch.zeros(b, dtype=torch.bool), 3), x)
    assert torch.equal(crop_flip(x, centre, centre, torch.ones(b, dtype=torch.bool), 3), x.flip(-1))
    dy, dx, flip = torch.tensor([0, 6, 2]), torch.tensor([6, 0, 5]), torch.tensor([False, True, True])
    for mode, torch_mode in (("zeros", "constant"), ("reflect", "reflect")):
        padded = F.pad(x.float(), (3,) * 4, mode=torch_mode).to(torch.uint8)
        out = crop_flip(x, dy, dx, flip, 3, mode)
        for i in range(b):
            window = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
            assert torch.equal(out[i], window.flip(-1) if flip[i] else window)


def test_flip_only_gives_image_or_its_mirror():
    data = make_data(n=32)
    loader = GPULoader(data, 32, train=True, device="cpu", pad=0, flip=True)
    x, y = next(iter(loader))
    ref = normalise(data.images[y], 0.5, 0.25).float()
    same = (x - ref).abs().flatten(1).amax(1) < 1e-5
    mirrored = (x - ref.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_cutout_explicit_square_clipped_at_border():
    x = torch.ones(2, 1, 10, 10)
    cutout_(x, torch.tensor([5, 0]), torch.tensor([5, 9]), 4)
    expected = torch.ones(2, 1, 10, 10)
    expected[0, :, 3:7, 3:7] = 0
    expected[1, :, 0:2, 7:10] = 0
    assert torch.equal(x, expected)


def test_cutout_zeroes_a_square_after_normalisation():
    images = torch.full((64, 3, 12, 12), 200, dtype=torch.uint8)
    data = ImageData("flat", "train", images, torch.zeros(64, dtype=torch.int64), 1, (0.1,) * 3, (0.3,) * 3)
    x, _ = next(iter(GPULoader(data, 64, train=True, device="cpu", pad=0, flip=False, cutout=6)))
    value = (200 / 255 - 0.1) / 0.3
    assert torch.all((x == 0) | ((x - value).abs() < 1e-5))
    for xi in x:
        zero = xi == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        assert 3 <= len(rows) <= 6 and 3 <= len(cols) <= 6  # a 6×6 square, clipped to at least half at a border
        assert zero[0].sum() == len(rows) * len(cols)  # the zeros form one full rectangle
        assert rows.max() - rows.min() + 1 == len(rows) and cols.max() - cols.min() + 1 == len(cols)


def test_dtype_and_channels_last():
    data = make_data(n=16)
    x, y = next(iter(GPULoader(data, 8, train=True, device="cpu", dtype=torch.bfloat16, channels_last=True)))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64 and x.shape == (8, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    ex, _ = next(iter(GPULoader(data, 8, device="cpu", dtype=torch.float16)))
    assert torch.allclose(ex.double(), normalise(data.images[:8], 0.5, 0.25), atol=5e-3)


def test_loader_rejects_bad_arguments():
    data = make_data(n=10)
    with pytest.raises(DataError, match="exceeds the 10 images"):
        GPULoader(data, 16, train=True, device="cpu")
    assert len(GPULoader(data, 16, device="cpu")) == 1  # eval keeps the partial batch
    with pytest.raises(DataError, match="pad_mode"):
        GPULoader(data, 4, device="cpu", pad_mode="edge")
    with pytest.raises(DataError, match="reflect padding"):
        GPULoader(data, 4, device="cpu", pad=8, pad_mode="reflect")
    with pytest.raises(DataError, match="floating"):
        GPULoader(data, 4, device="cpu", dtype=torch.int32)
    with pytest.raises(DataError, match="channel means"):
        GPULoader(data, 4, device="cpu", mean=(0.5,))
    with pytest.raises(DataError, match="seed >= 0"):
        GPULoader(data, 4, device="cpu", seed=-1)
    with pytest.raises(DataError, match="cutout 9 exceeds the 8×8 images"):
        GPULoader(data, 4, device="cpu", cutout=9)


@pytest.mark.cuda
def test_cuda_loader_matches_cpu_order_and_eval_batches():
    data = make_data(n=40)
    cpu = GPULoader(data, 8, train=True, device="cpu", seed=4)
    gpu = GPULoader(data, 8, train=True, device="cuda", seed=4)
    assert all(torch.equal(a[1], b[1].cpu()) for a, b in zip(collect(cpu), collect(gpu)))
    for (a, _), (b, _) in zip(GPULoader(data, 8, device="cpu"), GPULoader(data, 8, device="cuda")):
        assert torch.allclose(a, b.cpu(), atol=1e-6)
    x = torch.from_numpy(random_images(5, 3, 8, 8))
    dy, dx, flip = torch.randint(0, 9, (2, 5)), torch.randint(0, 9, (5,)), torch.rand(5) < 0.5
    for mode in ("zeros", "reflect"):
        ref = crop_flip(x, dy[0], dx, flip, 4, mode)
        assert torch.equal(crop_flip(x.cuda(), dy[0].cuda(), dx.cuda(), flip.cuda(), 4, mode).cpu(), ref)


def test_the_extending_guide_dataset_loads_and_batches():
    """docs/extending.md's dataset example, as written, and every table its table of dataset facts names."""
    import importlib
    import os
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "extending.md")).read()
    scope = {"torch": torch, "channel_stats": channel_stats, "ImageData": ImageData}
    exec(re.search(r"```python\n(def load_stripes.*?)```", text, re.S).group(1), scope)
    train = scope["load_stripes"]("train")
    assert train.shape == (1, 8, 8) and train.num_classes == 2 and len(train) == 64
    assert set(train.labels.tolist()) == {0, 1}
    x, y = next(iter(GPULoader(train, 16, train=True, device="cpu")))  # augmented: crops and flips
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    x, _ = next(iter(GPULoader(train, 64, device="cpu")))  # the whole split, as stored
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-5  # its own statistics
    section = text[text.index("# Adding a dataset"):text.index("# Adding a study arm")]
    rows = re.findall(r"^\| [^|]+ \| (.+?) \| `(deep/[\w/]+)\.py` \|$", section, re.M)
    assert len(rows) == 8
    for names, path in rows:
        module = importlib.import_module(path.replace("/", "."))
        for name in re.findall(r"`([A-Z][A-Za-z_.]*)`", names):
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part)  # the table names a table that exists where it says
