"""Parameters and FLOPs of a detector on one image, counted as the authors counted them (default
1280x800, as the paper):

    python detection/get_flops.py --cfg configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml [--shape 800 1280]

The authors' get_flops.py ran mmdet's ``forward_dummy`` under mmcv's module counter and added the
backbone's attention matrix products, which that counter does not see: backbone, FPN, the dense
head (RPN or RetinaNet's) at every level, and the R-CNN heads at their test load: the box head(s)
on 1000 RoIs (DET.RPN_POST_NMS_TOP_N_TEST) and the mask head(s) on 100 (DET.DETECTIONS_PER_IMG),
every stage of a cascade. The same passes run here, on the meta device (no memory, no arithmetic),
under ``torch.utils.flop_counter.FlopCounterMode``: every matrix product and convolution, attention
included, reported as GFLOPs = multiply-accumulates / 1e9 (the paper's unit; the counter's FLOPs / 2).
RoIAlign, NMS, resizing and normalising the image are not counted (nor by mmcv). mmcv also counts
norms, activations, pooling and convolution biases at one per element, which this count leaves
out: under 0.2% of these models.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import load_config  # noqa: E402
from detection.model import BOX_POOL_SIZE, MASK_POOL_SIZE, build_detector  # noqa: E402
from runtime import launch  # noqa: E402


def forward_dummy(model: nn.Module, config: CfgNode, height: int, width: int) -> None:
    """mmdet's ``forward_dummy`` on a ``height x width`` image: backbone and FPN, the dense head on
    every level, and each R-CNN stage's box head on DET.RPN_POST_NMS_TOP_N_TEST pooled RoIs and
    mask head on DET.DETECTIONS_PER_IMG (pooling itself is not counted, so pooled features stand in)."""
    device = next(model.parameters()).device
    features = list(model.backbone(torch.empty(1, 3, height, width, device=device)).values())
    if not hasattr(model, "roi_heads"):  # RetinaNet
        model.head(features)
        return
    model.rpn.head(features)
    channels = model.backbone.out_channels
    boxes = torch.empty(config.DET.RPN_POST_NMS_TOP_N_TEST, channels, BOX_POOL_SIZE, BOX_POOL_SIZE, device=device)
    masks = torch.empty(config.DET.DETECTIONS_PER_IMG, channels, MASK_POOL_SIZE, MASK_POOL_SIZE, device=device)
    for stage in model.roi_heads.stages:
        stage.boxes(boxes)
        if stage.mask_head is not None:
            stage.masks(masks)


def count(config: CfgNode, height: int, width: int) -> tuple[int, int, int]:
    """``(parameters, multiply-accumulates of the whole detector, those of the CrossFormer body)``."""
    with torch.device("meta"):
        model = build_detector(config).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward_dummy(model, config, height, width)
    per_module = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    root = type(model.backbone).__name__
    body = per_module[root] - per_module[f"{root}.fpn"]  # the body runs outside its own forward
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2, body // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="parameters and GFLOPs of a detector")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="detection config")
    parser.add_argument("--shape", type=int, nargs=2, default=(800, 1280), metavar=("H", "W"), help="image size")
    parser.add_argument("--opts", default=[], nargs="+", help="override config options: KEY VALUE pairs")
    args = parser.parse_args(argv)

    def job() -> None:
        config = load_config(args.cfg, args.opts)
        params, total, body = count(config, *args.shape)
        print(f"{config.MODEL.NAME}: {params / 1e6:.2f}M parameters; at {args.shape[1]}x{args.shape[0]}: "
              f"{total / 1e9:.1f} GFLOPs ({body / 1e9:.1f} in the CrossFormer body)")

    return launch(job)


if __name__ == "__main__":
    sys.exit(main())
