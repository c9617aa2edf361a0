"""main.py end to end: train, evaluate and measure throughput (each in its own run folder, the
training run left byte-identical), two CPU ranks (torchrun and torch.distributed.launch), the run
folder (a reusable config.yaml, newest-K checkpoints, readable logs, curves and TensorBoard),
one-line errors for bad input, fine-tuning with another head, zip mode, a fresh run at a later
epoch; in process: gradient accumulation on one and two ranks and a Mixup + bfloat16 step.

The digits runs are trained once per session (tests/conftest.py: one_epoch_run, four_epoch_run);
most tests read their folders or start from copies. main.py runs as a subprocess from the
repository root, or through main.run in this process for the error cases.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image
from timm.loss import SoftTargetCrossEntropy

import main
import plot
import runtime
from config import load_config
from conftest import (DEMO_CFG, DEMO_RUN_DIR, FOUR_EPOCHS, KEEP_CHECKPOINTS, ROOT, TRAIN_LINE, accuracies,
                      assert_same_weights, check_ok, demo_args, free_port, load_ckpt, run_in_process, run_main)
from data.build import build_mixup
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from utils import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread_in_process")

DEMO = os.path.join(ROOT, DEMO_CFG)
NAME = "cros_demo_digits"
EVAL_RUN_DIR = DEMO_RUN_DIR + "-eval"  # --eval runs write beside the training run, never into it
DIGITS_VAL_IMAGES = 360
THROUGHPUT_LINE = re.compile(r"batch_size (\d+) throughput (\S+)")
ACC_LINE_WITH_COUNT = re.compile(r" \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+) loss \S+ on (\d+) val images")
READABLE_TRAIN_LINE = re.compile(
    r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\]\teta \S+ \(run \S+\) lr (\S+)\t.*grad_norm \S+ \(\S+\)$")


# ----------------------------------------------------------------------------- helpers
def two_ranks(*, standalone: bool = True) -> tuple:
    if standalone:
        return ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    return ("-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()))  # a free port for torch.distributed.launch's rendezvous


def snapshot(folder) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def eval_one_rank(one_epoch_run, digits_dir, tmp_path_factory) -> SimpleNamespace:
    """``--eval --resume ckpt_epoch_0.pth`` in one process."""
    output = tmp_path_factory.mktemp("eval1")
    result = run_main(*demo_args(digits_dir, output), "--eval", "--resume", one_epoch_run.ckpt)
    return SimpleNamespace(result=result, acc=accuracies(result.stdout))


# ----------------------------------------------------------------------------- train, evaluate, measure
def test_demo_config_trains_one_epoch(one_epoch_run):
    run_dir = one_epoch_run.run_dir
    for name in ("config.yaml", "log_rank0.txt", "metrics.jsonl", "ckpt_epoch_0.pth", "best.pth"):
        assert (run_dir / name).is_file(), f"{name} missing from {sorted(os.listdir(run_dir))}"

    assert len(one_epoch_run.acc) == 1, one_epoch_run.result.stdout[-3000:]
    acc1, acc5 = map(float, one_epoch_run.acc[0])
    assert 0 <= acc1 <= acc5 <= 100
    assert acc1 > 20, "one epoch on digits should beat chance (10%) clearly"

    train_lines = TRAIN_LINE.findall(one_epoch_run.result.stdout)
    assert train_lines, one_epoch_run.result.stdout[-3000:]
    assert {(e, total) for e, total, _, _, _, _ in train_lines} == {("0", "1")}
    assert [int(step) for _, _, step, _, _, _ in train_lines] == [0, 5, 10, 15, 20, 21]
    assert {steps for _, _, _, steps, _, _ in train_lines} == {"22"}  # 1437 images // 64
    for *_, lr, grad_norm in train_lines:
        assert math.isfinite(float(grad_norm)) and float(grad_norm) > 0
        assert float(lr) > 0

    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1
    record = json.loads(metrics[0])
    assert record["epoch"] == 0
    assert record["acc1"] == pytest.approx(acc1, abs=5e-4)
    assert record["acc5"] == pytest.approx(acc5, abs=5e-4)
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["MODEL"]["NAME"] == "cros_demo_digits"
    assert saved["TRAIN"]["EPOCHS"] == 1
    assert saved["DATA"]["DATA_PATH"] == one_epoch_run.result.args[one_epoch_run.result.args.index("--data-path") + 1]
    assert saved["OUTPUT"] == str(run_dir)

    log = (run_dir / "log_rank0.txt").read_text()
    assert f" * Acc@1 {one_epoch_run.acc[0][0]} Acc@5 {one_epoch_run.acc[0][1]}" in log
    assert "Train: [0/1][21/22]" in log

    ckpt = load_ckpt(run_dir / "ckpt_epoch_0.pth")
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 0
    assert ckpt["model"]["head.weight"].shape == (10, 256)
    assert load_ckpt(run_dir / "best.pth")["epoch"] == 0


def test_eval_resume_prints_the_training_accuracy(one_epoch_run, eval_one_rank):
    check_ok(eval_one_rank.result)
    assert eval_one_rank.acc == [one_epoch_run.acc[-1]]
    assert "Train:" not in eval_one_rank.result.stdout
    assert f"on {DIGITS_VAL_IMAGES} val images" in eval_one_rank.result.stdout


def test_throughput_prints_images_per_second(digits_dir, tmp_path):
    result = run_main(*demo_args(digits_dir, tmp_path), "--throughput", "--batch-size", 8)
    check_ok(result)
    found = THROUGHPUT_LINE.findall(result.stdout)
    assert len(found) == 1, result.stdout[-3000:]
    batch, speed = found[0]
    assert int(batch) == 8
    assert math.isfinite(float(speed)) and float(speed) > 0
    assert "Train:" not in result.stdout and not accuracies(result.stdout)


def test_eval_and_throughput_leave_the_training_run_untouched(four_epoch_run, digits_dir, capsys):
    before = snapshot(four_epoch_run.run_dir)
    common = ["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", four_epoch_run.output, "--num_workers", 0]
    code, err, out = run_in_process(common + ["--eval", "--resume", four_epoch_run.run_dir / "best.pth"], capsys)
    assert code == 0, err
    code, err, out_throughput = run_in_process(common + ["--throughput", "--batch-size", 8], capsys)
    assert code == 0, err

    assert snapshot(four_epoch_run.run_dir) == before  # byte-identical, no file added or removed
    eval_dir, throughput_dir = four_epoch_run.output / NAME / "default-eval", four_epoch_run.output / NAME / "default-throughput"
    assert yaml.safe_load((eval_dir / "config.yaml").read_text())["EVAL_MODE"] is True
    assert yaml.safe_load((throughput_dir / "config.yaml").read_text())["THROUGHPUT_MODE"] is True
    best = max(four_epoch_run.metrics, key=lambda r: r["acc1"])
    acc1 = float(ACC_LINE_WITH_COUNT.search((eval_dir / "log_rank0.txt").read_text()).group(1))
    assert acc1 == pytest.approx(best["acc1"], abs=5e-4)
    # log polish: rounded throughput with units
    assert re.search(r"batch_size 8 throughput \d+\.\d images/s$", out_throughput, re.M), out_throughput[-2000:]


def test_eval_without_weights_is_one_line_and_exit_2(digits_dir, tmp_path, capsys):
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", tmp_path, "--eval"], capsys)
    assert code == 2
    assert err == ["error: --eval needs weights to evaluate: pass --resume CHECKPOINT or --pretrained WEIGHTS"]
    assert os.listdir(tmp_path) == []  # refused before anything is written


# ----------------------------------------------------------------------------- two CPU ranks
def test_torchrun_two_ranks_train_one_epoch(digits_dir, tmp_path):
    result = run_main(*demo_args(digits_dir, tmp_path), "--epochs", 1, launcher=two_ranks())
    check_ok(result)
    run_dir = tmp_path / DEMO_RUN_DIR
    log0, log1 = ((run_dir / f"log_rank{r}.txt").read_text() for r in (0, 1))
    assert "world size 2" in log0
    for log in (log0, log1):  # 1437 images, 2 ranks, batch 64: 11 steps each
        assert "Train: [0/1][10/11]" in log
        assert re.search(r"\* Acc@1 \d+\.\d+ Acc@5", log)
    assert load_ckpt(run_dir / "ckpt_epoch_0.pth")["epoch"] == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 only


def test_two_rank_eval_with_uneven_shards_matches_one_rank(one_epoch_run, eval_one_rank, digits_dir, tmp_path):
    check_ok(eval_one_rank.result)
    result = run_main(*demo_args(digits_dir, tmp_path), "--eval", "--resume", one_epoch_run.ckpt,
                      "--batch-size", 7, launcher=two_ranks())
    check_ok(result)
    assert "world size 2" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc
    assert f"on {DIGITS_VAL_IMAGES} val images" in result.stdout


def test_distributed_launch_eval_matches_one_rank(one_epoch_run, eval_one_rank, digits_dir, tmp_path):
    pytest.importorskip("torch.distributed.launch")
    check_ok(eval_one_rank.result)
    result = run_main(*demo_args(digits_dir, tmp_path), "--eval", "--resume", one_epoch_run.ckpt,
                      "--batch-size", 5, launcher=two_ranks(standalone=False))
    check_ok(result)
    assert "world size 2" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc
    assert (tmp_path / EVAL_RUN_DIR / "log_rank1.txt").is_file()


# ----------------------------------------------------------------------------- the run folder
def test_saved_config_reused_as_cfg_gives_the_same_run_and_learning_rates(four_epoch_run):
    saved_text = (four_epoch_run.run_dir / "config.yaml").read_text()
    saved = yaml.safe_load(saved_text)
    assert saved["TRAIN"]["BASE_LR"] == pytest.approx(8e-3)  # as asked, not scaled
    assert saved["DATA"]["NUM_WORKERS"] == 0 and saved["TRAIN"]["EPOCHS"] == FOUR_EPOCHS

    _, original = main.parse_option(list(map(str, four_epoch_run.args)))
    _, reused = main.parse_option(["--cfg", str(four_epoch_run.run_dir / "config.yaml"), "--output", str(four_epoch_run.output)])
    assert reused.dump() == original.dump() == saved_text
    for config in (original, reused):
        main.scale_learning_rates(config, world_size=1)
    rates = [(c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR) for c in (original, reused)]
    assert rates[0] == rates[1] == pytest.approx((8e-3 * 64 / 512, 8e-6 * 64 / 512, 8e-5 * 64 / 512))
    log = (four_epoch_run.run_dir / "log_rank0.txt").read_text()
    assert "learning rates for a global batch of 64: base 1.0000e-03, warmup 1.0000e-06, min 1.0000e-05" in log


def test_only_the_newest_k_epoch_checkpoints_and_best_are_kept(four_epoch_run):
    names = sorted(n for n in os.listdir(four_epoch_run.run_dir) if n.endswith(".pth"))
    assert names == ["best.pth"] + [f"ckpt_epoch_{e}.pth" for e in range(FOUR_EPOCHS - KEEP_CHECKPOINTS, FOUR_EPOCHS)]
    best = max(four_epoch_run.metrics, key=lambda r: r["acc1"])
    assert load_checkpoint_file(str(four_epoch_run.run_dir / "best.pth"))["epoch"] == best["epoch"]


def test_log_lines_are_readable(four_epoch_run):
    out = four_epoch_run.result.stdout
    train_lines = [line for line in out.splitlines() if "Train: [" in line]
    assert train_lines and all(READABLE_TRAIN_LINE.search(line) for line in train_lines), train_lines[:2]
    assert all("mem" not in line for line in train_lines)  # no "mem 0MB" on the CPU
    assert all(float(READABLE_TRAIN_LINE.search(line).group(4)) > 0 for line in train_lines)
    accuracy_lines = ACC_LINE_WITH_COUNT.findall(out)
    assert len(accuracy_lines) == FOUR_EPOCHS and {count for *_, count in accuracy_lines} == {"360"}
    assert "test images" not in out
    best = max(four_epoch_run.metrics, key=lambda r: r["acc1"])
    summary = (f"best Acc@1 {best['acc1']:.3f} (Acc@5 {best['acc5']:.3f}) at epoch {best['epoch']}, "
               f"weights in {four_epoch_run.run_dir / 'best.pth'}")
    assert summary in out.splitlines()[-1]


def test_curves_png_and_tensorboard_steps(four_epoch_run, tmp_path):
    png = four_epoch_run.run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size[0] > 1000 and image.size[1] > 300
    # on demand, from the run folder
    assert plot.main([str(four_epoch_run.run_dir)]) == 0
    assert plot.main([str(tmp_path)]) == 2  # no metrics.jsonl: one line, exit 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(four_epoch_run.run_dir / "tensorboard"))
    events.Reload()
    steps_per_epoch = 22
    expected = [e * steps_per_epoch + s for e in range(FOUR_EPOCHS) for s in (0, 5, 10, 15, 20, 21)]
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [event.step for event in events.Scalars(tag)] == expected, tag
    assert [event.step for event in events.Scalars("epoch/acc1")] == [(e + 1) * steps_per_epoch for e in range(FOUR_EPOCHS)]
    assert [event.value for event in events.Scalars("epoch/acc1")] == pytest.approx(
        [r["acc1"] for r in four_epoch_run.metrics])


# ----------------------------------------------------------------------------- bad input: one line, exit 2
def test_digits_are_not_written_into_a_folder_that_does_not_exist(tmp_path, capsys):
    typo = tmp_path / "dtaa" / "digits"
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", typo, "--output", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: dataset folder not found: {typo}")
    assert not (tmp_path / "dtaa").exists()


@pytest.mark.parametrize("value", [0, -3])
def test_batch_size_below_one_is_one_line_and_exit_2(value, tmp_path, capsys):
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--output", tmp_path, "--batch-size", value], capsys)
    assert code == 2
    assert err == [f"error: DATA.BATCH_SIZE (--batch-size) must be at least 1, got {value}"]


def test_text_file_as_resume_is_not_a_checkpoint(digits_dir, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\n")
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", tmp_path / "out",
                                   "--num_workers", 0, "--eval", "--resume", text], capsys)
    assert code == 2
    assert err == [f"error: {text} is not a checkpoint: not a file written by torch.save"]


def bad_input_cases(tmp_path, digits_dir):
    empty = tmp_path / "empty_data"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all")
    other_model = tmp_path / "other_model.pth"
    other = build_model(load_config(DEMO, ["MODEL.CROS.EMBED_DIM", 64, "MODEL.CROS.NUM_HEADS", [2, 4, 8, 16]]))
    torch.save({"model": other.state_dict()}, other_model)
    demo_weights = tmp_path / "demo_weights.pth"  # --eval needs weights
    torch.save({"model": build_model(load_config(DEMO)).state_dict()}, demo_weights)
    images = tmp_path / "images"
    for split in ("train", "val"):
        for label in range(10):
            (images / split / str(label)).mkdir(parents=True)
            Image.new("RGB", (32, 32), (25 * label, 0, 0)).save(images / split / str(label) / "a.png")
    broken = images / "val" / "3" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    base = ["--cfg", DEMO, "--data-path", digits_dir, "--output", str(tmp_path / "out")]
    imagenet = ["--opts", "DATA.DATASET", "imagenet"]
    return {
        "missing data path": (base[:3] + [str(tmp_path / "nowhere")] + base[4:] + imagenet, str(tmp_path / "nowhere")),
        "empty split": (base[:3] + [str(empty)] + base[4:] + imagenet, str(empty / "train")),
        "class count": (base + ["--opts", "MODEL.NUM_CLASSES", "7"], "7"),
        "unknown key": (base + ["--opts", "TRAIN.NOT_A_KEY", "1"], "TRAIN.NOT_A_KEY"),
        "wrong type": (base + ["--opts", "TRAIN.EPOCHS", "many"], "TRAIN.EPOCHS"),
        "missing config": (["--cfg", str(tmp_path / "nope.yaml")], str(tmp_path / "nope.yaml")),
        "missing resume": (base + ["--eval", "--resume", str(tmp_path / "none.pth")], str(tmp_path / "none.pth")),
        "corrupt resume": (base + ["--eval", "--resume", str(garbage)], str(garbage)),
        "foreign pretrained": (base + ["--pretrained", str(other_model)], f"{other_model} does not fit this model"),
        "input too small": (base + ["--opts", "DATA.IMG_SIZE", "16"], "too small"),
        "batch too large": (base + ["--batch-size", "5000"], "5000"),
        "output not writable": (base[:-1] + [str(blocker)], str(blocker)),
        "unreadable image": (base[:3] + [str(images)] + base[4:] + ["--eval", "--pretrained", str(demo_weights), "--batch-size", "2"] + imagenet,
                             f"cannot read image {broken}"),
    }


def test_bad_input_gives_one_line_naming_the_culprit(digits_dir, tmp_path):
    cases = bad_input_cases(tmp_path, digits_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the runs wait on start-up more than on work
        results = dict(zip(cases, pool.map(lambda case: run_main(*case[0]), cases.values())))
    for name, (_, culprit) in cases.items():
        result = results[name]
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], (name, lines)
    assert (tmp_path / "a_file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- train_one_epoch in process: accumulation, two ranks, Mixup + bfloat16
class RecordingScheduler:
    def __init__(self):
        self.updates: list[int] = []

    def step_update(self, num_updates: int) -> None:
        self.updates.append(num_updates)


def record_gradients(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """Wrap ``optimizer.step``: each call first stores a clone of every parameter's gradient."""
    recorded: list[dict] = []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        recorded.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                         if p.grad is not None})
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return recorded


