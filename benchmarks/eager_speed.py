"""Eager inference time of CrossFormer-T at several input sizes (median of repeated forwards).

    python benchmarks/eager_speed.py [--threads 1] [--repeats 10] [--model crossformer_tiny_patch4_group7_224]

Run it before and after a change to the model's forward to see what the change costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timm  # noqa: E402

import crossformer  # noqa: E402,F401  (registers the models)

SIZES = ((224, 224), (256, 256), (288, 320))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--model", default="crossformer_tiny_patch4_group7_224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model).eval()
    for height, width in SIZES:
        x = torch.randn(args.batch, 3, height, width)
        times = []
        with torch.inference_mode():
            model(x)  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        print(f"{args.model} batch {args.batch} {height}x{width}: median {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f}) over {args.repeats}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
