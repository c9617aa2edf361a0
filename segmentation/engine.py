"""Segmentation's own parts of training: the poly learning rate, and inference (single-scale or
multi-scale with flip, whole images after the align resize) for evaluation (the loop is the run
core's, training.py)."""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from yacs.config import CfgNode

from runtime import Precision
from segmentation.align_resize import aligned_resize_size
from segmentation.metrics import SegmentationMeter, format_table
from segmentation.pipeline import normalize


def poly_learning_rate(config: CfgNode, iteration: int) -> float:
    """mmseg's poly schedule: ``(BASE_LR - MIN_LR) * (1 - it / MAX_ITERS) ** POWER + MIN_LR``,
    times a linear warm-up factor rising from SEG.WARMUP_RATIO to 1 over SEG.WARMUP_ITERS.
    A pure function of the iteration, so a resumed run needs no scheduler state."""
    seg = config.SEG
    rate = (config.TRAIN.BASE_LR - seg.MIN_LR) * (1 - iteration / seg.MAX_ITERS) ** seg.POWER + seg.MIN_LR
    if iteration < seg.WARMUP_ITERS:
        rate *= 1 - (1 - iteration / seg.WARMUP_ITERS) * (1 - seg.WARMUP_RATIO)
    return rate


def set_poly_learning_rate(optimizer: Optimizer, config: CfgNode, iteration: int) -> None:
    """Every parameter group trains iteration ``iteration`` at ``poly_learning_rate``."""
    for group in optimizer.param_groups:
        group["lr"] = poly_learning_rate(config, iteration)


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
