"""The authors' test-time resize: keep the aspect ratio within a (long, short) scale, then round
each side up to a multiple of a divisor (32: the stride of the last stage), so that a whole image
passes through the network without padding."""
from __future__ import annotations

import math
from typing import Sequence


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """``(h, w)`` of the largest keep-ratio resize whose long side is at most ``max(scale)`` and
    whose short side is at most ``min(scale)`` (mmcv's keep-ratio rule, rounded to nearest)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def align_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """Both sides rounded up to a multiple of ``divisor``."""
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def aligned_resize_size(height: int, width: int, scale: Sequence[float], divisor: int = 32) -> tuple[int, int]:
    """The size an ``height x width`` image is resized to at test time."""
    return align_size(*rescale_size(height, width, scale), divisor)
