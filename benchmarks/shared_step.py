"""Throughput of one training step on the CPU: plain SGD vs the sequential and the vectorized late-phase step.

A thin wrapper of `python -m deep bench` with CPU defaults (WRN-16-4, K = 10, B = 16 per member); any of its flags
can be given, e.g. `python benchmarks/shared_step.py --device cuda --arch 28-10 --batch 128 --bf16 --channels-last`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deep.bench import add_arguments, main  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.set_defaults(device="cpu")
    sys.exit(main(ap.parse_args()))
