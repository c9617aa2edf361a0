"""Train (or evaluate) a CrossFormer detector on COCO: one process or many (torchrun / launch).

    python detection/train.py --cfg configs/detection/demo_digits.yaml
    torchrun --nproc_per_node 8 detection/train.py --cfg configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml \
        --data-path COCO_ROOT --pretrained crossformer-s.pth --output output
    python detection/train.py --cfg ... --data-path COCO_ROOT --eval --resume ckpt_epoch_11.pth

Detection's own parts (data, detector, loss terms, COCO evaluation) are in detection/; the
training loop, checkpoints, resume and stop signals are the run core's (training.py).
Run from anywhere: the repository root is put on ``sys.path`` (the first lines below).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

from yacs.config import CfgNode  # noqa: E402

from config import UserError  # noqa: E402
from detection import engine  # noqa: E402
from detection.model import build_detector  # noqa: E402
from logger import JsonLinesWriter  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from runtime import Precision, add_common_arguments, run_configured, setup_run  # noqa: E402
from training import (BestModel, EpochSchedule, TrainingRun, distributed, load_backbone_weights,  # noqa: E402
                      load_run_weights)
from utils import EPOCH_CHECKPOINTS  # noqa: E402


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer detection training and evaluation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--num_workers", type=int, help="data-loading workers per process")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--lr", type=float, help="learning rate (for the configured global batch; not rescaled)")
    return parser.parse_args(argv)


def main(config: CfgNode) -> None:
    """Set the run up, build loaders and detector, then evaluate or train from where the run stopped."""
    if config.COMPILE:
        raise UserError("COMPILE (--compile): torch.compile is used by main.py (classification) only, not by detection")
    if config.TRAIN.ACCUMULATION_STEPS > 1:
        raise UserError("TRAIN.ACCUMULATION_STEPS: gradient accumulation is not supported by detection/train.py")
    dist_info, logger = setup_run(config)
    device = dist_info.device
    loader_train, loader_val = engine.build_loaders(config, dist_info, train=not config.EVAL_MODE)
    model = build_detector(config).to(device)
    logger.info(f"{config.DET.TYPE} {config.MODEL.NAME}: {sum(p.numel() for p in model.parameters()):,} parameters")
    if config.MODEL.PRETRAINED and not config.MODEL.RESUME:
        load_backbone_weights(model.backbone.body, config.MODEL.PRETRAINED, config.TRUST_CHECKPOINTS)
        logger.info(f"loaded backbone weights from {config.MODEL.PRETRAINED}")
    precision = Precision(config, device)
    logger.info(f"precision: {precision}")

    def evaluate() -> dict[str, float]:
        return engine.evaluate(model, loader_val, precision, dist_info, logger)

    if config.EVAL_MODE:
        load_run_weights(config, logger, model, EPOCH_CHECKPOINTS)
        JsonLinesWriter(config.OUTPUT, dist_info.rank).write({"eval": True, **evaluate()})
        return

    trained = distributed(model, device) if dist_info.world_size > 1 else model
    optimizer = build_optimizer(config, model)
    lr_scheduler = engine.build_step_scheduler(config, optimizer, len(loader_train))
    best = BestModel("bbox_AP", "best_ap", "best_bbox_AP", "Max bbox AP: {:.4f}",
                     lambda r: f"bbox AP {r['bbox_AP']:.4f} (AP50 {r['bbox_AP50']:.4f})")
    run = TrainingRun(config, dist_info, logger, EpochSchedule(config, len(loader_train), dist_info.world_size),
                      trained, optimizer, precision, lr_scheduler.step_update, best, lr_scheduler)
    resumed_from = run.restore()
    if run.complete:
        logger.info(run.schedule.complete(resumed_from))
        return
    run.fit(loader_train, engine.detection_losses(trained, device), evaluate)


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    return run_configured(parse_option(argv), main)


if __name__ == "__main__":
    sys.exit(run())
