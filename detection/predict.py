"""Detect objects in one image and save it with boxes, masks and "name score" labels drawn, a
colour per detection, and a legend of them (PNG; small images are scaled up first):

    python detection/predict.py --cfg configs/detection/demo_digits.yaml --checkpoint CKPT \
        --image IMAGE --out detections.png [--score 0.5] [--data-path ROOT]

Category names come from the val annotations of the configured dataset (--data-path as for
training); without a dataset, an 80-class model gets COCO's names and others "class N".
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, not detection/

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn.functional import interpolate  # noqa: E402
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights  # noqa: E402
from torchvision.transforms.functional import pil_to_tensor, resize, to_pil_image  # noqa: E402
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks  # noqa: E402
from yacs.config import CfgNode  # noqa: E402

from config import UserError, load_config  # noqa: E402
from data.images import load_image_file  # noqa: E402
from detection.coco import CategoryMap, load_coco  # noqa: E402
from detection.coco_eval import MASK_THRESHOLD  # noqa: E402
from detection.engine import dataset_root  # noqa: E402
from detection.model import build_detector  # noqa: E402
from drawing import (LegendEntry, distinct_colours, font_file, font_size, save_picture, text_colour,  # noqa: E402
                     upscale_factor, with_legend)
from runtime import launch  # noqa: E402
from utils import load_checkpoint_file, load_weights, model_state  # noqa: E402

COCO_CLASSES = 80


def category_names(config: CfgNode) -> list[str]:
    """The name of each label 1..MODEL.NUM_CLASSES: from the val annotation file when the dataset is
    at hand (the digits demo, or COCO with DATA.DATA_PATH), COCO's 80 names for an 80-class model
    (torchvision's list), else "class N"."""
    count = config.MODEL.NUM_CLASSES
    if config.DATA.DATASET == "digits" or config.DATA.DATA_PATH:
        path = os.path.join(dataset_root(config), "annotations", "instances_val2017.json")
        coco = load_coco(path)
        names = [coco.cats[c]["name"] for c in CategoryMap(list(coco.cats)).category_ids]
        if len(names) != count:
            raise UserError(f"{path} has {len(names)} categories, the model {count} (MODEL.NUM_CLASSES)")
        return names
    if count == COCO_CLASSES:  # torchvision's list holds COCO's 91 ids, "N/A" for the unused ones
        return [name for name in FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"][1:] if name != "N/A"]
    return [f"class {label}" for label in range(1, count + 1)]


def draw_detections(image: torch.Tensor, output: dict, names: list[str],
                    score: float) -> tuple[Image.Image, list[LegendEntry]]:
    """``image`` (3, H, W) uint8, scaled up by ``drawing.upscale_factor``, with the detections
    scoring at least ``score`` drawn in a colour each (mask, box, "name score" label) and a legend
    of them beside it, best first; and the legend's entries."""
    keep = (output["scores"] >= score).nonzero().flatten()
    keep = keep[output["scores"][keep].argsort(descending=True)]
    factor = upscale_factor(image.shape[2], image.shape[1])
    height, width = image.shape[1] * factor, image.shape[2] * factor
    image = resize(image, [height, width], antialias=True)
    colours = distinct_colours(len(keep))
    labels = [f"{names[int(output['labels'][i]) - 1]} {float(output['scores'][i]):.2f}" for i in keep]
    if len(keep):
        last_first = keep.flip(0)  # drawn from the lowest score up: the best detection ends on top
        if "masks" in output:  # soft masks scaled up before the threshold: smooth outlines
            masks = interpolate(output["masks"][last_first], size=(height, width), mode="bilinear", align_corners=False)
            image = draw_segmentation_masks(image, masks[:, 0] > MASK_THRESHOLD, alpha=0.45, colors=colours[::-1])
        image = draw_bounding_boxes(image, output["boxes"][last_first] * factor, labels[::-1], colors=colours[::-1],
                                    width=2, font=font_file(), font_size=font_size(width, height), fill_labels=True,
                                    label_colors=[text_colour(c) for c in colours[::-1]])
    entries = list(zip(labels, colours))
    return with_legend(to_pil_image(image), f"score >= {score:.2f}", entries), entries


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
        names = category_names(config)
        model = build_detector(config).eval()
        load_weights(model, model_state(load_checkpoint_file(args.checkpoint, args.trust_checkpoints), args.checkpoint),
                     args.checkpoint)
        image = pil_to_tensor(load_image_file(args.image))
        with torch.no_grad():
            output = model([image.float() / 255])[0]
        picture, legend = draw_detections(image, output, names, args.score)
        save_picture(picture, args.out)
        print(f"{len(legend)} detections drawn to {args.out} ({image.shape[2]}x{image.shape[1]} image drawn at "
              f"{picture.width}x{picture.height} with its legend): {', '.join(text for text, _ in legend)}")

    return launch(job)


if __name__ == "__main__":
    sys.exit(main())
