"""`python -m deep bench`: training-step throughput of plain SGD vs the sequential and the vectorized late-phase step.

All three are measured side by side in one run, in interleaved rounds (plain, sequential, vectorized, plain, ...) so
that a change of machine load hits them alike; the table reports the median over rounds, the ratio per image to plain
SGD and the estimated TFLOP/s (training FLOPs = 3 x 2 x forward multiply-accumulates, counted with hooks). Equal
per-member batch: a plain SGD step sees B images, a late-phase outer step K B images (B per member); one round times K
plain steps and one outer step of each late-phase path. Late-phase weights: BatchNorm + classifier head (the reference
CIFAR setting), SGD with Nesterov momentum. Inputs are synthetic tensors already on the device (the model's speed,
not the data pipeline's).

    python -m deep bench                                   # CUDA: WRN-28-10, B=128, K=10 (add --bf16 --channels-last)
    python -m deep bench --device cpu --arch 16-4 --batch 16
"""
from __future__ import annotations

import copy
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

from shared import BatchNorm, Head, LatePhase, sgd
from shared.core import maybe_autocast

from .models import wrn
from .models.wrn import wrn_size
from .errors import DeepError
from .system import check_memory, cpu_name, keep_freed_memory, pick_device, sync
from .trainer import forward_macs

MIN_IMAGE_SIZE = 8  # the WRN halves the resolution twice; BatchNorm needs more than one value per channel


def add_arguments(ap):
    ap.add_argument("--arch", default=None,
                    help="WRN depth-width, e.g. 16-4 or wrn-16-4 (default 28-10 on CUDA, 16-4 on the CPU)")
    ap.add_argument("--K", type=int, default=10, help="members (default 10)")
    ap.add_argument("--batch", type=int, default=None, help="per-member minibatch B (default 16 on CPU, 128 on GPU)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward passes")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--system-malloc", action="store_true",
                    help="keep glibc's default malloc settings on the CPU (see keep_freed_memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model's forward")


def parse_arch(arch: str) -> tuple[int, int]:
    """(depth, width) of a WRN named DEPTH-WIDTH or wrn-DEPTH-WIDTH, with DEPTH = 6n + 4 >= 10 and WIDTH >= 1."""
    parts = arch.lower().removeprefix("wrn-").split("-")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise DeepError(f"--arch {arch}: expected WRN DEPTH-WIDTH such as 16-4 or wrn-16-4")
    depth, width = int(parts[0]), int(parts[1])
    if depth < 10 or (depth - 4) % 6:
        raise DeepError(f"--arch {arch}: the WRN depth must be 6n + 4 >= 10 (e.g. 16, 28), got {depth}")
    if width < 1:
        raise DeepError(f"--arch {arch}: the WRN width must be >= 1")
    return depth, width


def check_arguments(args) -> None:
    """Raise DeepError for the first argument out of range (--K, --batch, --rounds, ...)."""
    rules = [("--K", args.K, 1), ("--batch", args.batch, 1), ("--rounds", args.rounds, 1),
             ("--warmup", args.warmup, 0), ("--threads", args.threads, 1),
             ("--image-size", args.image_size, MIN_IMAGE_SIZE), ("--classes", args.classes, 1)]
    for flag, value, least in rules:
        if value is not None and value < least:
            why = " (the WRN downsamples by 4)" if flag == "--image-size" else ""
            raise DeepError(f"{flag} must be >= {least}{why}, got {value}")
    cpus = os.cpu_count() or 1
    if args.threads is not None and args.threads > cpus:
        raise DeepError(f"--threads {args.threads} is more than the {cpus} CPUs here; use --threads {cpus} or fewer")


def memory_needs(depth: int, width: int, args, K: int, B: int) -> list:
    """Lower bounds of what the benchmark allocates: the base model, its plain copy and two late-phase copies
    (weights, gradients, momentum), the activations of the largest step (K B images) and the input batch."""
    size = wrn_size(depth, width, args.classes, 3, args.image_size)
    element = 2 if args.bf16 else 4
    image = 3 * args.image_size ** 2
    return [(f"four WRN-{depth}-{width} copies ({size.parameters:,} parameters each) with gradients and momentum",
             4 * 3 * 4 * size.parameters, "--arch, --classes"),
            (f"the activations of {K * B} images of {args.image_size}x{args.image_size} per step",
             element * K * B * size.activations, "--batch, --K, --image-size"),
            (f"the input batch of {K * B} images", 4 * K * B * image, "--batch, --K, --image-size")]


def main(args) -> int:
    """Run the benchmark for parsed arguments (see add_arguments); prints a markdown table."""
    check_arguments(args)
    device = pick_device(args.device)
    args.arch = args.arch or ("28-10" if device.type == "cuda" else "16-4")
    depth, width = parse_arch(args.arch)
    malloc = "system malloc defaults"
    if device.type == "cpu" and not args.system_malloc:
        malloc = keep_freed_memory()
    B = args.batch if args.batch is not None else (128 if device.type == "cuda" else 16)
    K = args.K
    check_memory(device, memory_needs(depth, width, args, K, B), "the benchmark")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    autocast = torch.bfloat16 if args.bf16 else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    base = wrn(depth, width, args.classes).to(device, memory_format=fmt)
    n_params = sum(p.numel() for p in base.parameters())
    macs = forward_macs(base, (torch.randn(1, 3, args.image_size, args.image_size, device=device), 1))
    x = torch.randn(K * B, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, args.classes, (K * B,), device=device)

    plain = copy.deepcopy(base)
    if args.compile:
        plain.compile()
    opt = sgd()(list(plain.parameters()))

    def plain_round():
        for k in range(K):
            opt.zero_grad(set_to_none=True)
            with maybe_autocast(device, autocast):
                loss = F.cross_entropy(plain(x[k * B:(k + 1) * B]), y[k * B:(k + 1) * B])
            loss.backward()
            opt.step()

    runs = {"plain SGD": plain_round}
    for path in ("sequential", "vectorized"):
        lp = LatePhase(copy.deepcopy(base), K, [BatchNorm(), Head()], theta_optimizer=sgd(), phi_optimizer=sgd(),
                       path=path, autocast=autocast, check_finite_every=1 if device.type == "cpu" else 50)
        if args.compile:
            lp.model.compile()
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
    print(f"WRN-{depth}-{width} ({n_params / 1e6:.2f} M parameters), {args.image_size}x{args.image_size} inputs, "
          f"K={K}, B={B} per member ({images} images per round), late-phase BatchNorm + head, {args.rounds} rounds "
          f"(median) after {args.warmup} warm-up")
    print()
    print(f"forward: {macs / 1e9:.3f} G multiply-accumulates per image; training FLOPs estimated as 3 x 2 x MACs = "
          f"{6 * macs / 1e9:.2f} GFLOP per image")
    print()
    print("| step | images/s | per image vs plain SGD | est. TFLOP/s | round time (s), median [min, max] |")
    print("|---|---:|---:|---:|---|")
    for name, ts in times.items():
        rate = images / statistics.median(ts)
        print(f"| {name} | {rate:.1f} | {rate / plain_rate:.2f}x | {rate * 6 * macs / 1e12:.3f} | "
              f"{statistics.median(ts):.3f} [{min(ts):.3f}, {max(ts):.3f}] |")
    return 0
