"""Resuming: nothing is lost, whatever stops a run.

End to end (main.py in subprocesses): a SIGKILL or a damaged newest checkpoint, then a relaunch,
ends with the uninterrupted run's weights; auto-resume from the newest epoch checkpoint, with the
schedule continued (also with more epochs) and each epoch once in metrics.jsonl; NaN losses and
torchrun's --max-restarts. Step checkpoints: Ctrl-C, SIGKILL, SIGTERM and SIGUSR1 at random moments
inside epochs, on one process and on two torchrun ranks, end bit-identical (weights and EMA weights)
to an uninterrupted run. In process, on a toy model, for both schedules of the run core (training.py):
a stop at an evaluation resumes bit-identically with each record once; stop signals and the
checkpoint clock. A classification step checkpoint written before the run core still resumes.

Kills are timed by progress markers in the run log (a step checkpoint written), never by fixed
sleeps alone, so a loaded machine only slows them down. The dense trainers' signal tests are in
tests/test_dense_signals.py; the checkpoint files themselves in tests/test_checkpoints.py.
"""
import json
import logging
import os
import random
import re
import signal
import shutil
import subprocess
import sys
import time

import pytest
import torch

import main
from config import UserError, load_config
from conftest import (DEMO_CFG, DEMO_RUN_DIR, FOUR_EPOCHS, ROOT, TRAIN_LINE, ToyRun, TrainingProcess,
                      assert_bit_identical, assert_same_weights, check_ok, demo_args, four_epoch_args, free_port,
                      load_ckpt, run_main, training_environment)
from logger import read_metrics
from lr_scheduler import build_scheduler
from training import CheckpointClock, StopSignals
from utils import load_checkpoint_file, newest_loadable_checkpoint, resume_position, step_checkpoints, \
    write_checkpoint

DEMO = os.path.join(ROOT, DEMO_CFG)
EPOCHS = 3  # stops land in epochs 0 and 1; epoch 2 leaves room for a step checkpoint after the last one
FINAL = f"ckpt_epoch_{EPOCHS - 1}.pth"
OLD_CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "classification_step_checkpoint_before_run_core.pth")


# ----------------------------------------------------------------------------- epoch checkpoints, end to end
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))  # an existing folder: main.py writes the digits into it


def command(digits_path, output, *extra):
    return [sys.executable, "main.py", "--cfg", DEMO, "--epochs", str(EPOCHS), "--data-path", digits_path,
            "--output", str(output), "--num_workers", "1", "--opts", "SAVE_FREQ", "1", "PRINT_FREQ", "5", *extra]


def run(args, timeout=300):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def three_epoch_run(digits, tmp_path_factory):
    """The uninterrupted run folder of ``command``: three epochs, a checkpoint each."""
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run(command(digits, output))
    assert result.returncode == 0, result.stderr
    return output / DEMO_RUN_DIR


def test_sigkill_then_relaunch_ends_with_the_uninterrupted_weights(digits, three_epoch_run, tmp_path):
    args = command(digits, tmp_path)
    run_dir = tmp_path / DEMO_RUN_DIR
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "ckpt_epoch_0.pth").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 1
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "ckpt_epoch_2.pth").exists()
    result = run(args)
    assert result.returncode == 0, result.stderr
    assert re.search(r"resuming training at epoch [12]", result.stdout)
    assert_same_weights(weights(run_dir / "ckpt_epoch_2.pth"), weights(three_epoch_run / "ckpt_epoch_2.pth"))


