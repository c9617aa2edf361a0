"""Training augmentation that moves boxes and masks with the image: a random horizontal flip and
Swin Transformer's crop policy. The multi-scale resize (to DET.MIN_SIZE / DET.MAX_SIZE, one short
side drawn per image) and normalisation happen inside torchvision's detectors
(GeneralizedRCNNTransform), so they are not repeated here. Random draws use torch's RNG, so a
seeded run replays."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose
from torchvision.transforms.v2 import functional as TF
from yacs.config import CfgNode

Transform = Callable[[Tensor, dict], tuple[Tensor, dict]]


class RandomHorizontalFlip:
    """Mirror the image, its boxes and masks with probability ``p``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target


def _draw(low: int, high: int) -> int:
    """An integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, ()))


class RandomResizeCrop:
    """Swin Transformer's crop policy (its 3x COCO recipe): with probability ``p`` the image is
    resized, keeping its ratio, to a short side drawn from ``short_sides`` (long side at most
    ``max_size``; mmcv's rounding), then cut to a random window whose height and width are drawn
    from ``crop_size`` = (low, high), at most the image's (mmdet's ``RandomCrop`` with
    ``crop_type='absolute_range'``). Boxes are clipped to the window; those left without area go,
    with their labels and masks (a crop without objects is kept)."""

    def __init__(self, p: float, short_sides: Sequence[int], crop_size: Sequence[int], max_size: int):
        self.p, self.short_sides, self.max_size = p, list(short_sides), max_size
        self.low, self.high = crop_size

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if self.p <= 0 or torch.rand(()) >= self.p:
            return image, target
        height, width = image.shape[-2:]
        short = self.short_sides[_draw(0, len(self.short_sides) - 1)]
        scale = min(short / min(height, width), self.max_size / max(height, width))
        size = [int(height * scale + 0.5), int(width * scale + 0.5)]
        crop_h, crop_w = _draw(min(size[0], self.low), min(size[0], self.high)), _draw(min(size[1], self.low),
                                                                                     min(size[1], self.high))
        top, left = _draw(0, size[0] - crop_h), _draw(0, size[1] - crop_w)

        def resize_crop(item):
            return TF.crop(TF.resize(item, size, antialias=False), top, left, crop_h, crop_w)

        target = dict(target)
        boxes = resize_crop(tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width)))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target["boxes"], target["labels"] = boxes.as_subclass(Tensor)[keep], target["labels"][keep]
        if "masks" in target:
            target["masks"] = resize_crop(tv_tensors.Mask(target["masks"])).as_subclass(Tensor)[keep]
        return resize_crop(image), target


def build_train_transform(config: CfgNode) -> Transform:
    """Flip (DET.HFLIP), then the crop policy (DET.CROP_PROB, CROP_SHORT_SIDES, CROP_SIZE)."""
    det = config.DET
    return Compose([RandomHorizontalFlip(det.HFLIP),
                    RandomResizeCrop(det.CROP_PROB, det.CROP_SHORT_SIDES, det.CROP_SIZE, det.MAX_SIZE)])
