"""ImageNet (ILSVRC 2012) for fine-tuning pretrained classifiers: data sets, standard transforms, resumable loaders.

Accepted layouts of `root`:
  * prepared by torchvision.datasets.ImageNet: `meta.bin` (made from ILSVRC2012_devkit_t12.tar.gz) next to
    `train/` and `val/` or next to the official archives ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar, which
    torchvision unpacks into `train/<wnid>/` and `val/<wnid>/` on first use (hours for the 138 GB training tar);
    or the devkit tar.gz itself next to those folders or archives. Class names are then readable (`classes`).
  * a plain ImageFolder tree `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`.
Either way class indices follow the sorted WordNet ids, as torchvision's pretrained models expect.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from .errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
META = "meta.bin"
LAYOUT = ("<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG, or the official ILSVRC2012_img_train.tar, "
          "ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in <root> (torchvision.datasets.ImageNet "
          "unpacks them)")
_IMAGE_SUFFIXES = set(datasets.folder.IMG_EXTENSIONS)

log = logging.getLogger(__name__)


def train_transform(crop: int = 224) -> Callable:
    """Training augmentation: RandomResizedCrop(crop) + horizontal flip + ToTensor + ImageNet normalisation."""
    return transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_transform(resize: int = 256, crop: int = 224) -> Callable:
    """Evaluation transform: Resize(resize) (short side) + CenterCrop(crop) + ToTensor + ImageNet normalisation."""
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_image(path: str):
    """The RGB PIL image at `path` (torchvision's default loader); a file that is not a readable image raises
    DataError naming it."""
    from PIL import UnidentifiedImageError
    try:
        return datasets.folder.default_loader(path)
    except OSError as e:  # not an image, a truncated one, no permission
        why = "not an image PIL can identify" if isinstance(e, UnidentifiedImageError) else (e.strerror or str(e))
        raise DataError(f"cannot read image {path}: {why or type(e).__name__}; remove or replace the file") from None


def _uses_torchvision_layout(root: Path) -> bool:
    """True when torchvision.datasets.ImageNet can serve both splits from `root` without downloading anything."""
    has_meta = (root / META).is_file() or (root / DEVKIT).is_file()
    return has_meta and all((root / split).is_dir() or (root / archive).is_file()
                            for split, archive in ARCHIVES.items())


def _check_folder(root: Path, split: str) -> None:
    """Raise a DataError naming the problem if `<root>/<split>` is not a usable ImageFolder tree."""
    folder = root / split
    if (root / ARCHIVES[split]).is_file() and not folder.is_dir():
        raise DataError(f"found {ARCHIVES[split]} in {root} but not {DEVKIT}: put the devkit next to it so that "
                        f"torchvision.datasets.ImageNet can unpack it into {split}/<wnid>/")
    if not folder.is_dir():
        raise DataError(f"ImageNet folder {folder} not found; expected {LAYOUT}")
    if any(path.suffix.lower() in _IMAGE_SUFFIXES for path in folder.iterdir() if path.is_file()):
        raise DataError(f"{folder} holds images directly; sort them into {split}/<wnid>/ folders (for val, "
                        f"put {DEVKIT} and {ARCHIVES[split]} in {root} and torchvision.datasets.ImageNet does it)")
    if not any(path.is_dir() for path in folder.iterdir()):
        raise DataError(f"ImageNet folder {folder} has no class folders; expected {LAYOUT}")


def imagenet_datasets(root: str | Path, train_tf: Callable | None = None,
                      val_tf: Callable | None = None) -> tuple[Dataset, Dataset]:
    """(train, val) data sets of (image tensor (3, crop, crop), class index) from `root` (layouts in module doc).

    train_tf / val_tf default to `train_transform()` / `val_transform()`. Uses torchvision.datasets.ImageNet when
    its files (meta.bin or the devkit, plus folders or archives) are present, a plain ImageFolder otherwise.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} is not a folder; expected {LAYOUT}")
    train_tf = train_tf if train_tf is not None else train_transform()
    val_tf = val_tf if val_tf is not None else val_transform()
    if _uses_torchvision_layout(root):
        for split, archive in ARCHIVES.items():
            if not (root / split).is_dir():
                log.warning("unpacking %s into %s (once; slow for the training archive)", archive, root / split)
        return (datasets.ImageNet(str(root), split="train", transform=train_tf, loader=load_image),
                datasets.ImageNet(str(root), split="val", transform=val_tf, loader=load_image))
    for split in ARCHIVES:
        _check_folder(root, split)
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=train_tf, loader=load_image)
        val = datasets.ImageFolder(str(root / "val"), transform=val_tf, loader=load_image)
    except FileNotFoundError as error:
        raise DataError(f"{' '.join(str(error).split())}; expected {LAYOUT}") from None
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))[:3]
        raise DataError(f"train and val class folders differ (e.g. {missing}): labels would disagree; "
                        f"use the same <wnid> folders in both")
    return train, val


class EpochSampler(Sampler[int]):
    """Seeded per-epoch order, optional sharding over distributed ranks, resumable inside an epoch.

    Epoch e's order is torch.randperm(n) from a generator seeded with seed + e (shuffle) or 0..n-1. With R replicas
    it is sharded as torch.utils.data.DistributedSampler does (same indices for the same seed and epoch): `pad`
    repeats the first indices so that every rank gets ceil(n / R) (training), `drop_last` truncates to floor(n / R)
    per rank; with neither, rank r gets exactly order[r::R] (uneven, every sample once: exact evaluation).
    `set_epoch(e, skip)` starts epoch e after the first `skip` indices of this rank (resume after skip samples).
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 pad: bool = True, drop_last: bool = False):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} replicas")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank, self.pad, self.drop_last = num_replicas, rank, pad, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select epoch `epoch` and skip its first `skip` indices on this rank."""
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch (before skipping)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        replicas = self.num_replicas
        if self.drop_last:
            order = order[:self.size // replicas * replicas]
        elif self.pad and self.size % replicas:
            missing = -self.size % replicas
            order += (order * (missing // max(len(order), 1) + 1))[:missing]
        return order[self.rank::replicas]

    def __iter__(self):
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        return max(len(self.indices()) - self.skip, 0)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of the data-loading randomness of (seed, epoch, rank): worker seeds and augmentation draws."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 17) % (2 ** 63)


def imagenet_loader(dataset: Dataset, batch_size: int, train: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                    world: int = 1, workers: int = 8, pin_memory: bool = False) -> DataLoader:
    """DataLoader of (images (B, 3, H, W) float, labels (B,) int64) over this rank's shard of `dataset`, a pure
    function of (seed, epoch, rank): train=True shuffles with seed + epoch, pads the shards like DistributedSampler
    and drops the incomplete last batch; train=False keeps the order and gives every sample exactly once (rank r:
    order[r::world]). Worker seeds come from :func:`loader_seed`, so a resumed run draws what it would have drawn."""
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed, num_replicas=world, rank=rank, pad=train)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=train, generator=torch.Generator().manual_seed(loader_seed(seed, epoch, rank)))
