"""Segment one image and save the class map as colours blended over it (PNG).

    python segmentation/predict.py --cfg configs/segmentation/demo_digits.yaml --checkpoint CKPT \
        --image IMAGE --out overlay.png [--aug-test] [--alpha 0.5]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config import UserError, load_config  # noqa: E402
from data.images import load_image_file  # noqa: E402
from runtime import Precision, launch  # noqa: E402
from segmentation.engine import predict_probabilities  # noqa: E402
from segmentation.heads import build_segmentation_model  # noqa: E402
from utils import load_checkpoint_file, load_weights, model_state  # noqa: E402


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours, well apart in hue (fixed: the same class, the same colour)."""
    hues = (np.arange(num_classes) * 0.618034) % 1.0
    hsv = np.stack([hues * 255, np.full(num_classes, 200), np.full(num_classes, 255)], 1).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv[None], mode="HSV").convert("RGB"))[0]


def overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8 image with the colour of each pixel's class blended in at ``alpha``."""
    colours = palette(int(classes.max()) + 1)[classes]
    return np.round(image * (1 - alpha) + colours * alpha).astype(np.uint8)


def main(args: argparse.Namespace) -> None:
    config = load_config(args.cfg, args.opts or [])
    model = build_segmentation_model(config)
    load_weights(model, model_state(load_checkpoint_file(args.checkpoint, args.trust_checkpoints), args.checkpoint),
                 args.checkpoint)
    model.eval()
    image = load_image_file(args.image)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    seg = config.SEG
    ratios, flip = (seg.TEST_RATIOS, seg.TEST_FLIP) if args.aug_test else ((1.0,), False)
    classes = predict_probabilities(model, pixels, config, Precision(config, torch.device("cpu")), ratios, flip).argmax(0)
    try:
        Image.fromarray(overlay(np.asarray(image), classes.numpy(), args.alpha)).save(args.out)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {args.out}: {err}") from err
    print(f"{args.out}: {image.width}x{image.height}, classes present: {sorted(set(classes.flatten().tolist()))}")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("CrossFormer segmentation of one image")
    parser.add_argument("--cfg", required=True, metavar="FILE")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours")
    parser.add_argument("--aug-test", action="store_true")
    parser.add_argument("--trust-checkpoints", action="store_true")
    parser.add_argument("--opts", nargs="+")
    args = parser.parse_args(argv)
    return launch(lambda: main(args))


if __name__ == "__main__":
    sys.exit(run())
