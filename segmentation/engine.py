"""The iteration loop (train, checkpoint, evaluate) and inference (single-scale or multi-scale
with flip, whole images after the align resize)."""
from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from yacs.config import CfgNode

from logger import JsonLinesWriter
from runtime import Precision, check_finite, optimizer_step
from segmentation.align_resize import aligned_resize_size
from segmentation.losses import SegmentationLoss
from segmentation.metrics import SegmentationMeter, format_table
from segmentation.pipeline import normalize
from utils import DistInfo, epoch_seed, write_checkpoint, seed_everything

CHECKPOINT_PREFIX = "ckpt_iter_"  # ckpt_iter_N.pth: the state after N iterations
CHECKPOINT_ENTRIES = ("model", "optimizer", "iteration")


def poly_learning_rate(config: CfgNode, iteration: int) -> float:
    """mmseg's poly schedule: ``(BASE_LR - MIN_LR) * (1 - it / MAX_ITERS) ** POWER + MIN_LR``,
    times a linear warm-up factor rising from SEG.WARMUP_RATIO to 1 over SEG.WARMUP_ITERS.
    A pure function of the iteration, so a resumed run needs no scheduler state."""
    seg = config.SEG
    rate = (config.TRAIN.BASE_LR - seg.MIN_LR) * (1 - iteration / seg.MAX_ITERS) ** seg.POWER + seg.MIN_LR
    if iteration < seg.WARMUP_ITERS:
        rate *= 1 - (1 - iteration / seg.WARMUP_ITERS) * (1 - seg.WARMUP_RATIO)
    return rate


def train(config: CfgNode, dist_info: DistInfo, model: nn.Module, model_without_ddp: nn.Module, loader: Iterable,
          val_loader: Iterable, optimizer: Optimizer, precision: Precision, start: int, best_miou: float,
          logger: logging.Logger) -> None:
    """Iterations ``start`` .. SEG.MAX_ITERS-1: every iteration seeds dropout/drop-path from
    (SEED, iteration, rank) and takes one optimizer step; checkpoints every
    SEG.CHECKPOINT_INTERVAL and evaluations every SEG.EVAL_INTERVAL iterations (and at the end)."""
    seg, device = config.SEG, dist_info.device
    criterion = SegmentationLoss(seg.AUX_WEIGHT, seg.IGNORE_INDEX)
    metrics = JsonLinesWriter(config.OUTPUT, dist_info.rank)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    bad_step = torch.full((), -1, device=device)
    losses_counted = 0
    model.train()
    logger.info(f"Start training at iteration {start} of {seg.MAX_ITERS}")
    start_time = last_time = time.time()
    for iteration, (images, labels) in enumerate(loader, start):
        seed_everything(epoch_seed(config.SEED, iteration, dist_info.rank))
        for group in optimizer.param_groups:
            group["lr"] = poly_learning_rate(config, iteration)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with precision.autocast():
            loss = criterion(model(images), labels)
        precision.scaler.scale(loss).backward()
        grad_norm = optimizer_step(model, optimizer, precision, config.TRAIN.CLIP_GRAD)
        loss = loss.detach().float()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), iteration, bad_step)
        loss_sum += loss
        losses_counted += 1
        done = iteration + 1
        if done % config.PRINT_FREQ == 0 or done == seg.MAX_ITERS:
            check_finite(bad_step, "iteration")
            seconds = (time.time() - start_time) / (done - start)
            eta = datetime.timedelta(seconds=int(seconds * (seg.MAX_ITERS - done)))
            logger.info(f"Iter [{done}/{seg.MAX_ITERS}]\teta {eta} lr {optimizer.param_groups[0]['lr']:.3e}\t"
                        f"time {(time.time() - last_time) / config.PRINT_FREQ:.4f}\tloss {loss.item():.4f} "
                        f"({loss_sum.item() / losses_counted:.4f})\tgrad_norm {grad_norm.item():.4f}")
            last_time = time.time()
        last = done == seg.MAX_ITERS
        improved = False
        if done % seg.EVAL_INTERVAL == 0 or last:
            check_finite(bad_step, "iteration")
            summary = evaluate(model_without_ddp, val_loader, config, precision, device, logger)
            improved = summary["mIoU"] > best_miou
            best_miou = max(best_miou, summary["mIoU"])
            metrics.write({"iteration": done, "train_loss": loss_sum.item() / losses_counted,
                           "mIoU": summary["mIoU"], "mAcc": summary["mAcc"], "aAcc": summary["aAcc"],
                           "best_mIoU": best_miou, "lr": optimizer.param_groups[0]["lr"],
                           "seconds": round(time.time() - start_time, 1)})
            loss_sum.zero_()
            losses_counted = 0
            model.train()
        periodic = done % seg.CHECKPOINT_INTERVAL == 0 or last
        if dist_info.is_main and (periodic or improved):
            check_finite(bad_step, "iteration")
            state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": precision.scaler.state_dict(), "iteration": done, "best_miou": best_miou,
                     "config": config.dump()}
            if periodic:
                path = os.path.join(config.OUTPUT, f"{CHECKPOINT_PREFIX}{done}.pth")
                write_checkpoint(state, path)
                logger.info(f"{path} saved")
            if improved:
                write_checkpoint(state, os.path.join(config.OUTPUT, "best.pth"))
    check_finite(bad_step, "iteration")
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: Tensor, config: CfgNode, precision: Precision,
                          ratios: Sequence[float] = (1.0,), flip: bool = False) -> Tensor:
    """Class probabilities ``(classes, H, W)`` of one uint8 ``(3, H, W)`` image: for every ratio,
    the image is align-resized to ratio x SEG.IMG_SCALE, passed whole through the model (and
    flipped, if ``flip``), and the softmax of its logits, resized back to ``H x W``, is averaged."""
    height, width = image.shape[-2:]
    device = next(model.parameters()).device
    total = None
    for ratio in ratios:
        size = aligned_resize_size(height, width, [s * ratio for s in config.SEG.IMG_SCALE], config.SEG.SIZE_DIVISOR)
        pixels = F.interpolate(image[None].float().to(device), size=size, mode="bilinear", align_corners=False)
        batch = normalize(pixels[0].cpu())[None].to(device)
        views = [batch, batch.flip(-1)] if flip else [batch]
        for view_index, view in enumerate(views):
            with precision.autocast():
                logits = model(view)["out"].float()
            if view_index == 1:
                logits = logits.flip(-1)
            probabilities = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False).softmax(1)
            total = probabilities if total is None else total + probabilities
    return total[0] / (len(ratios) * (2 if flip else 1))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, config: CfgNode, precision: Precision, device: torch.device,
             logger: logging.Logger, aug_test: bool = False) -> dict:
    """mIoU, mAcc, aAcc and the per-class table over the validation images of every rank:
    single-scale, or with --aug-test SEG.TEST_RATIOS (and flip if SEG.TEST_FLIP)."""
    model.eval()
    seg = config.SEG
    ratios, flip = (seg.TEST_RATIOS, seg.TEST_FLIP) if aug_test else ((1.0,), False)
    meter = SegmentationMeter(config.MODEL.NUM_CLASSES, seg.IGNORE_INDEX, device)
    for image, label in loader:
        prediction = predict_probabilities(model, image[0], config, precision, ratios, flip).argmax(0)
        meter.update(prediction, label[0])
    summary = meter.summary()
    logger.info(("multi-scale" if aug_test else "single-scale") + " evaluation\n" + format_table(summary))
    return summary
