"""Readers for the on-disk formats the vision datasets ship in.

Each reader turns one file into numpy arrays in a single pass (no per-sample objects) and checks what it read, so a
truncated or mismatched file raises a one-line `DataError` naming the file instead of giving wrong data.

- idx (MNIST / Fashion-MNIST): big-endian magic `00 00 <type> <ndim>`, `ndim` big-endian uint32 sizes, then the values
  in row-major order; type 0x08 means unsigned bytes. Files may be gzip-compressed.
- CIFAR python pickles: a dict with `data`, a uint8 array (N, 3072) holding the red, green and blue 32×32 planes of each
  image in row-major order, and a list of N labels under `labels` (CIFAR-10) or `fine_labels` (CIFAR-100). The
  original archive was written by Python 2, so keys come back as byte strings or text depending on the writer; both are
  accepted.
- SVHN `*_32x32.mat` (MATLAB v5): `X` uint8 (32, 32, 3, N) indexed (row, column, channel, image) and `y` (N, 1) with
  labels 1..10, where 10 stands for the digit 0.
"""

import gzip
import importlib
import io
import math
import pickle
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

IDX_UBYTE = 0x08


def read_idx(path):
    """Read an idx file (optionally .gz) of unsigned bytes; returns a uint8 array with the file's dimensions."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream inside the .gz
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise DataError(f"cannot read idx file {path}: {why}; the file is damaged: re-download or reinstall it") \
            from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number); re-download or reinstall it")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{path}: idx element type 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated idx header; re-download or reinstall it")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(shape):
        raise DataError(f"{path}: idx header says shape {shape} ({math.prod(shape):,} bytes) but the file holds "
                        f"{len(raw) - header} data bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _numpy_core(submodule):
    """numpy's internal module `submodule` (named numpy._core.* since numpy 2, numpy.core.* before)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


# The only globals a CIFAR pickle needs: numpy array reconstruction and, for byte strings pickled by Python 3 with
# protocol 2, codecs.encode. Anything else in a file is refused instead of executed.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct,
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_core("multiarray").scalar,
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer,
    ("_codecs", "encode"): lambda: importlib.import_module("_codecs").encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals listed in `_ALLOWED_GLOBALS`."""

    def find_class(self, module, name):
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return make()


def read_cifar_pickle(path):
    """Load one CIFAR python batch file; returns its dict with keys decoded to str."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}; the file is corrupt") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR batch dict (found {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batches(paths, label_key, num_classes):
    """Read and concatenate CIFAR batch files.

    Returns images uint8 (N, 3, 32, 32) (channel planes R, G, B) and labels int64 (N,) in [0, num_classes).
    """
    images, labels = [], []
    for path in paths:
        batch = read_cifar_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{path}: CIFAR batch lacks the '{label_key}' or 'data' entry (has {sorted(batch)}); "
                            f"wrong or corrupt file")
        data = np.asarray(batch["data"])
        lab = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        if len(lab) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(lab)} labels")
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(f"{path}: labels outside [0, {num_classes}) (found {lab.min()}..{lab.max()})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def read_svhn_mat(path):
    """Read an SVHN `*_32x32.mat` file.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,) in [0, 10), with the file's label 10 mapped to digit 0
    (the same convention as torchvision's SVHN).
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path), variable_names=("X", "y"))
    except Exception as e:  # scipy raises several unrelated types for a damaged .mat file
        raise DataError(f"cannot read SVHN file {path}: {type(e).__name__}: {e}; the file is corrupt") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: SVHN file lacks the 'X' or 'y' variable; wrong or corrupt file")
    x, y = mat["X"], np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: 'X' is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    if x.shape[3] != len(y):
        raise DataError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: SVHN labels outside 1..10 (found {y.min()}..{y.max()})")
    y[y == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y
