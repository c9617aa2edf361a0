"""Benchmark of the README's segmentation demo: wall time of `segmentation/train.py` on the bundled
digit scenes and the mIoU it reaches (single-scale, on the 200 validation scenes).

    python benchmarks/segmentation_demo.py [extra segmentation/train.py arguments]

Threads: torch's default (one per core) unless OMP_NUM_THREADS is set. The first run also writes
the digit scenes once (a few seconds, included in the wall time).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_MIOU = 0.6


def main(extra: list[str]) -> None:
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        subprocess.run([sys.executable, "segmentation/train.py", "--cfg", "configs/segmentation/demo_digits.yaml",
                        "--output", output, *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(os.path.join(output, "seg_demo_digits", "default", "metrics.jsonl")) as f:
            evaluations = [json.loads(line) for line in f]
    reached = next((e for e in evaluations if e["mIoU"] >= TARGET_MIOU), None)
    first = f"iteration {reached['iteration']} after {reached['seconds'] / 60:.1f} min of training" if reached else "never"
    print(f"wall {wall / 60:.1f} min (start-up and evaluations included), {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average at start {load:.1f}")
    print("mIoU by iteration: " + ", ".join(f"{e['iteration']}: {100 * e['mIoU']:.1f}%" for e in evaluations))
    print(f"final mIoU {100 * evaluations[-1]['mIoU']:.2f}%; first evaluation at >= {100 * TARGET_MIOU:.0f}%: {first}")


if __name__ == "__main__":
    main(sys.argv[1:])
