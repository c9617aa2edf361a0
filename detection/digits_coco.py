"""The detection demo set: scikit-learn's handwritten digits pasted onto larger images, written once
in the COCO layout (boxes and RLE masks), so the demo reads it like COCO.

Each 96x96 image holds 2-4 digits, each scaled to a side of 20-44 pixels (bilinear) at a place where
its box overlaps no other; the mask is the digit's ink (upscaled value above 40% of full ink), the box
its tight bounds. Train images use the 80% split of data/digits.py, val images the other 20%, so no
handwritten digit appears in both. Categories are the digits 0-9 (ids 1-10). Fixed seeds: the set
never depends on the run.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data.digits import write_once_from_digits

DEFAULT_ROOT = os.path.join("~", ".cache", "crossformer", "digits_coco")
IMAGE_SIZE = 96
DIGITS_PER_IMAGE = (2, 4)
DIGIT_SIDE = (20, 44)
INK_THRESHOLD = 0.4
SPLIT_IMAGES = {"train": 600, "val": 100}


def _place(rng: np.random.Generator, side: int, boxes: list) -> tuple[int, int] | None:
    """A top-left corner where a ``side`` square overlaps none of ``boxes`` (x1, y1, x2, y2)."""
    for _ in range(50):
        x, y = rng.integers(0, IMAGE_SIZE - side + 1, size=2)
        if all(x + side <= bx1 or bx2 <= x or y + side <= by1 or by2 <= y for bx1, by1, bx2, by2 in boxes):
            return int(x), int(y)
    return None


def _compose(rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray,
             image_id: int, first_ann_id: int) -> tuple[np.ndarray, list[dict]]:
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    placed, annotations = [], []
    for index in rng.choice(pool, size=rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1), replace=False):
        side = int(rng.integers(DIGIT_SIDE[0], DIGIT_SIDE[1] + 1))
        corner = _place(rng, side, placed)
        if corner is None:
            continue
        x, y = corner
        placed.append((x, y, x + side, y + side))
        ink = np.asarray(Image.fromarray(digits[index].astype(np.float32) / 16).resize((side, side), Image.Resampling.BILINEAR))
        canvas[y:y + side, x:x + side] = np.maximum(canvas[y:y + side, x:x + side], ink)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        mask[y:y + side, x:x + side] = ink > INK_THRESHOLD
        rows, cols = np.nonzero(mask)
        x1, y1, x2, y2 = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        annotations.append({"id": first_ann_id + len(annotations), "image_id": image_id,
                            "category_id": int(labels[index]) + 1, "iscrowd": 0, "area": int(mask.sum()),
                            "bbox": [int(x1), int(y1), int(x2 - x1), int(y2 - y1)],
                            "segmentation": {"size": [IMAGE_SIZE, IMAGE_SIZE], "counts": rle["counts"].decode("ascii")}})
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8), annotations


def _write_split(root: str, split: str, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, f"{split}2017")
    os.makedirs(folder)
    images, annotations = [], []
    for image_id in range(1, SPLIT_IMAGES[split] + 1):
        pixels, anns = _compose(rng, digits, labels, pool, image_id, len(annotations) + 1)
        name = f"{image_id:06d}.png"
        Image.fromarray(pixels).convert("RGB").save(os.path.join(folder, name))
        images.append({"id": image_id, "file_name": name, "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        annotations += anns
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def ensure_digits_coco(root: str = "") -> str:
    """The demo set under ``root`` (default ``~/.cache/crossformer/digits_coco``), written only when
    its val annotations are missing (:func:`data.digits.write_once_from_digits`)."""
    def fill(staging: str, images: np.ndarray, targets: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
        os.makedirs(os.path.join(staging, "annotations"))
        _write_split(staging, "train", images, targets, train, seed=1)
        _write_split(staging, "val", images, targets, val, seed=2)

    return write_once_from_digits(root, DEFAULT_ROOT, os.path.join("annotations", "instances_val2017.json"), fill,
                                  "the digits detection set")
