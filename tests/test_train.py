"""main.py end to end: one demo epoch, eval, throughput, auto-resume, two CPU ranks (torchrun and
torch.distributed.launch), fine-tuning with another head, zip mode; in process: gradient
accumulation and a Mixup + bfloat16 training step.

The digits epoch is trained once per module; the eval, throughput, resume, distributed, fine-tune
and zip tests reuse its output. main.py runs as a subprocess from the repository root.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from timm.loss import SoftTargetCrossEntropy

import main
import runtime
from config import load_config
from data.build import build_mixup
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = "configs/demo/digits.yaml"
RUN_SUBDIR = os.path.join("cros_demo_digits", "default")
RUN_SUBDIR_EVAL = RUN_SUBDIR + "-eval"  # --eval runs write beside the training run, never into it
DIGITS_VAL_IMAGES = 360
TIMEOUT_S = 300
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")

ACC_LINE = re.compile(r" \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)")
TRAIN_LINE = re.compile(r"Train: \[(\d+)/(\d+)\]\[(\d+)/(\d+)\].*?lr (\S+)\s.*?grad_norm (\S+) ")
THROUGHPUT_LINE = re.compile(r"batch_size (\d+) throughput (\S+)")


# ----------------------------------------------------------------------------- helpers
def run_main(*args, launcher: tuple = (), timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python [launcher...] main.py args`` from the repository root, outside any launcher's env."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # two threads on these tiny ops run far slower
    command = [sys.executable, *launcher, "main.py", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode}\n--- stdout (tail)\n{result.stdout[-4000:]}\n"
            f"--- stderr (tail)\n{result.stderr[-4000:]}")


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, explain(result)


def accuracies(text: str) -> list[tuple[str, str]]:
    """Every ``(Acc@1, Acc@5)`` pair printed by ``validate``, as printed (three decimals)."""
    return ACC_LINE.findall(text)


def two_ranks(*, standalone: bool = True) -> tuple:
    if standalone:
        return ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    with socket.socket() as s:  # a free port for torch.distributed.launch's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ("-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port))


def load_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def common_args(data_path, output) -> list:
    return ["--cfg", DEMO_CFG, "--data-path", data_path, "--output", output, "--num_workers", 0]


# ----------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory) -> SimpleNamespace:
    """One epoch of the demo config on digits (demo model, batch 64, 22 steps)."""
    output = tmp_path_factory.mktemp("train1")
    result = run_main(*common_args(digits_dir, output), "--epochs", 1, "--opts", "PRINT_FREQ", 5)
    check_ok(result)
    run_dir = output / RUN_SUBDIR
    return SimpleNamespace(result=result, output=output, run_dir=run_dir,
                           ckpt=run_dir / "ckpt_epoch_0.pth", acc=accuracies(result.stdout))


@pytest.fixture(scope="module")
def eval_one_rank(trained, digits_dir, tmp_path_factory) -> SimpleNamespace:
    """``--eval --resume ckpt_epoch_0.pth`` in one process."""
    output = tmp_path_factory.mktemp("eval1")
    result = run_main(*common_args(digits_dir, output), "--eval", "--resume", trained.ckpt)
    return SimpleNamespace(result=result, acc=accuracies(result.stdout))


# ----------------------------------------------------------------------------- 1. one demo epoch
def test_demo_config_trains_one_epoch(trained):
    run_dir = trained.run_dir
    for name in ("config.yaml", "log_rank0.txt", "metrics.jsonl", "ckpt_epoch_0.pth", "best.pth"):
        assert (run_dir / name).is_file(), f"{name} missing from {sorted(os.listdir(run_dir))}"

    assert len(trained.acc) == 1, trained.result.stdout[-3000:]
    acc1, acc5 = map(float, trained.acc[0])
    assert 0 <= acc1 <= acc5 <= 100
    assert acc1 > 20, "one epoch on digits should beat chance (10%) clearly"

    train_lines = TRAIN_LINE.findall(trained.result.stdout)
    assert train_lines, trained.result.stdout[-3000:]
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
    assert saved["DATA"]["DATA_PATH"] == trained.result.args[trained.result.args.index("--data-path") + 1]
    assert saved["OUTPUT"] == str(run_dir)

    log = (run_dir / "log_rank0.txt").read_text()
    assert f" * Acc@1 {trained.acc[0][0]} Acc@5 {trained.acc[0][1]}" in log
    assert "Train: [0/1][21/22]" in log

    ckpt = load_ckpt(run_dir / "ckpt_epoch_0.pth")
    assert {"model", "optimizer", "lr_scheduler", "scaler", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 0
    assert ckpt["model"]["head.weight"].shape == (10, 256)
    assert load_ckpt(run_dir / "best.pth")["epoch"] == 0


# ----------------------------------------------------------------------------- 2. eval
def test_eval_resume_prints_the_training_accuracy(trained, eval_one_rank):
    check_ok(eval_one_rank.result)
    assert eval_one_rank.acc == [trained.acc[-1]]
    assert "Train:" not in eval_one_rank.result.stdout
    assert f"on {DIGITS_VAL_IMAGES} val images" in eval_one_rank.result.stdout


# ----------------------------------------------------------------------------- 3. throughput
def test_throughput_prints_images_per_second(digits_dir, tmp_path):
    result = run_main(*common_args(digits_dir, tmp_path), "--throughput", "--batch-size", 8)
    check_ok(result)
    found = THROUGHPUT_LINE.findall(result.stdout)
    assert len(found) == 1, result.stdout[-3000:]
    batch, speed = found[0]
    assert int(batch) == 8
    assert math.isfinite(float(speed)) and float(speed) > 0
    assert "Train:" not in result.stdout and not accuracies(result.stdout)


# ----------------------------------------------------------------------------- 4. auto-resume
def test_auto_resume_continues_from_the_newest_epoch_checkpoint(trained, digits_dir, tmp_path):
    """The epoch-1 run's output gets ``--epochs 2``; best.pth is rewritten to claim epoch 1 (and
    is the newest file), so resuming from it would train nothing: the epoch checkpoint must win."""
    output = tmp_path / "out"
    shutil.copytree(trained.output, output)
    run_dir = output / RUN_SUBDIR
    best = load_ckpt(run_dir / "best.pth")
    best["epoch"] = 1
    torch.save(best, run_dir / "best.pth")

    result = run_main(*common_args(digits_dir, output), "--epochs", 2, "--opts", "PRINT_FREQ", 5)
    check_ok(result)
    assert str(run_dir / "ckpt_epoch_0.pth") in result.stdout  # named as the file resumed from
    assert "resuming training at epoch 1" in result.stdout
    train_lines = TRAIN_LINE.findall(result.stdout)
    assert "Train: [0/2]" not in result.stdout
    assert train_lines and {(e, total) for e, total, *_ in train_lines} == {("1", "2")}

    # the schedule goes on from update 22 rather than starting its warm-up again
    last_lr_epoch0 = float(TRAIN_LINE.findall(trained.result.stdout)[-1][4])
    assert float(train_lines[0][4]) > last_lr_epoch0

    ckpt1 = load_ckpt(run_dir / "ckpt_epoch_1.pth")
    assert ckpt1["epoch"] == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    log = (run_dir / "log_rank0.txt").read_text()  # appended to by the second run
    assert "Train: [0/1]" in log and "resuming training at epoch 1" in log and "Train: [1/2]" in log


# ----------------------------------------------------------------------------- 5. two CPU ranks
def test_torchrun_two_ranks_train_one_epoch(digits_dir, tmp_path):
    result = run_main(*common_args(digits_dir, tmp_path), "--epochs", 1, launcher=two_ranks())
    check_ok(result)
    run_dir = tmp_path / RUN_SUBDIR
    log0, log1 = ((run_dir / f"log_rank{r}.txt").read_text() for r in (0, 1))
    assert "world size 2" in log0
    for log in (log0, log1):  # 1437 images, 2 ranks, batch 64: 11 steps each
        assert "Train: [0/1][10/11]" in log
        assert re.search(r"\* Acc@1 \d+\.\d+ Acc@5", log)
    assert load_ckpt(run_dir / "ckpt_epoch_0.pth")["epoch"] == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 only


def test_two_rank_eval_with_uneven_shards_matches_one_rank(trained, eval_one_rank, digits_dir, tmp_path):
    check_ok(eval_one_rank.result)
    result = run_main(*common_args(digits_dir, tmp_path), "--eval", "--resume", trained.ckpt,
                      "--batch-size", 7, launcher=two_ranks())
    check_ok(result)
    assert "world size 2" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc
    assert f"on {DIGITS_VAL_IMAGES} val images" in result.stdout


def test_distributed_launch_eval_matches_one_rank(trained, eval_one_rank, digits_dir, tmp_path):
    pytest.importorskip("torch.distributed.launch")
    check_ok(eval_one_rank.result)
    result = run_main(*common_args(digits_dir, tmp_path), "--eval", "--resume", trained.ckpt,
                      "--batch-size", 5, launcher=two_ranks(standalone=False))
    check_ok(result)
    assert "world size 2" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc
    assert (tmp_path / RUN_SUBDIR_EVAL / "log_rank1.txt").is_file()


# ----------------------------------------------------------------------------- in-process helpers
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


# ----------------------------------------------------------------------------- 6. accumulation
def test_gradient_accumulation_equals_one_double_batch():
    torch.manual_seed(0)
    accumulate = load_config(os.path.join(REPO, DEMO_CFG), PLAIN + ["TRAIN.ACCUMULATION_STEPS", 2])
    plain = load_config(os.path.join(REPO, DEMO_CFG), PLAIN + ["TRAIN.ACCUMULATION_STEPS", 1])
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
    config = load_config(os.path.join(REPO, DEMO_CFG), PLAIN + ["TRAIN.ACCUMULATION_STEPS", 2])
    torch.manual_seed(0)
    model = build_model(config)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    result = one_epoch(config, model, random_batches(5, 2))
    assert result.updates == [1, 2] and len(result.grads) == 2
    assert seen == [2, 2, 2, 2]  # the fifth batch could never complete an update


# ----------------------------------------------------------------------------- 7. Mixup + bf16
@pytest.mark.parametrize("level, dtype, enabled", [("O1", "bfloat16", True), ("O1", "float16", True),
                                                   ("O0", "bfloat16", False), ("O2", "bfloat16", True)])
@pytest.mark.filterwarnings("ignore:AMP_DTYPE float16")  # float16 on a CPU: honoured, with a warning
def test_precision_on_cpu(level, dtype, enabled):
    config = load_config(os.path.join(REPO, DEMO_CFG), ["AMP_OPT_LEVEL", level, "AMP_DTYPE", dtype])
    precision = runtime.Precision(config, torch.device("cpu"))
    expected = getattr(torch, dtype) if enabled else torch.float32
    assert precision.enabled is enabled
    assert precision.dtype == expected
    assert precision.scaler.is_enabled() is (expected == torch.float16)  # float16 autocast needs the scaler
    with precision.autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == expected


def test_mixup_bfloat16_training_step_on_cpu():
    config = load_config(os.path.join(REPO, DEMO_CFG), [
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


# ----------------------------------------------------------------------------- 8. fine-tuning
def test_pretrained_with_another_class_count_fine_tunes(trained, tmp_path):
    """Digits weights (10 classes) into a 5-class model on fake data, from a different seed: the
    head is skipped (and logged), every other weight starts from the checkpoint."""
    result = run_main("--cfg", DEMO_CFG, "--output", tmp_path, "--num_workers", 0, "--epochs", 1,
                      "--pretrained", trained.ckpt, "--batch-size", 16, "--seed", 1,
                      "--opts", "DATA.DATASET", "fake", "MODEL.NUM_CLASSES", 5, "DATA.FAKE_SIZE", 64)
    check_ok(result)
    log = (tmp_path / RUN_SUBDIR / "log_rank0.txt").read_text()
    skipped = [line for line in log.splitlines() if "skipped" in line]
    assert len(skipped) == 1, log[-3000:]
    assert "'head.weight'" in skipped[0] and "'head.bias'" in skipped[0]
    assert "WARNING" in skipped[0]
    assert f"loaded pretrained weights from {trained.ckpt}" in log
    assert "Train: [0/1][3/4]" in log  # 64 fake images, batch 16

    pretrained = load_ckpt(trained.ckpt)["model"]
    tuned = load_ckpt(tmp_path / RUN_SUBDIR / "ckpt_epoch_0.pth")
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


# ----------------------------------------------------------------------------- 9. zip mode
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


def test_zip_mode_eval_matches_folder_mode(trained, eval_one_rank, digits_dir, tmp_path):
    check_ok(eval_one_rank.result)
    zip_root = tmp_path / "zips"
    zip_root.mkdir()
    for split in ("train", "val"):
        zip_split(digits_dir, split, zip_root)
    result = run_main("--cfg", DEMO_CFG, "--data-path", zip_root, "--output", tmp_path / "out",
                      "--num_workers", 0, "--zip", "--eval", "--resume", trained.ckpt,
                      "--opts", "DATA.DATASET", "imagenet")
    check_ok(result)
    assert f"on {DIGITS_VAL_IMAGES} val images" in result.stdout
    assert accuracies(result.stdout) == eval_one_rank.acc


# ----------------------------------------------------------------------------- 4b. resume, longer run
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

    config = load_config(os.path.join(REPO, DEMO_CFG), ["TRAIN.EPOCHS", 3, "DATA.BATCH_SIZE", 16, *opts])
    main.scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedule = build_scheduler(config, optimizer, 4)
    for (epoch, step), lr in sorted(printed.items()):
        schedule.step_update(epoch * 4 + step + 1)  # the update just made when the line is printed
        expected = optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(expected, abs=1e-6), f"epoch {epoch} step {step}: lr {lr}, expected {expected:.6f}"


def test_start_epoch_starts_a_fresh_run_at_that_epoch_of_the_schedule(tmp_path):
    opts = ["DATA.DATASET", "fake", "DATA.FAKE_SIZE", 64, "TRAIN.WARMUP_EPOCHS", 0, "PRINT_FREQ", 1,
            "TRAIN.START_EPOCH", 2]
    result = run_main("--cfg", DEMO_CFG, "--output", tmp_path, "--num_workers", 0, "--batch-size", 16,
                      "--epochs", 3, "--opts", *opts)
    check_ok(result)
    printed = {(int(e), int(step)): float(lr) for e, _, step, _, lr, _ in TRAIN_LINE.findall(result.stdout)}
    assert sorted(printed) == [(2, s) for s in range(4)]
    config = load_config(os.path.join(REPO, DEMO_CFG), ["TRAIN.EPOCHS", 3, "DATA.BATCH_SIZE", 16, *opts])
    main.scale_learning_rates(config, world_size=1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.TRAIN.BASE_LR)
    schedule = build_scheduler(config, optimizer, 4)
    schedule.step_update(2 * 4 + 3 + 1)
    assert printed[(2, 3)] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-6)
    assert [json.loads(line)["epoch"] for line in (tmp_path / RUN_SUBDIR / "metrics.jsonl").read_text().splitlines()] == [2]
