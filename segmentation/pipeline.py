"""The ADE20K training augmentation (mmseg's pipeline, in our own numpy/torch code) and the test
normalisation. Every random choice comes from the ``numpy.random.Generator`` passed in, so one
seed per sample replays a sample exactly (exact resume)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from segmentation.align_resize import rescale_size

CROP_TRIES = 10  # crops drawn before the category-ratio limit gives up
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 / 180  # mmseg's 18 on OpenCV's 0-180 hue scale, as a fraction of a turn


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """ADE20K: 0 ("other") becomes ``ignore_index``, 1..N become 0..N-1."""
    label = label.astype(np.int64) - 1
    label[label < 0] = ignore_index
    label[label == ignore_index - 1] = ignore_index
    return label.astype(np.uint8)


def resize_pair(image: Image.Image, label: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    """Image bilinear, label nearest, to ``size`` = (h, w)."""
    h, w = size
    return image.resize((w, h), Image.Resampling.BILINEAR), label.resize((w, h), Image.Resampling.NEAREST)


def random_crop_box(label: np.ndarray, crop: Sequence[int], cat_max_ratio: float, ignore_index: int,
                    rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``crop`` (h, w) window; with ``cat_max_ratio`` < 1, up to
    CROP_TRIES windows are drawn until no class covers more than that share of the labelled
    pixels (a window with a single class always fails the test; the last draw is kept)."""
    margin_h, margin_w = max(label.shape[0] - crop[0], 0), max(label.shape[1] - crop[1], 0)
    for _ in range(CROP_TRIES):
        top, left = int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))
        if cat_max_ratio >= 1:
            break
        window = label[top:top + crop[0], left:left + crop[1]]
        counts = np.bincount(window[window != ignore_index].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


def photometric_distortion(image: Tensor, rng: np.random.Generator) -> Tensor:
    """mmseg's PhotoMetricDistortion on a (3, H, W) uint8 tensor: each step with probability 1/2,
    brightness (added delta), contrast (factor), then saturation and hue (before or after the
    contrast step, by a coin). Saturation and hue use torchvision's functions."""
    x = image.float()
    if rng.random() < 0.5:
        x = x + float(rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = rng.random() < 0.5
    contrast = float(rng.uniform(*CONTRAST_RANGE)) if rng.random() < 0.5 else None
    saturation = float(rng.uniform(*SATURATION_RANGE)) if rng.random() < 0.5 else None
    hue = float(rng.uniform(-HUE_DELTA, HUE_DELTA)) if rng.random() < 0.5 else None
    if contrast_first and contrast is not None:
        x = x * contrast
    x = x.clamp(0, 255).round().to(torch.uint8)
    if saturation is not None:
        x = TF.adjust_saturation(x, saturation)
    if hue is not None:
        x = TF.adjust_hue(x, hue)
    if not contrast_first and contrast is not None:
        x = (x.float() * contrast).clamp(0, 255).round().to(torch.uint8)
    return x


def normalize(image: Tensor) -> Tensor:
    """(3, H, W) uint8 or 0-255 float -> float normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1) * 255
    return (image.float() - mean) / std


def train_transform(image: Image.Image, label: Image.Image, seg, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Random resize (SEG.RATIO_RANGE of SEG.IMG_SCALE, keep ratio), random crop SEG.CROP_SIZE
    under SEG.CAT_MAX_RATIO, flip, photometric distortion, normalise, pad to the crop size
    (image 0, label SEG.IGNORE_INDEX). ``label`` holds the reduced labels already."""
    ratio = float(rng.uniform(*seg.RATIO_RANGE))
    size = rescale_size(image.height, image.width, [s * ratio for s in seg.IMG_SCALE])
    image, label = resize_pair(image, label, size)
    labels = np.asarray(label)
    top, left = random_crop_box(labels, seg.CROP_SIZE, seg.CAT_MAX_RATIO, seg.IGNORE_INDEX, rng)
    crop_h, crop_w = seg.CROP_SIZE
    labels = torch.from_numpy(labels[top:top + crop_h, left:left + crop_w].astype(np.int64))
    pixels = torch.from_numpy(np.asarray(image)[top:top + crop_h, left:left + crop_w].copy()).permute(2, 0, 1)
    if rng.random() < seg.FLIP_PROB:
        pixels, labels = pixels.flip(-1), labels.flip(-1)
    if seg.PHOTOMETRIC:
        pixels = photometric_distortion(pixels, rng)
    pad_h, pad_w = crop_h - labels.shape[0], crop_w - labels.shape[1]
    image_tensor = torch.nn.functional.pad(normalize(pixels), (0, pad_w, 0, pad_h), value=0.0)
    label_tensor = torch.nn.functional.pad(labels, (0, pad_w, 0, pad_h), value=seg.IGNORE_INDEX)
    return image_tensor, label_tensor