def one_epoch(config, model, batches, mixup_fn=None, criterion=None):
    """``main.train_one_epoch`` over a list of ``(images, labels)`` batches on the CPU."""
    optimizer = build_optimizer(config, model)
    grads = record_gradients(optimizer, model)
    scheduler = RecordingScheduler()
    criterion = criterion or main.build_criterion(config, mixup_fn is not None)
    loss = main.train_one_epoch(config, model, criterion, batches, optimizer, 0, mixup_fn, scheduler, None)
    return SimpleNamespace(loss=loss, grads=grads, updates=scheduler.updates)


PLAIN = ["MODEL.DROP_PATH_RATE", 0.0, "TRAIN.CLIP_GRAD", 0.0, "AUG.MIXUP", 0.0, "AUG.CUTMIX", 0.0,
         "AMP_OPT_LEVEL", "O0", "MODEL.LABEL_SMOOTHING", 0.0]


def random_batches(count: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator),
             torch.randint(0, 10, (size,), generator=generator)) for _ in range(count)]


def test_gradient_accumulation_equals_one_double_batch():
    torch.manual_seed(0)
    accumulate = load_config(DEMO, PLAIN + ["TRAIN.ACCUMULATION_STEPS", 2])
    plain = load_config(DEMO, PLAIN + ["TRAIN.ACCUMULATION_STEPS", 1])
    model = build_model(accumulate)
    twin = copy.deepcopy(model)
    small = random_batches(4, 3)
    large = [(torch.cat([small[i][0], small[i + 1][0]]), torch.cat([small[i][1], small[i + 1][1]]))
             for i in (0, 2)]

    accumulated = one_epoch(accumulate, model, small)
    whole = one_epoch(plain, twin, large)

    # one optimizer step and one scheduler update per two batches, numbered by update
    assert len(accumulated.grads) == 2 and accumulated.updates == [1, 2]
    assert len(whole.grads) == 2 and whole.updates == [1, 2]
    first, reference = accumulated.grads[0], whole.grads[0]
    assert set(first) == {name for name, _ in model.named_parameters()}
    assert set(first) == set(reference)
    for name in reference:
        difference = (first[name] - reference[name]).abs().max().item()
        assert difference <= 1e-6, f"{name}: accumulated gradient differs by {difference}"
    assert any(g.abs().max() > 1e-4 for g in reference.values())  # the comparison is not of zeros
    assert math.isfinite(accumulated.loss) and math.isfinite(whole.loss)


