"""A device-resident data loader: images stay on the device as uint8, batches are gathered, augmented and normalised
there with a few batched tensor ops (no per-sample Python, no worker processes). On a CPU the same code runs on the CPU.

Augmentation (training only), in the order of the standard CIFAR recipe:
1. random crop: pad each image by `pad` pixels (zero pixels, like torchvision's RandomCrop(32, padding=4), or
   reflection) and cut a window of the original size at a uniform offset in [0, 2·pad]² — done as one gather with
   per-sample source indices, so no padded copy is made;
2. horizontal flip with probability 1/2, folded into the same gather;
3. per-channel normalisation x ↦ (x/255 − mean)/std;
4. optional cutout: zero (after normalisation) a size×size square whose centre is uniform over the image, clipped at
   the borders.

Randomness and resuming: the sample order of epoch e is a permutation drawn by a CPU torch.Generator seeded from
(seed, e), so it is the same on every device. The augmentation of batch s of epoch e is drawn by a generator on the
data's device re-seeded from (seed, e, s); CPU and CUDA generators produce different streams from the same seed, so
augmentations are reproducible per device but differ between devices. Because every batch depends only on
(seed, epoch, step), `state_dict()` (the position of the next batch) is all a run needs to resume mid-epoch exactly.
"""

import math

import numpy as np
import torch

from .errors import DataError

PAD_MODES = ("zeros", "reflect")


