"""The detection demo figure of the README: train configs/detection/demo_digits.yaml on the CPU and
report, per epoch, bbox AP50 / AP and segm AP with the wall-clock and CPU minutes since the start
(data generation, if needed, included), and when bbox AP50 first reached 0.7.

    python benchmarks/detection_demo.py [--cfg configs/detection/demo_digits_cascade.yaml] [--threads 2]
        [--data-path DIR] [--output DIR]

CPU minutes (user + system of the training process) tell how much of the wall time a busy machine
took away. The run folder is a fresh temporary one unless --output is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import load_config  # noqa: E402

CONFIG = "configs/detection/demo_digits.yaml"
TARGET_AP50 = 0.7


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default=CONFIG, help="demo config (e.g. configs/detection/demo_digits_cascade.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--data-path", default="", help="where the demo set is (written there if missing)")
    parser.add_argument("--output", default="", help="run folder root (default: a temporary folder)")
    args = parser.parse_args()
    output = args.output or tempfile.mkdtemp(prefix="detection_demo_")
    command = [sys.executable, "detection/train.py", "--cfg", args.cfg, "--output", output]
    if args.data_path:
        command += ["--data-path", args.data_path]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    name = load_config(os.path.join(REPO, args.cfg)).MODEL.NAME  # the run folder's name
    metrics_file = os.path.join(output, name, "default", "metrics.jsonl")
    start = time.time()
    os.makedirs(output, exist_ok=True)
    errors_file = os.path.join(output, "stderr.txt")
    with open(errors_file, "w") as errors:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    seen, cpu, reached = 0, 0.0, None
    print(f"{'epoch':>5} {'bbox AP50':>9} {'bbox AP':>8} {'segm AP':>8} {'wall min':>8} {'cpu min':>8}", flush=True)
    try:
        while True:
            running = process.poll() is None
            if running:
                try:
                    cpu = cpu_seconds(process.pid)
                except OSError:
                    pass
            lines = open(metrics_file).read().splitlines() if os.path.isfile(metrics_file) else []
            for line in lines[seen:]:
                record = json.loads(line)
                wall = (time.time() - start) / 60
                print(f"{record['epoch']:>5} {record['bbox_AP50']:>9.3f} {record['bbox_AP']:>8.3f} "
                      f"{record['segm_AP']:>8.3f} {wall:>8.2f} {cpu / 60:>8.2f}", flush=True)
                if reached is None and record["bbox_AP50"] >= TARGET_AP50:
                    reached = (record["epoch"], wall, cpu / 60)
            seen = len(lines)
            if not running:
                break
            time.sleep(1.0)
    finally:
        if process.poll() is None:  # interrupted: do not leave the training running
            process.kill()
    if process.returncode != 0:
        with open(errors_file) as errors:
            print(f"training failed (exit {process.returncode}): {errors.read()[-2000:]}", file=sys.stderr)
        return 1
    print(f"threads {args.threads}, {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f}")
    if reached is None:
        print(f"bbox AP50 never reached {TARGET_AP50}")
        return 1
    print(f"bbox AP50 >= {TARGET_AP50} after epoch {reached[0]}: {reached[1]:.1f} wall minutes, "
          f"{reached[2]:.1f} CPU minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