def test_trailing_partial_accumulation_is_left_out():
    config = load_config(DEMO, PLAIN + ["TRAIN.ACCUMULATION_STEPS", 2])
    torch.manual_seed(0)
    model = build_model(config)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    result = one_epoch(config, model, random_batches(5, 2))
    assert result.updates == [1, 2] and len(result.grads) == 2
    assert seen == [2, 2, 2, 2]  # the fifth batch could never complete an update


def train_steps(rank, world_size, port, global_batches, accumulation, initial, result_path):
    """Train on this rank's share of every global batch; rank 0 saves the gradients of every
    optimizer step and the final weights."""
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    config = load_config(DEMO, ["MODEL.DROP_PATH_RATE", 0.0, "TRAIN.ACCUMULATION_STEPS", accumulation, "TRAIN.CLIP_GRAD", 0.0,
                                "PRINT_FREQ", 1000, "AMP_OPT_LEVEL", "O0", "MODEL.LABEL_SMOOTHING", 0.0])
    model = build_model(config).double()  # float64: compare the arithmetic, not float32 rounding
    model.load_state_dict(initial)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    optimizer = build_optimizer(config, model)
    updates = len(global_batches) // accumulation
    scheduler = build_scheduler(config, optimizer, updates)
    grads = []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.clone() for p in model.parameters()])
        return step(*args, **kwargs)

    optimizer.step = recording_step
    loader = [(images[rank::world_size], labels[rank::world_size]) for images, labels in global_batches]
    main.train_one_epoch(config, ddp, main.build_criterion(config, False), loader, optimizer, 0, None, scheduler, None)
    if rank == 0:
        torch.save({"grads": grads, "model": model.state_dict()}, result_path)
    if world_size > 1:
        dist.destroy_process_group()


