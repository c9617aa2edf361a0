"""The run core (training.py) that classification, detection and segmentation share.

In process, on a toy model: a stop signal in the step that ends an epoch / evaluation interval
(saved before the evaluation, which the relaunch runs) or during an evaluation (saved after it),
with step checkpoints after every update, ends bit-identical to the uninterrupted run with each
record once, for both schedules; the ETA leaves the warm-up out; DDP warns nothing; the fatal
error line reaches the run log; --throughput reports a median of rounds. An old classification
checkpoint (a fixture written by the main branch before the run core) still resumes.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import main
from config import get_default_config
from data.resumable import resumable_loader
from logger import read_metrics
from runtime import Precision
from training import (BestModel, EpochSchedule, IterationSchedule, StepClock, TrainingRun, distributed,
                      supervised_losses)
from utils import DistInfo, load_checkpoint_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
OLD_CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "classification_step_checkpoint_before_run_core.pth")


# ----------------------------------------------------------------------------- a toy run, in process
def toy_config(output, schedule: str, interrupted: bool):
    config = get_default_config()
    config.OUTPUT = str(output)
    config.DATA.BATCH_SIZE, config.DATA.NUM_WORKERS = 2, 0
    config.TRAIN.EPOCHS, config.SAVE_FREQ, config.PRINT_FREQ, config.AMP_OPT_LEVEL = 3, 2, 1, "O0"
    config.SEG.MAX_ITERS, config.SEG.EVAL_INTERVAL, config.SEG.CHECKPOINT_INTERVAL = 10, 5, 4
    # the interrupted runs save a step checkpoint after every update: when they are taken changes nothing
    config.TRAIN.CHECKPOINT_MINUTES = 1e-9 if interrupted else 0
    config.freeze()
    return config


class ToyRun:
    """A two-layer model with dropout on 8 samples (4 batches a pass), trained through TrainingRun
    with the ``schedule`` given; ``signal_at`` sends SIGTERM to this process in the ``losses`` call
    or ``evaluate`` call of that number (counted over launches)."""

    def __init__(self, output, schedule: str, interrupted: bool = False, signal_at: tuple[str, int] = ("", 0)):
        self.config = config = toy_config(output, schedule, interrupted)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(8, 3, generator=generator), torch.randint(0, 2, (8,), generator=generator))
        self.loader = resumable_loader(data, config, 0, 1)
        steps = len(self.loader)
        kind = EpochSchedule(config, steps) if schedule == "epoch" else IterationSchedule(config, steps)

        def set_learning_rate(updates):
            for group in optimizer.param_groups:
                group["lr"] = 0.01 / (1 + updates)

        self.run = TrainingRun(config, DistInfo(0, 1, 0, CPU), logging.getLogger("toy_run"), kind, self.model,
                               optimizer, Precision(config, CPU), set_learning_rate,
                               BestModel("score", "best_score", "best_score", "Max score: {:.4f}",
                                         lambda r: f"score {r['score']:.4f}"))
        self.signal_at = signal_at
        self.calls = {"losses": 0, "evaluate": 0}
        self.probe = torch.randn(4, 3, generator=generator)

    def _count(self, name):
        self.calls[name] += 1
        if self.signal_at == (name, self.calls[name]):
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the run's handler, acted on at the step boundary

    def losses(self, batch):
        self._count("losses")
        return supervised_losses(self.model, nn.CrossEntropyLoss(), CPU)(batch)

    def evaluate(self):
        self._count("evaluate")
        with torch.no_grad():
            return {"score": float(self.model.eval()(self.probe).softmax(1)[:, 0].mean())}

    def fit(self):
        """Restore, then fit; the signal handlers of this process are put back afterwards."""
        previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            self.run.restore()
            if not self.run.complete:
                self.run.fit(self.loader, self.losses, self.evaluate)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self


# where a signal lands: (call, its number); the step checkpoint that stop leaves, and the evaluations before it
STOPS = {
    "epoch": [(("losses", 8), "ckpt_epoch_1_step_4.pth", "epoch 1 step 4", 1),  # last step of epoch 1: not validated
              (("evaluate", 2), "ckpt_epoch_2_step_0.pth", "epoch 2 step 0", 2)],  # validating epoch 1 (not saved)
    "iteration": [(("losses", 5), "ckpt_iter_5_step.pth", "iteration 5", 0),  # iteration 5: not evaluated
                  (("evaluate", 1), "ckpt_iter_5_step.pth", "iteration 5", 1)],  # evaluating it (no ckpt_iter_5.pth)
}


@pytest.mark.parametrize("schedule, stop", [(s, i) for s in STOPS for i in range(2)],
                         ids=["epoch-before-validation", "epoch-during-validation", "iteration-before-evaluation",
                              "iteration-during-evaluation"])
def test_a_stop_at_an_evaluation_resumes_bit_identical_with_each_record_once(tmp_path, schedule, stop, caplog):
    reference = ToyRun(tmp_path / "reference", schedule).fit()
    signal_at, name, where, evaluations = STOPS[schedule][stop]
    caplog.set_level(logging.INFO, logger="toy_run")
    first = ToyRun(tmp_path / "interrupted", schedule, interrupted=True, signal_at=signal_at).fit()
    path = tmp_path / "interrupted" / name
    assert f"SIGTERM received: stopped at {where}, training state in {path}; relaunch" in caplog.text
    assert sorted(n for n in os.listdir(path.parent) if "_step" in n) == [name]  # only the newest step checkpoint
    saved = load_checkpoint_file(str(path))
    assert first.calls["evaluate"] == evaluations
    pending = saved["step"] == 4 if schedule == "epoch" else saved["evaluation_pending"]
    assert pending is (signal_at[0] == "losses")  # stopped before an evaluation: the relaunch runs it first

    relaunched = ToyRun(tmp_path / "interrupted", schedule, interrupted=True).fit()
    assert first.calls["evaluate"] + relaunched.calls["evaluate"] == reference.calls["evaluate"]  # none twice or lost
    for key, value in reference.model.state_dict().items():
        assert torch.equal(relaunched.model.state_dict()[key], value), key
    records, expected = read_metrics(str(path.parent)), read_metrics(str(tmp_path / "reference"))
    assert records == expected and len(records) == reference.calls["evaluate"]
    assert not [n for n in os.listdir(path.parent) if "_step" in n]  # the final checkpoint made it obsolete


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
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_a_classification_checkpoint_from_before_the_run_core_still_resumes(digits_dir, tmp_path):
    """``OLD_CHECKPOINT``: a step checkpoint (epoch 0, step 6 of 22, with its loss sums) that
    main.py wrote before the run core existed, for the demo config with a smaller model (the
    options below). The relaunch continues inside epoch 0 from it and finishes the run."""
    checkpoint = load_checkpoint_file(OLD_CHECKPOINT)
    assert (checkpoint["epoch"], checkpoint["step"], set(checkpoint["epoch_sums"])) == (0, 6, {"loss_sum", "grad_norm_sum"})
    run_dir = tmp_path / "cros_demo_digits" / "default"
    run_dir.mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, run_dir / "ckpt_epoch_0_step_6.pth")
    result = subprocess.run([sys.executable, "main.py", "--cfg", "configs/demo/digits.yaml", "--data-path", digits_dir,
                             "--output", str(tmp_path), "--num_workers", "0", "--epochs", "1", "--opts",
                             "MODEL.CROS.EMBED_DIM", "8", "MODEL.CROS.NUM_HEADS", "[1, 1, 1, 1]",
                             "MODEL.CROS.DEPTHS", "[1, 1, 1, 1]", "PRINT_FREQ", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming training inside epoch 0 at step 6 of 22" in result.stdout
    assert "Train: [0/1][0/22]" not in result.stdout and "Train: [0/1][10/22]" in result.stdout
    final = load_checkpoint_file(str(run_dir / "ckpt_epoch_0.pth"))
    assert final["epoch"] == 0 and final["max_accuracy"] > 10
    assert any(not torch.equal(final["model"][k], v) for k, v in checkpoint["model"].items())
