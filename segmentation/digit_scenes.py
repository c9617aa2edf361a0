"""The segmentation demo's data: scikit-learn's handwritten digits pasted on textured backgrounds,
written once in the ADE20K layout (``images/{training,validation}/*.jpg``,
``annotations/{...}/*.png``).

Each 64x64 scene holds 1 to 4 digits (one per 32x32 quadrant, 14-30 pixels tall, in a random
dark colour) over a light colour gradient with noise. Annotation values follow ADE20K: 0 is "other" and is
ignored (the soft rim of each stroke, where ink covers 15-50 % of a pixel), 1 is the background,
2 + d is digit d. After reduce-zero-label that gives 11 classes: background, then digits 0-9.
Validation scenes use only digits of the fixed validation split of data/digits.py, so the model
is scored on handwriting it never saw. Generation is deterministic (fixed seed).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data.digits import write_once_from_digits

DEFAULT_ROOT = os.path.join("~", ".cache", "crossformer", "digit_scenes")
SCENE_SIZE = 64
SCENES = {"training": 1000, "validation": 200}
DIGIT_SIZES = (14, 30)
INK_RIM, INK_SOLID = 0.15, 0.5  # ink cover: rim pixels are ignored, solid ones are the digit
BACKGROUND_RANGE, INK_RANGE, NOISE = (130, 255), (0, 100), 8  # light backgrounds, dark ink
GENERATOR_SEED = 2022


def _background(rng: np.random.Generator) -> np.ndarray:
    """A bilinear blend of four random light corner colours plus Gaussian noise, float (64, 64, 3)."""
    corners = rng.uniform(*BACKGROUND_RANGE, size=(2, 2, 3))
    u = np.linspace(0, 1, SCENE_SIZE)[:, None, None]
    v = u.transpose(1, 0, 2)
    gradient = ((1 - u) * (1 - v) * corners[0, 0] + (1 - u) * v * corners[0, 1]
                + u * (1 - v) * corners[1, 0] + u * v * corners[1, 1])
    return np.clip(gradient + rng.normal(0, NOISE, size=gradient.shape), 0, 255)


def render_scene(images: np.ndarray, targets: np.ndarray, pool: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``(64, 64, 3)`` uint8 scene and its ``(64, 64)`` uint8 annotation from digits in ``pool``."""
    pixels = _background(rng)
    annotation = np.ones((SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    half = SCENE_SIZE // 2
    quadrants = rng.permutation(4)[:rng.integers(1, 5)]
    for quadrant in quadrants:
        index = int(rng.choice(pool))
        size = int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1))
        cover = np.asarray(Image.fromarray((images[index] * (255 / 16)).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BILINEAR), dtype=np.float64) / 255
        top = (quadrant // 2) * half + int(rng.integers(0, max(1, half - size // 2)))
        left = (quadrant % 2) * half + int(rng.integers(0, max(1, half - size // 2)))
        cover = cover[:SCENE_SIZE - top, :SCENE_SIZE - left]
        window = (slice(top, top + cover.shape[0]), slice(left, left + cover.shape[1]))
        ink = rng.uniform(*INK_RANGE, size=3)
        pixels[window] = pixels[window] * (1 - cover[..., None]) + ink * cover[..., None]
        annotation[window][cover > INK_RIM] = 0
        annotation[window][cover > INK_SOLID] = 2 + targets[index]
    return np.round(pixels).astype(np.uint8), annotation


def _write_split(root: str, split: str, images: np.ndarray, targets: np.ndarray, pool: np.ndarray,
                 rng: np.random.Generator) -> None:
    image_dir, label_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    for n in range(SCENES[split]):
        pixels, annotation = render_scene(images, targets, pool, rng)
        Image.fromarray(pixels).save(os.path.join(image_dir, f"scene_{n:05d}.jpg"), quality=95)
        Image.fromarray(annotation).save(os.path.join(label_dir, f"scene_{n:05d}.png"))


def ensure_digit_scenes(root: str = "") -> str:
    """The demo folder under ``root`` (default ``~/.cache/crossformer/digit_scenes``), written
    only when ``root/images`` is missing (:func:`data.digits.write_once_from_digits`)."""
    def fill(staging: str, images: np.ndarray, targets: np.ndarray, train: np.ndarray, val: np.ndarray) -> None:
        rng = np.random.default_rng(GENERATOR_SEED)
        _write_split(staging, "training", images, targets, train, rng)
        _write_split(staging, "validation", images, targets, val, rng)

    return write_once_from_digits(root, DEFAULT_ROOT, "images", fill, "the digit scenes dataset")
