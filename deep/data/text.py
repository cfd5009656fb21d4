"""enwik8 for character-level language modelling: loading, the standard split, truncated-BPTT batching.

enwik8 is the first 100,000,000 bytes of an English Wikipedia XML dump (the Hutter Prize file). The standard split,
used by the paper, is the first 90,000,000 bytes for training, the next 5,000,000 for validation and the last
5,000,000 for testing. Symbols are raw bytes: a vocabulary of 256 (enwik8 itself uses 205 of them).

Losses are reported in bits per character: the mean next-byte cross-entropy in nats divided by ln 2.
"""
from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import DataError

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
VOCAB_SIZE = 256


def _how_to_get() -> str:
    return f"download {ENWIK8_URL} and pass the path of enwik8.zip, of the unzipped enwik8, or of their folder"


def _resolve(path: str | Path) -> Path:
    """The enwik8 file to read: `path` itself, or `enwik8` / `enwik8.zip` inside the folder `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("enwik8", "enwik8.zip"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"no 'enwik8' or 'enwik8.zip' in folder {path}: {_how_to_get()}")
    if not path.is_file():
        raise DataError(f"enwik8 file {path} not found: {_how_to_get()}")
    return path


def download_enwik8(folder: str | Path) -> Path:
    """Download enwik8.zip into `folder` unless `enwik8` or `enwik8.zip` is already there; returns the file.

    Failures (no network, disk full) raise a one-line DataError saying where to put the file by hand."""
    folder = Path(folder).expanduser()
    for name in ("enwik8", "enwik8.zip"):
        if (folder / name).is_file():
            return folder / name
    target = folder / "enwik8.zip"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(ENWIK8_URL, str(target), progress=False)
    except Exception as error:  # network, disk or permission failures all mean: no data
        detail = " ".join(str(error).split())[:200]
        raise DataError(f"could not download {ENWIK8_URL} ({detail}); download it elsewhere and put enwik8.zip "
                        f"into {folder}") from None
    return target


def read_bytes(path: str | Path) -> torch.Tensor:
    """All bytes of a text file, or of the single text inside a zip archive, as a 1-D uint8 tensor.

    `path` may be a raw file (e.g. `enwik8`), a zip archive (e.g. `enwik8.zip`: its member `enwik8` is read, or its
    only member), or a folder holding `enwik8` or `enwik8.zip`.
    """
    path = _resolve(path)
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04" or path.suffix.lower() == ".zip"
        if zipped:
            with zipfile.ZipFile(path) as archive:
                names = [info.filename for info in archive.infolist() if not info.is_dir()]
                if "enwik8" in names:
                    member = "enwik8"
                elif len(names) == 1:
                    member = names[0]
                else:
                    raise DataError(f"zip archive {path} holds {len(names)} files and none is named 'enwik8': "
                                    f"{_how_to_get()}")
                raw = archive.read(member)  # checks the member's CRC-32
        else:
            raw = path.read_bytes()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise DataError(f"{path} is a damaged zip archive ({e or type(e).__name__}): {_how_to_get()}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not raw:
        raise DataError(f"{path} holds no text (0 bytes): {_how_to_get()}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def split_sizes(total: int, split: str | Sequence[int] = "enwik8") -> tuple[int, int, int]:
    """Sizes in bytes (n_train, n_valid, n_test) of a `total`-byte text under `split`.

    split="enwik8": the standard 90M/5M/5M split; the text must have exactly 100,000,000 bytes.
    split="proportional": 90% / 5% / 5% of `total` (valid = test = floor(5% of total), train = the rest).
    split=(n_train, n_valid, n_test): explicit sizes summing to `total`.
    Every part must hold at least 2 bytes (one input and its next-byte target).
    """
    if isinstance(split, str):
        if split == "enwik8":
            if total != ENWIK8_BYTES:
                raise DataError(f"the text has {total:,} bytes, not the {ENWIK8_BYTES:,} of enwik8 (truncated or wrong "
                                f"file? re-download {ENWIK8_URL}); for another text give its split in bytes, "
                                f"--text_split N_TRAIN N_VALID N_TEST")
            sizes = ENWIK8_SPLIT
        elif split == "proportional":
            held_out = total * 5 // 100
            sizes = (total - 2 * held_out, held_out, held_out)
        else:
            raise DataError(f"unknown split {split!r}: use 'enwik8', 'proportional' or (n_train, n_valid, n_test)")
    else:
        sizes = tuple(int(n) for n in split)
        if len(sizes) != 3 or sum(sizes) != total:
            raise DataError(f"explicit split {tuple(split)} must be three sizes summing to the text's {total:,} bytes")
    if min(sizes) < 2:
        raise DataError(f"split {sizes} of a {total:,}-byte text leaves a part with fewer than 2 bytes")
    return sizes


def load_enwik8(path: str | Path,
                split: str | Sequence[int] = "enwik8") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, valid, test): consecutive uint8 slices of the text at `path` (see `read_bytes`, `split_sizes`).

    With the default split the file must be enwik8 itself (100,000,000 bytes): train = bytes [0, 90M),
    valid = [90M, 95M), test = [95M, 100M).
    """
    data = read_bytes(path)
    n_train, n_valid, _ = split_sizes(data.numel(), split)
    return data[:n_train], data[n_train:n_train + n_valid], data[n_train + n_valid:]


