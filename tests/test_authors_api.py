"""The authors' API document (API.md) and README commands, as a user of their code would try them:
each example adapted only in paths and sizes (small models, the bundled digits, CPU)."""
from __future__ import annotations

import argparse
import functools
import glob
import http.server
import importlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

import main
from config import UserError, add_official_arguments, get_config, get_default_config, load_config
from crossformer import CrossFormer
from data.build import build_dataset, build_loader, build_transform
from logger import create_logger
from lr_scheduler import LinearLRScheduler, build_scheduler
from models.build import build_model
from optimizer import build_optimizer
from runtime import Precision
from utils import auto_resume_helper, get_grad_norm, load_checkpoint, reduce_tensor, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join("configs", "demo", "digits.yaml")
SIZES = ("tiny", "small", "base", "large")
ACC_LINE = re.compile(r" \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)")
with open(os.path.join(ROOT, "tests", "fixtures", "official_models.json")) as f:
    OFFICIAL = json.load(f)

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread is fastest on 2 cores


@pytest.fixture
def logger():
    return logging.getLogger("test_authors_api")


def digits_config(digits_dir: str, *opts) -> "CfgNode":  # noqa: F821
    return load_config(DEMO, ["DATA.DATA_PATH", digits_dir, "DATA.NUM_WORKERS", 0, *opts])


