"""CrossFormer (ICLR 2022) and CrossFormer++ (TPAMI) in one model class.

Embeddings travel between layers as channels-last maps ``(B, H, W, C)``. A block groups them,
attends inside each group with a dynamic position bias, and puts them back:

* SDA (short distance): groups of adjacent embeddings.
* LDA (long distance): groups of embeddings ``I`` apart.

How a map of any size is grouped and zero-padded is the layout of
:func:`crossformer.grouping.group_layout`, in either official backbone's way (``grouping``: the
ICLR backbone's ``crossformer`` or the CrossFormer++ backbone's ``crossformer_pp``); padded
embeddings are masked out as keys and cut off afterwards. At the configured image size both
reproduce the official models exactly.

Tracing and export: the tensors derived from the input size (DPB offsets and index, grouping
indices, padding masks) come from the small functions below. Eager calls keep them per size (and
the DPB bias, in evaluation without gradients, per weights: see ``Attention.position_bias``);
traced and compiled code computes them in its graph. They are leaves for FX
(``torch.fx.wrap`` and timm's ``register_notrace_function``), so ``symbolic_trace`` and feature
extractors evaluate them at call time, and plain Python on symbolic sizes for ``torch.export`` /
``torch.compile``: an export with dynamic height and width follows the padding at every size and
guards the few choices that depend on the size (a map no larger than ``G``). ``torch.jit.trace`` and
the TorchScript-based ONNX exporter would freeze those choices silently, so they are refused.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crossformer.grouping import GroupLayout, block_group_sizes, group_layout, resolve_grouping

# Score given to padded keys. Finite, so a group made only of padding yields a uniform softmax
# (its outputs are cut off) instead of NaN; small enough for float16.
PADDED_KEY_SCORE = -1e4

T = TypeVar("T")


def cross_scale_channels(out_dim: int, num_kernels: int) -> list[int]:
    """Output channels of each kernel of a cross-scale layer: half for the smallest kernel, a
    quarter for the next and so on; the largest kernel gets as many as the one before it."""
    return [out_dim // 2 ** min(i + 1, num_kernels - 1) for i in range(num_kernels)]


def cross_scale_convs(in_dim: int, out_dim: int, kernel_sizes: Sequence[int], stride: int) -> nn.ModuleList:
    """Convolutions of several kernel sizes, same stride, centred so all outputs align."""
    return nn.ModuleList(
        nn.Conv2d(in_dim, channels, kernel, stride=stride, padding=(kernel - stride) // 2)
        for channels, kernel in zip(cross_scale_channels(out_dim, len(kernel_sizes)), kernel_sizes)
    )


def conv_output_size(size: int, kernel_sizes: Sequence[int], stride: int) -> int:
    """Spatial size after a cross-scale layer (all its kernels give the same size); <= 0 if too small."""
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


@register_notrace_function
@torch.fx.wrap
def check_input_size(x: Tensor, patch_size: Sequence[int], merge_sizes: Sequence[Sequence[int]]) -> None:
    """ValueError if the ``(B, C, H, W)`` input is too small for the stages."""
    checked_stage_sizes(x.shape[-2], x.shape[-1], patch_size, merge_sizes)


@register_notrace_function
@torch.fx.wrap
def resized_pos_embed(pos_embed: Tensor, grid: tuple[int, int], h: int, w: int) -> Tensor:
    """The ``(1, grid_h * grid_w, C)`` absolute position embedding as a ``(1, h, w, C)`` map, bicubic
    resized unless the size is known to equal the grid it was learned for."""
    pos = pos_embed.view(1, grid[0], grid[1], -1)
    if not torch.compiler.is_compiling() and isinstance(h, int) and isinstance(w, int) and (h, w) == tuple(grid):
        return pos
    return F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)


def strided_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for an unpadded-mode, ungrouped convolution with a square stride. When training
    eagerly on a CPU with a kernel at least four times the stride (the 16x16 and 32x32 kernels of
    the patch embedding), the same sum is computed as a stride-1 convolution over the space-to-depth
    input: oneDNN's weight gradient of the strided form is 3 to 5 times slower. Tracing, export and
    compile get the plain form."""
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or not (
            conv.training and x.device.type == "cpu" and torch.is_grad_enabled() and conv.weight.requires_grad
            and kernel >= 4 * stride and kernel % stride == 0):
        return conv(x)
    pad = conv.padding[0]
    out_h = (x.shape[-2] + 2 * pad - kernel) // stride + 1
    out_w = (x.shape[-1] + 2 * pad - kernel) // stride + 1
    # pad, keep the rows/columns the kernel reaches, and fold each stride x stride cell into channels
    x = F.pad(x, (pad, pad, pad, pad))[..., :(out_h - 1) * stride + kernel, :(out_w - 1) * stride + kernel]
    x = F.pixel_unshuffle(x, stride)  # channel c * stride**2 + i * stride + j holds pixel (i, j) of a cell
    out_chans, in_chans, cells = conv.out_channels, conv.in_channels, kernel // stride
    weight = conv.weight.view(out_chans, in_chans, cells, stride, cells, stride).permute(0, 1, 3, 5, 2, 4)
    return F.conv2d(x, weight.reshape(out_chans, in_chans * stride * stride, cells, cells), conv.bias)


