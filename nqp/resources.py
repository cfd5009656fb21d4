"""The machine's limits a request must fit: memory (lower bounds of what a command will allocate, checked before
anything is allocated) and CPUs (worker threads).

A refusal is one :class:`~nqp.errors.NQPError` line naming the amount needed, the memory this machine has and the
flags that set the largest parts. The estimates are lower bounds, so a request is refused only when it cannot fit.

This is the torch-free base layer's single copy of these readers: shared/ and deep/ use them too (deep.system asks
:func:`memory_limit` for the CPU's memory and words its refusals with :func:`memory_refusal`; shared.checkpoint sizes
its messages with :func:`format_bytes`).
"""
from __future__ import annotations

import os

from .errors import NQPError

FLOAT = 8   # bytes of a float64


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units (e.g. 1.5 GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"    # pragma: no cover (the loop returns at PiB)


def memory_limit() -> int | None:
    """Bytes of memory this process can have: the physical memory, or less where a cgroup limit or an address-space
    limit (ulimit -v) is set. None where it cannot be told."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def memory_refusal(needs: list, subject: str, limit: int | None, where: str = "this machine",
                   kind: str = "") -> str | None:
    """The one-line refusal of `needs` ((what, bytes, flags that change it), lower bounds of what is allocated at the
    same time) against `limit` bytes, or None when they fit (or the limit is unknown): the total, the memory `where`
    has and the largest needs with their flags."""
    needs = [(what, float(b), flags) for what, b, flags in needs]
    total = sum(b for _, b, _ in needs)
    if limit is None or total <= limit:
        return None
    largest = sorted(needs, key=lambda n: -n[1])
    parts = "; ".join(f"{what}: {format_bytes(b)} ({flags})" for what, b, flags in largest[:3]
                      if b >= total / 20 or b == largest[0][1])
    return (f"{subject} needs at least {format_bytes(total)} of {kind + ' ' if kind else ''}memory but {where} has "
            f"{format_bytes(limit)}: {parts}; lower those settings")


def check_memory(needs: list, subject: str) -> None:
    """Refuse (NQPError) a request whose memory cannot fit this machine (see :func:`memory_refusal`)."""
    line = memory_refusal(needs, subject, memory_limit())
    if line:
        raise NQPError(line)


def cpu_count() -> int:
    """CPUs this process may run on (the larger of the machine's count and the affinity mask's)."""
    n = os.cpu_count() or 1
    try:
        n = max(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return n


def check_threads(threads: int | None) -> None:
    """Refuse more worker threads than CPUs (results do not depend on the number of threads; more only slows)."""
    n = cpu_count()
    if threads is not None and threads > n:
        raise NQPError(f"`threads` {threads}: this machine has {n} CPU{'s' if n > 1 else ''}; give at most {n} "
                       f"(the results do not depend on the number of threads)")
