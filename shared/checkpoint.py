"""Atomic, verified checkpoints and RNG states.

``save(path, obj)`` writes ``obj`` (a dict of tensors and plain Python values, e.g. ``LatePhase.state_dict()``) through
:func:`atomic_write`: a temporary file in the same folder, flushed to disk and renamed over ``path`` (os.replace), so
a crash never leaves a truncated checkpoint. Next to ``obj`` the file holds its SHA-256 :func:`digest` (every tensor's
dtype, shape and bytes, and every other value, in order). ``load(path)`` reads it back with
``torch.load(weights_only=True)`` (no arbitrary pickled objects) and recomputes the digest: a file that cannot be read
as a checkpoint, or whose contents no longer match their digest (one flipped bit in the weights), raises
:class:`CheckpointError`. PyTorch's own loader checks neither the zip CRCs it writes nor anything else.

A failed write (disk full, quota, permissions) raises :class:`WriteError`, an OSError whose message is one line
naming the file, the bytes written and the space left; the temporary file is removed on every failure path, and
:func:`remove_stale_temporaries` clears those of processes that were killed mid-write.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import re
import warnings

import numpy as np
import torch

from nqp.files import disk_full, space_left
from nqp.files import remove_stale_temporaries as _remove_stale_temporaries
from nqp.resources import format_bytes

from .errors import LatePhaseError

FORMAT = "late-phase-checkpoint/1"   # the envelope save() writes: {"format", "sha256", "state"}


class CheckpointError(LatePhaseError):
    """A file exists but cannot be read as a checkpoint (damaged, truncated, or not a checkpoint). ``problem`` is
    what is wrong with the file (naming it), the message adds what to do."""

    def __init__(self, problem: str, advice: str = ""):
        super().__init__(f"{problem}; {advice}" if advice else problem)
        self.problem = problem


class WriteError(OSError):
    """Writing a file failed (disk full, quota exceeded, no permission, ...). ``errno`` is the operating system's;
    the message is one line naming the file, the bytes written before the failure and the space left."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class _Counting:
    """The temporary file as ``write`` sees it: counts the bytes written and remembers the OSError of a failed
    write (torch.save reports a failed write as a RuntimeError that does not say why)."""

    def __init__(self, f):
        self._f, self.written, self.error = f, 0, None

    def write(self, data):
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.written += len(data) if n is None else n
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write_error(path: str, e: OSError, written: int) -> WriteError:
    free = space_left(path)
    what = "disk full: " if disk_full(e) else ""
    return WriteError(e.errno, f"{what}cannot write {path}: {e.strerror or e} ({format_bytes(written)} written"
                               f"{', ' + free if free else ''})", path)


_TORCH_WRITE_FAILED = re.compile(r"PytorchStreamWriter failed writing|unexpected pos \d+ vs \d+")
_TEMPORARY = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _atomic_write_pid(name: str) -> int | None:
    """The process id in a temporary name of :func:`atomic_write` (``NAME.tmpPID``), else None."""
    m = _TEMPORARY.match(name)
    return int(m["pid"]) if m else None


def remove_stale_temporaries(folder) -> list[str]:
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` when its process was killed mid-write
    (``NAME.tmpPID`` with PID no longer running on this machine); returns their names."""
    return _remove_stale_temporaries(folder, writer_pid=_atomic_write_pid)


def atomic_write(path, write) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file (binary mode) in the same folder, which is
    flushed, fsynced and renamed over ``path`` (os.replace), and the folder entry is fsynced; on any failure (an
    exception, Ctrl-C) the temporary file is removed and ``path`` keeps its previous content. ``write`` may also be
    bytes or a str. An operating-system error (disk full, no permission, ...) raises :class:`WriteError`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    data = write.encode() if isinstance(write, str) else write
    counting = None
    try:
        try:  # a leftover (or planted) entry of that name, a link included, is removed -- never written through
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        with open(tmp, "xb") as f:  # O_EXCL: created here, so never a link (one planted meanwhile is refused)
            counting = _Counting(f)
            if isinstance(data, (bytes, bytearray)):
                counting.write(data)
            else:
                data(counting)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        cause = e if isinstance(e, OSError) else (counting.error if counting is not None else None)
        if cause is None and isinstance(e, RuntimeError) and _TORCH_WRITE_FAILED.search(str(e)):
            cause = OSError(errno.EIO, "the write failed")  # torch's writer failed without a Python-level error
        error = None
        if cause is not None and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            error = _write_error(path, cause, counting.written if counting is not None else 0)  # space before cleanup
        try:
            os.remove(tmp)
        except OSError:
            pass
        if error is not None:
            raise error from e
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


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    else:
        text = repr(obj).encode()
        h.update(f"{type(obj).__name__}{len(text)};".encode() + text)


def digest(obj) -> str:
    """SHA-256 (hex) of ``obj``'s contents: every tensor's dtype, shape and bytes, and every other value, in order
    (dicts, lists and tuples recursively). Equal for an object and what torch.save/torch.load make of it."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save(path, obj) -> None:
    """Write ``obj`` to ``path`` atomically with torch.save (see :func:`atomic_write`), with its SHA-256
    :func:`digest`, which :func:`load` verifies."""
    envelope = {"format": FORMAT, "sha256": digest(obj), "state": obj}
    atomic_write(path, lambda f: torch.save(envelope, f))


def load(path, map_location="cpu", verify: bool = True):
    """Read a checkpoint written by :func:`save` (tensors and plain values only: ``weights_only=True``) and check its
    contents against the stored digest. A file that cannot be read, that does not match its digest, or (with
    ``verify``) that has none raises :class:`CheckpointError`; ``verify=False`` also returns files without a
    digest (e.g. written by torch.save) unchecked."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LatePhaseError(f"no checkpoint at {path!r}; check the path (or start from scratch)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file", "check the path")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OSError) as e:  # what torch.load raises for truncated, damaged or foreign files
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}): the file is damaged "
                              f"or not a checkpoint", "restore it from a copy, or start afresh") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT and set(obj) == {"format", "sha256", "state"}:
        if digest(obj["state"]) != obj["sha256"]:
            raise CheckpointError(f"{path} is damaged: its contents do not match the SHA-256 digest written with it "
                                  f"(changed bits in the weights or values)", "restore it from a copy, or start afresh")
        return obj["state"]
    if verify:
        raise CheckpointError(f"{path} has no integrity digest (damaged, or not written by shared.save), so it "
                              f"cannot be verified", "read a trusted file with shared.load(path, verify=False)")
    return obj


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