class PatchEmbed(nn.Module):
    """Cross-scale embedding of the image: ``(B, 3, H, W)`` -> ``(B, H/s, W/s, C)``."""

    def __init__(self, patch_size: Sequence[int], in_chans: int, embed_dim: int, patch_norm: bool):
        super().__init__()
        self.patch_size = list(patch_size)
        self.projs = cross_scale_convs(in_chans, embed_dim, patch_size, stride=patch_size[0])
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([strided_conv(proj, x) for proj in self.projs], dim=1).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """Cross-scale embedding between stages: ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int]):
        super().__init__()
        self.kernel_sizes = list(kernel_sizes)
        self.norm = nn.LayerNorm(dim)
        self.reductions = cross_scale_convs(dim, 2 * dim, kernel_sizes, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        return torch.cat([reduce(x) for reduce in self.reductions], dim=1).permute(0, 2, 3, 1)


def kept_per_size(make: Callable[..., T]) -> Callable[..., T]:
    """``make`` (tensors that follow from sizes and a device alone) kept per argument tuple in eager
    calls, made outside inference mode so that a training step may use them too. Traced, exported
    and compiled code computes them in its graph."""
    kept = functools.lru_cache(maxsize=256)(make)

    @functools.wraps(make)
    def make_or_reuse(*args):
        if torch.compiler.is_compiling():
            return make(*args)
        with torch.inference_mode(False):
            return kept(*args)
    return make_or_reuse


@register_notrace_function
@torch.fx.wrap
def block_layout(H: int, W: int, group_size: int, interval: int, lda: bool, grouping: str, pad_type: int,
                 adaptive_interval: bool) -> GroupLayout:
    """:func:`crossformer.grouping.group_layout` with ``torch.sym_min``/``sym_max``: only
    comparisons that export can decide from the size range, no guard on ``H`` against ``W``."""
    return group_layout(H, W, group_size, interval, lda, grouping, pad_type, adaptive_interval,
                        minimum=torch.sym_min, maximum=torch.sym_max)


@register_notrace_function
@torch.fx.wrap
@kept_per_size
def relative_offsets(group_h: int, group_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All relative offsets ``(dy, dx)`` inside a ``group_h x group_w`` grid, as a float table of
    ``(2*group_h - 1) * (2*group_w - 1)`` rows (dy-major, as the official table), and for each
    (query, key) pair of the row-major members the row of its offset."""
    span_h = torch.arange(1 - group_h, group_h, device=device)
    span_w = torch.arange(1 - group_w, group_w, device=device)
    table = torch.stack(torch.meshgrid(span_h, span_w, indexing="ij"), dim=-1).reshape(-1, 2).float()
    member = torch.arange(group_h * group_w, device=device)
    rows, cols = member // group_w, member % group_w
    return table, ((rows[:, None] - rows[None, :] + group_h - 1) * (2 * group_w - 1)
                   + cols[:, None] - cols[None, :] + group_w - 1)


