"""A COCO-layout detection dataset: annotation checks, category ids <-> labels, targets and masks.

Layout: ``ROOT/annotations/instances_{split}2017.json`` and ``ROOT/{split}2017/<file_name>``.
Training targets follow torchvision: ``boxes`` (N, 4) x1y1x2y2 in pixels, ``labels`` 1..C (0 is
background), ``masks`` (N, H, W) uint8 from polygons or RLE, ``image_id``. Crowd regions are left
out of the targets (COCOeval ignores detections on them); images without objects are kept as
negatives. Category ids are mapped to labels in ascending id order.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Callable

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from config import UserError
from data.images import UnreadableImageError, load_image_file

MIN_BOX_SIDE = 1.0  # pixels: thinner boxes are dropped from training targets


class CategoryMap:
    """Contiguous labels 1..C for COCO category ids (ascending) and back."""

    def __init__(self, category_ids: list[int]):
        self.category_ids = sorted(category_ids)
        self._labels = {cat: label for label, cat in enumerate(self.category_ids, start=1)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        return self._labels[category_id]

    def category_id(self, label: int) -> int:
        return self.category_ids[label - 1]


def _check_annotation(ann: dict, image_ids: set, category_ids: set, path: str) -> None:
    """A UserError naming the file and the annotation if ``ann`` is not a valid instance."""
    where = f"annotation file {path}: annotation {ann.get('id', '?')}"
    if ann.get("image_id") not in image_ids:
        raise UserError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
    if ann.get("category_id") not in category_ids:
        raise UserError(f"{where} has category_id {ann.get('category_id')!r}, which is not in 'categories'")
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
            or not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0):
        raise UserError(f"{where} has bbox {bbox!r}; expected [x, y, width, height] with width, height >= 0")
    segmentation = ann.get("segmentation")
    if segmentation is None:
        return
    if isinstance(segmentation, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            raise UserError(f"{where} has a polygon that is not a flat list of at least 3 x, y pairs")
    elif not (isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation)):
        raise UserError(f"{where} has a segmentation that is neither polygons nor RLE with 'size' and 'counts'")


def load_coco(path: str) -> COCO:
    """The annotations of ``path`` as a pycocotools COCO index, checked first (UserError if bad)."""
    if not os.path.isfile(path):
        raise UserError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"annotation file {path} is not readable JSON: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise UserError(f"annotation file {path} needs the lists 'images', 'annotations' and 'categories'")
    try:
        image_ids = {image["id"] for image in data["images"] if image["file_name"] and image["height"] and image["width"]}
        category_ids = {category["id"] for category in data["categories"]}
    except (KeyError, TypeError) as err:
        raise UserError(f"annotation file {path}: every image needs id, file_name, height and width, "
                        f"every category an id (missing {err})") from err
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise UserError(f"annotation file {path}: an annotation is not a JSON object: {str(ann)[:80]}")
        _check_annotation(ann, image_ids, category_ids, path)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """``(image, target)`` pairs of one split; ``image`` is a (3, H, W) float tensor in 0-1.

    ``transform(image, target)`` runs last (e.g. a random flip); ``with_masks`` adds ``masks``.
    """

    def __init__(self, root: str, split: str, num_classes: int, with_masks: bool,
                 transform: Callable[[Tensor, dict], tuple[Tensor, dict]] | None = None):
        self.annotation_file = os.path.join(root, "annotations", f"instances_{split}2017.json")
        self.image_folder = os.path.join(root, f"{split}2017")
        self.coco = load_coco(self.annotation_file)
        self.categories = CategoryMap(list(self.coco.cats))
        if len(self.categories) != num_classes:
            raise UserError(f"{self.annotation_file} has {len(self.categories)} categories, but MODEL.NUM_CLASSES "
                            f"is {num_classes}")
        self.image_ids = sorted(self.coco.imgs)
        missing = [self.coco.imgs[i]["file_name"] for i in self.image_ids
                   if not os.path.isfile(os.path.join(self.image_folder, self.coco.imgs[i]["file_name"]))]
        if missing:
            raise UserError(f"{len(missing)} images of {self.annotation_file} are missing from {self.image_folder}, "
                            f"e.g. {missing[0]}")
        self.with_masks = with_masks
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def target(self, image_id: int) -> dict[str, Tensor]:
        """The training target of one image (crowd regions and degenerate boxes left out)."""
        info = self.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
            if x2 - x1 < MIN_BOX_SIDE or y2 - y1 < MIN_BOX_SIDE:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.categories.label(ann["category_id"]))
            if self.with_masks:
                masks.append(torch.from_numpy(self.coco.annToMask(ann)) if ann.get("segmentation")
                             else _box_mask(height, width, x1, y1, x2, y2))
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id}
        if self.with_masks:
            target["masks"] = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.image_ids[index]
        path = os.path.join(self.image_folder, self.coco.imgs[image_id]["file_name"])
        image = pil_to_tensor(load_image_file(path)).float().div_(255)
        info = self.coco.imgs[image_id]
        if image.shape[1:] != (info["height"], info["width"]):
            raise UnreadableImageError(f"cannot read image {path}: it is {image.shape[2]}x{image.shape[1]}, "
                                       f"the annotations say {info['width']}x{info['height']}")
        target = self.target(image_id)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def _box_mask(height: int, width: int, x1: float, y1: float, x2: float, y2: float) -> Tensor:
    """The box as a mask, for an instance without a segmentation."""
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[int(y1):math.ceil(y2), int(x1):math.ceil(x2)] = 1
    return mask


def collate(batch: list) -> tuple[tuple, tuple]:
    """Images and targets as tuples (torchvision's detectors take lists of different sizes)."""
    return tuple(zip(*batch))
