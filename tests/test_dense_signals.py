"""Detection and segmentation keep classification's promises (the run core): Ctrl-C (SIGINT to
the process group), SIGKILL and SIGTERM inside epochs / between iterations, each followed by a
relaunch, end with the uninterrupted run's weights to the bit and the same metrics.jsonl, each
record once; the signals exit 0 with the resume line. Both demo configs, on small data, with
random flips, multi-scale detection, drop path and two loader workers asked for (config.yaml
keeps that number, whatever the CPU plan gives).

The run core's logic behind this is checked in process, fast, by tests/test_resume.py; these
end-to-end runs are slow tests. Kills are timed by progress markers in the run log (a step
checkpoint written), never by fixed sleeps alone, so a loaded machine only slows them down.
"""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, TrainingProcess, assert_bit_identical, training_environment, write_ade

DETECTION_DIR = ("mask_rcnn_demo_digits", "default")
SEGMENTATION_DIR = ("seg_demo_digits", "default")
TRAIN_LINE = re.compile(r"^.*(Train: \[|Iter \[).*$", re.M)


def detection_command(data, output):
    return ["detection/train.py", "--cfg", "configs/detection/demo_digits.yaml", "--data-path", data, "--output", output,
            "--batch-size", 2, "--epochs", 3, "--num_workers", 2, "--opts", "SAVE_FREQ", 2, "DET.WARMUP_ITERS", 2,
            "PRINT_FREQ", 4, "TRAIN.CHECKPOINT_MINUTES", 0.002, "DET.HFLIP", 0.5, "DET.MIN_SIZE", "[80, 96]"]


def segmentation_command(data, output):
    return ["segmentation/train.py", "--cfg", "configs/segmentation/demo_digits.yaml", "--data-path", data,
            "--output", output, "--device", "cpu", "--opts", "DATA.DATASET", "ade20k", "MODEL.NUM_CLASSES", 4,
            "MODEL.CROS.EMBED_DIM", 16, "MODEL.CROS.DEPTHS", "[1, 1, 1, 1]", "MODEL.CROS.NUM_HEADS", "[1, 1, 1, 1]",
            "SEG.IMG_SCALE", "[40, 32]", "SEG.CROP_SIZE", "[32, 32]", "SEG.FLIP_PROB", 0.5, "MODEL.DROP_PATH_RATE", 0.1,
            "DATA.BATCH_SIZE", 2, "DATA.NUM_WORKERS", 2, "PRINT_FREQ", 10, "SEG.MAX_ITERS", 60, "SEG.EVAL_INTERVAL", 20,
            "SEG.CHECKPOINT_INTERVAL", 25, "SEG.WARMUP_ITERS", 5, "TRAIN.CHECKPOINT_MINUTES", 0.002]


def interrupted_then_finished(args, run_dir, stops, saved):
    """Launch ``args`` once per ``(signal, accept)`` of ``stops``: when a step checkpoint that
    ``accept`` takes (a match of ``saved``) is written, wait a random moment of a step and send the
    signal; then relaunch to the end. Returns the last launch's stdout."""
    rng = random.Random()
    for stop_signal, accept in stops:
        run = TrainingProcess(args, run_dir)
        run.wait_for(saved, accept)
        time.sleep(rng.uniform(0, 0.2))
        code, stdout, stderr, seconds = run.stop(stop_signal, group=stop_signal == signal.SIGINT)
        if stop_signal == signal.SIGKILL:
            assert code == -signal.SIGKILL
            continue
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
        stops_seen = re.findall(rf"{stop_signal.name} received: stopped at [^,]+, training state in (\S+); relaunch "
                                r"the same command to resume from there", stdout)
        assert len(stops_seen) == 1 and (run_dir / stops_seen[0].split("/")[-1]).is_file(), stdout[-3000:]
        assert seconds < 90
    return TrainingProcess(args, run_dir).finish()


def check_records_and_log(run_dir, reference_dir, final_stdout, unit):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r[unit] for r in records] == [r[unit] for r in expected]  # each once, none lost
    assert records == expected
    assert all("mem " not in line for line in TRAIN_LINE.findall((run_dir / "log_rank0.txt").read_text()))
    best = re.search(rf"best \S+ \S+ .* at {unit} (\d+), weights in (\S+)/best\.pth", final_stdout.splitlines()[-1])
    assert best and best.group(2) == str(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["DATA"]["NUM_WORKERS"] == 2  # as asked


@pytest.mark.slow  # about a minute on an idle 2-core machine: seven launches of the detection demo
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_detection_signals_and_sigkill_inside_epochs_end_bit_identical(digits_root, tmp_path):
    reference = subprocess.run([sys.executable, *map(str, detection_command(digits_root, tmp_path / "reference"))],
                               cwd=ROOT, capture_output=True, text=True, timeout=600, env=training_environment())
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path.joinpath("interrupted", *DETECTION_DIR)
    saved = r"ckpt_epoch_(\d+)_step_(\d+)\.pth saved"
    inside = [lambda m, e=epoch: int(m.group(1)) == e and 0 < int(m.group(2)) < 6 for epoch in range(3)]
    stdout = interrupted_then_finished(detection_command(digits_root, tmp_path / "interrupted"), run_dir,
                                       [(signal.SIGINT, inside[0]), (signal.SIGKILL, inside[1]),
                                        (signal.SIGTERM, inside[2])], saved)
    log = (run_dir / "log_rank0.txt").read_text()
    resumed = re.findall(r"resuming training (inside epoch \d at step \d of 8|at epoch \d)", log)
    assert len(resumed) == 3 and sum(line.startswith("inside") for line in resumed) >= 2, resumed
    reference_dir = tmp_path.joinpath("reference", *DETECTION_DIR)
    assert_bit_identical(run_dir / "ckpt_epoch_2.pth", reference_dir / "ckpt_epoch_2.pth")
    check_records_and_log(run_dir, reference_dir, stdout, "epoch")


@pytest.mark.slow  # about a minute on an idle 2-core machine: five launches of the segmentation demo
def test_segmentation_signals_and_sigkill_between_iterations_end_bit_identical(tmp_path):
    data = write_ade(tmp_path / "ade", images=6)
    reference = subprocess.run([sys.executable, *map(str, segmentation_command(data, tmp_path / "reference"))],
                               cwd=ROOT, capture_output=True, text=True, timeout=600, env=training_environment())
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path.joinpath("interrupted", *SEGMENTATION_DIR)
    saved = r"ckpt_iter_(\d+)_step\.pth saved"
    stdout = interrupted_then_finished(segmentation_command(data, tmp_path / "interrupted"), run_dir,
                                       [(signal.SIGINT, lambda m: 5 <= int(m.group(1)) < 15),
                                        (signal.SIGKILL, lambda m: 27 <= int(m.group(1)) < 35),
                                        (signal.SIGTERM, lambda m: 42 <= int(m.group(1)) < 50)], saved)
    resumed = [int(n) for n in re.findall(r"resuming training at iteration (\d+)", (run_dir / "log_rank0.txt").read_text())]
    assert len(resumed) == 3 and all(n % 25 for n in resumed)  # each from a step checkpoint, between intervals
    reference_dir = tmp_path.joinpath("reference", *SEGMENTATION_DIR)
    assert_bit_identical(run_dir / "ckpt_iter_60.pth", reference_dir / "ckpt_iter_60.pth")
    check_records_and_log(run_dir, reference_dir, stdout, "iteration")