# ----------------------------------------------------------------------------- config.get_config
def test_get_config_with_the_documents_bare_namespace(tmp_path, monkeypatch):
    """API.md: ``argparse.Namespace(cfg=..., batch_size=128, data_path=...)``, no other attribute,
    with the ICLR config path, from any working folder."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(cfg="configs/tiny_patch4_group7_224.yaml", batch_size=128, data_path="/path/to/imagenet")
    config = get_config(args)
    assert (config.DATA.BATCH_SIZE, config.DATA.DATA_PATH) == (128, "/path/to/imagenet")
    assert (config.MODEL.NAME, config.MODEL.CROS.EMBED_DIM, config.TRAIN.EPOCHS) == ("cros_tiny_patch4_group7_224", 64, 300)
    assert config.OUTPUT == os.path.join("output", "cros_tiny_patch4_group7_224", "default")
    assert config.is_frozen() and not os.listdir(tmp_path)  # nothing written
    with pytest.raises(UserError, match="get_config needs args.cfg"):
        get_config(argparse.Namespace(batch_size=128))


def test_configuration_structure_of_the_document_is_the_default_config():
    """API.md's "Configuration Structure" lists config.py's defaults (not the tiny config's)."""
    config = get_default_config()
    documented = {"DATA.BATCH_SIZE": 128, "DATA.IMG_SIZE": 224, "DATA.DATASET": "imagenet", "MODEL.TYPE": "cross-scale",
                  "MODEL.NUM_CLASSES": 1000, "MODEL.DROP_RATE": 0.0, "MODEL.DROP_PATH_RATE": 0.1,
                  "MODEL.CROS.PATCH_SIZE": [4, 8, 16, 32], "MODEL.CROS.EMBED_DIM": 48, "MODEL.CROS.DEPTHS": [2, 2, 6, 2],
                  "MODEL.CROS.NUM_HEADS": [3, 6, 12, 24], "MODEL.CROS.GROUP_SIZE": [7, 7, 7, 7], "TRAIN.EPOCHS": 300,
                  "TRAIN.BASE_LR": 5e-4, "TRAIN.WEIGHT_DECAY": 0.05, "TRAIN.OPTIMIZER.NAME": "adamw",
                  "TRAIN.LR_SCHEDULER.NAME": "cosine"}
    for key, value in documented.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key


# ----------------------------------------------------------------------------- both config layouts
@pytest.mark.parametrize("size", SIZES)
def test_iclr_config_path_is_the_same_config(size):
    iclr = load_config(os.path.join("configs", f"{size}_patch4_group7_224.yaml"))
    assert iclr.dump() == load_config(os.path.join("configs", "crossformer", f"{size}_patch4_group7_224.yaml")).dump()


def test_iclr_config_builds_the_official_model_with_the_interval_it_derived():
    """The ICLR code had no INTERVAL key: its LDA interval was the stage resolution divided by G.
    At 224 that is the INTERVAL the config gives, and the model has the official parameters and
    the logits of the crossformer/ config's model."""
    iclr = load_config(os.path.join("configs", "tiny_patch4_group7_224.yaml"))
    cros = iclr.MODEL.CROS
    resolutions = [iclr.DATA.IMG_SIZE // cros.PATCH_SIZE[0] // 2 ** stage for stage in range(4)]
    assert [res // group for res, group in zip(resolutions, cros.GROUP_SIZE)] == cros.INTERVAL == [8, 4, 2, 1]
    model = build_model(iclr).eval()
    official = {key: shape for key, shape, kind in OFFICIAL["crossformer/tiny_patch4_group7_224"]["state_dict"]
                if kind == "param"}
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == official
    other = build_model(load_config(os.path.join("configs", "crossformer", "tiny_patch4_group7_224.yaml"))).eval()
    other.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), other(images), rtol=0, atol=0)


# The model settings of API.md's "Pre-trained Models" list and FLOPs example, and what
# docs/authors_api.md says they give with the released configs' other settings.
DOCUMENT_SETTINGS = {"tiny": (48, [2, 2, 6, 2], [3, 6, 12, 24]), "small": (64, [2, 2, 18, 2], [3, 6, 12, 24]),
                     "base": (96, [2, 2, 18, 2], [3, 6, 12, 24]), "large": (128, [2, 2, 18, 2], [4, 8, 16, 32])}
DOCUMENTED_WRONG = {"tiny": ("7.89M", "1.31"), "small": ("23.31M", "4.16")}


@pytest.mark.parametrize("size", SIZES)
def test_documents_t_and_s_settings_are_not_the_released_models(size):
    embed_dim, depths, num_heads = DOCUMENT_SETTINGS[size]
    config = load_config(os.path.join("configs", "crossformer", f"{size}_patch4_group7_224.yaml"))
    released = (config.MODEL.CROS.EMBED_DIM, config.MODEL.CROS.DEPTHS, config.MODEL.CROS.NUM_HEADS)
    assert (released == (embed_dim, depths, num_heads)) == (size not in DOCUMENTED_WRONG)
    if size in DOCUMENTED_WRONG:
        model = build_model(load_config(os.path.join("configs", "crossformer", f"{size}_patch4_group7_224.yaml"),
                                        ["MODEL.CROS.EMBED_DIM", embed_dim, "MODEL.CROS.DEPTHS", depths,
                                         "MODEL.CROS.NUM_HEADS", num_heads]))
        params = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
        assert (params, f"{model.flops() / 1e9:.2f}") == DOCUMENTED_WRONG[size]
        with open(os.path.join(ROOT, "docs", "authors_api.md"), encoding="utf-8") as f:
            page = " ".join(f.read().split())
        assert DOCUMENTED_WRONG[size][0] in page and f"{DOCUMENTED_WRONG[size][1]} GFLOPs" in page


# ----------------------------------------------------------------------------- models, data, optimizer, scheduler
def test_build_model_takes_the_authors_args(digits_dir):
    config = digits_config(digits_dir)
    args = main.build_parser().parse_args(["--cfg", DEMO])
    torch.manual_seed(0)
    model = build_model(config, args)
    torch.manual_seed(0)
    again = build_model(config)
    assert isinstance(model, CrossFormer)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_build_loader_build_dataset_and_build_transform(digits_dir):
    config = digits_config(digits_dir, "AUG.MIXUP", 0.8, "DATA.BATCH_SIZE", 16)
    dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn = build_loader(config)
    images, targets = next(iter(data_loader_train))
    if mixup_fn is not None:
        images, targets = mixup_fn(images, targets)
    assert images.shape == (16, 3, 32, 32) and targets.shape == (16, 10)  # soft targets of the 10 digits
    assert len(dataset_train) == 1437 and len(dataset_val) == 360 and len(data_loader_val.dataset) == 360

    train, nb_classes = build_dataset(is_train=True, config=config)
    val, val_classes = build_dataset(is_train=False, config=config)
    assert (len(train), nb_classes, len(val), val_classes) == (1437, 10, 360, 10)
    assert train.classes == dataset_train.classes and val.samples == dataset_val.samples

    image = Image.open(val.samples[0][0]).convert("RGB")
    train_transform = build_transform(is_train=True, config=config)
    val_transform = build_transform(is_train=False, config=config)
    assert train_transform(image).shape == val_transform(image).shape == (3, 32, 32)
    torch.testing.assert_close(val_transform(image), val[0][0], rtol=0, atol=0)


def test_custom_dataset_example(digits_dir):
    """API.md's CustomDataset: build_transform on the user's own images and labels."""

    class CustomDataset(Dataset):
        def __init__(self, image_paths, labels, config, is_train=True):
            self.image_paths = image_paths
            self.labels = labels
            self.transform = build_transform(is_train, config)

        def __len__(self):
            return len(self.image_paths)

        def __getitem__(self, idx):
            image = Image.open(self.image_paths[idx]).convert("RGB")
            if self.transform:
                image = self.transform(image)
            return image, self.labels[idx]

    config = digits_config(digits_dir)
    image_paths = sorted(glob.glob(os.path.join(digits_dir, "train", "*", "*.png")))[:40]
    labels = [int(os.path.basename(os.path.dirname(path))) for path in image_paths]
    dataset = CustomDataset(image_paths, labels, config, is_train=True)
    dataloader = DataLoader(dataset, batch_size=32, shuffle=True)
    images, batch_labels = next(iter(dataloader))
    assert images.shape == (32, 3, 32, 32) and set(batch_labels.tolist()) <= set(labels)


def test_build_optimizer_build_scheduler_and_create_logger(digits_dir, tmp_path):
    config = digits_config(digits_dir)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 2
    lr_scheduler = build_scheduler(config, optimizer, 23)
    lr_scheduler.step_update(100)  # after the demo config's 2 warm-up epochs: the cosine over 30 epochs
    train = config.TRAIN
    cosine = train.MIN_LR + (train.BASE_LR - train.MIN_LR) * (1 + math.cos(math.pi * 100 / (30 * 23))) / 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cosine, rel=1e-12)

    logger = create_logger(output_dir=str(tmp_path), dist_rank=0, name="crossformer")
    logger.info("Training started")
    for handler in logger.handlers:
        handler.close()
    assert "Training started" in (tmp_path / "log_rank0.txt").read_text()


