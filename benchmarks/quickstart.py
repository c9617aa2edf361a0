"""Benchmark of the README's Quick start: wall time of the digits demo and the accuracy it reaches.

    python benchmarks/quickstart.py [--neighbour] [extra main.py arguments]

``--neighbour`` keeps one busy process (``yes > /dev/null``) running beside the demo, as a shared
machine would: the wall time should stay within 2x of the idle one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_TOP1 = 97.0


def main(extra: list[str]) -> None:
    neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if "--neighbour" in extra else None
    extra = [arg for arg in extra if arg != "--neighbour"]
    with tempfile.TemporaryDirectory() as output:
        start = time.perf_counter()
        try:
            subprocess.run([sys.executable, "main.py", "--cfg", "configs/demo/digits.yaml", "--output", output,
                            *extra], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
        wall = time.perf_counter() - start
        with open(os.path.join(output, "cros_demo_digits", "default", "metrics.jsonl")) as f:
            epochs = [json.loads(line) for line in f]
    reached = next((e["epoch"] for e in epochs if e["acc1"] >= TARGET_TOP1), None)
    print(f"{'with a busy neighbour' if neighbour else 'alone'}: epochs {len(epochs)}  wall {wall:.1f} s (start-up included)  "
          f"final top-1 {epochs[-1]['acc1']:.2f}%  best {max(e['acc1'] for e in epochs):.2f}%  "
          f"first epoch at >= {TARGET_TOP1:.0f}%: {reached}")


if __name__ == "__main__":
    main(sys.argv[1:])
