"""Throughput of the GPULoader training pipeline (gather, crop, flip, normalise, optional cutout) in images/s.

Runs on CUDA when available, else on the CPU, with synthetic CIFAR-shaped data and the late-phase batch of
K·128 images. Usage, from the repository root:
    python -m benchmarks.data_pipeline [--batches 20] [--members 10] [--cutout 16] [--dtype bf16]
"""

import argparse
import statistics
import time

import torch

from deep.data import GPULoader, load_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20, help="timed batches (after 2 warm-up batches); the median is robust to other load on the machine")
    parser.add_argument("--members", type=int, default=10, help="K: the batch is K·128 images")
    parser.add_argument("--cutout", type=int, default=0, help="cutout square side in pixels (0: off)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    batch = 128 * args.members
    data = load_dataset("synthetic", split="train", size=batch * (args.batches + 2))
    loader = GPULoader(data, batch, train=True, device=args.device, cutout=args.cutout, dtype=dtype,
                       channels_last=True)
    it = iter(loader)
    for _ in range(2):
        next(it)
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.batches):
        sync()
        start = time.perf_counter()
        next(it)
        sync()
        times.append(time.perf_counter() - start)
    median, total = statistics.median(times), sum(times)
    print(f"device {loader.device}, torch threads {torch.get_num_threads()}, batch {batch}, dtype {args.dtype}, "
          f"cutout {args.cutout}: median {batch / median:,.0f} images/s ({1e3 * median:.1f} ms per batch), "
          f"mean {args.batches * batch / total:,.0f} images/s over {args.batches} batches")

if __name__ == "__main__":
    main()
