"""The run core (training.py) that classification, detection and segmentation share, in process:
the ETA leaves the warm-up out (on a toy run, tests/conftest.py's ToyRun); DDP warns nothing; the
fatal error line reaches the run log; --throughput reports a median of rounds. Its resume and stop
signals are tested in tests/test_resume.py.
"""
from __future__ import annotations

import logging
import re
import warnings

import torch
import torch.distributed as dist
from torch import nn

import main
from conftest import CPU, ToyRun, free_port
from training import StepClock, distributed


def test_step_clock_leaves_the_warm_up_out_of_the_eta():
    """The first step takes 10 s (loader start-up), the rest 1 s: after five steps the naive mean,
    (10 + 4 x 1) / 5 = 2.8 s, would say 280 s for 100 more steps; the clock says 100 s."""
    ticks = iter([0.0, 10.0, 11.0, 12.0, 13.0, 14.0, 100.0, 101.0])
    clock = StepClock(now=lambda: next(ticks))
    clock.step()
    clock.step()
    assert clock.mean() is None  # warming up: no estimate rather than a wrong one
    for _ in range(3):
        clock.step()
    assert clock.mean() == 1.0 and clock.last == 1.0
    clock.pause()  # an evaluation: 86 s that are not step time
    clock.step()
    assert clock.mean() == 1.0


def test_first_progress_lines_show_no_eta_until_the_warm_up_is_over(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="toy_run")
    ToyRun(tmp_path, "epoch").fit()
    lines = [r.message for r in caplog.records if r.message.startswith("Train: ")]
    assert [re.search(r"eta (\S+) \(run (\S+)\)", line).groups() for line in lines[:2]] == [("-:--:--",) * 2] * 2
    assert all(re.search(r"eta \d:\d\d:\d\d \(run \d:\d\d:\d\d\)", line) for line in lines[2:])
    assert len(lines) == 12 and "mem" not in lines[0]  # every step (PRINT_FREQ 1); no memory on a CPU



# ----------------------------------------------------------------------------- small promises
def test_distributed_wrapping_warns_nothing():
    """torch 2.13+ deprecates DDP's broadcast_buffers: the wrapper asks for forward_sync_buffers."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for sync in (False, True):
                wrapped = distributed(nn.Linear(2, 2), CPU, sync_buffers=sync)
                wrapped(torch.ones(1, 2)).sum().backward()
        assert [str(w.message) for w in caught if "buffer" in str(w.message)] == []
    finally:
        dist.destroy_process_group()


def test_throughput_is_the_median_of_timed_rounds(caplog):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    passes = []
    model.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    logger = logging.getLogger("throughput_test")
    caplog.set_level(logging.INFO, logger="throughput_test")
    median = main.throughput([(torch.randn(6, 3, 8, 8), None)], model, logger)
    warmup, rounds, per_round = main.THROUGHPUT_PASSES["cpu"]
    assert len(passes) == warmup + rounds * per_round and set(passes) == {6}
    spread, official = caplog.messages[-2:]
    low, high = map(float, re.search(r"slowest (\S+), fastest (\S+) images/s", spread).groups())
    assert f"rounds of {per_round} passes" in spread and low <= median <= high
    assert official == f"batch_size 6 throughput {median:.1f} images/s"


def test_a_fatal_error_is_also_the_last_line_of_the_run_log(digits_dir, tmp_path, capsys, monkeypatch):
    """The class-count check fails after the run log was started: stderr and log_rank0.txt end
    with the same line, and the console does not print it twice."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = main.run(["--cfg", "configs/demo/digits.yaml", "--data-path", digits_dir, "--output", str(tmp_path),
                     "--num_workers", "0", "--opts", "MODEL.NUM_CLASSES", "7"])
    captured = capsys.readouterr()
    assert code == 2
    line = captured.err.strip()
    assert line.startswith("error: ") and "MODEL.NUM_CLASSES is 7" in line and "\n" not in line
    log = (tmp_path / "cros_demo_digits" / "default" / "log_rank0.txt").read_text().strip().splitlines()
    assert log[-1].endswith(f"ERROR {line}") and line not in captured.out
    assert logging.getLogger("crossformer").handlers == []  # the run's log is closed