def distinct_symbols(*parts: torch.Tensor) -> int:
    """How many of the 256 byte values occur in the given uint8 tensors together (205 for the whole of enwik8)."""
    seen = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    for part in parts:
        seen |= torch.bincount(part.flatten().long().cpu(), minlength=VOCAB_SIZE) > 0
    return int(seen.sum())


def bits_per_character(mean_nats: float | torch.Tensor) -> float | torch.Tensor:
    """Bits per character from a mean next-character cross-entropy in nats: nats / ln 2."""
    return mean_nats / math.log(2.0)


class BPTTBatcher:
    """Truncated-backpropagation-through-time batching of a 1-D token stream.

    The stream x_0..x_{N-1} is cut into `batch_size` contiguous columns of length L = (N - 1) // batch_size:
    column j holds inputs x_{jL} .. x_{jL+L-1} and their next-token targets x_{jL+1} .. x_{jL+L}, so every
    prediction is a real continuation of the stream (the last target of column j is the first input of column j+1);
    at most batch_size - 1 trailing bytes are unused. One epoch walks the columns left to right in windows of
    `bptt` steps: iterating yields (inputs, targets), both int64 of shape (batch_size, T), T <= bptt, and row j of a
    window continues row j of the previous window, so the trainer carries the LSTM state across windows (detached)
    and resets it at the start of each epoch. The last window of an epoch is shorter unless `drop_last`.

    seed: if given, the first window of epoch e has a length drawn uniformly from 1..bptt (from `seed` and e), so
    the truncation boundaries move from epoch to epoch; the remaining windows have length bptt. If None, every
    window starts at a multiple of bptt.

    Late-phase members (`members` = K, dividing batch_size): member k owns the fixed contiguous block of
    B_m = batch_size / K rows k*B_m .. (k+1)*B_m - 1 of every window (`member_rows(k)`), i.e. its own B_m columns of
    the stream. One outer step of Algorithm 1 is then one window: the stacked batch of K member minibatches of shape
    (B_m, T) each, and the rows of the carried LSTM state that belong to member k continue member k's own columns.
    (Giving members K consecutive windows instead would break the state continuity of a stateful LSTM.) Each member
    sees 1/K of the stream per epoch. With `rotate_members`, member k reads column block (k + e) mod K in epoch e,
    so over K epochs each member sees the whole stream; the block layout only changes at epoch starts, where the
    state is reset anyway. Without rotation the layout does not depend on K, so K may change between any two
    windows (e.g. at T0 inside an epoch); with rotation, change K only at an epoch start.

    Resume: `state_dict()` after a window has been consumed records (epoch, next window); `load_state_dict` restores
    it and a fresh `iter()` continues from there. The trainer must save and restore the carried LSTM state itself.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, bptt: int, device: torch.device | str | None = None,
                 seed: int | None = None, members: int = 1, rotate_members: bool = False, drop_last: bool = False):
        if data.dim() != 1:
            raise DataError(f"BPTTBatcher needs a 1-D token stream, got shape {tuple(data.shape)}")
        if batch_size < 1 or bptt < 1:
            raise DataError(f"batch_size ({batch_size}) and bptt ({bptt}) must be positive")
        columns = (data.numel() - 1) // batch_size
        if columns < 1:
            raise DataError(f"a stream of {data.numel()} tokens is too short for {batch_size} columns")
        if drop_last and columns < bptt:
            raise DataError(f"columns of {columns} tokens hold no full window of bptt={bptt} (drop_last=True)")
        self.batch_size, self.bptt, self.columns = batch_size, bptt, columns
        self.length, self.seed, self.rotate_members, self.drop_last = data.numel(), seed, rotate_members, drop_last
        self.epoch, self._window, self.members = 0, 0, 1
        self.set_members(members)
        stream = data[:batch_size * columns + 1].to(device if device is not None else data.device)
        self._inputs = stream[:-1].view(batch_size, columns)
        self._targets = stream[1:].view(batch_size, columns)

    # ----- members -----
    def set_members(self, members: int) -> None:
        """Give the rows to `members` late-phase members (K = 1: no members). See the class docstring."""
        if members < 1 or self.batch_size % members:
            raise DataError(f"members={members} must divide batch_size={self.batch_size}")
        if self.rotate_members and members != self.members and self._window != 0:
            raise DataError("with rotate_members, change the number of members only at the start of an epoch")
        self.members = members

    def member_rows(self, k: int) -> slice:
        """The rows of each window (and of the carried state) that belong to member k: a contiguous block."""
        if not 0 <= k < self.members:
            raise DataError(f"member {k} out of range for {self.members} members")
        size = self.batch_size // self.members
        return slice(k * size, (k + 1) * size)

    def split_members(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a (batch_size, ...) tensor as (K, batch_size / K, ...): index k is member k's block."""
        return tensor.view(self.members, self.batch_size // self.members, *tensor.shape[1:])

    def _row_order(self, epoch: int) -> torch.Tensor | None:
        """Column index for each row in `epoch` (None: the identity)."""
        shift = epoch % self.members if self.rotate_members else 0
        if shift == 0:
            return None
        size = self.batch_size // self.members
        blocks = [(k + shift) % self.members for k in range(self.members)]
        order = torch.cat([torch.arange(b * size, (b + 1) * size) for b in blocks])
        return order.to(self._inputs.device)

    # ----- windows -----
    def windows(self, epoch: int) -> list[tuple[int, int]]:
        """The [start, end) column ranges of the windows of `epoch`, in order."""
        first = self.bptt
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            first = 1 + int(torch.randint(self.bptt, (1,), generator=generator))
        bounds, start = [], 0
        while start < self.columns:
            end = min(start + (first if start == 0 else self.bptt), self.columns)
            if self.drop_last and end - start < (first if start == 0 else self.bptt):
                break
            bounds.append((start, end))
            start = end
        return bounds

    def __len__(self) -> int:
        """Number of windows in the current epoch."""
        return len(self.windows(self.epoch))

    @property
    def at_epoch_start(self) -> bool:
        """True when the next window is the first of an epoch (the trainer then resets the carried state)."""
        return self._window == 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the remaining windows of the current epoch as (inputs, targets), int64 (batch_size, T)."""
        epoch, bounds = self.epoch, self.windows(self.epoch)
        rows = self._row_order(epoch)
        for index in range(self._window, len(bounds)):
            start, end = bounds[index]
            inputs, targets = self._inputs[:, start:end], self._targets[:, start:end]
            if rows is not None:
                inputs, targets = inputs[rows], targets[rows]
            if index + 1 == len(bounds):
                self.epoch, self._window = epoch + 1, 0
            else:
                self._window = index + 1
            yield inputs.long(), targets.long()

    # ----- resume -----
    def _config(self) -> dict:
        return {"length": self.length, "batch_size": self.batch_size, "bptt": self.bptt, "seed": self.seed,
                "rotate_members": self.rotate_members, "drop_last": self.drop_last}

    def state_dict(self) -> dict:
        """Position (epoch, next window, members) plus the settings that define the windows, for checking."""
        return {"epoch": self.epoch, "window": self._window, "members": self.members, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()` taken with the same data and settings (create a new iterator after)."""
        saved = {key: state.get(key) for key in self._config()}
        if saved != self._config():
            raise DataError(f"batcher state was saved with settings {saved}, which differ from {self._config()}")
        self.epoch, self._window = int(state["epoch"]), int(state["window"])
        if not 0 <= self._window < len(self):
            raise DataError(f"saved window {self._window} is out of range for epoch {self.epoch}")
        members = int(state["members"])
        if members < 1 or self.batch_size % members:
            raise DataError(f"saved members={members} does not divide batch_size={self.batch_size}")
        self.members = members
