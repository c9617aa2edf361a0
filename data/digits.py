"""scikit-learn's handwritten digits written once as an image folder, read like ImageNet.

Layout: ``<root>/{train,val}/<digit 0-9>/<index in load_digits()>.png``. Each 8×8 image (values
0-16, ink high) becomes a 32×32 grayscale PNG (values scaled to 0-255, ink white, bilinear
upscale). The split is stratified 80/20 with a fixed seed, so it never depends on config.SEED:
1437 train and 360 val images.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import numpy as np
from PIL import Image

from config import UserError

DEFAULT_ROOT = os.path.join("~", ".cache", "crossformer", "digits")
IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def _write_split(folder: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for label in range(10):
        os.makedirs(os.path.join(folder, str(label)))
    for index in indices:
        pixels = np.round(images[index] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        image.save(os.path.join(folder, str(labels[index]), f"{index:04d}.png"))


def ensure_digits_folder(root: str = "") -> str:
    """The digits image folder under ``root`` (default ``~/.cache/crossformer/digits``), written
    only when ``root/train`` is missing (:func:`write_once_from_digits`)."""
    def fill(staging: str, images: np.ndarray, targets: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
        _write_split(os.path.join(staging, "train"), images, targets, train)
        _write_split(os.path.join(staging, "val"), images, targets, val)

    return write_once_from_digits(root, DEFAULT_ROOT, "train", fill, "the digits dataset")


def split_indices(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified 80/20 train/val split of ``load_digits()`` indices."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(targets)), test_size=VAL_FRACTION, stratify=targets,
                            random_state=SPLIT_SEED)


# fill(staging folder, images, targets, train indices, val indices)
FillFolder = Callable[[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


def write_once_from_digits(root: str, default_root: str, marker: str, fill: FillFolder, what: str) -> str:
    """Folder ``root`` (``default_root`` when empty; absolute, ``~`` expanded) of a demo set made
    from scikit-learn's digits, written only when ``root/marker`` is missing: by ``fill`` with the
    8x8 images, their targets and the fixed split (:func:`split_indices`), into a temporary folder
    beside ``root`` that is renamed into place, so concurrent processes never see half a folder; a
    process that loses the rename race drops its copy and uses the winner's. ``what`` names the set
    in the UserError of a folder that cannot be written."""
    root = os.path.abspath(os.path.expanduser(root or default_root))
    if os.path.exists(os.path.join(root, marker)):
        return root
    from sklearn.datasets import load_digits  # imported here: slow, and only the demo sets need it

    digits = load_digits()
    train_indices, val_indices = split_indices(digits.target)
    parent = os.path.dirname(root)
    staging = ""
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
        fill(staging, digits.images, digits.target, train_indices, val_indices)
        os.rename(staging, root)  # replaces an empty folder; fails if another process won
    except OSError as err:
        if not os.path.exists(os.path.join(root, marker)):
            raise UserError(f"cannot write {what} to {root}: {err}") from err
    finally:
        if staging and os.path.isdir(staging):
            shutil.rmtree(staging)
    return root
