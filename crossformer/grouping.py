"""How blocks group their maps, in plain Python shared by the PyTorch and the Flax model: the
per-block group sizes of CrossFormer++ (GROUP_TYPE), the grouping layout of a map of any size
in either official layout (GROUPING), the index tables that gather a map's groups and scatter
them back, the DPB's relative offsets and the score of padded keys.

The index tables are written once for both array libraries: they take ``arange`` (``np.arange``,
or ``torch.arange`` on a device) and use nothing but integer arithmetic and broadcasting on what
it returns, so PyTorch's export can follow them on symbolic sizes."""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

# Score given to padded keys. Finite, so a group made only of padding yields a uniform softmax
# (its outputs are cut off) instead of NaN; small enough for float16.
PADDED_KEY_SCORE = -1e4

Arange = Callable[[Any], Any]  # n -> the integers 0 .. n-1 as a 1-D array (numpy's or PyTorch's)

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


# ----------------------------------------------------------------------------- grouping layouts
GROUPINGS = ("crossformer", "crossformer_pp")


def resolve_grouping(grouping: str, use_acl: bool) -> str:
    """The layout that ``grouping`` names: ``auto`` follows the model family, which the official
    configs mark with USE_ACL (False in every CrossFormer config, True in every CrossFormer++ one)."""
    if grouping == "auto":
        return "crossformer_pp" if use_acl else "crossformer"
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be 'auto', 'crossformer' or 'crossformer_pp', got {grouping!r}")
    return grouping


class GroupLayout(NamedTuple):
    """How a block groups an ``H x W`` map. The map, zero-padded by ``top``/``bottom``/``left``/
    ``right``, is cut into regions of ``(group_h * interval) x (group_w * interval)``; each region
    holds ``interval**2`` groups of ``group_h x group_w`` embeddings ``interval`` apart. Interval 1
    is SDA (groups of adjacent embeddings)."""
    group_h: int
    group_w: int
    interval: int
    top: int
    bottom: int
    left: int
    right: int


def group_layout(H: int, W: int, group_size: int, interval: int, lda: bool, grouping: str, pad_type: int = 0,
                 adaptive_interval: bool = False, minimum: Callable = min, maximum: Callable = max) -> GroupLayout:
    """The layout of an ``H x W`` map for a block of group size ``group_size`` (SDA, or LDA with
    ``interval``), as the official detection/segmentation backbone of ``grouping`` computes it:

    * ``crossformer`` (the ICLR backbone): a map whose short side is <= G is SDA with
      ``G' = min(H, W)``; SDA pads to a multiple of G; LDA keeps the interval I and pads to a
      multiple of I, so its I x I groups grow to ``ceil(H/I) x ceil(W/I)`` (I = 1: the whole map).
    * ``crossformer_pp`` (the CrossFormer++ backbone): a map whose short side is <= G is one SDA
      group of ``max(H, W)`` (padded square); otherwise G and I stay and the map is padded to a
      multiple of ``G*I``, tiled by ``(G*I)**2`` regions.

    ``adaptive_interval`` (ADAPT_INTER): LDA takes ``I = ceil(max(H, W) / G)``. ``pad_type`` 1 splits
    the padding between both sides (the official backbones pad bottom/right: ``pad_type`` 0).
    At a square map of G*I (the configured classification size) both layouts coincide.

    ``minimum``/``maximum``: ``torch.sym_min``/``sym_max`` from the PyTorch model, so that export
    decides them without a guard on ``H`` against ``W``."""
    if not lda:
        interval = 1
    elif adaptive_interval:
        interval = (maximum(H, W) + group_size - 1) // group_size
    smallest, largest = minimum(H, W), maximum(H, W)
    # The rule for a map whose short side is <= G changes nothing for a map of exactly G x G that
    # the normal layout makes one G x G group too (interval 1), so it applies when the short side is
    # below G, or equal to G with a longer long side or an interval above 1. That is asked as a
    # single comparison, False at G x G as for larger maps: export and compile guard on the answer
    # (one graph for both), and inductor's compile cache re-checks a compound guard part by part,
    # which would pin a graph compiled at G x G to short sides <= G.
    if adaptive_interval or interval == 1:  # an adaptive interval is above 1 exactly when the long side is above G
        beyond = minimum(largest, group_size + 1) - minimum(largest, group_size)  # 1 if largest > G, else 0
    else:
        beyond = 1
    if smallest < group_size + beyond:
        side = smallest if grouping == "crossformer" else largest
        return _padded_layout(H, W, side, side, 1, pad_type)
    if lda and grouping == "crossformer":
        return _padded_layout(H, W, (H + interval - 1) // interval, (W + interval - 1) // interval, interval,
                              pad_type)
    return _padded_layout(H, W, group_size, group_size, interval, pad_type)


