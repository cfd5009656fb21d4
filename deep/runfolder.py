"""The run folder (``--out``): which values are accepted, and one run per folder at a time.

A run holds the file ``lock`` in its folder for as long as it lives: an exclusive ``flock`` on it, and the owner's
pid, host, start time and command as JSON inside (for the message a second run gets). A second run on the same
folder -- another process, on this machine or, where the file system supports locks, on another one -- is refused
with one line naming the owner. The operating system drops the lock when its process ends, however it ends, so a lock
file left behind by a killed run (its pid no longer running) is simply taken over, with a note. The lock file is
removed when the run ends normally, with an error or on Ctrl-C. The lock file is opened without following a symbolic
link and must be a regular file (a planted ``lock -> somewhere`` is refused, its target untouched), and what is
removed is the folder's entry ``lock``, never a link's target (deep.untrusted). Within one process a new run on a
folder that this process already holds takes it over (e.g. a notebook re-creating a trainer after an exception).
Under torchrun only rank 0 holds the lock. On a file system without ``flock`` the pid is checked instead.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time

from nqp.files import pid_alive

from .errors import DeepError
from .untrusted import open_nofollow

LOCK_NAME = "lock"


def default_out(name: str, seed: int) -> str:
    """The run folder when --out is not given: runs/<config name>_seed<seed>."""
    return os.path.join("runs", f"{name}_seed{seed}")


def check_out_value(out: str) -> str:
    """``out`` if it is a usable --out value, else a DeepError: empty, blank, with surrounding whitespace or control
    characters (a quoting mistake), or the root of the file system."""
    if not isinstance(out, (str, os.PathLike)):
        raise DeepError(f"--out must be a folder path, got {out!r}")
    text = os.fspath(out)
    if not text.strip():
        raise DeepError(f"--out {text!r} is empty; give the run folder, e.g. --out runs/my_run (or leave --out out "
                        f"for runs/CONFIG_seedSEED)")
    if text != text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise DeepError(f"--out {text!r} has surrounding whitespace or control characters (a quoting mistake?); "
                        f"give a plain folder path")
    if os.path.abspath(text) == os.path.abspath(os.sep):
        raise DeepError(f"--out {text!r} is the root of the file system; give a folder for the run")
    return text


def in_use(folder: str, info: dict) -> str:
    """The one line for a run folder that another run holds."""
    return (f"--out {folder} is in use by another run ({_describe(info)}; lock file "
            f"{os.path.join(folder, LOCK_NAME)}): wait for it to end, stop it, or choose another --out")


def _describe(info: dict) -> str:
    parts = [f"process {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("started"):
        parts.append(f"since {info['started']}")
    return " ".join(parts)


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 65536).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _other_live_owner(info: dict) -> bool:
    """Whether the lock file's ``info`` names another process that may still run (used where there is no flock)."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    return host not in (None, socket.gethostname()) or pid_alive(pid)


def _flock_briefly(fd: int) -> None:
    """An exclusive flock, retried for a moment: another process's :func:`holder` probe holds a shared lock for
    microseconds. Raises BlockingIOError when a run holds the file."""
    for attempt in range(5):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 4:
                raise
            time.sleep(0.02)


_HELD: dict[str, list] = {}   # real path of a lock file -> [fd, holders, pid] held by this process


class RunLock:
    """The lock of run folder ``folder`` (which must exist), acquired on construction; :meth:`release` (or leaving
    a ``with`` block, or the end of the process) gives it back. Raises DeepError when another run holds it."""

    def __init__(self, folder: str, command: str | None = None):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.key = _key(folder)
        self.released = False
        held = _HELD.get(self.key)
        if held is not None and held[2] == os.getpid():
            held[1] += 1  # this process holds the folder already: the newer run takes it over
            return
        fd = self._acquire(command)
        _HELD[self.key] = [fd, 1, os.getpid()]

    def _acquire(self, command: str | None) -> int:
        while True:
            try:
                fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
            except DeepError as e:
                raise DeepError(f"--out {self.folder}: the lock file {e}, or choose another --out") from None
            except OSError as e:
                raise DeepError(f"cannot create the lock file {self.path}: {e.strerror}; choose another --out") \
                    from None
            try:
                _flock_briefly(fd)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise DeepError(in_use(self.folder, info)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise DeepError(f"cannot lock {self.path}: {e.strerror}; choose another --out") from None
                self._check_pid(fd)  # no flock on this file system: the pid decides
            try:  # the previous owner may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous.get("pid") not in (None, os.getpid()):
                print(f"note: {self.folder}: the run of {_describe(previous)} ended without releasing its lock; "
                      f"taking the folder over", file=sys.stderr)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "command": command or " ".join(sys.argv)}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except OSError as e:
                try:
                    os.unlink(self.path)  # ours (we hold its flock): leave nothing behind
                except OSError:
                    pass
                os.close(fd)
                raise DeepError(f"cannot write the lock file {self.path}: {e.strerror}; free space or choose another "
                                f"--out") from None
            return fd

    def _check_pid(self, fd: int) -> None:
        info = _read(fd)
        if _other_live_owner(info):
            os.close(fd)
            raise DeepError(f"--out {self.folder} is in use by another run ({_describe(info)}; lock file "
                            f"{self.path}; this file system has no locks, so delete that file if the run is over): "
                            f"wait for it to end, or choose another --out")

    def release(self) -> None:
        """Give the folder back (idempotent); the lock file is removed when the last holder in this process goes."""
        if self.released:
            return
        self.released = True
        held = _HELD.get(self.key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] == 0:
            _close(self.key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # at interpreter shutdown the modules may be gone
            pass


def _key(folder: str) -> str:
    """The lock file's path with the folder resolved but not the name ``lock`` itself: removing it removes the entry,
    whatever it has become, never a link's target."""
    return os.path.join(os.path.realpath(folder), LOCK_NAME)


def _close(key: str) -> None:
    fd, _, pid = _HELD.pop(key)
    if pid != os.getpid():
        return  # a forked child: the parent still holds the lock
    try:
        if os.path.samestat(os.fstat(fd), os.lstat(key)):
            os.unlink(key)
    except OSError:
        pass
    finally:
        os.close(fd)


def holder(folder: str) -> dict | None:
    """Who holds the lock of ``folder`` (the lock file's JSON) when another process does, else None."""
    path = os.path.join(folder, LOCK_NAME)
    if _key(folder) in _HELD:
        return None
    try:
        fd = open_nofollow(path)  # a link or a folder named lock holds nothing (RunLock refuses it)
    except (OSError, DeepError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        except OSError:
            info = _read(fd)
            return info if _other_live_owner(info) else None
        return None
    finally:
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in [k for k, v in _HELD.items() if v[2] == os.getpid()]:
        _close(key)
