"""Detection's own parts of training: data loaders, the step schedule, the loss terms and COCO
evaluation of torchvision detectors (the loop is the run core's, training.py)."""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from yacs.config import CfgNode

from config import UserError
from data.build import ShardSampler
from data.resumable import loader_options, resumable_loader
from detection.coco import CocoDetection, collate
from detection.coco_eval import broadcast_metrics, coco_evaluate, gather_results, to_coco_results
from detection.digits_coco import ensure_digits_coco
from detection.model import has_masks
from detection.transforms import build_train_transform
from runtime import Precision
from utils import DistInfo

DATASETS = ("coco", "digits")


def dataset_root(config: CfgNode) -> str:
    """DATA.DATA_PATH for COCO; for the digits demo, the folder it is written to (once)."""
    if config.DATA.DATASET == "digits":
        return ensure_digits_coco(config.DATA.DATA_PATH)
    if config.DATA.DATASET != "coco":
        raise UserError(f"DATA.DATASET must be one of {', '.join(DATASETS)} for detection, got {config.DATA.DATASET!r}")
    if not config.DATA.DATA_PATH:
        raise UserError("no dataset: pass --data-path COCO_ROOT (with annotations/ and train2017/, val2017/)")
    return config.DATA.DATA_PATH


def build_dataset(config: CfgNode, split: str) -> CocoDetection:
    """The ``train`` (with the training augmentation) or ``val`` split."""
    transform = build_train_transform(config) if split == "train" else None
    return CocoDetection(dataset_root(config), split, config.MODEL.NUM_CLASSES, has_masks(config), transform)


def build_loaders(config: CfgNode, dist_info: DistInfo, train: bool) -> tuple[DataLoader | None, DataLoader]:
    """``(train loader or None, val loader)``. Training is the run core's resumable loader
    (shuffled by SEED and epoch, each image's augmentation seeded by its index, the last partial batch
    dropped); evaluation gives each rank its ShardSampler share of the images,
    DET.TEST_BATCH_SIZE at a time."""
    val = build_dataset(config, "val")
    loader_val = DataLoader(val, sampler=ShardSampler(len(val), dist_info.rank, dist_info.world_size),
                            **loader_options(config, batch_size=config.DET.TEST_BATCH_SIZE, collate_fn=collate))
    if not train:
        return None, loader_val
    return (resumable_loader(build_dataset(config, "train"), config, dist_info.rank, dist_info.world_size, collate),
            loader_val)


def build_step_scheduler(config: CfgNode, optimizer: Optimizer, updates_per_epoch: int) -> MultiStepLRScheduler:
    """mmdet's schedule, counted in optimizer steps: linear warm-up over DET.WARMUP_ITERS from
    BASE_LR * DET.WARMUP_RATIO, then x TRAIN.LR_SCHEDULER.DECAY_RATE after each epoch of DET.LR_STEPS."""
    return MultiStepLRScheduler(optimizer, decay_t=[e * updates_per_epoch for e in config.DET.LR_STEPS],
                                decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_t=config.DET.WARMUP_ITERS,
                                warmup_lr_init=config.TRAIN.BASE_LR * config.DET.WARMUP_RATIO,
                                warmup_prefix=False, t_in_epochs=False)


def detection_losses(model: nn.Module, device: torch.device) -> Callable[[tuple], dict[str, torch.Tensor]]:
    """``losses`` for the run core: the detector's loss terms on a batch of images and targets,
    and their sum (``loss``), which is trained."""

    def losses(batch: tuple) -> dict[str, torch.Tensor]:
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        terms = model(images, targets)
        return {"loss": sum(terms.values()), **terms}

    return losses


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, precision: Precision, dist_info: DistInfo,
             logger: logging.Logger) -> dict[str, float]:
    """COCO bbox (and segm for Mask R-CNN) metrics over the whole val split, the same on every rank:
    each rank detects its share, rank 0 scores all of them with COCOeval."""
    model.eval()
    dataset: CocoDetection = loader.dataset
    results: list[dict] = []
    start = time.time()
    for images, targets in loader:
        with precision.autocast():
            outputs = model([image.to(dist_info.device) for image in images])
        for target, output in zip(targets, outputs):
            results += to_coco_results(target["image_id"], output, dataset.categories)
    results = gather_results(results)
    metrics = {}
    if dist_info.is_main:
        logger.info(f"detected {len(results)} objects in {len(dataset)} images in {time.time() - start:.1f}s")
        iou_types = ("bbox", "segm") if dataset.with_masks else ("bbox",)
        metrics = coco_evaluate(dataset.coco, results, iou_types, logger)
    return broadcast_metrics(metrics)
