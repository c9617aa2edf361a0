"""Train, evaluate or benchmark CrossFormer: one process (CPU or GPU) or many (torchrun / launch).

    python main.py --cfg configs/demo/digits.yaml
    torchrun --nproc_per_node 8 main.py --cfg configs/crossformer/small_patch4_group7_224.yaml \
        --batch-size 128 --data-path IMAGENET --output output
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Iterable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode

from config import UserError, get_config
from data import build_loader
from logger import JsonLinesWriter, create_logger, create_scalar_writer
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from runtime import Precision, add_common_arguments, check_finite, launch, setup_run
from utils import (DistInfo, all_reduce_sum, epoch_seed, load_checkpoint_file, load_pretrained, load_weights,
                   model_state, newest_loadable_checkpoint, save_checkpoint, seed_everything)

# (warm-up passes, timed passes) of --throughput
THROUGHPUT_PASSES = {"cuda": (50, 30), "cpu": (3, 10)}


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer training and evaluation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--zip", action="store_true", help="read train.zip/val.zip instead of folders")
    parser.add_argument("--cache-mode", type=str, choices=["no", "full", "part"],
                        help="zip mode: no cache, cache everything, or cache this rank's shard")
    parser.add_argument("--accumulation-steps", type=int, help="gradient accumulation steps")
    parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
    parser.add_argument("--throughput", action="store_true", help="only measure throughput")
    parser.add_argument("--num_workers", type=int, help="data-loading workers per process")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, help="base learning rate (for a global batch of 512)")
    return parser.parse_args(argv)


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


def main(config: CfgNode, dist_info: DistInfo) -> None:
    """Build data, model and optimizer, resume, then evaluate, benchmark or train."""
    device = dist_info.device
    logger = create_logger(config.OUTPUT, dist_info.rank)
    if dist_info.is_main:
        with open(os.path.join(config.OUTPUT, "config.yaml"), "w") as f:
            f.write(config.dump())
    logger.info(f"world size {dist_info.world_size}, device {device}, output {config.OUTPUT}")

    dataset_train, dataset_val, loader_train, loader_val, mixup_fn = build_loader(
        config, dist_info.rank, dist_info.world_size)
    model = build_model(config).to(device)
    flops = f", {model.flops() / 1e9:.3f} GFLOPs at {config.DATA.IMG_SIZE}" if hasattr(model, "flops") else ""
    logger.info(f"model {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters{flops}")
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")

    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        skipped = load_pretrained(model, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS)
        if skipped:
            logger.warning(f"{config.MODEL.PRETRAINED}: the head has another class count; skipped {skipped}, "
                           "the new head starts fresh")
        logger.info(f"loaded pretrained weights from {config.MODEL.PRETRAINED}")

    model_without_ddp = model
    if dist_info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)

    if config.THROUGHPUT_MODE:
        throughput(loader_val, model, precision, device, logger)
        return

    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    updates_per_epoch = len(loader_train) // accumulation
    if updates_per_epoch < 1:
        raise UserError(f"TRAIN.ACCUMULATION_STEPS {accumulation} is larger than the {len(loader_train)} "
                        "batches of an epoch")
    optimizer = build_optimizer(config, model_without_ddp)
    lr_scheduler = build_scheduler(config, optimizer, updates_per_epoch)

    resume = config.MODEL.RESUME
    found = None
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = newest_loadable_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINTS)
        if found:
            if resume and resume != found[0]:
                logger.warning(f"auto-resume: using {found[0]} (newer than --resume {resume})")
            resume = found[0]
    start_epoch, max_accuracy = 0, 0.0
    if resume:
        checkpoint = found[1] if found else load_checkpoint_file(resume, config.TRUST_CHECKPOINTS)
        load_weights(model_without_ddp, model_state(checkpoint, resume), resume)
        logger.info(f"loaded weights from {resume}")
        if not config.EVAL_MODE and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            # The schedule follows from the config and the update count (the checkpoint's copy
            # is kept for the official format): a run extended with --epochs gets the new one.
            lr_scheduler.step_update((checkpoint["epoch"] + 1) * updates_per_epoch)
            if "scaler" in checkpoint:
                precision.scaler.load_state_dict(checkpoint["scaler"])
            start_epoch = checkpoint["epoch"] + 1
            max_accuracy = checkpoint.get("max_accuracy", 0.0)
            logger.info(f"resuming training at epoch {start_epoch}")

    if config.EVAL_MODE:
        acc1, acc5, _ = validate(loader_val, model, precision, device, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
        return

    train(config, dist_info, model, model_without_ddp, loader_train, loader_val, dataset_val, mixup_fn,
          optimizer, lr_scheduler, precision, start_epoch, max_accuracy, updates_per_epoch, logger)


def train(config: CfgNode, dist_info: DistInfo, model: nn.Module, model_without_ddp: nn.Module, loader_train: DataLoader,
          loader_val: DataLoader, dataset_val: Dataset, mixup_fn: Mixup | None, optimizer: Optimizer,
          lr_scheduler: Scheduler, precision: Precision, start_epoch: int, max_accuracy: float,
          updates_per_epoch: int, logger: logging.Logger) -> None:
    """The epoch loop: train, validate, save checkpoints and metrics."""
    criterion = build_criterion(config, mixup_fn is not None)
    metrics = JsonLinesWriter(config.OUTPUT, dist_info.rank)
    scalars = create_scalar_writer(config.OUTPUT, enabled=dist_info.is_main)
    logger.info("Start training")
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        seed_everything(epoch_seed(config.SEED, epoch, dist_info.rank))
        loader_train.sampler.set_epoch(epoch)
        train_loss = train_one_epoch(config, model, criterion, loader_train, optimizer, epoch, mixup_fn,
                                     lr_scheduler, precision, updates_per_epoch, dist_info, logger)
        acc1, acc5, val_loss = validate(loader_val, model, precision, dist_info.device, logger)
        logger.info(f"Accuracy of the network on the {len(dataset_val)} test images: {acc1:.1f}%")
        improved = acc1 > max_accuracy
        max_accuracy = max(max_accuracy, acc1)
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
        if dist_info.is_main:
            state = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": precision.scaler.state_dict(),
                "epoch": epoch,
                "max_accuracy": max_accuracy,
                "config": config.dump(),
            }
            last = epoch == config.TRAIN.EPOCHS - 1
            if epoch % config.SAVE_FREQ == 0 or last:
                path = os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
                save_checkpoint(state, path)
                logger.info(f"{path} saved")
            if improved:
                save_checkpoint(state, os.path.join(config.OUTPUT, "best.pth"))
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "acc1": acc1, "acc5": acc5,
                      "max_accuracy": max_accuracy, "lr": optimizer.param_groups[0]["lr"]}
            metrics.write(record)
            for key in ("train_loss", "val_loss", "acc1", "acc5", "lr"):
                scalars.add_scalar(key, record[key], epoch)
    scalars.close()
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def train_one_epoch(config: CfgNode, model: nn.Module, criterion: nn.Module, loader: Iterable,
                    optimizer: Optimizer, epoch: int, mixup_fn: Mixup | None, lr_scheduler: Scheduler,
                    precision: Precision, updates_per_epoch: int, dist_info: DistInfo,
                    logger: logging.Logger) -> float:
    """One epoch; every case (AMP or not, accumulation or not, DDP or not) takes the same path.
    Losses and norms stay on the device; the host reads them only every PRINT_FREQ steps."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device = dist_info.device
    accumulation = max(1, config.TRAIN.ACCUMULATION_STEPS)
    num_steps = updates_per_epoch * accumulation  # a trailing partial accumulation is left out
    clip = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD > 0 else math.inf
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    last_loss = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    norm_sum = torch.zeros((), device=device, dtype=torch.float64)
    bad_step = torch.full((), -1, device=device)  # first step with a non-finite loss
    start = batch_start = time.time()
    for idx, (samples, targets) in enumerate(loader):
        if idx >= num_steps:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        update = (idx + 1) % accumulation == 0
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not update else nullcontext()
        with sync:
            with precision.autocast():
                loss = criterion(model(samples), targets)
            precision.scaler.scale(loss / accumulation).backward()
        last_loss = loss.detach().float()
        loss_sum += last_loss
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(last_loss), idx, bad_step)
        if update:
            precision.scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            norm_sum += grad_norm.float()
            precision.scaler.step(optimizer)
            precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step_update(epoch * updates_per_epoch + (idx + 1) // accumulation)
        if idx % config.PRINT_FREQ == 0 or idx == num_steps - 1:
            check_finite(bad_step, f"epoch {epoch}")
            batch_time = (time.time() - start) / (idx + 1)
            eta = batch_time * (num_steps - idx - 1)
            memory = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else 0.0
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{num_steps}]\t"
                f"eta {datetime.timedelta(seconds=int(eta))} lr {optimizer.param_groups[0]['lr']:.6f}\t"
                f"time {time.time() - batch_start:.4f} ({batch_time:.4f})\t"
                f"loss {last_loss.item():.4f} ({loss_sum.item() / (idx + 1):.4f})\t"
                f"grad_norm {grad_norm.item():.4f} ({norm_sum.item() / max(1, (idx + 1) // accumulation):.4f})\t"
                f"mem {memory:.0f}MB")
        batch_start = time.time()
    check_finite(bad_step, f"epoch {epoch}")
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    return loss_sum.item() / num_steps