@register_notrace_function
@torch.fx.wrap
def group_index(H: int, W: int, layout: GroupLayout, device: torch.device) -> Tensor:
    """``(num_groups * group_h * group_w,)``: where each grouped embedding comes from in the
    flattened ``H x W`` map, ``H * W`` for padding. Groups run over regions (row-major), then over
    the ``interval**2`` offsets inside a region; members are row-major and ``interval`` apart.

    Computed element-wise from one ``arange`` (no tensor whose size may be 1, no view of a padded
    size), so that export reasons about it without guards on the input size."""
    group_h, group_w, interval, top, bottom, left, right = layout
    members = group_h * group_w
    region_rows = (top + H + bottom) // (group_h * interval)
    regions_per_row = (left + W + right) // (group_w * interval)
    slot = torch.arange(region_rows * regions_per_row * interval * interval * members, device=device)
    grouped, member = slot // members, slot % members
    col_offset, grouped = grouped % interval, grouped // interval
    # remainder as a difference: ONNX has no remainder by a size computed at run time
    row_major = grouped // regions_per_row
    col_region, grouped = grouped - row_major * regions_per_row, row_major
    row_offset, row_region = grouped % interval, grouped // interval
    row = row_region * group_h * interval + member // group_w * interval + row_offset - top
    col = col_region * group_w * interval + member % group_w * interval + col_offset - left
    inside = (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return (row * W + col).masked_fill(~inside, H * W)


@register_notrace_function
@torch.fx.wrap
def ungroup_index(H: int, W: int, layout: GroupLayout, device: torch.device) -> Tensor:
    """``(H, W)``: the position of each embedding in the flattened grouped tensor (inverse of
    :func:`group_index`)."""
    group_h, group_w, interval, top, bottom, left, right = layout

    def coordinates(size: int, before: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
        """(region, offset, member) of each coordinate of the padded map along one axis."""
        coord = torch.arange(size, device=device) + before
        span = group * interval
        return coord // span, coord % span % interval, coord % span // interval

    row_region, row_offset, row_member = coordinates(H, top, group_h)
    col_region, col_offset, col_member = coordinates(W, left, group_w)
    regions_per_row = (left + W + right) // (group_w * interval)
    groups = ((row_region * interval + row_offset)[:, None] * regions_per_row + col_region[None, :]) * interval \
        + col_offset[None, :]
    return groups * group_h * group_w + (row_member * group_w)[:, None] + col_member[None, :]


def group_embeddings(x: Tensor, index: Tensor, members: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, num_groups, members, C)`` by a :func:`group_index`; padding is zeros.
    A gather rather than pad + view + permute: no view of a padded size that export must reason about.
    ``index_select`` rather than indexing: its gradient is an ``index_add``, several times faster on a
    CPU than the accumulating ``index_put`` that indexing backpropagates through."""
    x = F.pad(x.flatten(1, 2), (0, 0, 0, 1))
    return x.index_select(1, index).unflatten(1, (-1, members))


def ungroup_embeddings(x: Tensor, index: Tensor) -> Tensor:
    """``(B, num_groups, members, C)`` -> ``(B, H, W, C)`` by an :func:`ungroup_index` (padding dropped)."""
    return x.flatten(1, 2).index_select(1, index.flatten()).unflatten(1, index.shape)


@register_notrace_function
@torch.fx.wrap
def padding_mask(index: Tensor, H: int, W: int, layout: GroupLayout) -> Tensor | None:
    """``(num_groups, group_h * group_w)`` booleans, True where a grouped embedding is padding; None
    when the padding is known to be zero: in eager mode at a size that needs none. Traced and
    compiled code always gets a mask, so that it holds for every size."""
    if not torch.compiler.is_compiling() and all(isinstance(pad, int) and pad == 0 for pad in layout[3:]):
        return None
    return (index == H * W).unflatten(0, (-1, layout.group_h * layout.group_w))


@register_notrace_function
@torch.fx.wrap
@kept_per_size
def grouping_tensors(H: int, W: int, layout: GroupLayout, device: torch.device,
                     masked: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(:func:`group_index`, :func:`padding_mask` or None unless ``masked``, :func:`ungroup_index`)
    of a block for an ``H x W`` map."""
    index = group_index(H, W, layout, device)
    return index, padding_mask(index, H, W, layout) if masked else None, ungroup_index(H, W, layout, device)


def unpack3(triple: tuple) -> tuple:
    """The three items of a tuple, also when FX traces it as one value (unpacking it would iterate)."""
    return triple[0], triple[1], triple[2]


@register_notrace_function
@torch.fx.wrap
def attention_mask(bias: Tensor | None, padded_keys: Tensor | None, batch: int) -> Tensor | None:
    """Additive mask for ``scaled_dot_product_attention`` over ``(batch * num_groups)`` groups: the
    ``(heads, N, N)`` position bias (None without one: USE_CPE), and padded keys (``padded_keys``:
    ``(num_groups, N)``, True where padded) pushed to ``PADDED_KEY_SCORE``; None when there is neither."""
    if padded_keys is None:
        return None if bias is None else bias.unsqueeze(0)
    if bias is None:
        keys = padded_keys.shape[-1]
        bias = torch.zeros(1, keys, keys, device=padded_keys.device)
    mask = bias.unsqueeze(0).masked_fill(padded_keys[:, None, None, :], PADDED_KEY_SCORE)
    # repeat, not expand + flatten: that reshape is a view only for a single group, a guard that
    # would make torch.compile build another graph when the group count changes
    return mask.repeat(batch, 1, 1, 1)


class DynamicPosBias(nn.Module):
    """DPB: an MLP mapping a relative offset ``(dy, dx)`` to one attention bias per head."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_dim = dim // 4
        self.num_heads = num_heads
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = self._layer(self.pos_dim)
        self.pos2 = self._layer(self.pos_dim)
        self.pos3 = self._layer(num_heads)

    def _layer(self, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True), nn.Linear(self.pos_dim, out_dim))

    def forward(self, offsets: Tensor) -> Tensor:
        """``(..., 2)`` offsets -> ``(..., num_heads)`` biases."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class RowConvPositionEncoding(nn.Conv2d):
    """CrossFormer++'s convolutional position encoding (USE_CPE), computed as the official code
    computes it: ``(B, H, W, C)`` -> same shape.

    That code builds a depthwise 3x3 convolution with one channel per *row* of the stage's map at
    the configured image size, and applies it to the channels-last ``(B, H, W, C)`` map as if it
    were ``(N, C, H, W)``: each row is convolved over its (column, channel) plane with a kernel of
    its own. It is kept that way so the official weights and results carry over. At another map
    height the per-row kernels and biases are linearly interpolated along the rows.
    """

    def __init__(self, height: int):
        super().__init__(height, height, kernel_size=3, padding=1, groups=height)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[1]
        weight, bias = self.weight, self.bias
        if rows != self.in_channels:
            weight = F.interpolate(weight.reshape(1, self.in_channels, 9).transpose(1, 2), size=rows,
                                   mode="linear", align_corners=False).transpose(1, 2).reshape(rows, 1, 3, 3)
            bias = F.interpolate(bias.view(1, 1, -1), size=rows, mode="linear", align_corners=False).view(rows)
        return F.conv2d(x, weight, bias, padding=1, groups=rows)


class Attention(nn.Module):
    """Multi-head self-attention inside groups, with a dynamic position bias (unless
    ``position_bias`` is False: CrossFormer++ with CPE has none)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, position_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads) if position_bias else None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._kept_bias: tuple[tuple, Tensor] | None = None  # see position_bias
        self._register_load_state_dict_pre_hook(self._drop_derivable_buffers)

    @staticmethod
    def _drop_derivable_buffers(state_dict: dict, prefix: str, *args) -> None:
        # Checkpoints of the ICLR code store the DPB index tables; here they are derived.
        for name in ("biases", "relative_position_index"):
            state_dict.pop(prefix + name, None)

    def position_bias(self, group: tuple[int, int]) -> Tensor:
        """``(num_heads, N, N)`` bias of a ``group = (Gh, Gw)`` group of ``N = Gh * Gw`` embeddings,
        from one DPB pass over all offsets.

        Without gradients (eval under ``no_grad`` / ``inference_mode``) the bias is kept and reused
        until the group shape, the DPB's dtype or device, the autocast dtype, or its weights change:
        an in-place change (optimizer step, ``load_state_dict``, EMA update) bumps the weights'
        version counters. An edit through ``.data`` bypasses them: call ``model.train()`` or
        ``model.eval()`` afterwards to drop the bias."""
        weight = self.qkv.weight
        if torch.is_grad_enabled() or self.training or torch.compiler.is_compiling():
            return self._position_bias(group)
        device_type = weight.device.type
        autocast = (torch.get_autocast_dtype(device_type) if torch.amp.is_autocast_available(device_type)
                    and torch.is_autocast_enabled(device_type) else None)
        key = (group, weight.dtype, weight.device, autocast, tuple(p._version for p in self.pos.parameters()))
        if self._kept_bias is None or self._kept_bias[0] != key:
            # a normal tensor (usable after inference mode ends) that needs no gradient
            with torch.inference_mode(False), torch.no_grad():
                self._kept_bias = (key, self._position_bias(group))
        return self._kept_bias[1]

    def _position_bias(self, group: tuple[int, int]) -> Tensor:
        table, index = relative_offsets(group[0], group[1], self.qkv.weight.device)
        return self.pos(table.to(self.qkv.weight.dtype))[index].permute(2, 0, 1)

    def train(self, mode: bool = True) -> Attention:
        self._kept_bias = None
        return super().train(mode)

    def forward(self, x: Tensor, group: tuple[int, int], padded_keys: Tensor | None = None) -> Tensor:
        """``x``: ``(B, num_groups, N, C)``, groups of ``group = (Gh, Gw)``, ``N = Gh * Gw`` -> same shape."""
        B, num_groups, N, C = x.shape
        qkv = self.qkv(x).view(B * num_groups, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.position_bias(group) if self.pos is not None else None
        mask = attention_mask(bias, padded_keys, B)
        mask = mask.to(q.dtype) if mask is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2)
        if torch.compiler.is_compiling():  # export, compile: the attention output's layout differs
            # between kernels (and between export and its decompositions), so copy explicitly
            # rather than let reshape pick a view that is wrong for another kernel
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.reshape(B, num_groups, N, C)
        return self.proj_drop(self.proj(x))


class CrossFormerBlock(nn.Module):
    """Norm -> group -> attend -> ungroup -> residual -> MLP residual [-> activation cooling]."""

    def __init__(self, dim: int, num_heads: int, group_size: int, interval: int, use_lda: bool,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pad_type: int = 0, no_mask: bool = False, use_acl: bool = False,
                 adaptive_interval: bool = False, cpe_height: int | None = None, grouping: str = "crossformer_pp"):
        """``adaptive_interval``: LDA uses the interval ``ceil(max(H, W) / G)`` of the map it gets
        instead of ``interval``. ``cpe_height``: use CrossFormer++'s CPE instead of the DPB, built
        for a map of this height (the stage's height at the configured image size). ``grouping``:
        the layout of a map of any size, ``crossformer`` or ``crossformer_pp`` (see :meth:`layout`)."""
        super().__init__()
        if grouping not in ("crossformer", "crossformer_pp"):
            raise ValueError(f"grouping must be 'crossformer' or 'crossformer_pp', got {grouping!r}")
        self.grouping = grouping
        self.group_size = group_size
        self.interval = interval
        self.use_lda = use_lda
        self.adaptive_interval = adaptive_interval
        self.pad_type = pad_type
        self.no_mask = no_mask
        self.norm1 = nn.LayerNorm(dim)
        self.cpe = RowConvPositionEncoding(cpe_height) if cpe_height else None
        self.norm_cpe = nn.LayerNorm(dim) if cpe_height else None
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, position_bias=not cpe_height)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.use_acl = use_acl
        if use_acl:  # activation cooling layer
            self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = nn.LayerNorm(dim)

    def layout(self, H: int, W: int) -> GroupLayout:
        """How this block groups and pads an ``H x W`` map (group shape, interval, padding), decided
        per call by :func:`crossformer.grouping.group_layout` without changing the block's state."""
        return block_layout(H, W, self.group_size, self.interval, self.use_lda, self.grouping, self.pad_type,
                            self.adaptive_interval)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> same shape."""
        B, H, W, C = x.shape
        layout = self.layout(H, W)
        index, padding, inverse = unpack3(grouping_tensors(H, W, layout, x.device, not self.no_mask))
        normed = self.norm1(x)
        if self.cpe is not None:
            normed = normed + self.norm_cpe(self.cpe(normed))
        group = (layout.group_h, layout.group_w)
        grouped = self.attn(group_embeddings(normed, index, group[0] * group[1]), group, padding)
        x = x + self.drop_path(ungroup_embeddings(grouped, inverse))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_acl:
            x = self.ex_ln(self.ex_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x

    def flops(self, H: int, W: int) -> int:
        """Multiply-accumulates for an ``H x W`` map, counted like the official code: the unpadded
        map as ``H*W / N`` groups of the layout's ``N`` embeddings, and the DPB MLP once per query
        embedding; plus activation cooling and CPE, which it leaves out."""
        dim = self.norm1.normalized_shape[0]
        layout = self.layout(H, W)
        tokens = layout.group_h * layout.group_w
        per_token = 4 * dim * dim + 2 * tokens * dim
        if self.attn.pos is not None:
            pos_dim, heads = self.attn.pos.pos_dim, self.attn.num_heads
            per_token += 2 * pos_dim + 2 * pos_dim * pos_dim + pos_dim * heads
        flops = 2 * dim * H * W + H * W * per_token + 2 * H * W * dim * self.mlp.fc1.out_features
        if self.use_acl:
            flops += H * W * dim * 9 + H * W * dim
        if self.cpe is not None:
            flops += H * W * dim * 9 + H * W * dim
        return flops


class Stage(nn.Module):
    """Blocks alternating SDA and LDA, then an optional cross-scale patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, group_sizes: Sequence[int], interval: int,
                 mlp_ratio: float, qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float,
                 drop_path: Sequence[float], merge_size: Sequence[int] | None, pad_type: int,
                 no_mask: bool, use_acl: bool, adaptive_interval: bool = False, cpe_height: int | None = None,
                 grouping: str = "crossformer_pp"):
        """``group_sizes``: one per block."""
        super().__init__()
        self.blocks = nn.ModuleList(
            CrossFormerBlock(dim, num_heads, group_sizes[i], interval, use_lda=i % 2 == 1, mlp_ratio=mlp_ratio,
                             qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                             drop_path=drop_path[i], pad_type=pad_type, no_mask=no_mask,
                             use_acl=use_acl and (i + 1) % 3 == 0 and i < depth - 1,
                             adaptive_interval=adaptive_interval, cpe_height=cpe_height, grouping=grouping)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim, merge_size) if merge_size else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")


class CrossFormer(nn.Module):
    """CrossFormer / CrossFormer++ classifier; any input size at run time (``img_size`` only sets
    the size for :meth:`flops` and the absolute position embedding)."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: Sequence[int] = (4, 8, 16, 32),
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 group_size: Sequence[int] = (7, 7, 7, 7), interval: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratio: float | Sequence[float] = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False,
                 merge_size: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4)),
                 group_type: str = "constant", use_acl: bool = False, pad_type: int = 0,
                 no_mask: bool = False, adaptive_interval: bool = False, use_cpe: bool = False,
                 global_pool: str = "avg", grouping: str = "auto"):
        """``group_type``, ``adaptive_interval``, ``use_cpe``: the CrossFormer++ options (see
        :func:`block_group_sizes`, :class:`CrossFormerBlock`, :class:`RowConvPositionEncoding`);
        group sizes and CPE are set for ``img_size``, intervals follow the map at run time.
        ``grouping``: the layout at sizes other than the configured square one (detection,
        segmentation): ``crossformer`` (the ICLR backbone's), ``crossformer_pp`` (the CrossFormer++
        backbone's) or ``auto``, which follows the family: ``crossformer`` unless ``use_acl``."""
        super().__init__()
        num_stages = len(depths)
        for name, values in (("num_heads", num_heads), ("group_size", group_size), ("interval", interval)):
            if len(values) != num_stages:
                raise ValueError(f"{name} needs one value per stage ({num_stages}), got {list(values)}")
        if len(merge_size) != num_stages - 1:
            raise ValueError(f"merge_size needs {num_stages - 1} kernel lists, got {list(merge_size)}")
        if pad_type not in (0, 1):
            raise ValueError(f"pad_type must be 0 or 1, got {pad_type}")
        _check_global_pool(global_pool)
        mlp_ratios = [mlp_ratio] * num_stages if isinstance(mlp_ratio, (int, float)) else list(mlp_ratio)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grouping = resolve_grouping(grouping, use_acl)
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.output_fmt = "NHWC"  # of forward_features; forward_intermediates gives NCHW
        self.feature_info = [dict(num_chs=embed_dim * 2 ** i, reduction=patch_size[0] * 2 ** i, module=f"layers.{i}")
                             for i in range(num_stages)]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.absolute_pos_embed = None
        if ape:  # learned for the configured size; resized for others
            self.pos_embed_grid = tuple(conv_output_size(s, patch_size, patch_size[0]) for s in self.img_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_embed_grid), embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under meta
        # The official code counts the first stage's resolution as image height // patch stride.
        resolution = self.img_size[0] // patch_size[0]
        self.group_sizes = block_group_sizes(group_type, group_size, depths, resolution)
        self.layers = nn.ModuleList(
            Stage(embed_dim * 2 ** i, depths[i], num_heads[i], self.group_sizes[i], interval[i], mlp_ratios[i],
                  qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_paths[sum(depths[:i]):sum(depths[:i + 1])],
                  merge_size[i] if i < num_stages - 1 else None, pad_type, no_mask, use_acl,
                  adaptive_interval, cpe_height=resolution // 2 ** i if use_cpe else None, grouping=self.grouping)
            for i in range(num_stages)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ sizes
    def stage_sizes(self, H: int, W: int) -> list[tuple[int, int]]:
        """Map size ``(h, w)`` of every stage for an ``H x W`` input; ValueError if too small."""
        return checked_stage_sizes(H, W, *self._kernel_sizes())

    def _kernel_sizes(self) -> tuple[list[int], list[list[int]]]:
        """Kernel sizes of the patch embedding and of each patch merging."""
        return self.patch_embed.patch_size, [layer.downsample.kernel_sizes for layer in self.layers[:-1]]

    # ------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("CrossFormer cannot be traced by torch.jit.trace (nor exported by the TorchScript-based "
                               "torch.onnx.export): the trace would freeze the padding and grouping of the traced "
                               "size and give wrong outputs at other sizes. Use torch.export.export or "
                               "torch.onnx.export(..., dynamo=True)")
        check_input_size(x, *self._kernel_sizes())
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + resized_pos_embed(self.absolute_pos_embed, self.pos_embed_grid, x.shape[1], x.shape[2])
        return self.pos_drop(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` image -> ``(B, h, w, num_features)`` normalised last-stage map."""
        x = self._embed(x)
        for layer in self.layers:
            x = layer.forward_blocks(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.norm(x)

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature interface: the output of the stages in ``indices`` (the last n for an
        int, all for None) as NCHW maps at strides 4, 8, 16, 32, taken before the stage's patch
        merging. ``norm`` applies the final norm to the last stage's map. Returns the maps, or
        ``(final features, maps)`` unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        x = self._embed(x)
        intermediates = []
        last = len(self.layers) - 1
        for i, layer in enumerate(layers):
            x = layer.forward_blocks(x)
            if i in take_indices:
                feature = self.norm(x) if norm and i == last else x
                intermediates.append(feature.permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None and (i < max_index or not stop_early):
                x = layer.downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``(B, h, w, C)`` features -> logits; ``pre_logits``: the pooled features. Without global
        pooling (``global_pool=''``) the map stays unpooled."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups from input to output, for timm's layer-wise LR decay: the patch
        embedding, each stage (or each block and merging layer), the final norm."""
        if coarse:
            return dict(stem=r"^patch_embed|^absolute_pos_embed", blocks=r"^layers\.(\d+)")
        return dict(stem=r"^patch_embed|^absolute_pos_embed",
                    blocks=[(r"^layers\.(\d+)\.blocks\.(\d+)", None),
                            (r"^layers\.(\d+)\.downsample", (99998,)),
                            (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New (randomly initialised) head for ``num_classes`` (0: none); ``global_pool``: 'avg' or ''."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages (and norm, head) that the maps of ``indices`` do not need; returns the
        kept indices, as :meth:`forward_intermediates` takes them."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        if max_index < len(self.layers) - 1:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_norm = prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def flops(self, img_size: int | Sequence[int] | None = None) -> int:
        """Multiply-accumulates of one image at ``img_size`` (default: the configured size),
        counted as the official code counts them, plus the activation-cooling layers it omits."""
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or self.img_size)
        sizes = self.stage_sizes(H, W)
        h, w = sizes[0]
        embed = self.patch_embed
        embed_dim = sum(p.out_channels for p in embed.projs)
        flops = sum(h * w * p.out_channels * p.in_channels * p.kernel_size[0] * p.kernel_size[1] for p in embed.projs)
        flops += h * w * embed_dim if embed.norm is not None else 0
        for layer, (h, w) in zip(self.layers, sizes):
            flops += sum(block.flops(h, w) for block in layer.blocks)
            if layer.downsample is not None:
                merge = layer.downsample
                flops += h * w * merge.norm.normalized_shape[0]
                flops += sum((h // 2) * (w // 2) * r.kernel_size[0] * r.kernel_size[1] * r.out_channels * r.in_channels
                             for r in merge.reductions)
        flops += self.num_features * sizes[0][0] * sizes[0][1] // 2 ** len(self.layers)
        flops += self.num_features * self.num_classes
        return int(flops)
