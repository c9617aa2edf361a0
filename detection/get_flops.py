"""Parameters and multiply-accumulates of a detector on one image (default 1280x800, as the paper):

    python detection/get_flops.py --cfg configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml [--shape 800 1280]

Counted by ``torch.utils.flop_counter.FlopCounterMode`` over one inference pass (CPU, float32):
every matrix product and convolution (attention, MLPs, patch embeddings, FPN, RPN, heads; the R-CNN
heads at full test load: DET.RPN_POST_NMS_TOP_N_TEST proposals and DET.DETECTIONS_PER_IMG masks,
whatever the scores of the random image), reported as GMACs = counted FLOPs / 2, which is what
mmcv's get_flops and the paper call "GFLOPs". Not counted: normalisation, activations, softmax,
element-wise additions, RoIAlign, NMS, resizing. The image is sized so that the detector's own
resize (DET.MIN_SIZE / DET.MAX_SIZE) keeps it as it is.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from config import load_config  # noqa: E402
from detection.model import build_detector  # noqa: E402
from runtime import launch  # noqa: E402


def count_macs(model: torch.nn.Module, height: int, width: int) -> tuple[int, int]:
    """``(whole detector, backbone body)`` multiply-accumulates of one ``height x width`` image."""
    model.eval()
    model.transform.min_size, model.transform.max_size = (min(height, width),), max(height, width)
    if hasattr(model, "roi_heads"):  # R-CNN heads at full load: every detection slot filled
        model.roi_heads.score_thresh = 0.0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model([torch.rand(3, height, width)])
    per_module = {name.split(".", 1)[-1]: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    body = per_module.get("backbone", 0) - per_module.get("backbone.fpn", 0)  # the body runs outside its forward
    return counter.get_total_flops() // 2, body // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="parameters and GMACs of a detector")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="detection config")
    parser.add_argument("--shape", type=int, nargs=2, default=(800, 1280), metavar=("H", "W"), help="image size")
    parser.add_argument("--opts", default=[], nargs="+", help="override config options: KEY VALUE pairs")
    args = parser.parse_args(argv)

    def job() -> None:
        config = load_config(args.cfg, args.opts)
        model = build_detector(config)
        params = sum(p.numel() for p in model.parameters())
        total, body = count_macs(model, *args.shape)
        print(f"{config.MODEL.NAME}: {params / 1e6:.2f}M parameters; at {args.shape[1]}x{args.shape[0]}: "
              f"{total / 1e9:.1f} GMACs ({body / 1e9:.1f} in the CrossFormer body)")

    return launch(job)


if __name__ == "__main__":
    sys.exit(main())