@torch.no_grad()
def validate(loader: Iterable, model: nn.Module, precision: Precision, device: torch.device,
             logger: logging.Logger) -> tuple[float, float, float]:
    """Top-1/top-5 accuracy and loss over the whole validation set: every rank counts its own
    images and the counts are summed, so the result does not depend on the number of ranks."""
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # correct@1, correct@5, loss sum, images
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([top[:, 0].sum(), top.sum(), nn.functional.cross_entropy(logits, targets, reduction="sum"),
                               torch.tensor(len(targets), device=device)]).double()
    correct1, correct5, loss_sum, count = all_reduce_sum(totals).tolist()
    acc1, acc5, loss = 100 * correct1 / count, 100 * correct5 / count, loss_sum / count
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    return acc1, acc5, loss


@torch.no_grad()
def throughput(loader: Iterable, model: nn.Module, precision: Precision, device: torch.device,
               logger: logging.Logger) -> None:
    """Images per second of forward passes on one batch (``batch_size N throughput X``)."""
    model.eval()
    images = next(iter(loader))[0].to(device)
    warmup, timed = THROUGHPUT_PASSES.get(device.type, THROUGHPUT_PASSES["cpu"])
    with precision.autocast():
        for _ in range(warmup):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        logger.info(f"throughput averaged over {timed} passes")
        start = time.time()
        for _ in range(timed):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    logger.info(f"batch_size {images.shape[0]} throughput {timed * images.shape[0] / (time.time() - start)}")


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)

    def job() -> None:
        config = get_config(args)
        dist_info = setup_run(config)
        scale_learning_rates(config, dist_info.world_size)
        main(config, dist_info)

    return launch(job)


if __name__ == "__main__":
    sys.exit(run())
