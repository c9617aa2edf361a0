"""ADE20K-layout datasets and their loaders.

Layout: ``ROOT/images/{training,validation}/NAME.jpg`` and ``ROOT/annotations/{...}/NAME.png``
(any image suffix among .jpg/.jpeg/.png; annotations are 8-bit PNGs of class numbers).
"""
from __future__ import annotations

import os
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from yacs.config import CfgNode

from config import UserError
from data.build import ShardSampler
from data.images import UnreadableImageError, load_image_file
from data.resumable import loader_options, resumable_loader
from segmentation.pipeline import reduce_zero_label, train_transform

SPLITS = {True: "training", False: "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DATASETS = ("ade20k", "digit_scenes")


class BadAnnotationError(UnreadableImageError):
    """An annotation with a label outside the classes: stops the run naming the file (one line,
    also when raised in a DataLoader worker)."""


def _stems(folder: str, suffixes: tuple[str, ...]) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise UserError(f"dataset split folder not found: {folder}")
    return {os.path.splitext(f)[0]: f for f in sorted(os.listdir(folder)) if f.lower().endswith(suffixes)}


def list_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """``(image path, annotation path)`` of every sample of ``split``, sorted by name; a
    missing folder or an image without its annotation (or the reverse) is a UserError."""
    image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    images, labels = _stems(image_dir, IMAGE_SUFFIXES), _stems(label_dir, (".png",))
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        shown = ", ".join(os.path.join(image_dir if s in images else label_dir, (images | labels)[s])
                          for s in unmatched[:3])
        raise UserError(f"{len(unmatched)} images and annotations of {split} do not pair up by name: {shown}")
    if not images:
        raise UserError(f"no images in {image_dir}")
    return [(os.path.join(image_dir, images[s]), os.path.join(label_dir, labels[s])) for s in sorted(images)]


class SegmentationDataset(Dataset):
    """One ADE20K-layout split. Training items are looked up by ``(index, seed)`` (the keys of
    data/resumable.py's sampler) and return the ``(image, label)`` crop augmented by a generator
    of that seed; evaluation items by index, returning the uint8 ``(3, H, W)``
    image and the ``(H, W)`` label at the original size."""

    def __init__(self, root: str, is_train: bool, config: CfgNode):
        self.pairs = list_pairs(root, SPLITS[is_train])
        self.is_train = is_train
        self.seg = config.SEG
        self.num_classes = config.MODEL.NUM_CLASSES

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[Image.Image, Image.Image]:
        """The image (RGB) and its label map (reduced if SEG.REDUCE_ZERO_LABEL), checked."""
        image_path, label_path = self.pairs[index]
        image = load_image_file(image_path)
        try:
            with Image.open(label_path) as file:
                labels = np.asarray(file)
        except (OSError, SyntaxError, ValueError) as err:
            raise UnreadableImageError.naming(label_path, err) from err
        if labels.ndim != 2 or labels.dtype != np.uint8:
            raise BadAnnotationError(f"annotation {label_path} is not an 8-bit single-channel PNG "
                                     f"(shape {labels.shape}, {labels.dtype})")
        if labels.shape != (image.height, image.width):
            raise BadAnnotationError(f"annotation {label_path} is {labels.shape[1]}x{labels.shape[0]}, "
                                     f"its image {image.width}x{image.height}")
        if self.seg.REDUCE_ZERO_LABEL:
            labels = reduce_zero_label(labels, self.seg.IGNORE_INDEX)
        bad = labels[(labels != self.seg.IGNORE_INDEX) & (labels >= self.num_classes)]
        if bad.size:
            raw = int(bad.max()) + int(self.seg.REDUCE_ZERO_LABEL)
            raise BadAnnotationError(f"annotation {label_path} holds label {raw}, above the "
                                     f"{self.num_classes} classes of MODEL.NUM_CLASSES")
        return image, Image.fromarray(labels)

    def __getitem__(self, item) -> tuple[Tensor, Tensor]:
        if self.is_train:
            index, seed = item
            image, label = self.load(index)
            return train_transform(image, label, self.seg, np.random.default_rng(seed))
        image, label = self.load(item)
        return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
                torch.from_numpy(np.asarray(label).astype(np.int64)))


def find_dataset_root(config: CfgNode) -> str:
    """DATA.DATA_PATH for 'ade20k'; the generated folder for 'digit_scenes'."""
    if config.DATA.DATASET not in DATASETS:
        raise UserError(f"unknown DATA.DATASET {config.DATA.DATASET!r} for segmentation; known: {', '.join(DATASETS)}")
    if config.DATA.DATASET == "digit_scenes":
        from segmentation.digit_scenes import ensure_digit_scenes
        return ensure_digit_scenes(config.DATA.DATA_PATH)
    if not config.DATA.DATA_PATH:
        raise UserError("no dataset given: pass --data-path ADE_ROOT (the folder holding images/ and annotations/)")
    if not os.path.isdir(config.DATA.DATA_PATH):
        raise UserError(f"dataset folder not found: {config.DATA.DATA_PATH}")
    return config.DATA.DATA_PATH


def build_train_loader(config: CfgNode, root: str, rank: int, world_size: int) -> DataLoader:
    """Batches of augmented crops for this rank: the run core's resumable loader, whose passes
    over the data the iterations run through (a pass shuffled by SEED and its number, each crop
    augmented by a generator seeded from SEED, pass and image), so a run resumed at any
    iteration sees the samples and augmentations it would have seen without stopping."""
    return resumable_loader(SegmentationDataset(root, True, config), config, rank, world_size, seeded=False)


def build_val_loader(config: CfgNode, root: str, rank: int, world_size: int) -> DataLoader:
    """One image a batch; rank r takes images r, r + world_size, ... (none twice, none left out)."""
    dataset = SegmentationDataset(root, False, config)
    return DataLoader(dataset, sampler=ShardSampler(len(dataset), rank, world_size), **loader_options(config, 1))
