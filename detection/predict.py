"""Detect objects in one image and save it with boxes, labels and masks drawn (PNG):

    python detection/predict.py --cfg configs/detection/demo_digits.yaml --checkpoint CKPT \
        --image IMAGE --out detections.png [--score 0.5] [--data-path ROOT]

Category names come from the val annotations of the configured dataset (--data-path as for
training), so labels read as in the annotations.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

import torch  # noqa: E402
from torchvision.io import write_png  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor  # noqa: E402
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks  # noqa: E402

from config import UserError, load_config  # noqa: E402
from data.images import load_image_file  # noqa: E402
from detection.coco import CategoryMap, load_coco  # noqa: E402
from detection.coco_eval import MASK_THRESHOLD  # noqa: E402
from detection.engine import dataset_root  # noqa: E402
from detection.model import build_detector  # noqa: E402
from runtime import launch  # noqa: E402
from utils import load_checkpoint_file, load_weights, model_state  # noqa: E402


def draw_detections(image: torch.Tensor, output: dict, names: list[str], score: float) -> torch.Tensor:
    """``image`` (3, H, W) uint8 with the detections scoring at least ``score`` drawn on it."""
    keep = output["scores"] >= score
    if "masks" in output and keep.any():
        image = draw_segmentation_masks(image, output["masks"][keep, 0] > MASK_THRESHOLD, alpha=0.45)
    labels = [f"{names[int(label) - 1]} {s:.2f}" for label, s in zip(output["labels"][keep], output["scores"][keep])]
    return draw_bounding_boxes(image, output["boxes"][keep], labels, colors="yellow", width=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="draw a detector's detections on one image")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="detection config")
    parser.add_argument("--checkpoint", required=True, help="detector weights")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--score", type=float, default=0.5, help="smallest score drawn")
    parser.add_argument("--data-path", default="", help="dataset root (for the category names)")
    parser.add_argument("--trust-checkpoints", action="store_true", help="allow checkpoints that need full unpickling")
    args = parser.parse_args(argv)

    def job() -> None:
        config = load_config(args.cfg, ["DATA.DATA_PATH", args.data_path] if args.data_path else [])
        coco = load_coco(os.path.join(dataset_root(config), "annotations", "instances_val2017.json"))
        categories = CategoryMap(list(coco.cats))
        names = [coco.cats[c]["name"] for c in categories.category_ids]
        model = build_detector(config).eval()
        load_weights(model, model_state(load_checkpoint_file(args.checkpoint, args.trust_checkpoints), args.checkpoint),
                     args.checkpoint)
        image = pil_to_tensor(load_image_file(args.image))
        with torch.no_grad():
            output = model([image.float() / 255])[0]
        try:
            write_png(draw_detections(image, output, names, args.score), args.out)
        except RuntimeError as err:
            raise UserError(f"cannot write {args.out}: {err}") from err
        print(f"{int((output['scores'] >= args.score).sum())} detections drawn to {args.out}")

    return launch(job)


if __name__ == "__main__":
    sys.exit(main())