def authors_linear_lr(base: float, t: int, t_initial: int, lr_min_rate: float, warmup_t: int,
                      warmup_lr_init: float) -> float:
    """The authors' LinearLRScheduler._get_lr for one parameter group, written out."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    return base - (base - base * lr_min_rate) * ((t - warmup_t) / (t_initial - warmup_t))


def test_linear_lr_scheduler_follows_the_authors_formula_per_group():
    """API.md's LinearLRScheduler call, on two parameter groups of different rates, stepped per
    update; past t_initial it stays at its end rate."""
    bases = (1e-3, 4e-4)
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(2))], "lr": lr} for lr in bases])
    num_steps, warmup_steps = 20, 5
    scheduler = LinearLRScheduler(optimizer, t_initial=num_steps, lr_min_rate=0.01, warmup_lr_init=1e-7,
                                  warmup_t=warmup_steps, t_in_epochs=False)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-7, 1e-7]  # warm-up starts at once
    for t in range(num_steps + 1):
        scheduler.step_update(t)
        expected = [authors_linear_lr(base, t, num_steps, 0.01, warmup_steps, 1e-7) for base in bases]
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(expected, rel=1e-12)
    scheduler.step_update(num_steps + 7)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01 * b for b in bases], rel=1e-12)
    scheduler.step(3)  # counted in updates: epochs leave it alone
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.01 * b for b in bases], rel=1e-12)

    by_epoch = LinearLRScheduler(optimizer, t_initial=10, lr_min_rate=0.1)
    by_epoch.step(5)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([b * 0.55 for b in bases], rel=1e-12)


def test_linear_schedule_of_the_config_is_the_authors_class():
    config = get_default_config()
    config.TRAIN.LR_SCHEDULER.NAME = "linear"
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=config.TRAIN.BASE_LR)
    scheduler = build_scheduler(config, optimizer, 10)
    assert isinstance(scheduler, LinearLRScheduler)
    assert (scheduler.t_initial, scheduler.warmup_t, scheduler.lr_min_rate) == (3000, 200, 0.01)


# ----------------------------------------------------------------------------- get_grad_norm, reduce_tensor
@pytest.mark.parametrize("norm_type", [2, 1, float("inf"), "inf"])
def test_get_grad_norm_equals_torch(norm_type):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 3))
    model(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)))[:, :2].sum().backward()
    model[3].weight.grad = None  # a parameter without a gradient is left out
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    norm = get_grad_norm(model.parameters(), norm_type)
    assert isinstance(norm, float)
    assert norm == pytest.approx(torch.linalg.vector_norm(grads, float(norm_type)).item(), rel=1e-6)
    assert get_grad_norm(model[0].weight, norm_type) == pytest.approx(
        torch.linalg.vector_norm(model[0].weight.grad, float(norm_type)).item(), rel=1e-6)
    assert get_grad_norm([nn.Parameter(torch.ones(2))], norm_type) == 0.0


def test_reduce_tensor_without_a_process_group_is_the_tensor_itself():
    tensor = torch.tensor([1.0, 2.0])
    assert reduce_tensor(tensor) is tensor


def reduce_on_rank(rank: int, world_size: int, store: str, result_dir: str) -> None:
    """One of ``world_size`` gloo ranks: reduce_tensor of a rank-dependent tensor, and the share of
    the validation set that build_loader(config) (no rank given) gives this rank."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    reduced = reduce_tensor(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))
    config = load_config(DEMO, ["DATA.DATASET", "fake", "DATA.FAKE_SIZE", 64, "DATA.BATCH_SIZE", 4,
                                "DATA.NUM_WORKERS", 0])
    *_, loader_val, _ = build_loader(config)
    torch.save({"reduced": reduced, "val_indices": list(loader_val.sampler)}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_reduce_tensor_is_the_mean_over_two_gloo_ranks_and_build_loader_shards(tmp_path):
    mp.spawn(reduce_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for result in results:
        torch.testing.assert_close(result["reduced"], torch.tensor([1.5, 15.0]), rtol=0, atol=0)
    assert results[0]["val_indices"] == list(range(0, 16, 2)) and results[1]["val_indices"] == list(range(1, 16, 2))


# ----------------------------------------------------------------------------- checkpoints
def small_training_state(digits_dir, *opts):
    config = digits_config(digits_dir, *opts)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    lr_scheduler = build_scheduler(config, optimizer, 5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return config, model, optimizer, lr_scheduler


def test_save_checkpoint_then_load_checkpoint(digits_dir, tmp_path, logger):
    config, model, optimizer, lr_scheduler = small_training_state(digits_dir, "OUTPUT", str(tmp_path / "run"))
    path = save_checkpoint(config, 3, model, 42.5, optimizer, lr_scheduler, logger)
    assert path == str(tmp_path / "run" / "ckpt_epoch_3.pth")
    saved = torch.load(path, weights_only=True)  # nothing in it needs unpickling
    assert set(saved) == {"model", "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config"}
    assert save_checkpoint(config, 3, model, 42.5, optimizer, lr_scheduler, logger, best=True).endswith("best.pth")
    assert save_checkpoint(config, 3, model, 42.5, optimizer, lr_scheduler, logger, last=True).endswith("last.pth")

    fresh, fresh_model, fresh_optimizer, fresh_scheduler = small_training_state(digits_dir, "MODEL.RESUME", path)
    assert load_checkpoint(fresh, fresh_model, fresh_optimizer, fresh_scheduler, logger) == 42.5
    assert fresh.TRAIN.START_EPOCH == 4 and fresh.is_frozen()
    for key, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[key], value), key
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    torch.testing.assert_close(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                               optimizer.state_dict()["state"][0]["exp_avg"], rtol=0, atol=0)

    evaluation, eval_model, eval_optimizer, eval_scheduler = small_training_state(
        digits_dir, "MODEL.RESUME", path, "EVAL_MODE", True)
    assert load_checkpoint(evaluation, eval_model, eval_optimizer, eval_scheduler, logger) == 0.0
    assert evaluation.TRAIN.START_EPOCH == 0


def test_load_checkpoint_errors_name_the_file(digits_dir, tmp_path, logger):
    config, model, optimizer, lr_scheduler = small_training_state(digits_dir, "OUTPUT", str(tmp_path))
    path = save_checkpoint(config, 0, model, 1.0, optimizer, lr_scheduler, logger)
    other, other_model, other_optimizer, other_scheduler = small_training_state(
        digits_dir, "MODEL.RESUME", path, "MODEL.NUM_CLASSES", 7)
    with pytest.raises(UserError, match=rf"^{re.escape(path)} does not fit this model .*head\.weight"):
        load_checkpoint(other, other_model, other_optimizer, other_scheduler, logger)
    missing, *state = small_training_state(digits_dir, "MODEL.RESUME", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pth"):
        load_checkpoint(missing, *state, logger)


def test_load_checkpoint_reads_the_authors_format_when_trusted(digits_dir, tmp_path, logger):
    """The authors' save_checkpoint pickled the yacs config itself: refused unless trusted."""
    config, model, optimizer, lr_scheduler = small_training_state(digits_dir)
    path = str(tmp_path / "theirs.pth")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "max_accuracy": 61.25, "epoch": 7, "config": config}, path)
    refused, *state = small_training_state(digits_dir, "MODEL.RESUME", path)
    with pytest.raises(UserError, match=rf"^refusing to load {re.escape(path)}: .*yacs\.config\.CfgNode.*--trust-checkpoints"):
        load_checkpoint(refused, *state, logger)
    trusted, *state = small_training_state(digits_dir, "MODEL.RESUME", path, "TRUST_CHECKPOINTS", True)
    assert load_checkpoint(trusted, *state, logger) == 61.25 and trusted.TRAIN.START_EPOCH == 8


def test_load_checkpoint_from_a_url(digits_dir, tmp_path, logger, monkeypatch):
    """The authors' load_checkpoint took https URLs (torch.hub's cache); here a local server."""
    config, model, optimizer, lr_scheduler = small_training_state(digits_dir, "OUTPUT", str(tmp_path / "served"))
    save_checkpoint(config, 2, model, 7.0, optimizer, lr_scheduler, logger)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ckpt_epoch_2.pth"
        fresh, *state = small_training_state(digits_dir, "MODEL.RESUME", url)
        assert load_checkpoint(fresh, *state, logger) == 7.0 and fresh.TRAIN.START_EPOCH == 3
        assert (tmp_path / "torch" / "hub" / "checkpoints" / "ckpt_epoch_2.pth").is_file()  # torch.hub's cache
        missing, *state = small_training_state(digits_dir, "MODEL.RESUME", url.replace("2.pth", "9.pth"))
        with pytest.raises(UserError, match=r"^cannot download checkpoint http://.*ckpt_epoch_9.pth: .*404"):
            load_checkpoint(missing, *state, logger)
    finally:
        server.shutdown()
        server.server_close()


def test_auto_resume_helper(digits_dir, tmp_path, logger, caplog):
    """The newest loadable training checkpoint by the epoch it holds: never best.pth, damaged
    files skipped, the CrossFormer++ code's last.pth when it is further along."""
    assert auto_resume_helper(str(tmp_path / "no_such_folder")) is None
    config, model, optimizer, lr_scheduler = small_training_state(digits_dir, "OUTPUT", str(tmp_path))
    assert auto_resume_helper(str(tmp_path)) is None
    save_checkpoint(config, 1, model, 1.0, optimizer, lr_scheduler, logger)
    save_checkpoint(config, 3, model, 1.0, optimizer, lr_scheduler, logger)
    save_checkpoint(config, 9, model, 1.0, optimizer, lr_scheduler, logger, best=True)  # the newest file
    assert auto_resume_helper(str(tmp_path)) == str(tmp_path / "ckpt_epoch_3.pth")

    (tmp_path / "ckpt_epoch_5.pth").write_bytes((tmp_path / "ckpt_epoch_3.pth").read_bytes()[:1000])
    utils_logger = logging.getLogger("crossformer.utils")  # "crossformer" does not propagate once main.py ran
    utils_logger.addHandler(caplog.handler)
    try:
        assert auto_resume_helper(str(tmp_path)) == str(tmp_path / "ckpt_epoch_3.pth")
    finally:
        utils_logger.removeHandler(caplog.handler)
    assert "skipping damaged checkpoint" in caplog.text and "ckpt_epoch_5.pth" in caplog.text

    save_checkpoint(config, 2, model, 1.0, optimizer, lr_scheduler, logger, last=True)
    assert auto_resume_helper(str(tmp_path)) == str(tmp_path / "ckpt_epoch_3.pth")
    save_checkpoint(config, 4, model, 1.0, optimizer, lr_scheduler, logger, last=True)
    assert auto_resume_helper(str(tmp_path)) == str(tmp_path / "last.pth")


def demo_args(digits_dir, output, tag: str, epochs: int) -> list[str]:
    return ["--cfg", DEMO, "--data-path", digits_dir, "--output", str(output), "--tag", tag, "--epochs", str(epochs),
            "--num_workers", "0", "--opts", "PRINT_FREQ", "1000", "SAVE_FREQ", "1"]


def test_checkpoints_of_save_checkpoint_and_main_py_are_interchangeable(digits_dir, tmp_path, logger,
                                                                      one_thread_in_process):
    """main.py's epoch-0 checkpoint, passed through load_checkpoint and save_checkpoint into another
    run folder, continues there exactly as main.py continues its own."""
    assert main.run(demo_args(digits_dir, tmp_path, "main", 1)) == 0
    run_dir = tmp_path / "cros_demo_digits"
    main_checkpoint = str(run_dir / "main" / "ckpt_epoch_0.pth")
    record = json.loads((run_dir / "main" / "metrics.jsonl").read_text().splitlines()[-1])

    config = get_config(main.build_parser().parse_args(demo_args(digits_dir, tmp_path, "api", 2)
                                          + ["MODEL.RESUME", main_checkpoint]))
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    lr_scheduler = build_scheduler(config, optimizer, 22)
    assert load_checkpoint(config, model, optimizer, lr_scheduler, logger) == record["max_accuracy"]
    assert config.TRAIN.START_EPOCH == 1
    save_checkpoint(config, 0, model, record["max_accuracy"], optimizer, lr_scheduler, logger)

    assert main.run(demo_args(digits_dir, tmp_path, "main", 2)) == 0  # auto-resume from its own
    assert main.run(demo_args(digits_dir, tmp_path, "api", 2)) == 0  # auto-resume from save_checkpoint's
    assert "resuming training at epoch 1" in (run_dir / "api" / "log_rank0.txt").read_text()
    ours = torch.load(run_dir / "main" / "ckpt_epoch_1.pth", weights_only=True)
    theirs = torch.load(run_dir / "api" / "ckpt_epoch_1.pth", weights_only=True)
    for key, value in ours["model"].items():
        torch.testing.assert_close(theirs["model"][key], value, rtol=0, atol=0, msg=key)
    assert theirs["max_accuracy"] == ours["max_accuracy"]


# ----------------------------------------------------------------------------- the official flags
OFFICIAL_ICLR_COMMAND = [
    "--batch-size", "16", "--data-set", "digits", "--data-path", "DIGITS", "--zip", "--cache-mode", "full",
    "--resume", "ckpt.pth", "--accumulation-steps", "2", "--use-checkpoint", "--amp-opt-level", "O0",
    "--output", "out", "--tag", "t", "--eval", "--throughput", "--num_workers", "1", "--mlp_ratio", "2",
    "--warmup_epochs", "3", "--local_rank", "0"]
OFFICIAL_PP_ONLY = [
    "--epochs", "9", "--lr", "0.001", "--min_lr", "1e-05", "--warmup_lr", "1e-06", "--weight_decay", "0.01",
    "--img_size", "96", "--embed_dim", "32", "--impl_type", "", "--group_type", "constant", "--pad_type", "0"]


def test_every_official_flag_lands_in_its_key(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = main.build_parser().parse_args(["--cfg", "configs/tiny_patch4_group7_224.yaml", *OFFICIAL_ICLR_COMMAND,
                              *OFFICIAL_PP_ONLY])
    config = get_config(args)
    assert (config.DATA.BATCH_SIZE, config.DATA.DATASET, config.DATA.DATA_PATH, config.DATA.ZIP_MODE,
            config.DATA.CACHE_MODE, config.DATA.NUM_WORKERS, config.DATA.IMG_SIZE) == \
        (16, "digits", "DIGITS", True, "full", 1, 96)
    assert (config.MODEL.RESUME, config.MODEL.CROS.MLP_RATIO, config.MODEL.CROS.EMBED_DIM, config.MODEL.IMPL_TYPE) == \
        ("ckpt.pth", [2.0] * 4, 32, "")
    assert (config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.USE_CHECKPOINT, config.TRAIN.WARMUP_EPOCHS,
            config.TRAIN.EPOCHS, config.TRAIN.WEIGHT_DECAY) == (2, True, 3, 9, 0.01)
    assert (config.TRAIN.BASE_LR, config.TRAIN.MIN_LR, config.TRAIN.WARMUP_LR) == (1e-3, 1e-5, 1e-6)
    assert (config.AMP_OPT_LEVEL, config.EVAL_MODE, config.THROUGHPUT_MODE, config.LOCAL_RANK) == ("O0", True, True, 0)
    assert config.OUTPUT == os.path.join("out", "cros_tiny_patch4_group7_224", "t-eval-throughput")


def test_flags_not_given_leave_the_config_file_alone(tmp_path):
    """The authors' argparse defaults (--epochs 300, --warmup_epochs 20, --img_size 224, --mlp_ratio 4,
    --data-set imagenet, --tag debug, ...) overwrote the file; here a flag not given changes nothing."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("BASE: ['" + os.path.join(ROOT, DEMO) + "']\nTRAIN:\n  WEIGHT_DECAY: 0.02\n  MIN_LR: 3.0e-5\n")
    config = get_config(main.build_parser().parse_args(["--cfg", str(cfg)]))
    demo = load_config(DEMO)
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS, config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR) == \
        (demo.TRAIN.EPOCHS, demo.TRAIN.WARMUP_EPOCHS, demo.TRAIN.BASE_LR, demo.TRAIN.WARMUP_LR)
    assert (config.TRAIN.WEIGHT_DECAY, config.TRAIN.MIN_LR, config.DATA.IMG_SIZE, config.DATA.DATASET) == \
        (0.02, 3e-5, 32, "digits")
    assert (config.MODEL.CROS.MLP_RATIO, config.DATA.NUM_WORKERS, config.DATA.CACHE_MODE, config.TAG) == \
        ([4.0] * 4, 2, "part", "default")


def test_add_official_arguments_keeps_a_scripts_own_flags():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12, help="the script's own")
    add_official_arguments(parser)
    args = parser.parse_args(["--lr", "0.1", "--use_cpe"])
    assert (args.epochs, args.lr, args.use_cpe, args.warmup_epochs, args.data_set) == (12, 0.1, True, None, None)


@pytest.mark.parametrize("flags,message", [
    (["--impl_type", "15"], r"MODEL\.IMPL_TYPE \(--impl_type\) is '15', but the official code's model variants"),
    (["--group_type", "linear"], r"--group_type linear: the official main\.py accepted this flag but never used it "
                                 r"\(its model follows MODEL\.CROS\.GROUP_TYPE, here 'constant'\); to ask for 'linear', "
                                 r"use --opts MODEL\.CROS\.GROUP_TYPE linear"),
    (["--use_cpe"], r"--use_cpe True: .*MODEL\.CROS\.USE_CPE"),
    (["--pad_type", "1"], r"--pad_type 1: .*MODEL\.CROS\.PAD_TYPE"),
    (["--no_mask"], r"--no_mask True: .*MODEL\.CROS\.NO_MASK"),
    (["--adaptive_interval"], r"--adaptive_interval True: .*MODEL\.CROS\.ADAPT_INTER"),
    (["--data-set", "ImageNet22K"], r"--data-set ImageNet22K: the official code's TFRecord datasets"),
    (["--data-set", "cifar"], r"--data-set cifar: unknown dataset; known: imagenet, digits, fake"),
    (["--embed_dim", "32", "64"], r"--embed_dim takes one number .*got 2: 32 64"),
    (["--warmup_epochs", "-1"], r"TRAIN\.WARMUP_EPOCHS \(--warmup_epochs\) must be at least 0, got -1"),
    (["--img_size", "0"], r"DATA\.IMG_SIZE \(--img_size\) must be at least 1, got 0"),
])
def test_official_flags_we_cannot_honour_are_one_line_errors(flags, message, capsys):
    assert main.run(["--cfg", "configs/tiny_patch4_group7_224.yaml", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"error: {message}", err[0]), err


def test_ignored_flags_matching_the_config_are_accepted():
    args = main.build_parser().parse_args(["--cfg", "configs/tiny_patch4_group7_224.yaml", "--use_cpe", "--group_type", "constant",
                              "--opts", "MODEL.CROS.USE_CPE", "True"])
    assert get_config(args).MODEL.CROS.USE_CPE is True


# ----------------------------------------------------------------------------- the authors' commands
@pytest.mark.parametrize("layout", [
    "configs/tiny_patch4_group7_224.yaml",
    pytest.param("configs/crossformer/tiny_patch4_group7_224.yaml", marks=pytest.mark.slow),  # the same, ++ path
])
def test_readme_eval_command_through_torch_distributed_launch(layout, digits_dir, tmp_path, logger):
    """``python -u -m torch.distributed.launch --nproc_per_node 1 main.py --cfg CFG --batch-size 128
    --data-path DATA --eval --resume CKPT`` (both READMEs' config layouts), sized down to the digits at
    32x32, with weights written by save_checkpoint: one gloo rank on the CPU (``--standalone``: a free
    port, beside other tests)."""
    sized = ["--data-set", "digits", "--img_size", "32", "--num_workers", "0", "--opts", "MODEL.NUM_CLASSES", "10"]
    config = get_config(main.build_parser().parse_args(["--cfg", layout, "--batch-size", "128", "--data-path", digits_dir,
                                           "--output", str(tmp_path), *sized]))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    checkpoint = save_checkpoint(config, 0, model, 0.0, optimizer, build_scheduler(config, optimizer, 11), logger)

    command = [sys.executable, "-u", "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--standalone",
               "main.py", "--cfg", layout, "--batch-size", "128", "--data-path", digits_dir, "--eval",
               "--resume", checkpoint, "--output", str(tmp_path), *sized]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    match = ACC_LINE.search(result.stdout)
    assert match, result.stdout[-3000:]

    model.eval()
    precision = Precision(config, torch.device("cpu"))
    *_, loader_val, _ = build_loader(config)
    correct = 0
    with torch.no_grad(), precision.autocast():
        for images, targets in loader_val:
            correct += (model(images).argmax(1) == targets).sum().item()
    assert float(match.group(1)) == pytest.approx(100 * correct / 360, abs=100 / 360 + 1e-3)  # bfloat16: one image


def test_dense_scripts_find_configs_from_their_own_folder(monkeypatch):
    """API.md: ``cd detection; python train.py --cfg ...``: a --cfg not found from the current folder
    is looked up from the repository root."""
    from detection.train import parse_option as detection_options
    from segmentation.test import parse_option as segmentation_options

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(os.path.join(ROOT, "detection"))
    config = get_config(detection_options(["--cfg", "configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml"]))
    assert config.dump() == get_config(detection_options(
        ["--cfg", os.path.join(ROOT, "configs", "detection", "mask_rcnn_crossformer_s_fpn_1x_coco.yaml")])).dump()
    assert config.DET.TYPE == "mask_rcnn"
    monkeypatch.chdir(os.path.join(ROOT, "segmentation"))
    config = get_config(segmentation_options(["--cfg", "configs/segmentation/upernet_crossformer_s_ade20k_160k.yaml",
                                              "--checkpoint", "ckpt.pth"]))
    assert config.SEG.HEAD == "upernet" and config.EVAL_MODE


MMDET_CONFIGS = [  # API.md's and the authors' READMEs' .py configs, from their folder
    ("detection", "train", "configs/mask_rcnn_crossformer_s_fpn_1x_coco.py",
     "configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml"),
    ("detection", "test", "configs/crossformer_tiny_patch4_group7_224_1x.py",
     "configs/detection/retinanet_crossformer_s_fpn_1x_coco.yaml"),
    ("segmentation", "test", "configs/upernet_crossformer_tiny_512x512_80k_ade20k.py",
     "configs/segmentation/upernet_crossformer_s_ade20k_160k.yaml"),
    ("segmentation", "train", "configs/fpn_crossformer_s_ade20k_40k.py",
     "configs/segmentation/fpn_crossformer_s_ade20k_80k.yaml"),
    ("detection", "train", "configs/crossformer_pp/mask_rcnn_crossformerpp_s_fpn_1x_coco.py",
     "configs/detection/mask_rcnn_crossformer_pp_s_fpn_1x_coco.yaml"),
    ("segmentation", "train", "configs/crossformer_pp/upernet_crossformerpp_s_ade20k.py",
     "configs/segmentation/upernet_crossformer_pp_s_ade20k_160k.yaml"),
]


def mmdet_error(cfg: str, closest: str) -> str:
    return (f"error: {cfg}: Python configs (the authors' mmdetection/mmsegmentation ones) are not read here; "
            f"configs are YAML files, and the closest by name is {closest}")


@pytest.mark.parametrize("folder,script,cfg,closest", MMDET_CONFIGS)
def test_authors_mmdet_and_mmseg_configs_name_the_yaml_to_use(folder, script, cfg, closest, monkeypatch, capsys):
    module = importlib.import_module(f"{folder}.{script}")
    monkeypatch.chdir(os.path.join(ROOT, folder))
    assert module.run(["--cfg", cfg] + (["--checkpoint", "ckpt.pth"] if script == "test" else [])) == 2
    assert capsys.readouterr().err.strip() == mmdet_error(cfg, closest)
    assert os.path.isfile(os.path.join(ROOT, closest))


def test_authors_detection_command_exits_2_with_one_line():
    """``cd detection; python train.py --cfg configs/mask_rcnn_crossformer_s_fpn_1x_coco.py`` as a process."""
    folder, script, cfg, closest = MMDET_CONFIGS[0]
    result = subprocess.run([sys.executable, f"{script}.py", "--cfg", cfg], cwd=os.path.join(ROOT, folder),
                            capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr.strip()) == (2, mmdet_error(cfg, closest))
