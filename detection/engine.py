"""Data loaders, schedule, one training epoch and COCO evaluation for torchvision detectors."""
from __future__ import annotations

import datetime
import logging
import os
import time

import torch
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler
from yacs.config import CfgNode

from config import UserError
from data.build import ShardSampler
from detection.coco import CocoDetection, collate
from detection.coco_eval import broadcast_metrics, coco_evaluate, gather_results, to_coco_results
from detection.digits_coco import ensure_digits_coco
from detection.model import has_masks
from detection.transforms import build_train_transform
from runtime import Precision, check_finite, optimizer_step
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
    """``(train loader or None, val loader)``. Training shuffles with a DistributedSampler seeded by
    SEED (``set_epoch`` each epoch) and drops the last partial batch; evaluation gives each rank its
    ShardSampler share of the images, DET.TEST_BATCH_SIZE at a time."""
    options = dict(num_workers=config.DATA.NUM_WORKERS, collate_fn=collate,
                   pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available())
    val = build_dataset(config, "val")
    loader_val = DataLoader(val, sampler=ShardSampler(len(val), dist_info.rank, dist_info.world_size),
                            batch_size=config.DET.TEST_BATCH_SIZE, **options)
    if not train:
        return None, loader_val
    dataset = build_dataset(config, "train")
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
                                 seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise UserError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than the {len(sampler)} training "
                        f"images per process")
    loader_train = DataLoader(dataset, sampler=sampler, drop_last=True, batch_size=config.DATA.BATCH_SIZE, **options)
    return loader_train, loader_val


def build_step_scheduler(config: CfgNode, optimizer: Optimizer, updates_per_epoch: int) -> MultiStepLRScheduler:
    """mmdet's schedule, counted in optimizer steps: linear warm-up over DET.WARMUP_ITERS from
    BASE_LR * DET.WARMUP_RATIO, then x TRAIN.LR_SCHEDULER.DECAY_RATE after each epoch of DET.LR_STEPS."""
    return MultiStepLRScheduler(optimizer, decay_t=[e * updates_per_epoch for e in config.DET.LR_STEPS],
                                decay_rate=config.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_t=config.DET.WARMUP_ITERS,
                                warmup_lr_init=config.TRAIN.BASE_LR * config.DET.WARMUP_RATIO,
                                warmup_prefix=False, t_in_epochs=False)


def train_one_epoch(config: CfgNode, model: nn.Module, loader: DataLoader, optimizer: Optimizer,
                    lr_scheduler: MultiStepLRScheduler, precision: Precision, epoch: int, dist_info: DistInfo,
                    logger: logging.Logger) -> dict[str, float]:
    """One epoch; returns the mean of each loss term and of their sum (``loss``)."""
    model.train()
    device = dist_info.device
    steps = len(loader)
    sums: dict[str, torch.Tensor] = {}
    bad_step = torch.full((), -1, device=device)
    start = time.time()
    for idx, (images, targets) in enumerate(loader):
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with precision.autocast():
            losses = model(images, targets)
        loss = sum(losses.values())
        precision.scaler.scale(loss).backward()
        grad_norm = optimizer_step(model, optimizer, precision, config.TRAIN.CLIP_GRAD)
        lr_scheduler.step_update(epoch * steps + idx + 1)
        for name, value in {"loss": loss, **losses}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), idx, bad_step)
        if idx % config.PRINT_FREQ == 0 or idx == steps - 1:
            check_finite(bad_step, f"epoch {epoch}")
            elapsed = time.time() - start
            eta = elapsed / (idx + 1) * (steps - idx - 1)
            terms = " ".join(f"{k} {v.item() / (idx + 1):.4f}" for k, v in sums.items())
            memory = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else 0.0
            logger.info(f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{idx}/{steps}]\t"
                        f"eta {datetime.timedelta(seconds=int(eta))} lr {optimizer.param_groups[0]['lr']:.6f}\t"
                        f"time {elapsed / (idx + 1):.4f}\t{terms}\tgrad_norm {grad_norm.item():.4f}\tmem {memory:.0f}MB")
    check_finite(bad_step, f"epoch {epoch}")
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    return {k: v.item() / steps for k, v in sums.items()}


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


def checkpoint_state(model: nn.Module, optimizer: Optimizer, lr_scheduler: MultiStepLRScheduler,
                     precision: Precision, epoch: int, best_ap: float, config: CfgNode) -> dict:
    """A training checkpoint in the repository's format (a plain dict)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
            "epoch": epoch, "best_ap": best_ap, "config": config.dump()}


def epoch_checkpoint(config: CfgNode, epoch: int) -> str:
    return os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
