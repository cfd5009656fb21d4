"""Atomic checkpoints and RNG states.

``save(path, obj)`` writes ``obj`` (a dict of tensors and plain Python values, e.g. ``LatePhase.state_dict()``) through
:func:`atomic_write`: a temporary file in the same folder, flushed to disk and renamed over ``path`` (os.replace), so
a crash never leaves a truncated checkpoint. ``load(path)`` reads it back with ``torch.load(weights_only=True)``: no arbitrary pickled objects; a file
that cannot be read as a checkpoint raises :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import pickle
import random

import numpy as np
import torch

from .errors import LatePhaseError


class CheckpointError(LatePhaseError):
    """A file exists but cannot be read as a checkpoint (damaged, truncated, or not a checkpoint)."""


def atomic_write(path, write) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file (binary mode) in the same folder, which is
    flushed, fsynced and renamed over ``path`` (os.replace), and the folder entry is fsynced; on any failure the
    temporary file is removed and ``path`` keeps its previous content. ``write`` may also be bytes or a str."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    data = write.encode() if isinstance(write, str) else write
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, (bytes, bytearray)):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path, obj) -> None:
    """Write ``obj`` to ``path`` atomically with torch.save (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path, map_location="cpu"):
    """Read a checkpoint written by :func:`save` (tensors and plain values only: ``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LatePhaseError(f"no checkpoint at {path!r}; check the path (or start from scratch)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError, IndexError,
            AttributeError) as e:  # what torch.load raises for truncated, damaged or foreign files
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}): the file is damaged "
                              f"or not a checkpoint") from e


def rng_state() -> dict:
    """The states of every random number generator a training loop may draw from: torch (CPU), CUDA (all devices,
    when available), numpy's global generator and Python's ``random``, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state` (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            raise LatePhaseError(f"the checkpoint holds RNG states of {len(cuda)} CUDA devices but "
                                 f"{torch.cuda.device_count()} are visible; resume with the same devices or pass "
                                 f"restore_rng=False")
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
