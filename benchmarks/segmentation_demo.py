"""Benchmark of the segmentation demo: wall time of `segmentation/train.py` on the bundled digit
scenes and the mIoU it reaches (single-scale, on the 200 validation scenes).

    python benchmarks/segmentation_demo.py [--neighbour] [--threads N] [--output DIR] [extra arguments]

``--neighbour`` runs it beside one busy process (see benchmarks/demo.py). The first run also
writes the digit scenes once (a few seconds, included in the wall time).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import benchmark  # noqa: E402

TARGET_MIOU = 0.6


def main() -> None:
    evaluations = benchmark(__doc__.splitlines()[0], "configs/segmentation/demo_digits.yaml", "segmentation/train.py")
    reached = next((e for e in evaluations if e["mIoU"] >= TARGET_MIOU), None)
    first = f"iteration {reached['iteration']} after {reached['wall_min']:.1f} wall min" if reached else "never"
    print("mIoU by iteration: " + ", ".join(f"{e['iteration']}: {100 * e['mIoU']:.1f}%" for e in evaluations))
    print(f"final mIoU {100 * evaluations[-1]['mIoU']:.2f}%; first evaluation at >= {100 * TARGET_MIOU:.0f}%: {first}")


if __name__ == "__main__":
    main()
