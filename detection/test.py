"""Evaluate a detector checkpoint on the COCO val split (bbox, and segm for Mask R-CNN):

    python detection/test.py --cfg configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml \
        --data-path COCO_ROOT --checkpoint ckpt_epoch_11.pth
    torchrun --nproc_per_node 8 detection/test.py ...   (each rank detects a share of the images)

The same as ``detection/train.py --eval --resume CKPT``; COCOeval's summary lines go to the log
and the numbers to ``metrics.jsonl`` in the run folder.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

from detection.train import main  # noqa: E402
from runtime import add_common_arguments, run_configured  # noqa: E402


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer detection evaluation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="detector weights (a training checkpoint)")
    parser.add_argument("--num_workers", type=int, help="data-loading workers per process")
    args = parser.parse_args(argv)
    args.eval, args.resume = True, args.checkpoint
    return args


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)
    return run_configured(args, main)


if __name__ == "__main__":
    sys.exit(run())
