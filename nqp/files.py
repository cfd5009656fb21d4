"""Output files, written atomically and together.

Each file is written to a temporary file beside its destination (``.NAME.HOST.PID.TOKEN.tmp``) and renamed into place
only when every file of the set has been written (:class:`Outputs`), so a failure (a full disk, a refused path, an
error or Ctrl-C while plotting) leaves the earlier files untouched and no temporary file behind. A failed write is one
:class:`OutputError` line naming the destination and, for a full disk, the space left there. Temporary files of
writers that were killed (their process is gone) are removed the next time a file is written to that folder.

The plumbing here (:func:`pid_alive`, :func:`remove_stale_temporaries`, :func:`disk_full`, :func:`space_left`) is the
torch-free base layer's single copy: shared/ (checkpoints) and deep/ (run folders, study jobs) use it too.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
import threading

from .errors import NQPError
from .resources import format_bytes

SUFFIX = ".tmp"
# a full disk or an exhausted quota (EDQUOT is missing on some systems); EFBIG ("file too large") is a size limit of
# the file or the file system, not a full disk, so its own reason is shown instead
_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_cleaned: set = set()
_lock = threading.Lock()


class OutputError(NQPError):
    """An output file could not be written (the message names the file and what to do)."""


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "host")


def temporary_name(dest: str) -> str:
    """A fresh temporary path beside `dest`, naming this host and process (so a stale one can be recognised)."""
    folder, base = os.path.split(os.path.abspath(dest))
    return os.path.join(folder, f".{base}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{SUFFIX}")


def pid_alive(pid) -> bool:
    """Whether a process with id ``pid`` may be running on this machine. False for anything that is not a positive
    integer (no process has it) and for a process that is gone; True for one that exists, including one of another
    user's (it cannot be signalled but is running) and an id the operating system cannot even take (to be safe)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):    # PermissionError: it exists but belongs to someone else
        return True
    return True


def _output_writer_pid(name: str) -> int | None:
    """The process id in a temporary name of :func:`temporary_name` written on this host, else None."""
    if not (name.startswith(".") and name.endswith(SUFFIX)):
        return None
    parts = name[1:-len(SUFFIX)].rsplit(".", 3)
    if len(parts) != 4 or parts[1] != _host() or not parts[2].isdigit() or not re.fullmatch(r"[0-9a-f]{8}", parts[3]):
        return None
    return int(parts[2])


def remove_stale_temporaries(folder, writer_pid=_output_writer_pid) -> list[str]:
    """Remove the temporary files in ``folder`` whose writer's process is gone; returns their names. ``writer_pid``
    tells a temporary file's writer from its name (None: not a temporary file, or one of another machine); by default
    the names of :func:`temporary_name` on this host. Another writer's files (its process runs) and this process's own
    are kept, and a file that cannot be removed is left."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = writer_pid(name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        try:
            os.remove(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def disk_full(e: OSError) -> bool:
    """Whether the failed write ``e`` failed for want of space (a full disk or an exhausted quota)."""
    return e.errno in _FULL


def space_left(path) -> str | None:
    """The free space of the file system that holds ``path``'s folder, as "1.5 GiB free there"; None where it cannot
    be measured. Measured before a failed write's partial file is removed, it is the space the write found."""
    try:
        return f"{format_bytes(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)} free there"
    except OSError:
        return None


def describe(e: OSError, dest: str) -> str:
    """One line for a failed write of `dest`: the reason and, for a full disk, the space left there."""
    if disk_full(e):
        return f"cannot write {dest}: the disk is full ({space_left(dest) or 'no space left'}); free some space or " \
               f"choose another --out"
    reason = e.strerror or str(e)
    return f"cannot write {dest}: {reason[:1].lower() + reason[1:]}; choose another --out"


class Outputs:
    """A set of output files: each written to a temporary file beside its destination, all renamed into place by
    :meth:`commit` (on leaving the ``with`` block without an error); on any failure every temporary file is removed
    and no destination is changed."""

    def __init__(self):
        self._staged: list[tuple[str, str]] = []

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False

    def write(self, dest, writer) -> str:
        """Stage `dest`, written by writer(binary file object). Returns `dest`."""
        dest = os.fspath(dest)
        try:
            folder = os.path.dirname(os.path.abspath(dest))
            os.makedirs(folder, exist_ok=True)
            with _lock:
                first = folder not in _cleaned
                _cleaned.add(folder)
            if first:
                remove_stale_temporaries(folder)
            tmp = temporary_name(dest)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._staged.append((tmp, dest))        # registered first: a failure below removes it
            with os.fdopen(fd, "wb") as f:
                writer(f)
        except OSError as e:
            message = describe(e, dest)             # the space left is measured before the partial file goes
            self.discard()
            raise OutputError(message) from None
        except BaseException:
            self.discard()
            raise
        return dest

    def write_text(self, dest, text: str) -> str:
        return self.write(dest, lambda f: f.write(text.encode("utf-8")))

    def write_figure(self, dest, fig, **savefig) -> str:
        return self.write(dest, lambda f: fig.savefig(f, format="png", **savefig))

    def commit(self) -> None:
        """Rename every staged file into place."""
        while self._staged:
            tmp, dest = self._staged[0]
            try:
                os.replace(tmp, dest)
            except OSError as e:
                message = describe(e, dest)
                self.discard()
                raise OutputError(message) from None
            self._staged.pop(0)

    def discard(self) -> None:
        """Remove every staged temporary file."""
        for tmp, _ in self._staged:
            try:
                os.remove(tmp)
            except OSError:
                pass
        self._staged.clear()


def write_atomic(dest, text: str) -> str:
    """Write one text file atomically (see :class:`Outputs`). Returns `dest`."""
    with Outputs() as out:
        out.write_text(dest, text)
    return os.fspath(dest)


def check_writable(folder: str, flag: str = "--out") -> None:
    """Refuse a folder in which no file can be created (checked before any work, by creating and removing one)."""
    tmp = temporary_name(os.path.join(folder, "probe"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        reason = e.strerror or str(e)
        if disk_full(e):
            raise OutputError(f"{flag} {folder}: the disk is full; free some space or choose another {flag}") from None
        raise OutputError(f"{flag} {folder}: cannot write there ({reason[:1].lower() + reason[1:]}); choose another "
                          f"{flag}") from None
