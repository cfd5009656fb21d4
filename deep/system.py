"""The machine a run uses: device choice, CPU allocator setting, synchronisation for timings, and provenance."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

from nqp.resources import memory_refusal
from nqp.resources import memory_limit as machine_memory

from .errors import DeepError


def pick_device(device: str | None) -> torch.device:
    """``torch.device`` for a --device value (default: this rank's GPU where CUDA is available, else the CPU),
    checked: a CPU or CUDA device that exists here (else a one-line DeepError)."""
    if device is None:
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeepError(f"--device {device}: not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeepError(f"--device {device}: not supported (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DeepError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise DeepError(f"--device {device}: there are only {n} CUDA device(s) here (cuda:0 to cuda:{n - 1})")
    return dev


def memory_limit(device: torch.device) -> int | None:
    """Bytes of memory a run can have on ``device``: a GPU's total memory; for the CPU the physical memory, or less
    where a cgroup limit or an address-space limit (ulimit -v) is set (:func:`nqp.resources.memory_limit`). None
    where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory() if device.type == "cpu" else None


def check_memory(device: torch.device, needs: list, subject: str = "the run") -> None:
    """Refuse (one-line DeepError) a run or benchmark whose memory needs cannot fit ``device``: ``needs`` holds
    (what, bytes, flags that change it), lower bounds of what will be allocated. The line names the total, the
    device's memory and the largest needs with their flags."""
    where = f"the GPU {device}" if device.type == "cuda" else "this machine"
    line = memory_refusal(needs, subject, memory_limit(device), where, device.type.upper())
    if line:
        raise DeepError(line)


def keep_freed_memory() -> str:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD at 2 GiB). With the defaults, every step of a large stacked batch maps and page-faults its
    activations afresh (blocks above 32 MiB are mmap'ed and unmapped each time), which on the CPU costs the
    vectorized path ~40 %; jemalloc or tcmalloc have the same effect. Returns a line for the provenance."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 2 ** 31 - 1) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc malloc keeps freed memory (mallopt)" if ok else "system malloc (mallopt unavailable)"


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so that wall-clock timings cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("late-phase")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return None


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from, with a "+dirty" mark for local changes (None outside
    a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: torch.device, amp=None, channels_last: bool = False) -> dict:
    """Provenance of the measurements: device and its model, the precision and memory format actually used, torch,
    CUDA and Python versions, threads, this package's version and git commit."""
    info = {"device": str(device), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "precision": "bf16 autocast" if amp is not None else "float32",
            "memory_format": "channels_last" if channels_last else "contiguous",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "package_version": _package_version(), "git_commit": _git_commit()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
