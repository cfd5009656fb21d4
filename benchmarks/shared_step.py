"""Throughput of one training step: plain SGD vs the sequential and the vectorized late-phase step (Algorithm 1).

All three are measured side by side in one run, in interleaved rounds (plain, sequential, vectorized, plain, ...) so
that a change of machine load hits them alike; the table reports the median over rounds. Equal per-member batch: a
plain SGD step sees B images, a late-phase outer step K B images (B per member). One round times K plain steps and one
outer step of each late-phase path, i.e. K B images each. Late-phase weights: BatchNorm + classifier head (the
reference CIFAR setting), SGD with Nesterov momentum for theta, phi and the plain model.

    python benchmarks/shared_step.py                                   # WRN-16-4 on the CPU, K = 10, B = 16
    python benchmarks/shared_step.py --device cuda --arch 28-10 --batch 128 --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep.models import wrn  # noqa: E402
from shared import BatchNorm, Head, LatePhase, sgd  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="16-4", help="WRN depth-width (default 16-4; 28-10 for the paper's network)")
    ap.add_argument("--K", type=int, default=10, help="members (default 10)")
    ap.add_argument("--batch", type=int, default=None, help="per-member minibatch B (default 16 on CPU, 128 on GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc settings on the CPU (see keep_freed_memory)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    malloc = "system malloc defaults"
    if device.type == "cpu" and not args.system_malloc:
        malloc = keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch or (128 if device.type == "cuda" else 16)
    K = args.K
    depth, width = (int(v) for v in args.arch.split("-"))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = torch.bfloat16 if args.bf16 else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    base = wrn(depth, width, args.classes).to(device, memory_format=fmt)
    n_params = sum(p.numel() for p in base.parameters())
    x = torch.randn(K * B, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, args.classes, (K * B,), device=device)

    plain = copy.deepcopy(base)
    opt = sgd()(list(plain.parameters()))

    def plain_round():
        for k in range(K):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = F.cross_entropy(plain(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B])
            loss.backward()
            opt.step()

    runs = {"plain SGD": plain_round}
    for path in ("sequential", "vectorized"):
        lp = LatePhase(copy.deepcopy(base), K, [BatchNorm(), Head()], path=path, autocast=autocast,
                       check_finite_every=1 if device.type == "cpu" else 50)
        runs[f"late-phase {path}"] = (lambda lp=lp: lp.step(x, y, F.cross_entropy))

    times = {name: [] for name in runs}
    for r in range(args.warmup + args.rounds):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    images = K * B
    plain_rate = images / statistics.median(times["plain SGD"])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"# late-phase step throughput -- {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"torch {torch.__version__}, device {device.type} ({dev_name}), threads {torch.get_num_threads()}, "
          f"dtype {'bf16 autocast' if autocast else 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{malloc}")
    print(f"WRN-{args.arch} ({n_params / 1e6:.2f} M parameters), {args.image_size}x{args.image_size} inputs, K={K}, "
          f"B={B} per member ({images} images per round), late-phase BatchNorm + head, {args.rounds} rounds "
          f"(median) after {args.warmup} warm-up")
    print()
    print("| step | images/s | per image vs plain SGD | round time (s), median [min, max] |")
    print("|---|---:|---:|---|")
    for name, ts in times.items():
        rate = images / statistics.median(ts)
        print(f"| {name} | {rate:.1f} | {rate / plain_rate:.2f}x | {statistics.median(ts):.3f} "
              f"[{min(ts):.3f}, {max(ts):.3f}] |")


if __name__ == "__main__":
    main()