def test_two_rank_accumulated_training_equals_one_big_batch(tmp_path):
    """2 ranks x 2 accumulation steps x 4 images per batch must train exactly like one process
    taking all 16 images at once: same gradients at every optimizer step, same weights."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))) for _ in range(4)]
    merged = [(torch.cat([batches[i][0], batches[i + 1][0]]), torch.cat([batches[i][1], batches[i + 1][1]]))
              for i in (0, 2)]
    initial = build_model(load_config(DEMO, ["MODEL.DROP_PATH_RATE", 0.0])).double().state_dict()
    one_path, two_path = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    train_steps(0, 1, free_port(), merged, 1, initial, one_path)
    mp.spawn(train_steps, args=(2, free_port(), batches, 2, initial, two_path), nprocs=2)
    one, two = torch.load(one_path, weights_only=True), torch.load(two_path, weights_only=True)
    assert len(one["grads"]) == len(two["grads"]) == 2
    for step_one, step_two in zip(one["grads"], two["grads"]):
        for g1, g2 in zip(step_one, step_two):
            torch.testing.assert_close(g1, g2, rtol=0, atol=1e-6)
    assert_same_weights(one["model"], two["model"])


def test_mixup_bfloat16_training_step_on_cpu():
    config = load_config(DEMO, [
        "AUG.MIXUP", 0.8, "AUG.CUTMIX", 1.0, "AMP_DTYPE", "bfloat16", "AMP_OPT_LEVEL", "O1",
        "DATA.BATCH_SIZE", 4])
    precision = runtime.Precision(config, torch.device("cpu"))
    assert precision.enabled and precision.dtype == torch.bfloat16
    mixup_fn = build_mixup(config)
    assert mixup_fn is not None
    soft_loss = main.build_criterion(config, mixup=True)
    assert isinstance(soft_loss, SoftTargetCrossEntropy)

    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws its mixing factors from numpy
    model = build_model(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logit_types, targets_seen = [], []
    model.head.register_forward_hook(lambda module, inputs, output: logit_types.append(output.dtype))

    def criterion(logits, targets):
        targets_seen.append(targets)
        return soft_loss(logits, targets)

    labels = torch.tensor([0, 1, 2, 3])  # each pairs with a different label (i with 3 - i)
    batches = [(torch.randn(4, 3, 32, 32), labels), (torch.randn(4, 3, 32, 32), labels)]
    result = one_epoch(config, model, batches, mixup_fn=mixup_fn, criterion=criterion)

    assert math.isfinite(result.loss) and result.loss > 0
    assert logit_types == [torch.bfloat16, torch.bfloat16]
    assert len(targets_seen) == 2
    for targets in targets_seen:
        assert targets.shape == (4, 10)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(4))
        assert targets.max() < 0.9  # mixed: no row keeps its one (smoothed) label
    assert result.updates == [1, 2]
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert "head.weight" in changed and "patch_embed.projs.0.weight" in changed
    assert all(p.detach().dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(changed) >= 0.9 * len(before), f"only {len(changed)} of {len(before)} parameters moved"


# ----------------------------------------------------------------------------- fine-tuning, zip mode, a later start epoch
def test_pretrained_with_another_class_count_fine_tunes(one_epoch_run, tmp_path):
    """Digits weights (10 classes) into a 5-class model on fake data, from a different seed: the
    head is skipped (and logged), every other weight starts from the checkpoint."""
    result = run_main("--cfg", DEMO_CFG, "--output", tmp_path, "--num_workers", 0, "--epochs", 1,
                      "--pretrained", one_epoch_run.ckpt, "--batch-size", 16, "--seed", 1,
                      "--opts", "DATA.DATASET", "fake", "MODEL.NUM_CLASSES", 5, "DATA.FAKE_SIZE", 64)
    check_ok(result)
    log = (tmp_path / DEMO_RUN_DIR / "log_rank0.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipped" in line]
    assert len(skipped) == 1, log[-3000:]
    assert "'head.weight'" in skipped[0] and "'head.bias'" in skipped[0]
    assert "WARNING" in skipped[0]
    assert f"loaded pretrained weights from {one_epoch_run.ckpt}" in log
    assert "Train: [0/1][3/4]" in log  # 64 fake images, batch 16

    pretrained = load_ckpt(one_epoch_run.ckpt)["model"]
    tuned = load_ckpt(tmp_path / DEMO_RUN_DIR / "ckpt_epoch_0.pth")
    assert tuned["epoch"] == 0
    weights = tuned["model"]
    assert weights["head.weight"].shape == (5, pretrained["head.weight"].shape[1])
    assert weights["head.bias"].shape == (5,)
    assert set(weights) == set(pretrained)
    # four warm-up steps move a weight by well under 1e-2; a fresh initialisation is far away
    for name, value in weights.items():
        if not name.startswith("head."):
            difference = (value.float() - pretrained[name].float()).abs().max().item()
            assert difference < 1e-2, f"{name} moved {difference} from the pretrained weights"


def zip_split(folder: str, split: str, zip_root) -> None:
    """``zip_root/<split>.zip`` and ``<split>_map.txt`` in ImageFolder order (classes, then files)."""
    lines = []
    with zipfile.ZipFile(zip_root / f"{split}.zip", "w", zipfile.ZIP_STORED) as archive:
        for label, name in enumerate(sorted(os.listdir(os.path.join(folder, split)))):
            for image in sorted(os.listdir(os.path.join(folder, split, name))):
                inner = f"{split}/{name}/{image}"
                archive.write(os.path.join(folder, split, name, image), inner)
                lines.append(f"{inner}\t{label}\n")
    (zip_root / f"{split}_map.txt").write_text("".join(lines))


def test_zip_mode_eval_matches_folder_mode(one_epoch_run, eval_one_rank, digits_dir, tmp_path):
    check_ok(eval_one_rank.result)
    zip_root = tmp_path / "zips"
    zip_root.mkdir()
    for split in ("train", "val"):
        zip_split(digits_dir, split, zip_root)
    result = run_main("--cfg", DEMO_CFG, "--data-path", zip_root, "--output", tmp_path / "out",
                      "--num_workers", 0, "--zip", "--eval", "--resume", one_epoch_run.ckpt,
                      "--opts", "DATA.DATASET", "imagenet")
    check_ok(result)
    assert f"on {DIGITS_VAL_IMAGES} val images" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc


def test_start_epoch_starts_a_fresh_run_at_that_epoch_of_the_schedule(tmp_path):
    opts = ["DATA.DATASET", "fake", "DATA.FAKE_SIZE", 64, "TRAIN.WARMUP_EPOCHS", 0, "PRINT_FREQ", 1,
            "TRAIN.START_EPOCH", 2]
    result = run_main("--cfg", DEMO_CFG, "--output", tmp_path, "--num_workers", 0, "--batch-size", 16,
                      "--epochs", 3, "--opts", *opts)
    check_ok(result)
    printed = {(int(e), int(step)): float(lr) for e, _, step, _, lr, _ in TRAIN_LINE.findall(result.stdout)}
    assert sorted(printed) == [(2, s) for s in range(4)]
    config = load_config(DEMO, ["TRAIN.EPOCHS", 3, "DATA.BATCH_SIZE", 16, *opts])
    main.scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedule = build_scheduler(config, optimizer, 4)
    schedule.step_update(2 * 4 + 3 + 1)
    assert printed[(2, 3)] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-6)
    assert [json.loads(line)["epoch"] for line in (tmp_path / DEMO_RUN_DIR / "metrics.jsonl").read_text().splitlines()] == [2]
