"""Files that come from someone else: run folders, study folders, exports and study specs.

The principle: reading such a file never runs code and never reaches outside its folder, and nothing the project
writes or deletes follows a symbolic link. A planted link (``lock -> ~/.bashrc``, ``report.md -> /etc/...``) is
either refused with one line or replaced by the project's own file -- its target is never opened for writing,
truncated or deleted. The helpers here are the few primitives the rest of the package uses for that:

* :func:`open_nofollow` -- ``os.open`` that refuses a link (``O_NOFOLLOW``) and anything but a regular file;
* :func:`read_bytes`, :func:`read_json` -- whole files read that way (JSON with repeated keys refused);
* :func:`torch_load` -- tensors from such bytes with ``weights_only=True`` (no pickled objects built);
* :func:`write_png` -- a matplotlib figure written atomically (rendered to memory, then
  :func:`shared.checkpoint.atomic_write`, whose rename replaces a link instead of writing through it);
* :func:`subfolder` -- a folder below a root, created if missing, refused if it (or a folder between) is a link;
* :func:`sha256_file` -- the digest exports record for each of their files.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import stat

from shared.checkpoint import atomic_write

from .errors import DeepError


def open_nofollow(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC)``, refusing a symbolic link or a non-regular file with a
    DeepError (other OS errors propagate). The caller closes the descriptor."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or os.path.islink(path):
            raise DeepError(f"{path} is a symbolic link; the project never follows one here: delete it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeepError(f"{path} is not a regular file: delete or move it")
    return fd


def read_bytes(path: str) -> bytes:
    """The content of the regular file ``path`` (not through a link; see :func:`open_nofollow`)."""
    fd = open_nofollow(path)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _unique(pairs: list) -> dict:
    """json object_pairs_hook: an object whose keys repeat is refused (json would silently keep the last)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice in one object")
        out[k] = v
    return out


def loads(text) -> object:
    """``json.loads`` refusing repeated keys (ValueError), NaN and Infinity allowed as Python writes them."""
    return json.loads(text, object_pairs_hook=_unique)


def read_json(path: str) -> object:
    """The JSON in the regular file ``path`` (not through a link). Raises OSError, DeepError (a link) or ValueError
    (not JSON, repeated keys, too deeply nested)."""
    data = read_bytes(path)
    try:
        return loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def torch_load(data: bytes, map_location="cpu"):
    """``torch.load(weights_only=True)`` of bytes read from an untrusted file: tensors and plain containers only, no
    object of the file's choosing is built; torch's warning about a foreign pickle's protocol is silenced (the
    caller turns the failure into one line)."""
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def sha256_file(path: str) -> str:
    """The SHA-256 of a file's bytes, as hex (read without following a link)."""
    h = hashlib.sha256()
    fd = open_nofollow(path)
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_png(fig, path: str, **savefig) -> None:
    """Save the matplotlib figure ``fig`` as PNG to ``path`` atomically: a link at ``path`` is replaced, never
    written through, and a killed process leaves the previous figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    atomic_write(path, buf.getvalue())


def subfolder(root: str, *parts: str) -> str:
    """``root/parts...``, created if missing; a DeepError if any folder below ``root`` on the way is a symbolic link
    or not a folder (a planted link would make every file written there land outside ``root``)."""
    path = root
    for part in parts:
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise DeepError(f"{path} is a symbolic link; the project never writes through one: delete it")
        if os.path.exists(path) and not os.path.isdir(path):
            raise DeepError(f"{path} is not a folder: delete or move it")
        os.makedirs(path, exist_ok=True)
        if os.path.islink(path):  # created meanwhile by someone else
            raise DeepError(f"{path} is a symbolic link; the project never writes through one: delete it")
    return path
