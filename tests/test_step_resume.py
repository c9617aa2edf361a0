"""No work lost: step checkpoints, stop signals and model EMA, checked against an uninterrupted run.

Every interrupted run here is relaunched until it finishes; its final weights and EMA weights must
be bit-identical to the uninterrupted run's. Kills are timed by progress markers in the run log
(a step checkpoint written), never by fixed sleeps alone, so a loaded machine only slows them down.
"""
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from config import UserError
from conftest import TrainingProcess, assert_bit_identical, training_environment
from training import CheckpointClock, StopSignals
from utils import load_checkpoint_file, model_state, newest_loadable_checkpoint, remove_step_checkpoints, \
    resume_position, write_checkpoint, step_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "digits.yaml")
RUN_DIR = ("cros_demo_digits", "default")
SAVED_STEP = re.compile(r"ckpt_epoch_(\d+)_step_(\d+)\.pth saved")
# randomness everywhere: RandAugment and random erasing in the workers (Python, NumPy and torch
# RNGs), Mixup/CutMix and drop path in the main process
OPTIONS = ["SAVE_FREQ", "1", "PRINT_FREQ", "5", "DATA.BATCH_SIZE", "32", "TRAIN.CHECKPOINT_MINUTES", "0.01",
           "MODEL_EMA", "True", "MODEL_EMA_DECAY", "0.9", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5",
           "AUG.REPROB", "0.25", "AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0"]
EPOCHS = 3  # stops land in epochs 0 and 1; epoch 2 leaves room for a step checkpoint after the last one
FINAL = f"ckpt_epoch_{EPOCHS - 1}.pth"


def command(digits_path, output, *extra):
    return ["main.py", "--cfg", DEMO, "--epochs", str(EPOCHS), "--data-path", digits_path, "--output", str(output),
            "--num_workers", "2", "--opts", *OPTIONS, *extra]


