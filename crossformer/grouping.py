"""Per-block group sizes of CrossFormer++ (GROUP_TYPE): plain Python, shared by the PyTorch and
the Flax model."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

GROUP_TYPES = ("constant", "linear", "linear_div", "alter", "7_14")
SMALLEST_PROGRESSIVE_GROUP = 4  # the group size the CrossFormer++ progressive group types start from


def block_group_sizes(group_type: str, group_size: Sequence[int], depths: Sequence[int],
                      resolution: int) -> list[list[int]]:
    """The group size G of every block of every stage, as CrossFormer++ chooses it (GROUP_TYPE),
    before the rule that a block whose map is no larger than G attends over the whole map.

    ``resolution`` is the height of the first stage's map at the configured image size; stage ``i``
    counts as ``resolution // 2**i`` rows. ``constant`` takes ``group_size[i]`` for every block of
    stage ``i``; ``7_14`` halves it for the first four blocks of the third stage. The progressive
    types give block ``k`` (counted over the whole model) the fraction ``f_k`` of its stage's
    resolution, with ``f`` rising in equal steps from ``4 / resolution`` towards 1 over all blocks,
    rounded up and at least 4 (``linear``). Where that is over half the stage's resolution,
    ``linear_div`` takes the whole map, except in the third stage below three quarters, where it
    takes half; ``alter`` takes the whole map, except in the third stage at even ``k``, where it
    takes half.
    """
    if group_type not in GROUP_TYPES:
        raise ValueError(f"unknown group_type {group_type!r}; known: {', '.join(GROUP_TYPES)}")
    total = sum(depths)
    fractions = np.zeros(total)  # a map of at most 4 rows: every progressive group is 4
    if resolution > SMALLEST_PROGRESSIVE_GROUP:
        start = SMALLEST_PROGRESSIVE_GROUP / resolution
        # numpy's arange, as the official code uses it: its rounding decides a few ceilings.
        fractions = np.arange(start, 1.0, (1 - start) / total)
    sizes, block = [], 0
    for stage, depth in enumerate(depths):
        stage_resolution = resolution // 2 ** stage
        sizes.append([])
        for index in range(depth):
            if group_type == "constant":
                size = group_size[stage]
            elif group_type == "7_14":
                size = group_size[stage] // 2 if stage == 2 and index < 4 else group_size[stage]
            else:
                size = stage_resolution * fractions[block]
                if group_type != "linear" and size > stage_resolution // 2:
                    whole = size > stage_resolution * 3 / 4 if group_type == "linear_div" else block % 2 == 1
                    size = stage_resolution if whole or stage != 2 else stage_resolution // 2
                size = max(SMALLEST_PROGRESSIVE_GROUP, math.ceil(size))
            sizes[-1].append(int(size))
            block += 1
    return sizes
