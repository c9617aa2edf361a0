"""runtime.py's CPU plan: data-loading workers and torch threads never ask for more than the free
cores (the busy ones measured from /proc/stat), and the line that says why."""
import os
import shutil
import subprocess
import time

import pytest
import torch

import runtime
from config import load_config
from conftest import DEMO_CFG, ROOT

pytestmark = pytest.mark.usefixtures("one_thread_in_process")


@pytest.mark.parametrize("asked, processes, cpus, busy, expected", [
    (8, 1, 2, 0, (1, 1)),    # official 8 workers on a 2-core machine: 1 worker, 1 thread
    (0, 1, 2, 0, (0, 2)),    # no workers: torch computes on both cores
    (2, 2, 2, 0, (0, 1)),    # two processes share two cores
    (8, 8, 96, 0, (8, 4)),   # 8 GPUs, 96 cores: 12 per process
    (8, 8, 64, 0, (7, 1)),   # 8 per process: one of them is the process's own
    (4, 4, 2, 0, (0, 1)),    # more processes than cores: at least one thread each, no workers
    (0, 1, 2, 1, (0, 1)),    # a busy neighbour: one thread, not two that wait on each other
    (2, 1, 2, 1, (0, 1)),    # ... and no worker competing for the one free core
    (8, 1, 2, 2, (0, 1)),    # every core busy: still one thread
    (8, 8, 96, 16, (8, 2)),  # 80 free cores: 10 per process
])
def test_cpu_plan_never_asks_for_more_than_the_free_cores(asked, processes, cpus, busy, expected):
    workers, threads = runtime.cpu_plan(asked, processes, cpus, busy)
    assert (workers, threads) == expected
    assert processes * (workers + threads) <= max(cpus - busy, processes)


def test_limit_cpu_use_caps_workers_and_threads_by_the_free_cores_and_says_why(monkeypatch):
    info = runtime.DistInfo(0, 1, 0, torch.device("cpu"))
    monkeypatch.setattr(runtime, "available_cpus", lambda: {0, 1, 2, 3})
    load = iter([0.04, 0.04, 1.4, 0.04])  # idle (system noise), idle, a neighbour on one core and 40% of another
    monkeypatch.setattr(runtime, "busy_cores", lambda cpus: next(load))
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    config = load_config(os.path.join(ROOT, DEMO_CFG), ["DATA.NUM_WORKERS", 8])
    line = runtime.limit_cpu_use(config, info)
    assert config.DATA.NUM_WORKERS == 3 and config.is_frozen() and torch.get_num_threads() == 1
    assert line == ("CPU plan: 4 cores, 0.0 busy with other work (measured over 0.25 s), 1 training process(es) here; "
                    "per process: 3 data-loading workers (8 asked), 1 torch threads")
    throughput = load_config(os.path.join(ROOT, DEMO_CFG), ["DATA.NUM_WORKERS", 8, "THROUGHPUT_MODE", True])
    runtime.limit_cpu_use(throughput, info)  # one batch to read: every core computes
    assert throughput.DATA.NUM_WORKERS == 0 and torch.get_num_threads() == 4
    busy = load_config(os.path.join(ROOT, DEMO_CFG), ["DATA.NUM_WORKERS", 8])
    line = runtime.limit_cpu_use(busy, info)  # 1.4 busy: 2 cores taken (threads would wait on a 40% one)
    assert busy.DATA.NUM_WORKERS == 1 and torch.get_num_threads() == 1
    assert "1.4 busy with other work" in line and "1 data-loading workers (8 asked), 1 torch threads" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    line = runtime.limit_cpu_use(load_config(os.path.join(ROOT, DEMO_CFG), ["DATA.NUM_WORKERS", 1]), info)
    assert torch.get_num_threads() == 3 and line.endswith("3 torch threads (OMP_NUM_THREADS)")  # the user's choice stays


def test_busy_cores_sums_each_cores_busy_share():
    snapshots = iter([{0: (100, 1000), 1: (0, 1000), 2: (0, 1000)},
                      {0: (600, 1500), 1: (50, 1500), 2: (500, 1500)}])  # (busy, total) ticks of /proc/stat
    reads = lambda: next(snapshots)  # noqa: E731
    assert runtime.busy_cores({0, 1, 5}, 0.0, reads) == pytest.approx(1.1)  # core 2 is not ours, 5 unknown


@pytest.mark.skipif(shutil.which("taskset") is None or not os.path.exists("/proc/stat"), reason="needs taskset and /proc/stat")
def test_busy_cores_sees_a_neighbour_that_has_just_started():
    core = min(runtime.available_cpus())
    neighbour = subprocess.Popen(["taskset", "-c", str(core), "yes"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.1)
        busy = runtime.busy_cores({core}, 0.5)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert busy > 0.8  # the core is busy whoever else shares it; the load average would still be near 0