def _seed(*parts):
    """A 63-bit seed derived from integers `parts` (distinct tuples give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _source_index(offset, pad, n, mode):
    """Source coordinates (B, n) of a window of length n starting at `offset` − pad, and a validity mask (or None).

    For mode "zeros" out-of-range coordinates are clamped and flagged invalid; for "reflect" they are mirrored about
    the border pixel (needs pad < n).
    """
    src = offset[:, None] - pad + torch.arange(n, device=offset.device)
    if mode == "reflect":
        src = src.abs()
        return torch.where(src > n - 1, 2 * (n - 1) - src, src), None
    valid = (src >= 0) & (src < n)
    return src.clamp(0, n - 1), valid


def crop_flip(x, dy, dx, flip, pad, mode="zeros"):
    """Padded random crop and horizontal flip of a batch x (B, C, H, W) of any dtype.

    Output[b] = the H×W window at offset (dy[b], dx[b]) of x[b] padded by `pad` on every side, mirrored left-right
    where flip[b]. dy, dx: int64 (B,) in [0, 2·pad]; flip: bool (B,). Returns a new (B, C, H, W) tensor.
    """
    b, c, h, w = x.shape
    rows, row_ok = _source_index(dy, pad, h, mode)
    cols, col_ok = _source_index(dx, pad, w, mode)
    # Flipping the crop reverses the order in which its source columns are read.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    out = x.reshape(b, c, h * w).gather(2, flat).reshape(b, c, h, w)
    if row_ok is not None:
        col_ok = torch.where(flip[:, None], col_ok.flip(1), col_ok)
        out = out * (row_ok[:, None, :, None] & col_ok[:, None, None, :]).to(out.dtype)
    return out


def cutout_(x, cy, cx, size):
    """Zero, in place, the size×size square of x (B, C, H, W) covering rows [cy − size//2, cy − size//2 + size) and
    the same columns around cx (int64 (B,) centres), clipped to the image. Returns x."""
    _, _, h, w = x.shape
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_r = (r >= top[:, None]) & (r < top[:, None] + size)
    in_c = (c >= left[:, None]) & (c < left[:, None] + size)
    return x.masked_fill_(in_r[:, None, :, None] & in_c[:, None, None, :], 0)


class GPULoader:
    """Batches (x, y) of one ImageData, kept and processed on `device`.

    x: (batch_size, C, H, W) in `dtype` (normalised; channels_last memory format if asked), y: int64 (batch_size,).
    Training loaders (train=True) shuffle every epoch, drop the last incomplete batch by default and augment; each
    `for` pass yields the rest of the current epoch and then moves to the next one. Eval loaders yield every image once,
    in order, without augmentation, and start from the first batch on every pass.

    mean, std: normalisation statistics (pixel/255 units, per channel); default the data's own.
    pad: random-crop padding in pixels (0 disables); pad_mode: "zeros" or "reflect"; flip: random horizontal flips;
    cutout: side of the cutout square in pixels (0 disables). device defaults to CUDA when available, else CPU.
    """

    def __init__(self, data, batch_size, *, train=False, device=None, seed=0, mean=None, std=None, pad=4,
                 pad_mode="zeros", flip=True, cutout=0, dtype=torch.float32, channels_last=False, drop_last=None):
        n, c, h, w = data.images.shape
        mean = data.mean if mean is None else tuple(mean)
        std = data.std if std is None else tuple(std)
        if batch_size < 1 or seed < 0:
            raise DataError(f"batch_size must be >= 1 and seed >= 0, got batch_size {batch_size}, seed {seed}")
        if pad < 0 or cutout < 0:
            raise DataError(f"pad and cutout must be >= 0, got pad {pad}, cutout {cutout}")
        if cutout > min(h, w):
            raise DataError(f"cutout {cutout} exceeds the {h}×{w} images; use a cutout square of at most {min(h, w)}")
        if pad_mode not in PAD_MODES:
            raise DataError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {pad_mode!r}")
        if pad_mode == "reflect" and pad >= min(h, w):
            raise DataError(f"reflect padding needs pad < image side, got pad {pad} for {h}×{w} images")
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise DataError(f"need {c} channel means and positive stds, got mean {mean}, std {std}")
        if not dtype.is_floating_point:
            raise DataError(f"dtype must be a floating type, got {dtype}")
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.seed = int(batch_size), bool(train), int(seed)
        self.pad, self.pad_mode, self.flip, self.cutout = int(pad), pad_mode, bool(flip), int(cutout)
        self.dtype, self.channels_last = dtype, bool(channels_last)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        if self.drop_last and n < self.batch_size:
            raise DataError(f"batch_size {self.batch_size} exceeds the {n} images of {getattr(data, 'name', 'data')} "
                            f"with drop_last: no full batch")
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.scale, self.shift = 1 / (255 * std_t), -mean_t / std_t
        self.epoch, self.step = 0, 0
        self._order = (None, None)
        self._gen = torch.Generator(device=self.device)

    def __len__(self):
        """Batches per epoch."""
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch):
        """Indices (N,) of the images in epoch `epoch`'s order, on the device (identity for eval loaders)."""
        if self._order[0] != epoch:
            n = self.images.shape[0]
            if self.train:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, 0, epoch)))
            else:
                perm = torch.arange(n)
            self._order = (epoch, perm.to(self.device))
        return self._order[1]

    def batch(self, epoch, step):
        """The batch (x, y) at position (epoch, step); a pure function of those, the seed and the settings."""
        if not 0 <= step < len(self):
            raise DataError(f"step {step} outside [0, {len(self)}) batches per epoch")
        idx = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        x, y = self.images[idx], self.labels[idx]
        cut = None
        if self.train and (self.pad or self.flip or self.cutout):
            x, cut = self._augment(x, epoch, step)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt).mul_(self.scale).add_(self.shift)
        if cut is not None:
            cutout_(x, cut[0], cut[1], self.cutout)
        return x.to(self.dtype), y

    def _augment(self, x, epoch, step):
        """Crop and flip uint8 batch x with the randomness of batch (epoch, step); returns it and the cutout centres
        (rows, cols) or None. Draw order: crop offsets, flips, cutout centres."""
        b, _, h, w = x.shape
        g, dev = self._gen.manual_seed(_seed(self.seed, 1, epoch, step)), self.device
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2, b), generator=g, device=dev)
        flips = torch.randint(0, 2, (b,), generator=g, device=dev).bool() & self.flip
        if self.pad or self.flip:
            x = crop_flip(x, dy, dx, flips, self.pad, self.pad_mode)
        if not self.cutout:
            return x, None
        cy = torch.randint(0, h, (b,), generator=g, device=dev)
        cx = torch.randint(0, w, (b,), generator=g, device=dev)
        return x, (cy, cx)

    def __iter__(self):
        if not self.train:
            self.step = 0
        epoch, n = self.epoch, len(self)
        for step in range(self.step, n):
            # The state always names the next batch, so a checkpoint taken inside the loop body resumes after it.
            self.epoch, self.step = (epoch, step + 1) if step + 1 < n else (epoch + 1, 0)
            yield self.batch(epoch, step)

    def state_dict(self):
        """Position of the next batch (epoch, step) and the settings that determine the batches."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "num_images": self.images.shape[0]}

    def load_state_dict(self, state):
        """Resume at state["epoch"], state["step"]; refuses a state saved with another seed, batch size or data size."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "num_images"):
            if state.get(key) != mine[key]:
                raise DataError(f"loader state has {key} {state.get(key)}, this loader has {mine[key]}; "
                                f"resuming would give a different batch sequence")
        if not (0 <= state["step"] < max(len(self), 1) and state["epoch"] >= 0):
            raise DataError(f"loader state epoch {state['epoch']}, step {state['step']} is outside "
                            f"[0, {len(self)}) batches per epoch")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
