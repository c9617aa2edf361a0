"""Train, evaluate or benchmark CrossFormer: one process (CPU or GPU) or many (torchrun / launch).

    python main.py --cfg configs/demo/digits.yaml
    torchrun --nproc_per_node 8 main.py --cfg configs/crossformer/small_patch4_group7_224.yaml \
        --batch-size 128 --data-path IMAGENET --output output

What is classification's own lives here: the data, the model, the loss (Mixup/CutMix, label
smoothing) and the top-1/top-5 evaluation; the training loop is the run core's (training.py).
The authors' training API is here too, as thin fronts over ours: ``parse_option() -> (args,
config)``, ``main(args, config)``, ``train_one_epoch``, ``validate`` and ``throughput``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Iterable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer
from yacs.config import CfgNode

from config import UserError, add_official_arguments, get_config
from data import build_loader
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from runtime import Precision, add_common_arguments, compile_model, launch, run_configured, setup_run
from training import BestModel, EpochSchedule, TrainingRun, distributed, load_run_weights, supervised_losses
from utils import EPOCH_CHECKPOINTS, all_reduce_sum, load_pretrained, process_info

# --throughput: warm-up passes, timed rounds, passes per round (the median round is reported)
THROUGHPUT_PASSES = {"cuda": (50, 5, 30), "cpu": (3, 5, 4)}


def build_parser() -> argparse.ArgumentParser:
    """main.py's flags: the common ones, classification's, and the authors' official ones."""
    parser = argparse.ArgumentParser("CrossFormer training and evaluation", add_help=True)
    add_common_arguments(parser)
    add_official_arguments(parser)  # the authors' official flags, ours among them (--zip, --epochs, --lr, ...)
    return parser


