"""Train or evaluate a CrossFormer segmentation model (Semantic FPN, UPerNet) on ADE20K-layout data,
iteration by iteration, on one CPU/GPU or many (torchrun).

    python segmentation/train.py --cfg configs/segmentation/demo_digits.yaml
    torchrun --nproc_per_node 8 segmentation/train.py --cfg configs/segmentation/fpn_crossformer_s_ade20k_80k.yaml \
        --data-path ADE_ROOT --pretrained crossformer-s.pth --output output
    python segmentation/train.py --cfg ... --data-path ADE_ROOT --eval --resume CKPT [--aug-test]

Segmentation's own parts (data, model, loss, poly schedule, mIoU evaluation) are in
segmentation/; the training loop, checkpoints, resume and stop signals are the run core's
(training.py), counted in iterations.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402

from torch import nn  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import UserError  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from runtime import Precision, add_common_arguments, run_configured, setup_run  # noqa: E402
from segmentation.dataset import build_train_loader, build_val_loader, find_dataset_root  # noqa: E402
from segmentation.engine import evaluate, set_poly_learning_rate  # noqa: E402
from segmentation.heads import build_segmentation_model  # noqa: E402
from segmentation.losses import SegmentationLoss  # noqa: E402
from training import (BestModel, IterationSchedule, TrainingRun, distributed, load_backbone_weights,  # noqa: E402
                      load_run_weights, supervised_losses)
from utils import ITERATION_CHECKPOINTS  # noqa: E402

SCORES = ("mIoU", "mAcc", "aAcc")  # what an evaluation during training records


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer semantic segmentation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--aug-test", action="store_true",
                        help="with --eval: multi-scale (SEG.TEST_RATIOS) and flip testing")
    return parser.parse_args(argv)


def main(config: CfgNode, aug_test: bool = False) -> dict | None:
    """Set the run up, build data and model, then evaluate (``--eval``; returns the summary) or
    train from where the run stopped."""
    if aug_test and not config.EVAL_MODE:
        raise UserError("--aug-test applies to evaluation: add --eval --resume CKPT, or use segmentation/test.py")
    if config.COMPILE:
        raise UserError("COMPILE (--compile): torch.compile is used by main.py (classification) only, not by segmentation")
    dist_info, logger = setup_run(config)
    device = dist_info.device
    root = find_dataset_root(config)
    val_loader = build_val_loader(config, root, dist_info.rank, dist_info.world_size)
    model = build_segmentation_model(config)
    logger.info(f"model {config.MODEL.NAME} ({config.SEG.HEAD}): "
                f"{sum(p.numel() for p in model.parameters()):,} parameters")
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        load_backbone_weights(model.backbone, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS)
        logger.info(f"loaded backbone weights from {config.MODEL.PRETRAINED}")
    if dist_info.world_size > 1 and device.type == "cuda":  # torch's SyncBatchNorm trains on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")
    if config.EVAL_MODE:
        load_run_weights(config, logger, model, ITERATION_CHECKPOINTS)
        return evaluate(model, val_loader, config, precision, device, logger, aug_test)

    trained = distributed(model, device) if dist_info.world_size > 1 else model
    optimizer = build_optimizer(config, model)
    train_loader = build_train_loader(config, root, dist_info.rank, dist_info.world_size)
    best = BestModel("mIoU", "best_miou", "best_mIoU", "Max mIoU: {:.2%}",
                     lambda r: f"mIoU {100 * r['mIoU']:.2f}% (mAcc {100 * r['mAcc']:.2f}%, aAcc {100 * r['aAcc']:.2f}%)")
    run = TrainingRun(config, dist_info, logger, IterationSchedule(config, len(train_loader)), trained, optimizer,
                      precision, lambda updates: set_poly_learning_rate(optimizer, config, updates), best)
    resumed_from = run.restore()
    if run.complete:
        logger.info(run.schedule.complete(resumed_from))
        return None

    def evaluate_scores() -> dict[str, float]:
        summary = evaluate(model, val_loader, config, precision, device, logger)
        return {key: summary[key] for key in SCORES}

    criterion = SegmentationLoss(config.SEG.AUX_WEIGHT, config.SEG.IGNORE_INDEX)
    run.fit(train_loader, supervised_losses(trained, criterion, device), evaluate_scores)
    return None


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)
    return run_configured(args, main, args.aug_test)


if __name__ == "__main__":
    sys.exit(run())
