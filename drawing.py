"""Readable prediction pictures (detection/predict.py, segmentation/predict.py): small images are
scaled up by a whole factor before anything is drawn, every instance or class gets a colour of
its own, and a legend panel on the right of the image names each colour.

torchvision draws the masks and boxes. The legend panel is drawn here with PIL: torchvision and
PIL have none, and matplotlib's belongs to a figure, which would resample the image instead of
keeping its pixels. Text is set in DejaVu Sans, the font matplotlib ships, so it is scalable and
the same on every machine (PIL's built-in default font is a tiny bitmap).
"""
from __future__ import annotations

import colorsys
import math
import os

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from config import UserError

MIN_SIDE = 512  # a shorter side below this is scaled up by the smallest whole factor that reaches it
Colour = tuple[int, int, int]
LegendEntry = tuple[str, Colour]


def upscale_factor(width: int, height: int) -> int:
    """The whole factor that brings the shorter side to at least ``MIN_SIDE`` pixels (1 for large images)."""
    return max(1, math.ceil(MIN_SIDE / min(width, height)))


def distinct_colours(count: int) -> list[Colour]:
    """``count`` colours told apart at a glance: matplotlib's qualitative tab10 for up to 10, its
    tab20 for up to 20 (the first 10 still tab10's), else hues in golden-ratio steps (consecutive
    ones far apart), every other one darker."""
    if count <= 20:
        table = matplotlib.colormaps["tab20"].colors
        return [tuple(round(255 * v) for v in table[2 * i if i < 10 else 2 * (i - 10) + 1]) for i in range(count)]
    colours = []
    for i in range(count):
        red, green, blue = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0 if i % 2 == 0 else 0.7)
        colours.append((round(red * 255), round(green * 255), round(blue * 255)))
    return colours


def text_colour(background: Colour) -> Colour:
    """Black on light colours, white on dark ones (by the colour's luma)."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def font_file() -> str:
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


def font_size(width: int, height: int) -> int:
    """Text size in pixels for a picture of this size: 16 at 512 pixels, at least 12."""
    return max(12, round(min(width, height) / 32))


def with_legend(image: Image.Image, title: str, entries: list[LegendEntry]) -> Image.Image:
    """``image`` with a white panel on its right: ``title``, then a colour swatch and its text per
    entry. The picture keeps the image's height; entries that do not fit end in "+N more"."""
    size = font_size(*image.size)
    font = ImageFont.truetype(font_file(), size)
    pad, row = size // 2, round(size * 1.6)
    rows = max(1, (image.height - 2 * pad) // row - 1)  # below the title
    shown = entries if len(entries) <= rows else entries[:rows - 1]
    lines = [text for text, _ in shown] + ([f"+{len(entries) - len(shown)} more"] if len(shown) < len(entries) else [])
    measure = ImageDraw.Draw(image)
    text_width = max(measure.textlength(text, font=font) for text in [title, *lines, "none"])
    panel = Image.new("RGB", (round(text_width) + 3 * pad + size, image.height), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((pad, pad), title, fill="black", font=font)
    for n, line in enumerate(lines or ["none"], start=1):
        top = pad + n * row
        if n <= len(shown):
            draw.rectangle((pad, top, pad + size, top + size), fill=shown[n - 1][1], outline="black")
        draw.text((2 * pad + size, top), line, fill="black", font=font)
    picture = Image.new("RGB", (image.width + panel.width, image.height))
    picture.paste(image.convert("RGB"), (0, 0))
    picture.paste(panel, (image.width, 0))
    return picture


def save_picture(picture: Image.Image, path: str) -> None:
    """Write ``picture`` to ``path`` as a PNG; a path that cannot be written is a UserError naming it."""
    try:
        picture.save(path, format="PNG")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot write {path}: {err}") from err
