"""Nothing lost: exact resume after SIGKILL, damaged and unsafe checkpoints, bad input, NaN, DDP."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import main
from config import UserError, load_config
from models import build_model
from optimizer import build_optimizer
from lr_scheduler import build_scheduler
from utils import load_checkpoint_file, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "digits.yaml")
RUN_DIR = ("cros_demo_digits", "default")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits"))  # an existing folder: main.py writes the digits into it


def command(digits_path, output, *extra):
    return [sys.executable, "main.py", "--cfg", DEMO, "--epochs", "3", "--data-path", digits_path,
            "--output", str(output), "--num_workers", "1", "--opts", "SAVE_FREQ", "1", "PRINT_FREQ", "5", *extra]


def run(args, timeout=300):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=tol, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    result = run(command(digits, output))
    assert result.returncode == 0, result.stderr
    return output.joinpath(*RUN_DIR)


def test_sigkill_then_relaunch_ends_with_the_uninterrupted_weights(digits, uninterrupted, tmp_path):
    args = command(digits, tmp_path)
    run_dir = tmp_path.joinpath(*RUN_DIR)
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
    assert_same_weights(weights(run_dir / "ckpt_epoch_2.pth"), weights(uninterrupted / "ckpt_epoch_2.pth"))


def test_truncated_newest_checkpoint_is_reported_and_skipped(digits, uninterrupted, tmp_path):
    run_dir = tmp_path.joinpath(*RUN_DIR)
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "ckpt_epoch_2.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (run_dir / "ckpt_epoch_1.pth").unlink()
    result = run(command(digits, tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"skipping damaged checkpoint {newest}: cannot read checkpoint" in result.stdout
    assert "resuming training at epoch 1" in result.stdout  # from ckpt_epoch_0, not best.pth
    assert_same_weights(weights(newest), weights(uninterrupted / "ckpt_epoch_2.pth"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_epoch_0.pth"
    write_checkpoint({"model": {"w": torch.ones(3)}}, str(path))

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint({"model": {"w": torch.zeros(3)}}, str(path))
    assert os.listdir(tmp_path) == ["ckpt_epoch_0.pth"]
    torch.testing.assert_close(load_checkpoint_file(str(path))["model"]["w"], torch.ones(3))


class CreatesFile:
    """Unpickling this object opens (creates) a file: code running from a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("flag", ["--resume", "--pretrained"])
def test_checkpoint_needing_unpickling_is_refused_and_runs_nothing(digits, tmp_path, flag):
    victim = tmp_path / "created_by_checkpoint"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"head.bias": torch.zeros(10)}, "note": CreatesFile(str(victim))}, evil)
    result = run([sys.executable, "main.py", "--cfg", DEMO, "--data-path", digits, "--output", str(tmp_path),
                  "--eval", flag, str(evil)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"refusing to load {evil}" in result.stderr and "--trust-checkpoints" in result.stderr
    assert "Traceback" not in result.stderr
    assert not victim.exists()
    load_checkpoint_file(str(evil), trust=True)  # the opt-in really unpickles: the file appears
    assert victim.exists()


def bad_input_cases(tmp_path, digits):
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
    base = ["--cfg", DEMO, "--data-path", digits, "--output", str(tmp_path / "out")]
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


def test_bad_input_gives_one_line_naming_the_culprit(digits, tmp_path):
    cases = bad_input_cases(tmp_path, digits)
    with ThreadPoolExecutor(max_workers=2) as pool:  # the runs wait on start-up more than on work
        results = dict(zip(cases, pool.map(lambda case: run([sys.executable, "main.py", *case[0]]), cases.values())))
    for name, (_, culprit) in cases.items():
        result = results[name]
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], (name, lines)
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(digits, tmp_path):
    explode = ["TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "1",
               "TRAIN.LR_SCHEDULER.DECAY_RATE", "1e30", "TRAIN.WARMUP_EPOCHS", "0"]
    result = run(command(digits, tmp_path, *explode))
    run_dir = tmp_path.joinpath(*RUN_DIR)
    assert result.returncode == 3
    assert re.fullmatch(r"error: loss is not finite at epoch 1 step \d+; .*", result.stderr.strip())
    assert not (run_dir / "ckpt_epoch_1.pth").exists()
    kept = load_checkpoint_file(str(run_dir / "ckpt_epoch_0.pth"))
    assert kept["epoch"] == 0 and all(torch.isfinite(t).all() for t in kept["model"].values())


# ----------------------------------------------------------------------------- distributed
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_torchrun_max_restarts_resumes_by_itself(digits, tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    args += command(digits, tmp_path, "DATA.BATCH_SIZE", "32")[1:]
    run_dir = tmp_path.joinpath(*RUN_DIR)
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


def test_damaged_checkpoints_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint_file(str(tmp_path / "missing.pth"))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=f"cannot read checkpoint {empty}"):
        load_checkpoint_file(str(empty))
