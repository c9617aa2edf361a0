"""Training augmentation that moves boxes and masks with the image. Resizing (to DET.MIN_SIZE /
DET.MAX_SIZE, one short side drawn per image for multi-scale training) and normalisation happen
inside torchvision's detectors (GeneralizedRCNNTransform), so they are not repeated here."""
from __future__ import annotations

import torch
from torch import Tensor


class RandomHorizontalFlip:
    """Mirror the image, its boxes and masks with probability ``p`` (torch's RNG: seeded runs replay)."""

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