def _padded_layout(H: int, W: int, group_h: int, group_w: int, interval: int, pad_type: int) -> GroupLayout:
    """The layout with the zero padding that makes ``H x W`` a multiple of the region size."""
    span_h, span_w = group_h * interval, group_w * interval
    pad_h = (H + span_h - 1) // span_h * span_h - H
    pad_w = (W + span_w - 1) // span_w * span_w - W
    top, left = (pad_h // 2, pad_w // 2) if pad_type == 1 else (0, 0)
    return GroupLayout(group_h, group_w, interval, top, pad_h - top, left, pad_w - left)


# ----------------------------------------------------------------------------- index tables
def quotient_remainder(x: Any, divisor: int) -> tuple[Any, Any]:
    """``(x // divisor, x % divisor)``, the remainder written as a difference: ONNX has no remainder
    by a size computed at run time, which group sizes and intervals are in the ICLR layout."""
    quotient = x // divisor
    return quotient, x - quotient * divisor


def group_positions(H: int, W: int, layout: GroupLayout, arange: Arange) -> Any:
    """``(num_groups * group_h * group_w,)``: where each grouped embedding comes from in the
    flattened ``H x W`` map, ``H * W`` for padding. Groups run over regions (row-major), then over
    the ``interval**2`` offsets inside a region; members are row-major and ``interval`` apart.

    Computed element-wise from one ``arange`` (no array whose size may be 1, no view of a padded
    size), so that export reasons about it without guards on the input size."""
    group_h, group_w, interval, top, bottom, left, right = layout
    members = group_h * group_w
    region_rows = (top + H + bottom) // (group_h * interval)
    regions_per_row = (left + W + right) // (group_w * interval)
    slot = arange(region_rows * regions_per_row * interval * interval * members)
    grouped, member = quotient_remainder(slot, members)
    grouped, col_offset = quotient_remainder(grouped, interval)
    grouped, col_region = quotient_remainder(grouped, regions_per_row)
    row_region, row_offset = quotient_remainder(grouped, interval)
    member_row, member_col = quotient_remainder(member, group_w)
    row = row_region * group_h * interval + member_row * interval + row_offset - top
    col = col_region * group_w * interval + member_col * interval + col_offset - left
    outside = (row < 0) | (row >= H) | (col < 0) | (col >= W)
    position = row * W + col
    return position + (H * W - position) * outside  # padding: H * W


def ungroup_positions(H: int, W: int, layout: GroupLayout, arange: Arange) -> Any:
    """``(H, W)``: the position of each embedding in the flattened grouped array (inverse of
    :func:`group_positions`)."""
    group_h, group_w, interval, top, bottom, left, right = layout

    def coordinates(size: int, before: int, group: int) -> tuple[Any, Any, Any]:
        """(region, offset, member) of each coordinate of the padded map along one axis."""
        region, within = quotient_remainder(arange(size) + before, group * interval)
        member, offset = quotient_remainder(within, interval)
        return region, offset, member

    row_region, row_offset, row_member = coordinates(H, top, group_h)
    col_region, col_offset, col_member = coordinates(W, left, group_w)
    regions_per_row = (left + W + right) // (group_w * interval)
    groups = ((row_region * interval + row_offset)[:, None] * regions_per_row + col_region[None, :]) * interval \
        + col_offset[None, :]
    return groups * group_h * group_w + (row_member * group_w)[:, None] + col_member[None, :]


def relative_offsets(group_h: int, group_w: int, arange: Arange) -> tuple[Any, Any]:
    """All relative offsets ``(dy, dx)`` inside a ``group_h x group_w`` grid, as an integer table of
    ``(2*group_h - 1) * (2*group_w - 1)`` rows (dy-major, as the official DPB table), and for each
    (query, key) pair of the row-major members the row of its offset."""
    span_w = 2 * group_w - 1
    dy, dx = quotient_remainder(arange((2 * group_h - 1) * span_w), span_w)
    column = arange(2)[None, :]  # the two columns by broadcasting, where the libraries' stack differs
    table = (dy[:, None] + 1 - group_h) * (1 - column) + (dx[:, None] + 1 - group_w) * column
    rows, cols = quotient_remainder(arange(group_h * group_w), group_w)
    return table, ((rows[:, None] - rows[None, :] + group_h - 1) * span_w
                   + cols[:, None] - cols[None, :] + group_w - 1)
