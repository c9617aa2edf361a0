"""Train or evaluate a CrossFormer segmentation model (Semantic FPN, UPerNet) on ADE20K-layout data,
iteration by iteration, on one CPU/GPU or many (torchrun).

    python segmentation/train.py --cfg configs/segmentation/demo_digits.yaml
    torchrun --nproc_per_node 8 segmentation/train.py --cfg configs/segmentation/fpn_crossformer_s_ade20k_80k.yaml \
        --data-path ADE_ROOT --pretrained crossformer-s.pth --output output
    python segmentation/train.py --cfg ... --data-path ADE_ROOT --eval --resume CKPT [--aug-test]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402

from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import UserError, get_config  # noqa: E402
from logger import create_logger  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from runtime import Precision, add_common_arguments, launch, setup_run  # noqa: E402
from segmentation.dataset import build_train_loader, build_val_loader, find_dataset_root  # noqa: E402
from segmentation.engine import CHECKPOINT_ENTRIES, CHECKPOINT_PREFIX, evaluate, train  # noqa: E402
from segmentation.heads import SegmentationModel, build_segmentation_model  # noqa: E402
from utils import (DistInfo, load_checkpoint_file, load_weights, model_state,  # noqa: E402
                   newest_loadable_checkpoint)


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer semantic segmentation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--aug-test", action="store_true",
                        help="with --eval: multi-scale (SEG.TEST_RATIOS) and flip testing")
    return parser.parse_args(argv)


def load_backbone_weights(model: SegmentationModel, path: str, trust: bool) -> None:
    """ImageNet weights of the backbone from a classification checkpoint or model file (its
    classifier and final norm, which segmentation does not use, are left out)."""
    state = model_state(load_checkpoint_file(path, trust), path)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}
    load_weights(model.backbone, state, path)


def main(config: CfgNode, dist_info: DistInfo, aug_test: bool = False) -> dict | None:
    """Build data and model, resume, then evaluate (``--eval``; returns the summary) or train."""
    device = dist_info.device
    logger = create_logger(config.OUTPUT, dist_info.rank)
    if dist_info.is_main:
        with open(os.path.join(config.OUTPUT, "config.yaml"), "w") as f:
            f.write(config.dump())
    logger.info(f"world size {dist_info.world_size}, device {device}, output {config.OUTPUT}")
    if config.COMPILE:
        raise UserError("COMPILE (--compile): torch.compile is used by main.py (classification) only, not by segmentation")
    root = find_dataset_root(config)
    val_loader = build_val_loader(config, root, dist_info.rank, dist_info.world_size)

    model = build_segmentation_model(config)
    logger.info(f"model {config.MODEL.NAME} ({config.SEG.HEAD}): "
                f"{sum(p.numel() for p in model.parameters()):,} parameters")
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        load_backbone_weights(model, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS)
        logger.info(f"loaded backbone weights from {config.MODEL.PRETRAINED}")
    if dist_info.world_size > 1 and device.type == "cuda":  # torch's SyncBatchNorm trains on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    model_without_ddp = model
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")
    optimizer = build_optimizer(config, model_without_ddp)

    resume, found = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME and not config.EVAL_MODE:
        found = newest_loadable_checkpoint(config.OUTPUT, logger, config.TRUST_CHECKPOINTS,
                                           prefix=CHECKPOINT_PREFIX, required=CHECKPOINT_ENTRIES)
        if found:
            resume = found[0]
    start, best_miou = 0, 0.0
    if resume:
        checkpoint = found[1] if found else load_checkpoint_file(resume, config.TRUST_CHECKPOINTS)
        load_weights(model_without_ddp, model_state(checkpoint, resume), resume)
        logger.info(f"loaded weights from {resume}")
        if not config.EVAL_MODE and "optimizer" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer"])
            if "scaler" in checkpoint:
                precision.scaler.load_state_dict(checkpoint["scaler"])
            start, best_miou = checkpoint["iteration"], checkpoint.get("best_miou", 0.0)
            logger.info(f"resuming training at iteration {start}")

    if config.EVAL_MODE:
        return evaluate(model_without_ddp, val_loader, config, precision, device, logger, aug_test)
    if dist_info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader = build_train_loader(config, root, dist_info.rank, dist_info.world_size, start)
    train(config, dist_info, model, model_without_ddp, train_loader, val_loader, optimizer, precision,
          start, best_miou, logger)
    return None


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)

    def job() -> None:
        if args.aug_test and not args.eval:
            raise UserError("--aug-test applies to evaluation: add --eval --resume CKPT, or use segmentation/test.py")
        config = get_config(args)
        main(config, setup_run(config), args.aug_test)

    return launch(job)


if __name__ == "__main__":
    sys.exit(run())