@pytest.fixture(scope="module")
def uninterrupted(digits_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run([sys.executable, *command(digits_dir, output)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=training_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return output.joinpath(*RUN_DIR)


def wait_for_step_checkpoint(run, epoch=0):
    """Wait until this launch has written a step checkpoint in ``epoch`` or later."""
    run.wait_for(SAVED_STEP, lambda match: int(match.group(1)) >= epoch)


def newest_position(run_dir):
    """Where a relaunch continues: the position of the newest loadable checkpoint."""
    path, checkpoint = newest_loadable_checkpoint(str(run_dir), logging.getLogger("test"))
    return path, resume_position(checkpoint)


def assert_clean_stop(code, stdout, stderr, seconds, name, run_dir):
    """Exit 0 soon after the signal, one line saying where the state is and how to resume, and
    that state is the newest one on disk (a step checkpoint, the only one kept)."""
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    stops = re.findall(rf"{name} received: stopped at epoch (\d+) step (\d+), training state in (\S+); relaunch "
                       r"the same command to resume", stdout)
    assert len(stops) == 1, stdout[-3000:]
    position, path = (int(stops[0][0]), int(stops[0][1])), stops[0][2]
    assert newest_position(run_dir) == (path, position)
    assert len(step_checkpoints(str(run_dir))) <= 1  # only the newest step checkpoint is kept
    assert seconds < 90  # one step and one save, with a generous margin for a loaded machine


def wait_for_resume_line(run, position):
    epoch, step = position
    run.wait_for(re.escape(f"resuming training inside epoch {epoch} at step {step} of" if step
                           else f"resuming training at epoch {epoch}"))


def test_signals_and_sigkill_inside_epochs_end_bit_identical(digits_dir, uninterrupted, tmp_path):
    """Ctrl-C (SIGINT to the process group), SIGKILL, SIGTERM, SIGUSR1 and another SIGKILL at
    moments inside both epochs, each followed by a relaunch: every relaunch continues from the
    newest state, inside the epoch, and the run ends with the uninterrupted weights and EMA."""
    run_dir = tmp_path.joinpath(*RUN_DIR)
    args = command(digits_dir, tmp_path)
    rng = random.Random(os.getpid())
    position, resumed = None, []
    for stop_signal, epoch in [(signal.SIGINT, 0), (signal.SIGKILL, 0), (signal.SIGTERM, 1), (signal.SIGUSR1, 1),
                               (signal.SIGKILL, 1)]:
        run = TrainingProcess(args, run_dir)
        if position is not None:
            wait_for_resume_line(run, position)
        wait_for_step_checkpoint(run, epoch)
        time.sleep(rng.uniform(0, 0.4))  # a random moment of a step
        code, stdout, stderr, seconds = run.stop(stop_signal, group=stop_signal == signal.SIGINT)
        if stop_signal == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert_clean_stop(code, stdout, stderr, seconds, stop_signal.name, run_dir)
        position = newest_position(run_dir)[1]
        resumed.append(position)
    run = TrainingProcess(args, run_dir)
    wait_for_resume_line(run, position)
    run.finish()
    assert {epoch for epoch, step in resumed if step > 0} >= {0, 1}, resumed  # inside both epochs
    assert_bit_identical(run_dir / FINAL, uninterrupted / FINAL, ("model", "model_ema"))
    assert step_checkpoints(str(run_dir)) == []  # the final epoch checkpoint made them obsolete
    log = (run_dir / "log_rank0.txt").read_text()
    assert re.search(r"EMA \* Acc@1 \d+\.\d+ Acc@5 \d+\.\d+", log)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    for ours, theirs in zip(records, reference):  # the same accuracies, EMA ones included, and training loss
        for key in ("acc1", "acc5", "ema_acc1", "ema_acc5", "ema_val_loss", "train_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key


# ----------------------------------------------------------------------------- pieces, in process
def test_newest_loadable_checkpoint_orders_epoch_and_step_checkpoints(tmp_path):
    def write(name, **extra):
        write_checkpoint({"model": {}, "optimizer": {}, "lr_scheduler": {}, **extra}, str(tmp_path / name))

    write("ckpt_epoch_0.pth", epoch=0)
    write("ckpt_epoch_1_step_30.pth", epoch=1, step=30)
    write("ckpt_epoch_2_step_0.pth", epoch=2, step=0)
    logger = logging.getLogger("test")
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_2_step_0.pth") and resume_position(checkpoint) == (2, 0)
    (tmp_path / "ckpt_epoch_2_step_0.pth").write_bytes(b"damaged")
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_1_step_30.pth") and resume_position(checkpoint) == (1, 30)
    remove_step_checkpoints(str(tmp_path))
    path, checkpoint = newest_loadable_checkpoint(str(tmp_path), logger)
    assert path.endswith("ckpt_epoch_0.pth") and resume_position(checkpoint) == (1, 0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_epoch_0.pth"]


def test_stop_signals_are_recorded_and_a_second_one_is_ignored(capfd):
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    assert stop.requested() == ""
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
    assert stop.requested() == "SIGUSR1"
    stop.restore()
    assert "SIGINT ignored: already stopping" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not before  # still ignoring until the process ends
    for signum, handler in stop._previous.items():
        signal.signal(signum, handler)
    StopSignals().install().restore()
    assert signal.getsignal(signal.SIGTERM) is before  # no signal: the old handlers are back


def test_signals_during_a_save_change_nothing(tmp_path, monkeypatch, capfd):
    """A second and third signal (Ctrl-C twice, SIGTERM) arriving half-way through writing a
    checkpoint neither interrupt nor damage it."""
    path = tmp_path / "ckpt_epoch_0_step_3.pth"
    real_save = torch.save

    def signalled_half_way(obj, f):
        for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # the handler runs here, in the middle of the write
        real_save(obj, f)

    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the signal that starts the stop
        assert stop.requested() == "SIGTERM"
        monkeypatch.setattr(torch, "save", signalled_half_way)
        write_checkpoint({"model": {"w": torch.arange(5.0)}, "step": 3}, str(path))
    finally:
        for signum, handler in stop._previous.items():
            signal.signal(signum, handler)
    assert capfd.readouterr().err.count("ignored: already stopping") >= 2  # equal signals may merge
    assert sorted(os.listdir(tmp_path)) == [path.name]
    torch.testing.assert_close(load_checkpoint_file(str(path))["model"]["w"], torch.arange(5.0))


def test_checkpoint_clock():
    assert not CheckpointClock(0).due()
    assert CheckpointClock(1e-9).due() and not CheckpointClock(1).due()
    with pytest.raises(UserError, match="TRAIN.CHECKPOINT_MINUTES"):
        CheckpointClock(-1)


# ----------------------------------------------------------------------------- two ranks under torchrun
def torchrun(digits_path, output):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command(digits_path, output)]


def worker_of_rank(launcher_pid, rank):
    for pid in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.slow  # about a minute on an idle 2-core machine: four torchrun launches of 2 ranks
def test_two_ranks_sigkill_and_sigterm_to_one_rank_end_bit_identical(digits_dir, tmp_path):
    """torchrun with 2 gloo ranks: SIGKILL of the whole job inside epoch 0, relaunch, then SIGTERM
    to rank 1 alone inside epoch 1: both ranks stop at the same step, rank 0 saves, exit 0; the
    relaunch ends with the uninterrupted 2-rank run's weights and EMA."""
    reference_dir = tmp_path / "uninterrupted"
    result = subprocess.run([sys.executable, *torchrun(digits_dir, reference_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=training_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path.joinpath("interrupted", *RUN_DIR)
    args = torchrun(digits_dir, tmp_path / "interrupted")

    run = TrainingProcess(args, run_dir)
    wait_for_step_checkpoint(run, 0)
    time.sleep(random.uniform(0, 0.4))
    for pid in [worker_of_rank(run.process.pid, rank) for rank in (0, 1)] + [run.process.pid]:
        os.kill(pid, signal.SIGKILL)  # the node goes away: workers (in sessions of their own) and launcher
    run.process.wait(timeout=60)
    _, position = newest_position(run_dir)

    run = TrainingProcess(args, run_dir)
    wait_for_resume_line(run, position)
    wait_for_step_checkpoint(run, 1)
    os.kill(worker_of_rank(run.process.pid, 1), signal.SIGTERM)
    run.finish(timeout=120)
    stops = [re.findall(r"SIGTERM received: stopped at epoch (\d+) step (\d+)", (run_dir / f"log_rank{rank}.txt").read_text())
             for rank in (0, 1)]
    assert len(stops[0]) == 1 and stops[0] == stops[1]  # the same step on both ranks
    _, position = newest_position(run_dir)
    assert position == tuple(map(int, stops[0][0])) and position[0] == 1 and position[1] > 0

    run = TrainingProcess(args, run_dir)
    wait_for_resume_line(run, position)
    run.finish()
    assert_bit_identical(run_dir / FINAL, reference_dir.joinpath(*RUN_DIR, FINAL), ("model", "model_ema"))


def test_eval_scores_the_ema_weights_with_model_ema_eval(digits_dir, uninterrupted, tmp_path):
    final = uninterrupted / FINAL
    result = subprocess.run([sys.executable, "main.py", "--cfg", DEMO, "--data-path", digits_dir, "--output", str(tmp_path),
                             "--eval", "--resume", str(final), "--opts", "MODEL_EMA_EVAL", "True"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=training_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded EMA weights from {final}" in result.stdout
    last = json.loads((uninterrupted / "metrics.jsonl").read_text().splitlines()[-1])
    top1, top5 = map(float, re.search(r" \* Acc@1 (\S+) Acc@5 (\S+)", result.stdout).groups())
    assert (top1, top5) == (round(last["ema_acc1"], 3), round(last["ema_acc5"], 3))
    assert last["ema_acc1"] != last["acc1"]  # the EMA really is other weights


def test_checkpoint_without_ema_weights_is_named(tmp_path):
    path = tmp_path / "plain.pth"
    write_checkpoint({"model": {"w": torch.ones(1)}}, str(path))
    with pytest.raises(UserError, match=f"{path} has no 'model_ema' entry"):
        model_state(load_checkpoint_file(str(path)), str(path), "model_ema")


def test_step_checkpoint_of_another_batch_size_is_refused(digits_dir, uninterrupted, tmp_path):
    run_dir = tmp_path.joinpath(*RUN_DIR)
    run_dir.mkdir(parents=True)
    checkpoint = load_checkpoint_file(str(uninterrupted / "ckpt_epoch_0.pth"))
    step_file = run_dir / "ckpt_epoch_1_step_6.pth"
    write_checkpoint({**checkpoint, "epoch": 1, "step": 6, "world_size": 1, "batch_size": 32}, str(step_file))
    result = subprocess.run([sys.executable, *command(digits_dir, tmp_path, "DATA.BATCH_SIZE", "16")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=training_environment())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr  # (timm may warn about the schedule before the error)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {step_file} is a step checkpoint of 1 processes x batch 32; this run has 1 x 16: relaunch with "
        "those, or --resume an epoch checkpoint")
