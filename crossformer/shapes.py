"""The model's shapes in plain Python, shared by the PyTorch and the Flax model: the per-stage
constructor arguments, the channels and output size of a cross-scale layer, the map size of every
stage and the check that an input is large enough."""
from __future__ import annotations

from typing import Sequence


def stage_arguments(depths: Sequence[int], num_heads: Sequence[int], group_size: int | Sequence[int],
                    interval: Sequence[int], mlp_ratio: float | Sequence[float], merge_size: Sequence[Sequence[int]],
                    pad_type: int, interval_name: str = "interval") -> tuple[list[int], list[float]]:
    """The group size and MLP ratio of every stage (an int or a float: the same for all), after
    checking that every per-stage argument has one entry per stage and ``merge_size`` one kernel
    list per patch merging; ValueError naming the argument otherwise (``interval_name``: the name
    the caller's interval argument has)."""
    num_stages = len(depths)
    group_size = [group_size] * num_stages if isinstance(group_size, int) else list(group_size)
    for name, values in (("num_heads", num_heads), ("group_size", group_size), (interval_name, interval)):
        if len(values) != num_stages:
            raise ValueError(f"{name} needs one value per stage ({num_stages}), got {list(values)}")
    if len(merge_size) != num_stages - 1:
        raise ValueError(f"merge_size needs {num_stages - 1} kernel lists, got {list(merge_size)}")
    if pad_type not in (0, 1):
        raise ValueError(f"pad_type must be 0 or 1, got {pad_type}")
    mlp_ratios = [mlp_ratio] * num_stages if isinstance(mlp_ratio, (int, float)) else list(mlp_ratio)
    return group_size, mlp_ratios


def cross_scale_channels(out_dim: int, num_kernels: int) -> list[int]:
    """Output channels of each kernel of a cross-scale layer: half for the smallest kernel, a
    quarter for the next and so on; the largest kernel gets as many as the one before it."""
    return [out_dim // 2 ** min(i + 1, num_kernels - 1) for i in range(num_kernels)]


def conv_output_size(size: int, kernel_sizes: Sequence[int], stride: int) -> int:
    """Spatial size after a cross-scale layer (all its kernels, padded by ``(k - stride) // 2``,
    give the same size); <= 0 if too small."""
    kernel = kernel_sizes[0]
    return (size + 2 * ((kernel - stride) // 2) - kernel) // stride + 1


def stage_sizes(H: int, W: int, patch_size: Sequence[int],
                merge_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Map size ``(h, w)`` of every stage for an ``H x W`` input (sizes < 1: input too small)."""
    sizes = [(conv_output_size(H, patch_size, patch_size[0]), conv_output_size(W, patch_size, patch_size[0]))]
    for kernels in merge_sizes:
        sizes.append((conv_output_size(sizes[-1][0], kernels, 2), conv_output_size(sizes[-1][1], kernels, 2)))
    return sizes


def checked_stage_sizes(H: int, W: int, patch_size: Sequence[int],
                        merge_sizes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """:func:`stage_sizes`, with a ValueError naming the smallest usable size if the input is too small."""
    sizes = stage_sizes(H, W, patch_size, merge_sizes)
    if any(size < 1 for hw in sizes for size in hw):  # one comparison per size: no guard on H against W
        smallest = next(s for s in range(1, 4096) if min(stage_sizes(s, s, patch_size, merge_sizes)[-1]) >= 1)
        raise ValueError(f"input {H}x{W} is too small for this model: its last stage would have "
                         f"{sizes[-1][0]}x{sizes[-1][1]} embeddings; use at least {smallest}x{smallest}")
    return sizes
