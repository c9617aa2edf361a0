"""Evaluate a segmentation checkpoint: mIoU, mAcc, aAcc and the per-class table, single-scale or
with --aug-test (SEG.TEST_RATIOS and flip, the paper's "MS mIoU"); torchrun for many processes.

    python segmentation/test.py --cfg configs/segmentation/upernet_crossformer_s_ade20k_160k.yaml \
        --data-path ADE_ROOT --checkpoint CKPT [--aug-test]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402

from runtime import add_common_arguments, run_configured  # noqa: E402
from segmentation.train import main  # noqa: E402


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("CrossFormer semantic segmentation: evaluation", add_help=True)
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="weights to evaluate (a training checkpoint or model file)")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale (SEG.TEST_RATIOS) and flip testing")
    args = parser.parse_args(argv)
    args.resume, args.eval = args.checkpoint, True
    return args


def run(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit code; bad input is one line on stderr and exit code 2."""
    args = parse_option(argv)
    return run_configured(args, main, args.aug_test)


if __name__ == "__main__":
    sys.exit(run())
