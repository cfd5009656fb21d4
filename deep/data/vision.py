"""Image datasets as in-memory tensors: CIFAR-10/100, SVHN, Fashion-MNIST, image folders and synthetic data.

Every loader returns an `ImageData` holding all images of one split as a uint8 tensor (N, C, H, W) and the labels as
an int64 tensor (N,), read from the dataset's own on-disk format in one pass (see `formats.py`). torchvision is used
only to download (`download=True`), which also verifies the archive's checksum; the files are then read here, so data
already on disk is never re-hashed or converted image by image.

Normalisation statistics (`ImageData.mean`, `ImageData.std`, per channel, in units of pixel/255) are fixed constants:
the per-channel mean and standard deviation over all pixels of the official training split (CIFAR-10, CIFAR-100, SVHN
train, Fashion-MNIST train; the Fashion-MNIST values were recomputed from the real files). They do not depend on which
split is loaded, so train and test are normalised identically. The reference implementation normalised CIFAR-10 with
std (0.2023, 0.1994, 0.2010), a smaller value that is not the pixel standard deviation; `REFERENCE_STATS` holds its
constants for runs that want to match it. Out-of-distribution sets carry the statistics of the in-distribution data
they are paired with (`load_ood_sets`), since the model sees every input normalised the same way.
"""

import dataclasses
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .formats import read_cifar_batches, read_idx, read_svhn_mat

# Debian/Ubuntu package `dataset-fashion-mnist` installs the original gzip'd idx files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Per-channel (mean, std) of the training split's pixels, pixel values scaled to [0, 1].
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# The constants the reference implementation normalised with (its CIFAR-10 std is not the pixel std).
REFERENCE_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}

