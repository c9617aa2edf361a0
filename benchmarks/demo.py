"""What the three demo benchmarks share (quickstart.py, detection_demo.py, segmentation_demo.py):
run a trainer on its demo config as a user would (a subprocess, a fresh run folder), alone or
beside one busy process (``--neighbour``: ``yes > /dev/null``, as on a shared machine), and
follow its metrics.jsonl, each record with the wall and CPU minutes since the start.

    python benchmarks/<demo>.py [--cfg CONFIG] [--neighbour] [--threads N] [--output DIR] [trainer arguments ...]

Without --threads the trainer's CPU plan chooses threads and loader workers (the line it logged
is printed); CPU minutes (user + system of the trainer process, and of loader workers once they
have ended) tell how much of the wall time a busy machine took away.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402

PLAN_LINE = re.compile(r"CPU plan: .*")


def parse_arguments(description: str, config: str) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's own flags (``config``: the demo config, unless --cfg names another); the
    rest goes to the trainer."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", default=config, help=f"the config to train (default {config})")
    parser.add_argument("--neighbour", action="store_true", help="run beside one busy process (yes > /dev/null)")
    parser.add_argument("--threads", type=int, help="torch threads (OMP_NUM_THREADS; default: the CPU plan's choice)")
    parser.add_argument("--output", default="", help="run folder root (default: a temporary folder)")
    return parser.parse_known_args()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and of its children that have ended (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")


@dataclass
class DemoRun:
    """A finished demo: its records (with ``wall_min`` and ``cpu_min``), total wall and CPU
    seconds (start-up and data generation included) and the CPU plan it logged."""
    records: list[dict] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    plan: str = ""


def run_demo(script: str, args: argparse.Namespace, extra: list[str],
             on_record: Callable[[dict], None] = lambda record: None) -> DemoRun:
    """Run ``script --cfg args.cfg`` (plus ``extra``) to the end and return what it did; each new
    record of its run folder's metrics.jsonl goes to ``on_record`` as it appears. Exits with the
    trainer's stderr if it fails."""
    output = args.output or tempfile.mkdtemp(prefix="demo_")
    run_dir = os.path.join(output, load_config(os.path.join(ROOT, args.cfg)).MODEL.NAME, "default")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    neighbour = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if args.neighbour else None
    result, cpu = DemoRun(), 0.0
    start = time.time()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, script, "--cfg", args.cfg, "--output", output, *extra], cwd=ROOT,
                                   env=env, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            while True:
                running = process.poll() is None
                if running:
                    try:
                        cpu = _cpu_seconds(process.pid)
                    except OSError:
                        pass
                path = os.path.join(run_dir, "metrics.jsonl")
                lines = open(path).read().splitlines() if os.path.isfile(path) else []
                for line in lines[len(result.records):]:
                    record = {**json.loads(line), "wall_min": (time.time() - start) / 60, "cpu_min": cpu / 60}
                    result.records.append(record)
                    on_record(record)
                if not running:
                    break
                time.sleep(0.5)
        finally:
            for child in (process, neighbour):
                if child is not None and child.poll() is None:  # interrupted: leave nothing running
                    child.kill()
                    child.wait()
        if process.returncode != 0:
            errors.seek(0)
            sys.exit(f"{script} failed (exit {process.returncode}): {errors.read()[-2000:]}")
    result.wall, result.cpu = time.time() - start, cpu
    with open(os.path.join(run_dir, "log_rank0.txt")) as f:
        plans = PLAN_LINE.findall(f.read())
    result.plan = plans[-1] if plans else ""
    return result


def describe(args: argparse.Namespace, result: DemoRun) -> str:
    """One line: alone or beside a busy process, wall and CPU time, the CPU plan."""
    return (f"{'beside a busy process' if args.neighbour else 'alone'}: wall {result.wall:.1f} s "
            f"({result.wall / 60:.2f} min, start-up included), CPU {result.cpu / 60:.2f} min, "
            f"{os.cpu_count()} cores; {result.plan}")


def benchmark(description: str, config: str, script: str, header: str = "",
              on_record: Callable[[dict], None] = lambda record: None) -> list[dict]:
    """A demo benchmark: its flags parsed (``config``: the default --cfg), ``header`` printed,
    ``script`` run to the end (each record to ``on_record``) and described in one line; returns
    the records."""
    args, extra = parse_arguments(description, config)
    if header:
        print(header, flush=True)
    result = run_demo(script, args, extra, on_record)
    print(describe(args, result))
    return result.records
