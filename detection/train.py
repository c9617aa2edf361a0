"""Train (or evaluate) a CrossFormer detector on COCO: one process or many (torchrun / launch).

    python detection/train.py --cfg configs/detection/demo_digits.yaml
    torchrun --nproc_per_node 8 detection/train.py --cfg configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml \
        --data-path COCO_ROOT --pretrained crossformer-s.pth --output output
    python detection/train.py --cfg ... --data-path COCO_ROOT --eval --resume ckpt_epoch_11.pth

Run from anywhere: the repository root is put on ``sys.path`` (the first lines below).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import UserError  # noqa: E402
from detection import engine  # noqa: E402
from detection.model import build_detector  # noqa: E402
from logger import JsonLinesWriter, create_logger  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from runtime import Precision, add_common_arguments, checkpoint_to_resume, run_configured  # noqa: E402
from utils import (DistInfo, epoch_seed, load_checkpoint_file, load_weights, model_state,  # noqa: E402
                   write_checkpoint, seed_everything)


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer detection training and evaluation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--num_workers", type=int, help="data-loading workers per process")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, help="learning rate (for the configured global batch; not rescaled)")
    return parser.parse_args(argv)


def load_backbone_weights(model: nn.Module, path: str, trust: bool) -> None:
    """ImageNet weights (a classification checkpoint of ours or an official release) into the
    backbone body; the classifier and the final norm, which detection does not use, are left out."""
    state = model_state(load_checkpoint_file(path, trust), path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
    load_weights(model.backbone.body, state, path)


def prepare(config: CfgNode, dist_info: DistInfo, logger: logging.Logger,
            train: bool) -> tuple[DataLoader | None, DataLoader, nn.Module, Precision]:
    """Loaders, detector (with pretrained or resumed weights) and precision shared by train and test."""
    if config.COMPILE:
        raise UserError("COMPILE (--compile): torch.compile is used by main.py (classification) only, not by detection")
    loader_train, loader_val = engine.build_loaders(config, dist_info, train)
    model = build_detector(config).to(dist_info.device)
    logger.info(f"{config.DET.TYPE} {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters")
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        load_backbone_weights(model, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS)
        logger.info(f"loaded backbone weights from {config.MODEL.PRETRAINED}")
    precision = Precision(config, dist_info.device)
    logger.info(f"precision: {precision}")
    return loader_train, loader_val, model, precision


def main(config: CfgNode, dist_info: DistInfo) -> None:
    """Build everything, resume, then evaluate or train."""
    logger = create_logger(config.OUTPUT, dist_info.rank)
    if dist_info.is_main:
        with open(os.path.join(config.OUTPUT, "config.yaml"), "w") as f:
            f.write(config.dump())
    logger.info(f"world size {dist_info.world_size}, device {dist_info.device}, output {config.OUTPUT}")
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        raise UserError("TRAIN.ACCUMULATION_STEPS: gradient accumulation is not supported by detection/train.py")
    loader_train, loader_val, model, precision = prepare(config, dist_info, logger, train=not config.EVAL_MODE)
    metrics = JsonLinesWriter(config.OUTPUT, dist_info.rank)

    optimizer = lr_scheduler = None
    if not config.EVAL_MODE:
        optimizer = build_optimizer(config, model)
        lr_scheduler = engine.build_step_scheduler(config, optimizer, len(loader_train))
    start_epoch, best_ap = 0, 0.0
    resume = checkpoint_to_resume(config, logger)
    if resume:
        path, checkpoint = resume
        load_weights(model, model_state(checkpoint, path), path)
        logger.info(f"loaded weights from {path}")
        if not config.EVAL_MODE and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.step_update((checkpoint["epoch"] + 1) * len(loader_train))
            if "scaler" in checkpoint:
                precision.scaler.load_state_dict(checkpoint["scaler"])
            start_epoch, best_ap = checkpoint["epoch"] + 1, checkpoint.get("best_ap", 0.0)
            logger.info(f"resuming training at epoch {start_epoch}")

    if config.EVAL_MODE:
        record = engine.evaluate(model, loader_val, precision, dist_info, logger)
        metrics.write({"eval": True, **record})
        return

    ddp = model
    if dist_info.world_size > 1:
        device = dist_info.device
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    logger.info("Start training")
    start_time = time.time()
    for epoch in range(start_epoch, config.TRAIN.EPOCHS):
        seed_everything(epoch_seed(config.SEED, epoch, dist_info.rank))
        loader_train.sampler.set_epoch(epoch)
        losses = engine.train_one_epoch(config, ddp, loader_train, optimizer, lr_scheduler, precision, epoch,
                                        dist_info, logger)
        record = engine.evaluate(model, loader_val, precision, dist_info, logger)
        improved = record["bbox_AP"] > best_ap
        best_ap = max(best_ap, record["bbox_AP"])
        logger.info(f"bbox AP {record['bbox_AP']:.4f} (best {best_ap:.4f})")
        if dist_info.is_main:
            state = engine.checkpoint_state(model, optimizer, lr_scheduler, precision, epoch, best_ap, config)
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                write_checkpoint(state, engine.epoch_checkpoint(config, epoch))
                logger.info(f"{engine.epoch_checkpoint(config, epoch)} saved")
            if improved:
                write_checkpoint(state, os.path.join(config.OUTPUT, "best.pth"))
            metrics.write({"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}, **record,
                           "lr": optimizer.param_groups[0]["lr"]})
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)
    return run_configured(args, main)


if __name__ == "__main__":
    sys.exit(run())
