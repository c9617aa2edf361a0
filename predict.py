"""Classify images with a trained model: the top-5 classes and their probabilities.

    python predict.py --cfg configs/demo/digits.yaml --checkpoint output/cros_demo_digits/default/best.pth a.png b.jpg

Images go through exactly the evaluation transform of the config (any mode: grayscale, palette,
RGBA, 16-bit are converted to RGB as in training). Class names come from the checkpoint (an
image folder's class names are stored in checkpoints written by main.py), else from timm's
ImageNet-1k names for a 1000-class model, else they are the class indices.
"""
from __future__ import annotations

import argparse
import sys

import torch
from timm.data import ImageNetInfo
from torch import nn

from config import UserError, load_config
from data.build import build_transform
from data.images import load_image_file
from models import build_model
from runtime import launch
from utils import init_distributed, load_checkpoint_file, load_weights, model_state

IMAGENET_CLASSES = 1000


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser("Classify images with a CrossFormer checkpoint")
    parser.add_argument("--cfg", required=True, metavar="FILE", help="the model's config file")
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="weights (a checkpoint or released model)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--opts", default=None, nargs="+", help="override config options: KEY VALUE pairs")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow a checkpoint that needs full unpickling (can run code): only for files you trust")
    return parser.parse_args(argv)


def class_names(checkpoint: dict, num_classes: int) -> list[str]:
    """The checkpoint's ``classes`` when it has one per output; ImageNet-1k's names (timm's
    dataset info) for 1000 outputs; else the indices as text."""
    stored = checkpoint.get("classes")
    if isinstance(stored, (list, tuple)) and len(stored) == num_classes:
        return [str(name) for name in stored]
    if num_classes == IMAGENET_CLASSES:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, class indices)`` of the ``top`` most likely classes per image, best first."""
    probabilities = model(images).float().softmax(dim=1)
    return probabilities.topk(min(top, probabilities.shape[1]), dim=1)


def main(args: argparse.Namespace) -> None:
    if args.top < 1 or args.batch_size < 1:
        raise UserError(f"--top and --batch-size must be at least 1, got {args.top} and {args.batch_size}")
    config = load_config(args.cfg, args.opts or [])
    device = init_distributed(args.device).device
    checkpoint = load_checkpoint_file(args.checkpoint, args.trust_checkpoints)
    model = build_model(config)
    load_weights(model, model_state(checkpoint, args.checkpoint), args.checkpoint)
    model.to(device).eval()
    names = class_names(checkpoint, config.MODEL.NUM_CLASSES)
    transform = build_transform(False, config)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        batch = torch.stack([transform(load_image_file(path)) for path in paths]).to(device)
        probabilities, indices = predict(model, batch, args.top)
        for path, row_p, row_i in zip(paths, probabilities.tolist(), indices.tolist()):
            print(path)
            for rank, (p, i) in enumerate(zip(row_p, row_i), 1):
                index = "" if names[i] == str(i) else f"  (class {i})"
                print(f"  {rank}. {100 * p:6.2f}%  {names[i]}{index}")


if __name__ == "__main__":
    options = parse_option()
    sys.exit(launch(lambda: main(options)))