# Uniform random bytes 0..255: mean 127.5/255, std sqrt((256² − 1)/12)/255.
_UNIFORM_BYTE_STATS = (0.5, math.sqrt((256 ** 2 - 1) / 12) / 255)

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: compare tensors with torch.equal, not ==
class ImageData:
    """One split of an image dataset held in memory.

    images: uint8 (N, C, H, W); labels: int64 (N,) in [0, num_classes); mean, std: per-channel normalisation
    statistics in pixel/255 units (length C); name: dataset key (e.g. "cifar10"); split: "train", "test", ...;
    source: the folder the files were read from, where a loader falls back to one outside its root ("" otherwise).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple
    std: tuple
    source: str = ""

    def __post_init__(self):
        im, lab = self.images, self.labels
        if im.dtype != torch.uint8 or im.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 (N, C, H, W), got {im.dtype} {tuple(im.shape)}")
        if lab.dtype != torch.int64 or lab.shape != (im.shape[0],):
            raise DataError(f"{self.name}: labels must be int64 ({im.shape[0]},), got {lab.dtype} {tuple(lab.shape)}")
        if len(self.mean) != im.shape[1] or len(self.std) != im.shape[1] or min(self.std) <= 0:
            raise DataError(f"{self.name}: need {im.shape[1]} channel means and positive stds, "
                            f"got mean {self.mean}, std {self.std}")

    def __len__(self):
        return self.images.shape[0]

    @property
    def shape(self):
        """Shape (C, H, W) of one image."""
        return tuple(self.images.shape[1:])


def channel_stats(images, chunk=4096):
    """Per-channel mean and std (population) of uint8 images (N, C, H, W) in pixel/255 units, as two tuples."""
    c = images.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)
        s1 += x.sum(1)
        s2 += (x * x).sum(1)
    n = images.shape[0] * images.shape[2] * images.shape[3]
    if n == 0:
        raise DataError("channel_stats needs at least one image")
    mean = s1 / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _check_split(name, split, allowed=SPLITS):
    if split not in allowed:
        raise DataError(f"{name}: unknown split {split!r}; choose one of {', '.join(allowed)}")


def _make(name, split, images, labels, num_classes):
    mean, std = STATS[name]
    return ImageData(name, split, torch.from_numpy(images), torch.from_numpy(labels), num_classes, mean, std)


def _torchvision_download(title, cls_name, root, **kwargs):
    """Download a dataset with torchvision (which verifies its checksum); errors become DataError."""
    import torchvision.datasets as tvd

    try:
        getattr(tvd, cls_name)(str(root), download=True, **kwargs)
    except Exception as e:  # network, checksum and archive errors come in many types
        raise DataError(f"{title} download into {root} failed ({type(e).__name__}: {e}); "
                        f"check the internet connection or place the files by hand") from None


_CIFAR = {
    "cifar10": dict(title="CIFAR-10", cls="CIFAR10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"], label_key="labels",
                    num_classes=10, listing="{data_batch_1..5,test_batch}"),
    "cifar100": dict(title="CIFAR-100", cls="CIFAR100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=["train"], test=["test"], label_key="fine_labels", num_classes=100,
                     listing="{train,test}"),
}


def load_cifar(name, root, split="train", download=False):
    """CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100", fine labels) from torchvision's folder under `root`.

    Returns ImageData with images uint8 (N, 3, 32, 32): 50,000 train or 10,000 test images for the real data.
    """
    spec = _CIFAR[name]
    _check_split(name, split)
    folder = Path(root) / spec["folder"]
    files = [folder / f for f in spec[split]]
    if download and not all(f.is_file() for f in files):
        _torchvision_download(spec["title"], spec["cls"], root, train=split == "train")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{spec['title']} not found: expected {folder}/{spec['listing']} "
                        f"(missing {', '.join(missing)}); pass --download (download=True) with internet access, or unpack {spec['archive']} "
                        f"into {root}")
    images, labels = read_cifar_batches(files, spec["label_key"], spec["num_classes"])
    return _make(name, split, images, labels, spec["num_classes"])


def load_svhn(root, split="test", download=False):
    """SVHN ("train", "test" or "extra") from torchvision's layout `<root>/<split>_32x32.mat`; digit 0 is label 0.

    Returns ImageData with images uint8 (N, 3, 32, 32); the real test split has 26,032 images.
    """
    _check_split("svhn", split, ("train", "test", "extra"))
    path = Path(root) / f"{split}_32x32.mat"
    if download and not path.is_file():
        _torchvision_download("SVHN", "SVHN", root, split=split)
    if not path.is_file():
        raise DataError(f"SVHN not found: expected {path}; pass --download (download=True) with internet access, "
                        f"or save {path.name} from http://ufldl.stanford.edu/housenumbers/ into {root}")
    images, labels = read_svhn_mat(path)
    return _make("svhn", split, images, labels, 10)


def _idx_file(folder, stem):
    """The path of idx file `stem` in `folder`, uncompressed or .gz, or None."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def load_fashion_mnist(root, split="train", download=False, system_dir=DEBIAN_FASHION_MNIST):
    """Fashion-MNIST from `<root>/FashionMNIST/raw/` (torchvision's layout) or, failing that, `system_dir`.

    `system_dir` defaults to where Debian's `dataset-fashion-mnist` package installs the gzip'd idx files (None skips
    it). Both plain and .gz idx files are read directly: Debian recompressed its copies, so torchvision's checksum of
    the .gz archives does not match them although the contents are the originals.
    Returns ImageData with images uint8 (N, 1, 28, 28): 60,000 train or 10,000 test images for the real data.
    """
    _check_split("fashion_mnist", split)
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    raw = Path(root) / "FashionMNIST" / "raw"
    folders = [raw] + ([Path(system_dir)] if system_dir is not None else [])

    def find():
        for folder in folders:
            paths = [_idx_file(folder, s) for s in stems]
            if all(paths):
                return paths
        return None

    paths = find()
    if paths is None and download:
        _torchvision_download("Fashion-MNIST", "FashionMNIST", root, train=split == "train")
        paths = find()
    if paths is None:
        where = " or ".join(str(f) for f in folders)
        raise DataError(f"Fashion-MNIST not found: expected {stems[0]}[.gz] and {stems[1]}[.gz] in {where}; "
                        f"run `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --download "
                        f"(download=True) with internet access")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"Fashion-MNIST files {paths[0]} {images.shape} and {paths[1]} {labels.shape} do not form "
                        f"a dataset of 28×28 images with one label each; the files are mismatched or corrupt")
    if len(labels) and labels.max() >= 10:
        raise DataError(f"{paths[1]}: Fashion-MNIST labels outside [0, 10) (max {labels.max()})")
    data = _make("fashion_mnist", split, images[:, None], labels.astype(np.int64), 10)
    return data if paths[0].parent == raw else dataclasses.replace(data, source=str(paths[0].parent))