def test_truncated_newest_checkpoint_is_reported_and_skipped(digits, three_epoch_run, tmp_path):
    run_dir = tmp_path / DEMO_RUN_DIR
    shutil.copytree(three_epoch_run, run_dir)
    newest = run_dir / "ckpt_epoch_2.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (run_dir / "ckpt_epoch_1.pth").unlink()
    result = run(command(digits, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"skipping damaged checkpoint {newest}: cannot read checkpoint" in result.stdout
    assert "resuming training at epoch 1" in result.stdout  # from ckpt_epoch_0, not best.pth
    assert_same_weights(weights(newest), weights(three_epoch_run / "ckpt_epoch_2.pth"))


def test_auto_resume_continues_from_the_newest_epoch_checkpoint(one_epoch_run, digits_dir, tmp_path):
    """The epoch-1 run's output gets ``--epochs 2``; best.pth is rewritten to claim epoch 1 (and
    is the newest file), so resuming from it would train nothing: the epoch checkpoint must win."""
    output = tmp_path / "out"
    shutil.copytree(one_epoch_run.output, output)
    run_dir = output / DEMO_RUN_DIR
    best = load_ckpt(run_dir / "best.pth")
    best["epoch"] = 1
    torch.save(best, run_dir / "best.pth")

    result = run_main(*demo_args(digits_dir, output), "--epochs", 2, "--opts", "PRINT_FREQ", 5)
    check_ok(result)
    assert str(run_dir / "ckpt_epoch_0.pth") in result.stdout  # named as the file resumed from
    assert "resuming training at epoch 1" in result.stdout
    train_lines = TRAIN_LINE.findall(result.stdout)
    assert "Train: [0/2]" not in result.stdout
    assert train_lines and {(e, total) for e, total, *_ in train_lines} == {("1", "2")}

    # the schedule goes on from update 22 rather than starting its warm-up again
    last_lr_epoch0 = float(TRAIN_LINE.findall(one_epoch_run.result.stdout)[-1][4])
    assert float(train_lines[0][4]) > last_lr_epoch0

    ckpt1 = load_ckpt(run_dir / "ckpt_epoch_1.pth")
    assert ckpt1["epoch"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    log = (run_dir / "log_rank0.txt").read_text()  # appended to by the second run
    assert "Train: [0/1]" in log and "resuming training at epoch 1" in log and "Train: [1/2]" in log


def test_resume_with_more_epochs_follows_the_new_schedule(tmp_path):
    """A 1-epoch run resumed with ``--epochs 3`` is a 3-epoch run: its learning rate follows the
    3-epoch cosine, not the finished 1-epoch one (which would sit at MIN_LR from epoch 1 on)."""
    opts = ["DATA.DATASET", "fake", "DATA.FAKE_SIZE", 64, "TRAIN.WARMUP_EPOCHS", 0, "PRINT_FREQ", 1]
    args = ["--cfg", DEMO_CFG, "--output", tmp_path, "--num_workers", 0, "--batch-size", 16]
    check_ok(run_main(*args, "--epochs", 1, "--opts", *opts))
    result = run_main(*args, "--epochs", 3, "--opts", *opts)
    check_ok(result)
    assert "resuming training at epoch 1" in result.stdout
    printed = {(int(e), int(step)): float(lr) for e, _, step, _, lr, _ in TRAIN_LINE.findall(result.stdout)}
    assert sorted(printed) == [(e, s) for e in (1, 2) for s in range(4)]

    config = load_config(DEMO, ["TRAIN.EPOCHS", 3, "DATA.BATCH_SIZE", 16, *opts])
    main.scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedule = build_scheduler(config, optimizer, 4)
    for (epoch, step), lr in sorted(printed.items()):
        schedule.step_update(epoch * 4 + step + 1)  # the update just made when the line is printed
        expected = optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(expected, abs=1e-6), f"epoch {epoch} step {step}: lr {lr}, expected {expected:.6f}"


def test_resume_writes_each_epoch_once_and_a_finished_run_says_so(four_epoch_run, tmp_path):
    """The last epoch's checkpoint is lost after its metrics line was written (as a kill between
    the two, or SAVE_FREQ > 1, leaves it): the relaunch trains that epoch again, exactly, and
    metrics.jsonl still has one line per epoch. A second relaunch trains nothing and says why."""
    output = tmp_path / "out"
    shutil.copytree(four_epoch_run.output / DEMO_RUN_DIR, output / DEMO_RUN_DIR)
    run_dir = output / DEMO_RUN_DIR
    (run_dir / f"ckpt_epoch_{FOUR_EPOCHS - 1}.pth").unlink()
    args = four_epoch_args(four_epoch_run.args[four_epoch_run.args.index("--data-path") + 1], output)

    result = run_main(*args)
    check_ok(result)
    assert f"resuming training at epoch {FOUR_EPOCHS - 1}" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(FOUR_EPOCHS))
    assert records[:-1] == four_epoch_run.metrics[:-1]  # untouched
    for key in ("acc1", "acc5", "val_loss", "train_loss", "lr"):  # the replay is exact on the CPU
        assert records[-1][key] == pytest.approx(four_epoch_run.metrics[-1][key], abs=1e-6), key

    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    again = run_main(*args)
    check_ok(again)
    assert f"the run is complete: all {FOUR_EPOCHS} epochs are trained" in again.stdout
    assert f"--epochs N (N > {FOUR_EPOCHS})" in again.stdout
    assert "Train:" not in again.stdout and "resuming training" not in again.stdout
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(digits, tmp_path):
    explode = ["TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "1",
               "TRAIN.LR_SCHEDULER.DECAY_RATE", "1e30", "TRAIN.WARMUP_EPOCHS", "0"]
    result = run(command(digits, tmp_path, *explode))
    run_dir = tmp_path / DEMO_RUN_DIR
    assert result.returncode == 3
    assert re.fullmatch(r"error: loss is not finite at epoch 1 step \d+; .*", result.stderr.strip())
    assert not (run_dir / "ckpt_epoch_1.pth").exists()
    kept = load_checkpoint_file(str(run_dir / "ckpt_epoch_0.pth"))
    assert kept["epoch"] == 0 and all(torch.isfinite(t).all() for t in kept["model"].values())


def test_torchrun_max_restarts_resumes_by_itself(digits, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    args += command(digits, tmp_path, "DATA.BATCH_SIZE", "32")[1:]
    run_dir = tmp_path / DEMO_RUN_DIR
    launcher = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not (run_dir / "ckpt_epoch_0.pth").exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, output[-3000:]
    log = (run_dir / "log_rank0.txt").read_text()
    assert re.search(r"resuming training at epoch [12]", log)
    assert (run_dir / "ckpt_epoch_2.pth").exists()


# ----------------------------------------------------------------------------- step checkpoints, stop signals and model EMA, end to end
SAVED_STEP = re.compile(r"ckpt_epoch_(\d+)_step_(\d+)\.pth saved")


EMA_OPTIONS = ["SAVE_FREQ", "1", "PRINT_FREQ", "5", "DATA.BATCH_SIZE", "32", "TRAIN.CHECKPOINT_MINUTES", "0.01",
           "MODEL_EMA", "True", "MODEL_EMA_DECAY", "0.9", "AUG.AUTO_AUGMENT", "rand-m9-mstd0.5",
           "AUG.REPROB", "0.25", "AUG.MIXUP", "0.8", "AUG.CUTMIX", "1.0"]


def ema_command(digits_path, output, *extra):
    return ["main.py", "--cfg", DEMO, "--epochs", str(EPOCHS), "--data-path", digits_path, "--output", str(output),
            "--num_workers", "2", "--opts", *EMA_OPTIONS, *extra]


@pytest.fixture(scope="module")
def ema_run(digits_dir, tmp_path_factory):
    """The uninterrupted run folder of ``ema_command``: three epochs with step checkpoints, model EMA
    and random augmentation."""
    output = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run([sys.executable, *ema_command(digits_dir, output)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=training_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return output / DEMO_RUN_DIR


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


def test_signals_and_sigkill_inside_epochs_end_bit_identical(digits_dir, ema_run, tmp_path):
    """Ctrl-C (SIGINT to the process group), SIGKILL, SIGTERM, SIGUSR1 and another SIGKILL at
    moments inside both epochs, each followed by a relaunch: every relaunch continues from the
    newest state, inside the epoch, and the run ends with the uninterrupted weights and EMA."""
    run_dir = tmp_path / DEMO_RUN_DIR
    args = ema_command(digits_dir, tmp_path)
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
    assert_bit_identical(run_dir / FINAL, ema_run / FINAL, ("model", "model_ema"))
    assert step_checkpoints(str(run_dir)) == []  # the final epoch checkpoint made them obsolete
    log = (run_dir / "log_rank0.txt").read_text()
    assert re.search(r"EMA \* Acc@1 \d+\.\d+ Acc@5 \d+\.\d+", log)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (ema_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    for ours, theirs in zip(records, reference):  # the same accuracies, EMA ones included, and training loss
        for key in ("acc1", "acc5", "ema_acc1", "ema_acc5", "ema_val_loss", "train_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-12), key


def torchrun(digits_path, output):
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *ema_command(digits_path, output)]


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
    run_dir = tmp_path / "interrupted" / DEMO_RUN_DIR
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
    assert_bit_identical(run_dir / FINAL, reference_dir / DEMO_RUN_DIR / FINAL, ("model", "model_ema"))


def test_eval_scores_the_ema_weights_with_model_ema_eval(digits_dir, ema_run, tmp_path):
    final = ema_run / FINAL
    result = subprocess.run([sys.executable, "main.py", "--cfg", DEMO, "--data-path", digits_dir, "--output", str(tmp_path),
                             "--eval", "--resume", str(final), "--opts", "MODEL_EMA_EVAL", "True"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=training_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded EMA weights from {final}" in result.stdout
    last = json.loads((ema_run / "metrics.jsonl").read_text().splitlines()[-1])
    top1, top5 = map(float, re.search(r" \* Acc@1 (\S+) Acc@5 (\S+)", result.stdout).groups())
    assert (top1, top5) == (round(last["ema_acc1"], 3), round(last["ema_acc5"], 3))
    assert last["ema_acc1"] != last["acc1"]  # the EMA really is other weights


def test_step_checkpoint_of_another_batch_size_is_refused(digits_dir, ema_run, tmp_path):
    run_dir = tmp_path / DEMO_RUN_DIR
    run_dir.mkdir(parents=True)
    checkpoint = load_checkpoint_file(str(ema_run / "ckpt_epoch_0.pth"))
    step_file = run_dir / "ckpt_epoch_1_step_6.pth"
    write_checkpoint({**checkpoint, "epoch": 1, "step": 6, "world_size": 1, "batch_size": 32}, str(step_file))
    result = subprocess.run([sys.executable, *ema_command(digits_dir, tmp_path, "DATA.BATCH_SIZE", "16")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env=training_environment())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr  # (timm may warn about the schedule before the error)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {step_file} is a step checkpoint of 1 processes x batch 32; this run has 1 x 16: relaunch with "
        "those, or --resume an epoch checkpoint")


# ----------------------------------------------------------------------------- the run core, in process
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


# ----------------------------------------------------------------------------- checkpoints written before the run core
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