def parse_option(argv: list[str] | None = None) -> tuple[argparse.Namespace, CfgNode]:
    """The authors' API: the flags (``sys.argv`` unless ``argv``) and the config they give. Bad
    input is one line on stderr and exit code 2, as for ``python main.py``."""
    args = build_parser().parse_args(argv)
    try:
        return args, get_config(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def main(args: argparse.Namespace, config: CfgNode) -> None:
    """The authors' API: train, evaluate (``--eval``) or measure throughput (``--throughput``) as
    ``config`` (from ``parse_option``) says, also in a process group the caller initialised (it is
    joined, and left to the caller). ``args`` is accepted as the authors' main took it; everything
    is in ``config``. Ends with SystemExit for an exit code other than 0 (see ``runtime.launch``)."""
    code = launch(lambda: run_classification(config))
    if code:
        raise SystemExit(code)


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    return run_configured(build_parser().parse_args(argv), run_classification)


def scale_learning_rates(config: CfgNode, world_size: int) -> None:
    """The official rule: rates are given for a global batch of 512, times accumulation steps."""
    factor = config.DATA.BATCH_SIZE * world_size / 512.0 * max(1, config.TRAIN.ACCUMULATION_STEPS)
    config.defrost()
    config.TRAIN.BASE_LR *= factor
    config.TRAIN.WARMUP_LR *= factor
    config.TRAIN.MIN_LR *= factor
    config.freeze()


def build_criterion(config: CfgNode, mixup: bool) -> nn.Module:
    """Soft-target loss with Mixup/CutMix, else label smoothing (MODEL.LABEL_SMOOTHING) or plain CE."""
    if mixup:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def updates_per_epoch(config: CfgNode, batches: int) -> int:
    """Optimizer updates in an epoch of ``batches`` (a trailing partial accumulation is left out)."""
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    if batches < accumulation:
        raise UserError(f"TRAIN.ACCUMULATION_STEPS {accumulation} is larger than the {batches} batches of an epoch")
    return batches // accumulation


def run_classification(config: CfgNode) -> None:
    """Set the run up (on a copy of ``config``, whose learning rates are scaled once), build
    data, model and optimizer, then evaluate, benchmark or train from where the run stopped."""
    config = config.clone()
    dist_info, logger = setup_run(config)
    scale_learning_rates(config, dist_info.world_size)
    device = dist_info.device
    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(
        config, dist_info.rank, dist_info.world_size)
    model = build_model(config).to(device)
    flops = f", {model.flops() / 1e9:.3f} GFLOPs at {config.DATA.IMG_SIZE}" if hasattr(model, "flops") else ""
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters{flops}")
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")

    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        # --eval with MODEL_EMA_EVAL scores EMA weights
        weights_key = "model_ema" if config.EVAL_MODE and config.MODEL_EMA_EVAL else "model"
        skipped = load_pretrained(model, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS, weights_key)
        if skipped:
            logger.warning(f"{config.MODEL.PRETRAINED}: the head has another class count; skipped {skipped}, "
                           "the new head starts fresh")
        logger.info(f"loaded pretrained weights from {config.MODEL.PRETRAINED}")
    ema = ModelEmaV3(model, decay=config.MODEL_EMA_DECAY) if config.MODEL_EMA and not config.EVAL_MODE else None
    if config.COMPILE:
        compile_model(model, any_size=config.EVAL_MODE or config.THROUGHPUT_MODE)
        logger.info("torch.compile: the first batches (and the first in eval mode) compile the model")
    if config.THROUGHPUT_MODE:
        throughput(loader_val, model, logger, precision)
        return
    if config.EVAL_MODE:
        load_run_weights(config, logger, model, EPOCH_CHECKPOINTS, "model_ema" if config.MODEL_EMA_EVAL else "model")
        validate(config, loader_val, model, precision=precision)
        return

    trained = distributed(model, device, sync_buffers=False) if dist_info.world_size > 1 else model
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    updates = updates_per_epoch(config, len(loader_train))
    optimizer = build_optimizer(config, model)
    lr_scheduler = build_scheduler(config, optimizer, updates)
    ema_counts = ema is not None and config.MODEL_EMA_EVAL  # MODEL_EMA_EVAL: the EMA's top-1 picks best.pth
    key, label = ("ema_acc", "EMA Acc") if ema_counts else ("acc", "Acc")
    best = BestModel(f"{key}1", "max_accuracy", "max_accuracy", "Max accuracy: {:.2f}%",
                     lambda r: f"{label}@1 {r[key + '1']:.3f} ({label}@5 {r[key + '5']:.3f})")
    # The schedule follows from the config and the update count (a checkpoint's copy is kept for
    # the official format): a run extended with --epochs gets the new one.
    run = TrainingRun(config, dist_info, logger, EpochSchedule(config, updates * accumulation, dist_info.world_size,
                                                               accumulation),
                      trained, optimizer, precision, lr_scheduler.step_update, best, lr_scheduler, ema,
                      {"classes": list(dataset_val.classes)} if hasattr(dataset_val, "classes") else {})
    resumed_from = run.restore()
    if run.complete:
        logger.info(run.schedule.complete(resumed_from))
        return
    logger.info(f"learning rates for a global batch of {config.DATA.BATCH_SIZE * dist_info.world_size}"
                f"{f' x {accumulation} accumulation steps' if accumulation > 1 else ''}: "
                f"base {config.TRAIN.BASE_LR:.4e}, warmup {config.TRAIN.WARMUP_LR:.4e}, min {config.TRAIN.MIN_LR:.4e}")

    def evaluate() -> dict[str, float]:
        acc1, acc5, loss = validate(config, loader_val, model, precision=precision)
        record = {"val_loss": loss, "acc1": acc1, "acc5": acc5}
        if ema is not None:
            ema_acc1, ema_acc5, ema_loss = validate(config, loader_val, ema.module, precision=precision, label="EMA")
            record.update(ema_acc1=ema_acc1, ema_acc5=ema_acc5, ema_val_loss=ema_loss)
        return record

    criterion = build_criterion(config, mixup_fn is not None)
    run.fit(loader_train, supervised_losses(trained, criterion, device, mixup_fn), evaluate)


def train_one_epoch(config: CfgNode, model: nn.Module, criterion: nn.Module, data_loader: Iterable,
                    optimizer: Optimizer, epoch: int, mixup_fn: Mixup | None, lr_scheduler: Scheduler,
                    loss_scaler=None) -> float:
    """The authors' API: one epoch of ``data_loader`` (``(images, labels)`` batches; ``model`` in
    DDP or not), through the run core's loop: per-batch seeds, TRAIN.ACCUMULATION_STEPS, clipping
    to TRAIN.CLIP_GRAD, the learning rate stepped per update, the non-finite stop, progress lines.
    Autocast follows the config. ``loss_scaler``: timm's ``NativeScaler``, whose gradient scaler
    then scales the loss (its state goes on across epochs), or None for no scaling. Returns the
    epoch's mean training loss."""
    device = next(model.parameters()).device
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    steps = updates_per_epoch(config, len(data_loader)) * accumulation
    scaler = getattr(loss_scaler, "_scaler", loss_scaler)  # NativeScaler keeps its torch GradScaler there
    precision = Precision(config, device, scaler if scaler is not None else torch.amp.GradScaler(device.type,
                                                                                              enabled=False))
    dist_info = process_info(device)
    run = TrainingRun(config, dist_info, logging.getLogger("crossformer"),
                      EpochSchedule(config, steps, dist_info.world_size, accumulation), model, optimizer, precision,
                      lr_scheduler.step_update)
    run.train_steps(data_loader, supervised_losses(model, criterion, device, mixup_fn), epoch)
    return run.sums["loss_sum"].item() / steps


@torch.no_grad()
def validate(config: CfgNode, data_loader: Iterable, model: nn.Module, epoch: int = 0,
             precision: Precision | None = None, label: str = "") -> tuple[float, float, float]:
    """The authors' API (``epoch``, CrossFormer++'s argument, is not used): top-1/top-5 accuracy
    and loss over the whole validation set: every rank counts its own images and the counts are
    summed, so the result does not depend on the number of ranks. Autocast as ``precision``
    (default: from the config). ``label`` names the weights in the log line (``EMA * Acc@1 ...``)."""
    model.eval()
    device = next(model.parameters()).device
    precision = precision or Precision(config, device)
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # correct@1, correct@5, loss sum, images
    for images, targets in data_loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([top[:, 0].sum(), top.sum(), nn.functional.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(len(targets), device=device)]).double()
    correct1, correct5, loss_sum, count = all_reduce_sum(totals).tolist()
    acc1, acc5, loss = 100 * correct1 / count, 100 * correct5 / count, loss_sum / count
    logging.getLogger("crossformer").info(f"{label} * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.4f} "
                                          f"on {int(count)} val images")
    return acc1, acc5, loss


@torch.no_grad()
def throughput(data_loader: Iterable, model: nn.Module, logger: logging.Logger,
               precision: Precision | None = None) -> float:
    """The authors' API: images per second of forward passes on one batch of ``data_loader``,
    the median of several timed rounds (the log also gives the slowest and fastest), then the
    official line ``batch_size N throughput X images/s``. ``precision``: autocast as training
    would (default: none, as the authors measured). Returns the median."""
    model.eval()
    device = next(model.parameters()).device
    images = next(iter(data_loader))[0].to(device)
    warmup, rounds, passes = THROUGHPUT_PASSES.get(device.type, THROUGHPUT_PASSES["cpu"])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    speeds = []
    with precision.autocast() if precision else nullcontext():
        for _ in range(warmup):
            model(images)
        synchronize()
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(passes):
                model(images)
            synchronize()
            speeds.append(passes * images.shape[0] / (time.perf_counter() - start))
    median = statistics.median(speeds)
    logger.info(f"throughput over {rounds} rounds of {passes} passes, precision {precision or 'float32'}: "
                f"median {median:.1f}, slowest {min(speeds):.1f}, fastest {max(speeds):.1f} images/s")
    logger.info(f"batch_size {images.shape[0]} throughput {median:.1f} images/s")
    return median


if __name__ == "__main__":
    sys.exit(run())
