"""Parameters and FLOPs of a segmentation config, counted as the authors counted them (default
512x2048, the paper's size):

    python segmentation/get_flops.py --cfg configs/segmentation/fpn_crossformer_s_ade20k_80k.yaml [--shape 512 2048]

The authors' get_flops.py ran mmseg's ``forward_dummy`` (backbone, neck and decode head; no
auxiliary head) under mmcv's module counter and added the backbone's attention matrix products,
which that counter does not see. The same pass runs here in evaluation mode on the meta device (no
memory, no arithmetic) under ``torch.utils.flop_counter.FlopCounterMode``: every convolution and
matrix product, attention included, reported as GFLOPs = multiply-accumulates / 1e9 (the paper's
unit; the counter's FLOPs / 2). Resizing is not counted (nor by mmcv); mmcv also counts norms,
activations, pooling and convolution biases at one per element, which this count leaves out: under
0.1% of these models. Parameters include the auxiliary head, as mmseg counts them.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import load_config  # noqa: E402
from runtime import launch  # noqa: E402
from segmentation.heads import build_segmentation_model  # noqa: E402


def count(config: CfgNode, height: int, width: int) -> tuple[int, int, int]:
    """(parameters incl. the auxiliary head, multiply-accumulates of one image, those of the decode head)."""
    with torch.device("meta"):
        model = build_segmentation_model(config).eval()
    image = torch.empty(1, 3, height, width, device="meta")
    parameters = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    head = sum(counter.get_flop_counts()["SegmentationModel.decode_head"].values()) // 2
    return parameters, counter.get_total_flops() // 2, head


def main(args: argparse.Namespace) -> None:
    config = load_config(args.cfg, args.opts or [])
    parameters, macs, head = count(config, *args.shape)
    print(f"{config.MODEL.NAME}: {parameters / 1e6:.2f}M parameters, {macs / 1e9:.1f} GFLOPs at "
          f"{args.shape[0]}x{args.shape[1]} (backbone {(macs - head) / 1e9:.1f}G, decode head {head / 1e9:.1f}G)")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("CrossFormer segmentation: parameters and FLOPs")
    parser.add_argument("--cfg", required=True, metavar="FILE")
    parser.add_argument("--shape", type=int, nargs=2, default=[512, 2048], metavar=("H", "W"))
    parser.add_argument("--opts", nargs="+")
    args = parser.parse_args(argv)
    return launch(lambda: main(args))


if __name__ == "__main__":
    sys.exit(run())
