"""The detection demo figure of the docs: train configs/detection/demo_digits.yaml on the CPU and
report, per epoch, bbox AP50 / AP and segm AP with the wall-clock and CPU minutes since the start
(data generation, if needed, included), and when bbox AP50 first reached 0.7.

    python benchmarks/detection_demo.py [--cfg CONFIG] [--neighbour] [--threads N] [--output DIR] [--data-path DIR]

``--neighbour`` runs it beside one busy process (see benchmarks/demo.py). The run folder is a
fresh temporary one unless --output is given.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import benchmark  # noqa: E402

TARGET_AP50 = 0.7


def main() -> int:
    records = benchmark(
        __doc__.splitlines()[0], "configs/detection/demo_digits.yaml", "detection/train.py",
        header=f"{'epoch':>5} {'bbox AP50':>9} {'bbox AP':>8} {'segm AP':>8} {'wall min':>8} {'cpu min':>8}",
        on_record=lambda r: print(f"{r['epoch']:>5} {r['bbox_AP50']:>9.3f} {r['bbox_AP']:>8.3f} {r['segm_AP']:>8.3f} "
                                  f"{r['wall_min']:>8.2f} {r['cpu_min']:>8.2f}", flush=True))
    reached = next((r for r in records if r["bbox_AP50"] >= TARGET_AP50), None)
    if reached is None:
        print(f"bbox AP50 never reached {TARGET_AP50}")
        return 1
    print(f"bbox AP50 >= {TARGET_AP50} after epoch {reached['epoch']}: {reached['wall_min']:.1f} wall minutes, "
          f"{reached['cpu_min']:.1f} CPU minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
