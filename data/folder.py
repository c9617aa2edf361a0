"""Image-folder datasets (``<root>/<split>/<class>/<image>``) and the split names they accept."""
from __future__ import annotations

import os
from typing import Callable

from torchvision.datasets import ImageFolder

from config import UserError
from data.images import load_image_file

VAL_SPLIT_NAMES = ("val", "validation")


def find_val_split(root: str, suffix: str = "") -> str:
    """``val``, or ``validation`` when only ``root/validation<suffix>`` exists."""
    for name in VAL_SPLIT_NAMES:
        if os.path.exists(os.path.join(root, name + suffix)):
            return name
    return VAL_SPLIT_NAMES[0]


def check_data_path(root: str) -> None:
    """UserError unless DATA.DATA_PATH names an existing folder."""
    if not root:
        raise UserError("DATA.DATA_PATH is empty: give the dataset folder (--data-path)")
    if not os.path.isdir(root):
        raise UserError(f"dataset folder not found: {root}")


def build_folder_dataset(root: str, split: str, transform: Callable) -> ImageFolder:
    """``root/split`` as a torchvision ImageFolder whose loader raises ``UnreadableImageError``."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"dataset split folder not found: {split_dir}")
    try:
        return ImageFolder(split_dir, transform=transform, loader=load_image_file)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise UserError(f"no images in {split_dir}: {' '.join(str(err).split())}") from err
