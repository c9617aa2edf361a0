"""A run people can trust (issue 10): eval/throughput runs in their own folders, weights required
for --eval, CPU sharing, a reusable config.yaml, digits only into existing folders, one-line
errors for bad values and files, metrics without resume duplicates, a finished run that says
so, newest-K checkpoints, predict.py, curves and TensorBoard scalars, the installable package.

One 4-epoch digits run is trained per module (a subprocess, like a user's run); most tests read
its folder or start from a copy of it. Error cases run main.run in this process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from PIL import Image

import main
import plot
import predict
import runtime
from config import UserError, load_config
from data.build import build_transform
from data.images import load_image_file
from logger import JsonLinesWriter
from models import build_model
from utils import load_checkpoint_file, prune_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread_in_process")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = "configs/demo/digits.yaml"
NAME = "cros_demo_digits"
EPOCHS = 4
KEEP = 2
TIMEOUT_S = 300
ACC_LINE = re.compile(r" \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+) loss \S+ on (\d+) val images")
TRAIN_LINE = re.compile(r"Train: \[(\d+)/\d+\]\[(\d+)/(\d+)\]\teta \S+ \(run \S+\) lr (\S+)\t.*grad_norm \S+ \(\S+\)$")


def run_script(script: str, *args, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def train_args(digits_dir, output) -> list:
    return ["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", output, "--num_workers", 0,
            "--epochs", EPOCHS, "--opts", "KEEP_CHECKPOINTS", KEEP, "SAVE_FREQ", 1, "PRINT_FREQ", 5]


def snapshot(folder) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def run_in_process(argv: list, capsys) -> tuple[int, list[str], str]:
    """``main.run(argv)`` here: exit code, stderr lines, stdout."""
    capsys.readouterr()
    code = main.run([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory) -> SimpleNamespace:
    output = tmp_path_factory.mktemp("train")
    args = train_args(digits_dir, output)
    result = run_script("main.py", *args)
    check_ok(result)
    run_dir = output / NAME / "default"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(args=args, output=output, run_dir=run_dir, result=result, metrics=metrics)


# ----------------------------------------------------------------------------- 1. separate runs
def test_eval_and_throughput_leave_the_training_run_untouched(trained, digits_dir, capsys):
    before = snapshot(trained.run_dir)
    common = ["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", trained.output, "--num_workers", 0]
    code, err, out = run_in_process(common + ["--eval", "--resume", trained.run_dir / "best.pth"], capsys)
    assert code == 0, err
    code, err, out_throughput = run_in_process(common + ["--throughput", "--batch-size", 8], capsys)
    assert code == 0, err

    assert snapshot(trained.run_dir) == before  # byte-identical, no file added or removed
    eval_dir, throughput_dir = trained.output / NAME / "default-eval", trained.output / NAME / "default-throughput"
    assert yaml.safe_load((eval_dir / "config.yaml").read_text())["EVAL_MODE"] is True
    assert yaml.safe_load((throughput_dir / "config.yaml").read_text())["THROUGHPUT_MODE"] is True
    best = max(trained.metrics, key=lambda r: r["acc1"])
    acc1 = float(ACC_LINE.search((eval_dir / "log_rank0.txt").read_text()).group(1))
    assert acc1 == pytest.approx(best["acc1"], abs=5e-4)
    # log polish: rounded throughput with units
    assert re.search(r"batch_size 8 throughput \d+\.\d images/s$", out_throughput, re.M), out_throughput[-2000:]


# ----------------------------------------------------------------------------- 2. --eval needs weights
def test_eval_without_weights_is_one_line_and_exit_2(digits_dir, tmp_path, capsys):
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", tmp_path, "--eval"], capsys)
    assert code == 2
    assert err == ["error: --eval needs weights to evaluate: pass --resume CHECKPOINT or --pretrained WEIGHTS"]
    assert os.listdir(tmp_path) == []  # refused before anything is written


# ----------------------------------------------------------------------------- 3. CPU sharing
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
    config = load_config(os.path.join(REPO, DEMO_CFG), ["DATA.NUM_WORKERS", 8])
    line = runtime.limit_cpu_use(config, info)
    assert config.DATA.NUM_WORKERS == 3 and config.is_frozen() and torch.get_num_threads() == 1
    assert line == ("CPU plan: 4 cores, 0.0 busy with other work (measured over 0.25 s), 1 training process(es) here; "
                    "per process: 3 data-loading workers (8 asked), 1 torch threads")
    throughput = load_config(os.path.join(REPO, DEMO_CFG), ["DATA.NUM_WORKERS", 8, "THROUGHPUT_MODE", True])
    runtime.limit_cpu_use(throughput, info)  # one batch to read: every core computes
    assert throughput.DATA.NUM_WORKERS == 0 and torch.get_num_threads() == 4
    busy = load_config(os.path.join(REPO, DEMO_CFG), ["DATA.NUM_WORKERS", 8])
    line = runtime.limit_cpu_use(busy, info)  # 1.4 busy: 2 cores taken (threads would wait on a 40% one)
    assert busy.DATA.NUM_WORKERS == 1 and torch.get_num_threads() == 1
    assert "1.4 busy with other work" in line and "1 data-loading workers (8 asked), 1 torch threads" in line
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    line = runtime.limit_cpu_use(load_config(os.path.join(REPO, DEMO_CFG), ["DATA.NUM_WORKERS", 1]), info)
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


# ----------------------------------------------------------------------------- 4. config.yaml reused
def test_saved_config_reused_as_cfg_gives_the_same_run_and_learning_rates(trained):
    saved_text = (trained.run_dir / "config.yaml").read_text()
    saved = yaml.safe_load(saved_text)
    assert saved["TRAIN"]["BASE_LR"] == pytest.approx(8e-3)  # as asked, not scaled
    assert saved["DATA"]["NUM_WORKERS"] == 0 and saved["TRAIN"]["EPOCHS"] == EPOCHS

    _, original = main.parse_option(list(map(str, trained.args)))
    _, reused = main.parse_option(["--cfg", str(trained.run_dir / "config.yaml"), "--output", str(trained.output)])
    assert reused.dump() == original.dump() == saved_text
    for config in (original, reused):
        main.scale_learning_rates(config, world_size=1)
    rates = [(c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR) for c in (original, reused)]
    assert rates[0] == rates[1] == pytest.approx((8e-3 * 64 / 512, 8e-6 * 64 / 512, 8e-5 * 64 / 512))
    log = (trained.run_dir / "log_rank0.txt").read_text()
    assert "learning rates for a global batch of 64: base 1.0000e-03, warmup 1.0000e-06, min 1.0000e-05" in log


# ----------------------------------------------------------------------------- 5. mistyped --data-path
def test_digits_are_not_written_into_a_folder_that_does_not_exist(tmp_path, capsys):
    typo = tmp_path / "dtaa" / "digits"
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", typo, "--output", tmp_path / "out"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: dataset folder not found: {typo}")
    assert not (tmp_path / "dtaa").exists()


# ----------------------------------------------------------------------------- 6. one-line errors
@pytest.mark.parametrize("value", [0, -3])
def test_batch_size_below_one_is_one_line_and_exit_2(value, tmp_path, capsys):
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--output", tmp_path, "--batch-size", value], capsys)
    assert code == 2
    assert err == [f"error: DATA.BATCH_SIZE (--batch-size) must be at least 1, got {value}"]


class CallsSystem:
    """Unpickling this calls ``os.system``: a checkpoint that runs a command."""

    def __reduce__(self):
        return os.system, ("true",)


def test_checkpoint_files_are_told_apart(tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\n")
    system_zip = tmp_path / "system.pth"
    torch.save({"model": {"w": torch.ones(1)}, "hook": CallsSystem()}, system_zip)
    system_legacy = tmp_path / "system_legacy.pth"
    torch.save({"model": {"w": torch.ones(1)}, "hook": CallsSystem()}, system_legacy,
               _use_new_zipfile_serialization=False)
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.ones(1)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.ones(1)}}, legacy, _use_new_zipfile_serialization=False)

    with pytest.raises(UserError, match=f"^{re.escape(str(text))} is not a checkpoint: not a file written by torch.save$"):
        load_checkpoint_file(str(text))
    with pytest.raises(UserError, match=r"^cannot read checkpoint .*truncated.pth: damaged"):
        load_checkpoint_file(str(truncated))
    assert torch.equal(load_checkpoint_file(str(legacy))["model"]["w"], torch.ones(1))
    refused = rf"^refusing to load .*: it needs full unpickling, which can run code \(it imports {os.name}\.system\)"
    for path in (system_zip, system_legacy):
        with pytest.raises(UserError, match=refused):
            load_checkpoint_file(str(path))
    # torch before 2.5 has no get_unsafe_globals_in_checkpoint: the opcode listing answers instead
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    with pytest.raises(UserError, match=refused):
        load_checkpoint_file(str(system_zip))
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint_file(str(truncated))


def test_text_file_as_resume_is_not_a_checkpoint(digits_dir, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes\n")
    code, err, _ = run_in_process(["--cfg", DEMO_CFG, "--data-path", digits_dir, "--output", tmp_path / "out",
                                   "--num_workers", 0, "--eval", "--resume", text], capsys)
    assert code == 2
    assert err == [f"error: {text} is not a checkpoint: not a file written by torch.save"]


# ----------------------------------------------------------------------------- 7. resume and finished runs
def test_resume_writes_each_epoch_once_and_a_finished_run_says_so(trained, tmp_path):
    """The last epoch's checkpoint is lost after its metrics line was written (as a kill between
    the two, or SAVE_FREQ > 1, leaves it): the relaunch trains that epoch again, exactly, and
    metrics.jsonl still has one line per epoch. A second relaunch trains nothing and says why."""
    output = tmp_path / "out"
    shutil.copytree(trained.output / NAME / "default", output / NAME / "default")
    run_dir = output / NAME / "default"
    (run_dir / f"ckpt_epoch_{EPOCHS - 1}.pth").unlink()
    args = train_args(trained.args[trained.args.index("--data-path") + 1], output)

    result = run_script("main.py", *args)
    check_ok(result)
    assert f"resuming training at epoch {EPOCHS - 1}" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    assert records[:-1] == trained.metrics[:-1]  # untouched
    for key in ("acc1", "acc5", "val_loss", "train_loss", "lr"):  # the replay is exact on the CPU
        assert records[-1][key] == pytest.approx(trained.metrics[-1][key], abs=1e-6), key

    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    again = run_script("main.py", *args)
    check_ok(again)
    assert f"the run is complete: all {EPOCHS} epochs are trained" in again.stdout
    assert f"--epochs N (N > {EPOCHS})" in again.stdout
    assert "Train:" not in again.stdout and "resuming training" not in again.stdout
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before


def test_metrics_keep_before_drops_replayed_and_cut_lines(tmp_path):
    writer = JsonLinesWriter(str(tmp_path))
    for epoch in range(3):
        writer.write({"epoch": epoch, "acc1": float(epoch)})
    with open(writer.path, "a") as f:
        f.write('{"epoch": 3, "ac')  # a kill in the middle of a line
    writer.keep_before("epoch", 2)
    assert [json.loads(line) for line in open(writer.path)] == [{"epoch": 0, "acc1": 0.0}, {"epoch": 1, "acc1": 1.0}]


# ----------------------------------------------------------------------------- 8. newest K + best
def test_only_the_newest_k_epoch_checkpoints_and_best_are_kept(trained):
    names = sorted(n for n in os.listdir(trained.run_dir) if n.endswith(".pth"))
    assert names == ["best.pth"] + [f"ckpt_epoch_{e}.pth" for e in range(EPOCHS - KEEP, EPOCHS)]
    best = max(trained.metrics, key=lambda r: r["acc1"])
    assert load_checkpoint_file(str(trained.run_dir / "best.pth"))["epoch"] == best["epoch"]


def test_prune_checkpoints_keeps_newest(tmp_path):
    for name in ("ckpt_epoch_1.pth", "ckpt_epoch_10.pth", "ckpt_epoch_2.pth", "best.pth", "ckpt_epoch_x.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert prune_checkpoints(str(tmp_path), 0) == []
    deleted = prune_checkpoints(str(tmp_path), 2)
    assert deleted == [str(tmp_path / "ckpt_epoch_1.pth")]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "ckpt_epoch_10.pth", "ckpt_epoch_2.pth", "ckpt_epoch_x.pth"]


# ----------------------------------------------------------------------------- 9. predict.py
def test_predict_names_the_classes_of_held_out_digits(trained, digits_dir, tmp_path):
    """Two val images per digit (never trained on), one of them saved in another image mode."""
    images, labels = [], []
    for label in range(10):
        folder = os.path.join(digits_dir, "val", str(label))
        for index, name in enumerate(sorted(os.listdir(folder))[:2]):
            path = os.path.join(folder, name)
            if index == 1:  # the same pixels as RGBA, palette or 16-bit: the same classification
                mode = ("RGBA", "P", "I;16", "RGB")[label % 4]
                path = str(tmp_path / f"{label}_{mode.replace(';', '')}.png")
                Image.open(os.path.join(folder, name)).convert(mode).save(path)
            images.append(path)
            labels.append(str(label))
    checkpoint = trained.run_dir / "best.pth"
    assert load_checkpoint_file(str(checkpoint))["classes"] == [str(d) for d in range(10)]
    result = run_script("predict.py", "--cfg", trained.run_dir / "config.yaml", "--checkpoint", checkpoint,
                        "--device", "cpu", *images)
    check_ok(result)
    printed = {}
    current = None
    for line in result.stdout.splitlines():
        if not line.startswith("  "):
            current = line
            printed[current] = []
        else:
            match = re.fullmatch(r"  (\d)\. +(\d+\.\d\d)%  (\S+)", line)
            assert match, line
            printed[current].append((match.group(3), float(match.group(2))))
    assert list(printed) == images and all(len(rows) == 5 for rows in printed.values()), result.stdout
    correct = sum(printed[path][0][0] == label for path, label in zip(images, labels))
    assert correct >= 16, f"{correct}/20 right: {printed}"

    # exactly the evaluation transform: the same probabilities as the model on eval-transformed images
    config = load_config(str(trained.run_dir / "config.yaml"))
    model = build_model(config).eval()
    model.load_state_dict(load_checkpoint_file(str(checkpoint))["model"])
    transform = build_transform(False, config)
    batch = torch.stack([transform(load_image_file(path)) for path in images])
    probabilities, indices = predict.predict(model, batch, 5)
    for path, row_p, row_i in zip(images, probabilities.tolist(), indices.tolist()):
        assert [name for name, _ in printed[path]] == [str(i) for i in row_i]
        assert [p for _, p in printed[path]] == pytest.approx([100 * p for p in row_p], abs=0.006)


def test_class_names_from_checkpoint_imagenet_or_indices():
    assert predict.class_names({"classes": ["cat", "dog"]}, 2) == ["cat", "dog"]
    assert predict.class_names({"classes": ["cat", "dog"]}, 3) == ["0", "1", "2"]  # not this model's
    names = predict.class_names({}, 1000)
    assert len(names) == 1000 and names[0].startswith("tench") and "goldfish" in names[1]


# ----------------------------------------------------------------------------- 10. logs and pictures
def test_log_lines_are_readable(trained):
    out = trained.result.stdout
    train_lines = [line for line in out.splitlines() if "Train: [" in line]
    assert train_lines and all(TRAIN_LINE.search(line) for line in train_lines), train_lines[:2]
    assert all("mem" not in line for line in train_lines)  # no "mem 0MB" on the CPU
    assert all(float(TRAIN_LINE.search(line).group(4)) > 0 for line in train_lines)
    accuracy_lines = ACC_LINE.findall(out)
    assert len(accuracy_lines) == EPOCHS and {count for *_, count in accuracy_lines} == {"360"}
    assert "test images" not in out
    best = max(trained.metrics, key=lambda r: r["acc1"])
    summary = (f"best Acc@1 {best['acc1']:.3f} (Acc@5 {best['acc5']:.3f}) at epoch {best['epoch']}, "
               f"weights in {trained.run_dir / 'best.pth'}")
    assert summary in out.splitlines()[-1]


def test_curves_png_and_tensorboard_steps(trained, tmp_path):
    png = trained.run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size[0] > 1000 and image.size[1] > 300
    # on demand, from the run folder
    assert plot.main([str(trained.run_dir)]) == 0
    assert plot.main([str(tmp_path)]) == 2  # no metrics.jsonl: one line, exit 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(trained.run_dir / "tensorboard"))
    events.Reload()
    steps_per_epoch = 22
    expected = [e * steps_per_epoch + s for e in range(EPOCHS) for s in (0, 5, 10, 15, 20, 21)]
    for tag in ("train/loss", "train/lr", "train/grad_norm"):
        assert [event.step for event in events.Scalars(tag)] == expected, tag
    assert [event.step for event in events.Scalars("epoch/acc1")] == [(e + 1) * steps_per_epoch for e in range(EPOCHS)]
    assert [event.value for event in events.Scalars("epoch/acc1")] == pytest.approx([r["acc1"] for r in trained.metrics])


# ----------------------------------------------------------------------------- 11. the package
@pytest.mark.slow
def test_pip_install_then_import_from_another_folder(tmp_path):
    """``pip install .`` into a fresh virtual environment (reusing this one's torch and timm)
    installs ``crossformer`` and nothing with a generic name; it imports from another folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "crossformer"), source / "crossformer",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for family in ("crossformer", "crossformer_pp"):  # the official configs, installed as package data
        shutil.copytree(os.path.join(REPO, "configs", family), source / "configs" / family)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages (pip, setuptools, torch, timm) seen from the new one, without pip of its own;
    # --system-site-packages would reach only the base interpreter's when the tests run in a venv (as in CI)
    with open(os.path.join(site, "tested_environment.pth"), "w") as f:
        f.write("\n".join(sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})) + "\n")
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(source)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    installed = {name.split("-")[0] for name in os.listdir(site) if not name.startswith(("_", "."))}
    assert "crossformer" in installed
    assert not installed & {"models", "data", "utils", "config", "logger", "runtime", "main", "optimizer"}
    away = tmp_path / "elsewhere"
    away.mkdir()
    code = ("import crossformer, torch; "
            "m = crossformer.CrossFormer(img_size=32, patch_size=[4, 8], embed_dim=32, depths=[1, 1, 1, 1], "
            "num_heads=[2, 4, 8, 16], group_size=[4, 4, 4, 4], interval=[2, 1, 1, 1], num_classes=10).eval(); "
            "print(crossformer.__file__); print(tuple(m(torch.randn(2, 3, 32, 32)).shape)); "
            "import timm; print(len(timm.list_models('crossformer*')), "
            "timm.create_model('crossformer_pp_huge_patch4_group_const_224', pretrained=False).num_features)")
    result = subprocess.run([python, "-c", code], cwd=away, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    location, shape, registry = result.stdout.strip().splitlines()
    assert location.startswith(site) and shape == "(2, 10)" and registry == "8 1024"
