"""Segment one image and save the class map as colours blended over it, with a legend naming the
classes present (PNG; small images are scaled up first).

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

from config import load_config  # noqa: E402
from data.images import load_image_file  # noqa: E402
from drawing import LegendEntry, distinct_colours, save_picture, upscale_factor, with_legend  # noqa: E402
from runtime import Precision, launch  # noqa: E402
from segmentation.class_names import class_names  # noqa: E402
from segmentation.engine import predict_probabilities  # noqa: E402
from segmentation.heads import build_segmentation_model  # noqa: E402
from utils import load_checkpoint_file, load_weights, model_state  # noqa: E402

BACKGROUND = (255, 255, 255)  # the legend colour of the uncoloured "background" class


def draw_classes(image: np.ndarray, classes: np.ndarray, names: list[str],
                 alpha: float = 0.5) -> tuple[Image.Image, list[LegendEntry]]:
    """``image`` ``(H, W, 3)`` uint8, scaled up by ``drawing.upscale_factor``, with the colour of
    each pixel's class (``classes``, ``(H, W)``) blended in at ``alpha`` (a class named
    "background" is left as it is: white in the legend), and a legend of the classes present,
    largest share first; and the legend's entries."""
    factor = upscale_factor(image.shape[1], image.shape[0])
    upscaled = np.asarray(Image.fromarray(image).resize((image.shape[1] * factor, image.shape[0] * factor),
                                                        Image.Resampling.BILINEAR))
    colours = [BACKGROUND if name == "background" else colour
               for name, colour in zip(names, distinct_colours(len(names)))]
    weights = np.array([0.0 if name == "background" else alpha for name in names])
    # nearest-neighbour: each input pixel's class fills its factor x factor block
    blocks = classes.repeat(factor, axis=0).repeat(factor, axis=1)
    weight = weights[blocks][..., None]
    blended = np.round(upscaled * (1 - weight) + np.asarray(colours, dtype=np.float64)[blocks] * weight)
    present, counts = np.unique(classes, return_counts=True)
    shares = [(100 * n / classes.size, c) for n, c in zip(counts.tolist(), present.tolist())]
    entries = [(f"{names[c]} {f'{share:.0f}%' if share >= 1 else '<1%'}", colours[c])
               for share, c in sorted(shares, reverse=True)]
    return with_legend(Image.fromarray(blended.astype(np.uint8)), "class, share of pixels", entries), entries


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
    precision = Precision(config, torch.device("cpu"))
    classes = predict_probabilities(model, pixels, config, precision, ratios, flip).argmax(0)
    picture, legend = draw_classes(np.asarray(image), classes.numpy(), class_names(config), args.alpha)
    save_picture(picture, args.out)
    print(f"{args.out}: {image.width}x{image.height} image drawn at {picture.width}x{picture.height} with its "
          f"legend; classes: {', '.join(text for text, _ in legend)}")


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
