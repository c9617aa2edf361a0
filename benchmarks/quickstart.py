"""Benchmark of the README's Quick start: wall time of the digits demo and the accuracy it reaches.

    python benchmarks/quickstart.py [--neighbour] [--threads N] [extra main.py arguments]

``--neighbour`` keeps one busy process (``yes > /dev/null``) running beside the demo, as a shared
machine would: the wall time should stay within 2x of the idle one (see benchmarks/demo.py).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from demo import benchmark  # noqa: E402

TARGET_TOP1 = 97.0


def main() -> None:
    epochs = benchmark(__doc__.splitlines()[0], "configs/demo/digits.yaml", "main.py")
    reached = next((e["epoch"] for e in epochs if e["acc1"] >= TARGET_TOP1), None)
    print(f"epochs {len(epochs)}, final top-1 {epochs[-1]['acc1']:.2f}%, best {max(e['acc1'] for e in epochs):.2f}%, "
          f"first epoch at >= {TARGET_TOP1:.0f}%: {reached}")


if __name__ == "__main__":
    main()