def load_synthetic(split="train", size=None, shape=(3, 32, 32), num_classes=10, seed=0):
    """Deterministic uniform random uint8 images (size, *shape) and labels in [0, num_classes), for throughput runs.

    `size` defaults to 50,000 (train) or 10,000 (other splits); each split gets its own stream derived from `seed`.
    The statistics are those of uniform bytes (mean 0.5, std ≈ 0.2898 per channel).
    """
    size = (50_000 if split == "train" else 10_000) if size is None else int(size)
    shape = tuple(int(s) for s in shape)
    if size < 0 or len(shape) != 3 or min(shape) < 1 or num_classes < 1 or seed < 0:
        raise DataError(f"synthetic: need size >= 0, shape (C, H, W), num_classes >= 1 and seed >= 0, "
                        f"got size {size}, shape {shape}, num_classes {num_classes}, seed {seed}")
    stream = int(np.random.SeedSequence([seed, zlib.crc32(split.encode())]).generate_state(1)[0])
    g = torch.Generator().manual_seed(stream)
    images = torch.randint(0, 256, (size, *shape), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (size,), generator=g, dtype=torch.int64)
    mean, std = _UNIFORM_BYTE_STATS
    return ImageData("synthetic", split, images, labels, num_classes, (mean,) * shape[0], (std,) * shape[0])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(path, name=None, size=32, channels=3):
    """All images under `path` (searched recursively, sorted by path), converted to `channels` (1 or 3) and resized
    to size×size (bilinear) where they differ, e.g. the LSUN-resize and TinyImageNet-resize OOD sets.

    Labels index the sorted names of the images' parent folders relative to `path` (as torchvision's ImageFolder).
    The statistics are computed from the images themselves.
    """
    from PIL import Image

    root = Path(path)
    name = name or root.name
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{name}: no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    classes = sorted({str(p.parent.relative_to(root)) for p in files})
    index = {c: i for i, c in enumerate(classes)}
    mode = {1: "L", 3: "RGB"}[channels]
    images = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                images[i] = np.asarray(im).reshape(size, size, channels)
        except OSError as e:
            raise DataError(f"{name}: cannot read image {p}: {e}") from None
    labels = np.array([index[str(p.parent.relative_to(root))] for p in files], dtype=np.int64)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    mean, std = channel_stats(tensor)
    std = tuple(max(s, 1e-6) for s in std)
    return ImageData(name, "test", tensor, torch.from_numpy(labels), len(classes), mean, std)


def load_digits(split="test", size=28):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 16 grey levels; no download) as uint8 images
    resized to size x size (bilinear) with one channel: an out-of-distribution set reachable offline for
    Fashion-MNIST. Needs scikit-learn (``pip install scikit-learn``, or the ``[ood]`` extra)."""
    _check_split("digits", split)
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError("the digits OOD set needs scikit-learn: pip install scikit-learn (or late-phase[ood])") \
            from None
    d = sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    if size != 8:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                 align_corners=False).round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    mean, std = channel_stats(images)
    return ImageData("digits", split, images.contiguous(), labels, 10, mean, std)


DATASETS = ("cifar10", "cifar100", "svhn", "fashion_mnist", "synthetic", "digits")


def load_dataset(name, root=".", split="train", download=False, **options):
    """Load split `split` of dataset `name` (one of DATASETS) stored under `root`; returns ImageData.

    `download=True` fetches missing files with torchvision (needs internet). `options` go to the dataset's loader:
    `system_dir` for fashion_mnist; `size`, `shape`, `num_classes`, `seed` for synthetic.
    """
    if name in _CIFAR:
        return load_cifar(name, root, split, download, **options)
    if name == "svhn":
        return load_svhn(root, split, download, **options)
    if name == "fashion_mnist":
        return load_fashion_mnist(root, split, download, **options)
    if name == "synthetic":
        return load_synthetic(split, **options)
    if name == "digits":
        return load_digits(split, **options)
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# The OOD test sets the paper pairs with each in-distribution dataset (plus LSUN/TinyImageNet-resize as folders).
OOD_SETS = {"cifar10": ("svhn", "cifar100"), "cifar100": ("svhn", "cifar10"), "fashion_mnist": ("digits",)}


def load_ood_sets(in_data, root=".", folders=None, download=False):
    """The out-of-distribution test sets for in-distribution data `in_data` (an ImageData) that can be loaded.

    Loads the test split of each dataset in OOD_SETS[in_data.name] from `root`, and each image folder in `folders`
    (a dict name -> path, e.g. {"lsun_resize": ".../LSUN"}), resized to `in_data`'s image size. Every returned set
    carries `in_data`'s mean/std, so it is normalised exactly like the in-distribution inputs.
    Returns (found, missing): dict name -> ImageData, and dict name -> the one-line reason it could not be loaded
    (for the caller to report as a warning).
    """
    found, missing = {}, {}
    c, h, w = in_data.shape
    for name in OOD_SETS.get(in_data.name, ()):
        try:
            data = load_dataset(name, root, "test", download, **({"size": h} if name == "digits" else {}))
            if data.shape != (c, h, w):
                raise DataError(f"{name} images are {data.shape}, in-distribution images are {(c, h, w)}")
            found[name] = data
        except DataError as e:
            missing[name] = str(e)
    for name, path in (folders or {}).items():
        try:
            if h != w or c not in (1, 3):
                raise DataError(f"{name}: cannot match image folders to in-distribution images of shape {(c, h, w)}")
            found[name] = load_image_folder(path, name=name, size=h, channels=c)
        except DataError as e:
            missing[name] = str(e)
    found = {k: dataclasses.replace(v, mean=in_data.mean, std=in_data.std) for k, v in found.items()}
    return found, missing
