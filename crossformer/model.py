"""CrossFormer (ICLR 2022) and CrossFormer++ (TPAMI) in one model class.

The classes take the authors' constructor arguments and forward on their tensor layouts:
embeddings travel as tokens ``(B, H*W, C)`` with the map size ``(H, W)`` beside them. What is
added here comes in addition: any input size at run time (``H, W`` arguments where the authors'
modules had a fixed ``input_resolution``), both official grouping layouts, timm's interface.

Map of this file: the public classes :class:`CrossFormer`, :class:`Stage`,
:class:`CrossFormerBlock`, :class:`Attention`, :class:`DynamicPosBias`, :class:`Mlp`,
:class:`PatchEmbed`, :class:`PatchMerging`, :class:`RowConvPositionEncoding`; then the helpers: the
per-module store of tensors kept between eager calls, sizes, grouping (index tables that gather
the groups of a map and scatter them back), attention masks. What holds for the Flax port as well
(layouts, index tables, DPB offsets, sizes, argument checks) is written once, without PyTorch, in
:mod:`crossformer.grouping` and :mod:`crossformer.shapes`; the helpers here put it on a device and
make it traceable.

A block groups its map, attends inside each group with a dynamic position bias, and puts the
groups back: SDA groups adjacent embeddings, LDA embeddings ``I`` apart. How a map of any size is
grouped and padded is the layout of :func:`crossformer.grouping.group_layout` (``grouping``: the
ICLR backbone's ``crossformer`` or the CrossFormer++ backbone's ``crossformer_pp``); padded
embeddings are masked out as keys and cut off afterwards. At the configured image size this
reproduces the official models exactly.

Tracing and export: the tensors derived from the input size (grouping layout and indices, DPB
offsets, padding masks) come from small functions that are leaves for FX (``torch.fx.wrap`` and
timm's ``register_notrace_function``), so ``symbolic_trace`` and feature extractors evaluate them at
call time, and plain Python on symbolic sizes for ``torch.export`` / ``torch.compile``: an export
with dynamic height and width follows the padding at every size and guards the few choices that
depend on the size (a map no larger than a group). Eager calls keep them on the module between
calls of the same size (and the DPB bias, in evaluation without gradients, per weights).
``torch.jit.trace`` and the TorchScript-based ONNX exporter would freeze those choices silently,
so they are refused.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence, TypeVar

import timm.layers
import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crossformer import grouping as plain_grouping
from crossformer.grouping import PADDED_KEY_SCORE, GroupLayout, block_group_sizes, group_layout, resolve_grouping
from crossformer.official import drop_derivable_buffers
from crossformer.shapes import checked_stage_sizes, conv_output_size, cross_scale_channels, stage_arguments

# The authors' default LDA intervals; a module constant so that an explicit crs_interval can be
# told apart from the default (see CrossFormer's ``interval``).
_CRS_INTERVAL = (8, 4, 2, 1)

T = TypeVar("T")


class CrossFormer(nn.Module):
    """CrossFormer / CrossFormer++ classifier with the authors' constructor arguments and class
    defaults (those of the CrossFormer++ code; ``configs/`` give the papers' models). Any input
    size at run time: ``img_size`` only sets the size for :meth:`flops`, for the absolute position
    embedding and for the per-block group sizes of GROUP_TYPE and the CPE.

    The authors' arguments: ``group_size`` one G per stage (an int: the same for every stage),
    ``crs_interval`` the LDA interval per stage, ``merge_size`` the kernels of each patch merging,
    ``use_cpe``, ``group_type``, ``pad_type``, ``no_mask``, ``adaptive_interval``, ``use_acl``
    (CrossFormer++: see :func:`block_group_sizes`, :class:`CrossFormerBlock`).

    Added: ``interval``, a synonym of ``crs_interval`` (give one of them); ``grouping``, the layout
    at sizes other than the configured square one: ``crossformer`` (the ICLR backbone's),
    ``crossformer_pp`` (the CrossFormer++ backbone's) or ``auto``, which follows the family:
    ``crossformer`` unless ``use_acl``; ``global_pool`` ('avg' or '' for none).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: Sequence[int] = (4,), in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), group_size: int | Sequence[int] = (7, 7, 7, 7),
                 crs_interval: Sequence[int] = _CRS_INTERVAL, mlp_ratio: float | Sequence[float] = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False, merge_size: Sequence[Sequence[int]] = ((2,), (2,), (2,)),
                 use_cpe: bool = False, group_type: str = "constant", pad_type: int = 0, no_mask: bool = False,
                 adaptive_interval: bool = False, use_acl: bool = False, *, interval: Sequence[int] | None = None,
                 grouping: str = "auto", global_pool: str = "avg"):
        super().__init__()
        if interval is not None:
            if crs_interval is not _CRS_INTERVAL:
                raise ValueError("give the LDA intervals once: crs_interval (the authors' name) or interval")
            crs_interval = interval
        num_stages = len(depths)
        group_size, mlp_ratios = stage_arguments(depths, num_heads, group_size, crs_interval, mlp_ratio, merge_size,
                                                 pad_type, interval_name="crs_interval")
        _check_global_pool(global_pool)
        self.img_size = tuple(to_2tuple(img_size))
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grouping = resolve_grouping(grouping, use_acl)
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.output_fmt = "NHWC"  # of forward_features; forward_intermediates gives NCHW
        self.feature_info = [dict(num_chs=embed_dim * 2 ** i, reduction=patch_size[0] * 2 ** i, module=f"layers.{i}")
                             for i in range(num_stages)]

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim,
                                      norm_layer if patch_norm else None)
        self.absolute_pos_embed = None
        if ape:  # learned for the configured size; resized for others
            self.pos_embed_grid = self.patch_embed.output_size(*self.img_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_embed_grid), embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also under meta
        # The official code counts the first stage's resolution as image height // patch stride.
        resolution = self.img_size[0] // patch_size[0]
        self.group_sizes = block_group_sizes(group_type, group_size, depths, resolution)
        kernel_counts = [len(patch_size)] + [len(kernels) for kernels in merge_size]
        self.layers = nn.ModuleList(
            Stage(embed_dim * 2 ** i, (resolution // 2 ** i, self.img_size[1] // patch_size[0] // 2 ** i), depths[i],
                  num_heads[i], self.group_sizes[i], crs_interval[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate,
                  attn_drop_rate, drop_paths[sum(depths[:i]):sum(depths[:i + 1])], norm_layer,
                  PatchMerging if i < num_stages - 1 else None, use_checkpoint,
                  merge_size[i] if i < num_stages - 1 else None, kernel_counts[i], use_cpe, pad_type, no_mask,
                  adaptive_interval, use_acl, grouping=self.grouping)
            for i in range(num_stages)
        )
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

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
        return self.patch_embed.patch_size, [layer.downsample.patch_size for layer in self.layers[:-1]]

    # ------------------------------------------------------------------ forward
    def _embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Image -> (tokens, H, W) of the first stage."""
        if torch.jit.is_tracing():
            raise RuntimeError("CrossFormer cannot be traced by torch.jit.trace (nor exported by the TorchScript-based "
                               "torch.onnx.export): the trace would freeze the padding and grouping of the traced "
                               "size and give wrong outputs at other sizes. Use torch.export.export or "
                               "torch.onnx.export(..., dynamo=True)")
        check_input_size(x, *self._kernel_sizes())
        H, W = self.patch_embed.output_size(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = x + resized_pos_embed(self.absolute_pos_embed, self.pos_embed_grid, H, W)
        return self.pos_drop(x), H, W

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` image -> ``(B, h, w, num_features)`` normalised last-stage map (timm's
        unpooled features; the authors' ``forward_features`` pooled them)."""
        x, H, W = self._embed(x)
        for layer in self.layers:
            x = layer.forward_blocks(x, H, W)
            if layer.downsample is not None:
                x = layer.downsample(x, H, W)
                H, W = layer.downsample.output_size(H, W)
        x = self.norm(x)
        return x.reshape(x.shape[0], H, W, x.shape[-1])

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature interface: the output of the stages in ``indices`` (the last n for an
        int, all for None) as NCHW maps at strides 4, 8, 16, 32, taken before the stage's patch
        merging. ``norm`` applies the final norm to the last stage's map. Returns the maps, or
        ``(final NHWC features, maps)`` unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        layers = self.layers[:max_index + 1] if stop_early else self.layers
        x, H, W = self._embed(x)
        intermediates = []
        last = len(self.layers) - 1
        for i, layer in enumerate(layers):
            x = layer.forward_blocks(x, H, W)
            if i in take_indices:
                feature = self.norm(x) if norm and i == last else x
                intermediates.append(feature.reshape(x.shape[0], H, W, x.shape[-1]).permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None and (i < max_index or not stop_early):
                x = layer.downsample(x, H, W)
                H, W = layer.downsample.output_size(H, W)
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x.reshape(x.shape[0], H, W, x.shape[-1]), intermediates

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
            layer.use_checkpoint = enable

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
        counted as the official code counts them, plus the activation-cooling layers and CPE it
        omits."""
        H, W = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or self.img_size)
        sizes = self.stage_sizes(H, W)
        flops = self.patch_embed.flops(H, W)
        flops += sum(layer.flops(h, w) for layer, (h, w) in zip(self.layers, sizes))
        # the head: the official code counts the pooling over the configured square's last map
        flops += self.num_features * sizes[0][0] * sizes[0][1] // 2 ** len(self.layers)
        return int(flops + self.num_features * self.num_classes)


class Stage(nn.Module):
    """The blocks of one stage (SDA and LDA alternating), then an optional cross-scale patch
    merging; the authors' arguments. ``group_size``: one G, or one per block (GROUP_TYPE);
    ``interval``: the LDA interval, by default the ICLR classification code's
    ``input_resolution[0] // G``; ``use_acl``: activation cooling after every third block but the
    last. ``forward(x, H, W)``: tokens ``(B, H*W, C)`` -> the merged tokens (or the blocks' output
    when there is no merging); ``H, W`` default to ``input_resolution``."""

    def __init__(self, dim: int, input_resolution: Sequence[int], depth: int, num_heads: int,
                 group_size: int | Sequence[int], interval: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float | Sequence[float] = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 downsample: type[PatchMerging] | None = None, use_checkpoint: bool = False,
                 patch_size_end: Sequence[int] | None = (4,), num_patch_size: int | None = None,
                 use_cpe: bool = False, pad_type: int = 0, no_mask: bool = False, adaptive_interval: bool = False,
                 use_acl: bool = False, *, grouping: str = "crossformer_pp"):
        super().__init__()
        group_sizes = [group_size] * depth if isinstance(group_size, int) else list(group_size)
        if interval is None:
            interval = input_resolution[0] // group_sizes[0]
        drop_paths = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            CrossFormerBlock(dim, input_resolution, num_heads, group_sizes[i], interval, lsda_flag=i % 2,
                             mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                             attn_drop=attn_drop, drop_path=drop_paths[i], norm_layer=norm_layer,
                             num_patch_size=num_patch_size, pad_type=pad_type,
                             use_extra_conv=use_acl and (i + 1) % 3 == 0 and i < depth - 1, use_cpe=use_cpe,
                             no_mask=no_mask, adaptive_interval=adaptive_interval, grouping=grouping)
            for i in range(depth)
        )
        self.downsample = None
        if downsample is not None:
            self.downsample = downsample(input_resolution, dim=dim, norm_layer=norm_layer, patch_size=patch_size_end,
                                         num_input_patch_size=num_patch_size)

    def forward_blocks(self, x: Tensor, H: int, W: int) -> Tensor:
        """The blocks alone: tokens of an ``H x W`` map -> same shape."""
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, H, W, use_reentrant=False)
            else:
                x = block(x, H, W)
        return x

    def forward(self, x: Tensor, H: int | None = None, W: int | None = None) -> Tensor:
        if H is None:
            H, W = self.input_resolution
        x = self.forward_blocks(x, H, W)
        return self.downsample(x, H, W) if self.downsample is not None else x

    def flops(self, H: int | None = None, W: int | None = None) -> int:
        """Multiply-accumulates for an ``H x W`` map (default ``input_resolution``)."""
        if H is None:
            H, W = self.input_resolution
        flops = sum(block.flops(H, W) for block in self.blocks)
        return flops + (self.downsample.flops(H, W) if self.downsample is not None else 0)


class CrossFormerBlock(nn.Module):
    """Norm -> group -> attend -> ungroup -> residual -> MLP residual [-> activation cooling],
    with the authors' arguments: ``lsda_flag`` 0 for SDA, 1 for LDA with ``interval``;
    CrossFormer++'s ``pad_type`` (1: split the padding), ``use_extra_conv`` (the activation-cooling
    layer), ``use_cpe`` (its convolutional position encoding instead of the DPB, built for
    ``input_resolution[0]`` rows), ``no_mask`` (padded keys are not masked), ``adaptive_interval``
    (LDA uses ``ceil(max(H, W) / G)``). ``num_patch_size`` is accepted and unused, as there.

    ``forward(x, H, W)``: tokens ``(B, H*W, C)`` -> same shape, for any ``H, W`` (default
    ``input_resolution``). The group layout is decided per call (:meth:`layout`, by ``grouping``),
    without changing the block's state."""

    def __init__(self, dim: int, input_resolution: Sequence[int], num_heads: int, group_size: int = 7,
                 interval: int = 8, lsda_flag: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 num_patch_size: int | None = 1, pad_type: int = 0, use_extra_conv: bool = True,
                 use_cpe: bool = False, no_mask: bool = False, adaptive_interval: bool = False, *,
                 grouping: str = "crossformer_pp"):
        super().__init__()
        if grouping not in ("crossformer", "crossformer_pp"):
            raise ValueError(f"grouping must be 'crossformer' or 'crossformer_pp', got {grouping!r}")
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.group_size = group_size
        self.interval = interval
        self.lsda_flag = lsda_flag
        self.mlp_ratio = mlp_ratio
        self.num_patch_size = num_patch_size
        self.pad_type = pad_type
        self.use_extra_conv = use_extra_conv
        self.use_cpe = use_cpe
        self.no_mask = no_mask
        self.adaptive_interval = adaptive_interval
        self.grouping = grouping
        self.norm1 = norm_layer(dim)
        self.cpe = RowConvPositionEncoding(self.input_resolution[0]) if use_cpe else None
        self.norm_cpe = norm_layer(dim) if use_cpe else None
        self.attn = Attention(dim, (group_size, group_size), num_heads, qkv_bias, qk_scale, attn_drop, drop,
                              position_bias=not use_cpe)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        if use_extra_conv:  # activation cooling layer
            self.ex_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.ex_ln = norm_layer(dim)
        self._kept_grouping: tuple | None = None  # see kept_on_module

    def layout(self, H: int, W: int) -> GroupLayout:
        """How this block groups and pads an ``H x W`` map (group shape, interval, padding)."""
        return block_layout(H, W, self.group_size, self.interval, self.lsda_flag == 1, self.grouping,
                            self.pad_type, self.adaptive_interval)

    def forward(self, x: Tensor, H: int | None = None, W: int | None = None) -> Tensor:
        if H is None:
            H, W = self.input_resolution
        B, L, C = x.shape
        layout = self.layout(H, W)
        index, padded_keys, inverse = self._grouping_tensors(x, H, W, layout)
        shortcut = x
        x = self.norm1(x)
        if self.cpe is not None:
            x = x + self.norm_cpe(self.cpe(x.reshape(B, H, W, C)).reshape(B, L, C))
        members = layout.group_h * layout.group_w
        x = self.attn(group_embeddings(x, index, members), group_size=(layout.group_h, layout.group_w),
                      padded_keys=padded_keys)
        x = shortcut + self.drop_path(ungroup_embeddings(x, inverse, B))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if self.use_extra_conv:
            x = self.ex_ln(self.ex_conv(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
        return x

    def _grouping_tensors(self, x: Tensor, H: int, W: int, layout: GroupLayout) -> tuple[Tensor, Tensor | None, Tensor]:
        """(group index, padded-key mask or None, ungroup index) of an ``H x W`` map, kept on the
        block between eager calls of the same size."""
        masked = not self.no_mask
        if not is_eager(x):
            return unpack3(grouping_tensors(H, W, layout, x.device, masked))
        return kept_on_module(self, "_kept_grouping", (H, W, layout, x.device, masked),
                              lambda: grouping_tensors(H, W, layout, x.device, masked))

    def flops(self, H: int | None = None, W: int | None = None) -> int:
        """Multiply-accumulates for an ``H x W`` map (default ``input_resolution``), counted like the
        official code: the unpadded map as ``H*W / N`` groups of the layout's ``N`` embeddings, and
        the DPB MLP once per query embedding; plus activation cooling and CPE, which it leaves out."""
        if H is None:
            H, W = self.input_resolution
        layout = self.layout(H, W)
        members = layout.group_h * layout.group_w
        flops = 2 * self.dim * H * W + H * W * (self.attn.flops(members) // members)  # norms, attention
        flops += 2 * H * W * self.dim * self.mlp.fc1.out_features
        if self.use_extra_conv:  # depthwise 3x3 convolution and LayerNorm
            flops += 10 * H * W * self.dim
        if self.cpe is not None:
            flops += 10 * H * W * self.dim
        return flops


class Attention(nn.Module):
    """Multi-head self-attention inside groups of ``group_size = (Gh, Gw)`` embeddings, with a
    dynamic position bias (unless ``position_bias`` is False: CrossFormer++ with CPE has none);
    the authors' arguments.

    ``forward(x, mask)``: ``x`` is ``(num_groups * B, N, C)`` with ``N = Gh * Gw`` (group ``g`` of
    image ``b`` at row ``b * num_groups + g``), ``mask`` an additive ``(num_groups, N, N)`` mask
    (0 or a large negative number) or None, as in the authors' code. Added keywords: another
    ``group_size`` for this call, and ``padded_keys``, ``(num_groups, N)`` booleans, True for
    padding, which get no attention weight. Runs through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, group_size: int | Sequence[int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 position_bias: bool = True):
        super().__init__()
        self.dim = dim
        self.group_size = tuple(to_2tuple(group_size))
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        # The official code passes dim // 4 here and DynamicPosBias divides by 4 again: the DPB
        # MLP is dim // 16 wide.
        self.pos = DynamicPosBias(dim // 4, num_heads, residual=False) if position_bias else None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._kept_bias: tuple | None = None  # see position_bias
        self._register_load_state_dict_pre_hook(self._drop_derivable_buffers)

    @staticmethod
    def _drop_derivable_buffers(state_dict: dict, prefix: str, *_) -> None:
        """Checkpoints of the ICLR code store the DPB index tables; here they are derived."""
        drop_derivable_buffers(state_dict, prefix)

    def position_bias(self, group_size: Sequence[int]) -> Tensor:
        """``(num_heads, N, N)`` bias of a ``Gh x Gw`` group, from one DPB pass over all offsets.

        Without gradients (eval under ``no_grad`` / ``inference_mode``) the bias is kept and reused
        while the group shape, the autocast dtype and the DPB's parameters (storage, version,
        dtype, device) stay the same: an in-place change (optimizer step, ``load_state_dict``, EMA
        update) bumps their version counters. An edit through ``.data`` bypasses them: call
        ``model.train()`` or ``model.eval()`` afterwards to drop the bias."""
        if torch.is_grad_enabled() or self.training:
            return self.compute_position_bias(group_size)
        params = list(self.pos.parameters())
        device_type = params[0].device.type
        autocast = (torch.get_autocast_dtype(device_type) if torch.amp.is_autocast_available(device_type)
                    and torch.is_autocast_enabled(device_type) else None)
        key = (tuple(group_size), autocast, tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        return kept_on_module(self, "_kept_bias", key, lambda: self.compute_position_bias(group_size))

    def compute_position_bias(self, group_size: Sequence[int]) -> Tensor:
        """:meth:`position_bias`, computed (in the graph, when traced or compiled)."""
        weight = self.pos.pos_proj.weight
        table, index = relative_offsets(group_size[0], group_size[1], weight.device)
        return self.pos(table.to(weight.dtype))[index].permute(2, 0, 1)

    def train(self, mode: bool = True) -> Attention:
        self._kept_bias = None
        return super().train(mode)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, group_size: Sequence[int] | None = None,
                padded_keys: Tensor | None = None) -> Tensor:
        rows, N, C = x.shape
        qkv = self.qkv(x).view(rows, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if self.pos is not None:
            group_size = self.group_size if group_size is None else group_size
            bias = self.position_bias(group_size) if is_eager(x) else self.compute_position_bias(group_size)
        mask = attention_mask(bias, mask, padded_keys, rows)
        mask = mask.to(q.dtype) if mask is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2)
        if torch.compiler.is_compiling():  # export, compile: the attention output's layout differs
            # between kernels (and between export and its decompositions), so copy explicitly
            # rather than let reshape pick a view that is wrong for another kernel
            x = x.clone(memory_format=torch.contiguous_format)
        return self.proj_drop(self.proj(x.reshape(rows, N, C)))

    def flops(self, N: int) -> int:
        """Multiply-accumulates of one group of ``N`` embeddings, as the official code counts them
        (the DPB MLP counted for ``N`` offsets)."""
        flops = 4 * N * self.dim * self.dim + 2 * self.num_heads * N * (self.dim // self.num_heads) * N
        return flops + (self.pos.flops(N) if self.pos is not None else 0)


class DynamicPosBias(nn.Module):
    """DPB: an MLP mapping a relative offset ``(dy, dx)`` to one attention bias per head, ``dim // 4``
    wide; ``residual``: the authors' residual form (each hidden layer adds its input)."""

    def __init__(self, dim: int, num_heads: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.num_heads = num_heads
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = self._layer(self.pos_dim)
        self.pos2 = self._layer(self.pos_dim)
        self.pos3 = self._layer(num_heads)

    def _layer(self, out_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.LayerNorm(self.pos_dim), nn.ReLU(inplace=True), nn.Linear(self.pos_dim, out_dim))

    def forward(self, biases: Tensor) -> Tensor:
        """``(..., 2)`` offsets -> ``(..., num_heads)`` biases."""
        pos = self.pos_proj(biases)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
        else:
            pos = self.pos2(self.pos1(pos))
        return self.pos3(pos)

    def flops(self, N: int) -> int:
        """Multiply-accumulates for ``N`` offsets, as the official code counts them."""
        return N * (2 * self.pos_dim + 2 * self.pos_dim * self.pos_dim + self.pos_dim * self.num_heads)


class Mlp(timm.layers.Mlp):
    """timm's two-layer MLP (``fc1``, activation, ``fc2``, dropout after each) with the authors'
    positional arguments, whose fifth is ``drop`` (timm's is ``norm_layer``)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop)


class PatchEmbed(nn.Module):
    """Cross-scale embedding of the image: convolutions with the kernels ``patch_size`` and the
    stride ``patch_size[0]``, concatenated; ``(B, in_chans, H, W)`` -> tokens ``(B, h*w, embed_dim)``
    (any ``H, W``; ``img_size`` only sets ``patches_resolution`` and the default of :meth:`flops`)."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: Sequence[int] = (4,), in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.img_size = tuple(to_2tuple(img_size))
        self.patch_size = list(patch_size)
        self.patches_resolution = [size // patch_size[0] for size in self.img_size]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.projs = cross_scale_convs(in_chans, embed_dim, patch_size, stride=patch_size[0])
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """Size ``(h, w)`` of the token map of an ``H x W`` image."""
        return (conv_output_size(H, self.patch_size, self.patch_size[0]),
                conv_output_size(W, self.patch_size, self.patch_size[0]))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([strided_conv(proj, x) for proj in self.projs], dim=1).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x

    def flops(self, H: int | None = None, W: int | None = None) -> int:
        """Multiply-accumulates for an ``H x W`` image (default ``img_size``)."""
        h, w = self.output_size(*((H, W) if H is not None else self.img_size))
        flops = sum(h * w * p.out_channels * p.in_channels * p.kernel_size[0] * p.kernel_size[1] for p in self.projs)
        return flops + (h * w * self.embed_dim if self.norm is not None else 0)


class PatchMerging(nn.Module):
    """Cross-scale embedding between stages: norm, then convolutions with the kernels
    ``patch_size`` and stride 2, concatenated; tokens of an ``H x W`` map ``(B, H*W, dim)`` ->
    tokens of the ``H/2 x W/2`` map ``(B, H*W/4, 2*dim)`` (any ``H, W``, default
    ``input_resolution``). ``num_input_patch_size`` is accepted and unused, as in the authors' code."""

    def __init__(self, input_resolution: Sequence[int], dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 patch_size: Sequence[int] = (2,), num_input_patch_size: int | None = 1):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.patch_size = list(patch_size)
        self.num_input_patch_size = num_input_patch_size
        self.norm = norm_layer(dim)
        self.reductions = cross_scale_convs(dim, 2 * dim, patch_size, stride=2)

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        """Size ``(h, w)`` of the merged map of an ``H x W`` map."""
        return conv_output_size(H, self.patch_size, 2), conv_output_size(W, self.patch_size, 2)

    def forward(self, x: Tensor, H: int | None = None, W: int | None = None) -> Tensor:
        if H is None:
            H, W = self.input_resolution
        B, _, C = x.shape
        x = self.norm(x).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return torch.cat([reduce(x) for reduce in self.reductions], dim=1).flatten(2).transpose(1, 2)

    def flops(self, H: int | None = None, W: int | None = None) -> int:
        """Multiply-accumulates for an ``H x W`` map (default ``input_resolution``), as the official
        code counts them."""
        if H is None:
            H, W = self.input_resolution
        return H * W * self.dim + sum((H // 2) * (W // 2) * r.kernel_size[0] * r.kernel_size[1] * r.out_channels
                                      * r.in_channels for r in self.reductions)


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


# ============================================================================ helpers: eager-only stores
def is_eager(x: Tensor) -> bool:
    """Whether this is a plain eager call: not compiled or exported, and ``x`` is no FX proxy (a
    Python-side store or a branch on a device type cannot be traced)."""
    return not (torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy))


def kept_on_module(module: nn.Module, slot: str, key: tuple, make: Callable[[], T]) -> T:
    """``make()``, kept in ``module``'s attribute ``slot`` (one entry) and made again when ``key``
    changes; made outside inference mode and without gradients, so that tensors kept while
    evaluating serve a later training step too. Per module, so no tensor is shared across models."""
    kept = getattr(module, slot)
    if kept is None or kept[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            kept = (key, make())
        setattr(module, slot, kept)
    return kept[1]


# ============================================================================ helpers: sizes
def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")


def cross_scale_convs(in_dim: int, out_dim: int, kernel_sizes: Sequence[int], stride: int) -> nn.ModuleList:
    """Convolutions of several kernel sizes, same stride, centred so all outputs align."""
    return nn.ModuleList(
        nn.Conv2d(in_dim, channels, kernel, stride=stride, padding=(kernel - stride) // 2)
        for channels, kernel in zip(cross_scale_channels(out_dim, len(kernel_sizes)), kernel_sizes)
    )


@register_notrace_function
@torch.fx.wrap
def check_input_size(x: Tensor, patch_size: Sequence[int], merge_sizes: Sequence[Sequence[int]]) -> None:
    """ValueError if the ``(B, C, H, W)`` input is too small for the stages."""
    checked_stage_sizes(x.shape[-2], x.shape[-1], patch_size, merge_sizes)


@register_notrace_function
@torch.fx.wrap
def resized_pos_embed(pos_embed: Tensor, grid: tuple[int, int], h: int, w: int) -> Tensor:
    """The ``(1, grid_h * grid_w, C)`` absolute position embedding for an ``h x w`` token map,
    bicubic resized unless the size is known to equal the grid it was learned for."""
    if not torch.compiler.is_compiling() and isinstance(h, int) and isinstance(w, int) and (h, w) == tuple(grid):
        return pos_embed
    pos = pos_embed.view(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
    return F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)


def strided_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for an unpadded-mode, ungrouped convolution with a square stride. When training
    eagerly on a CPU with a kernel at least four times the stride (the 16x16 and 32x32 kernels of
    the patch embedding), the same sum is computed as a stride-1 convolution over the space-to-depth
    input: oneDNN's weight gradient of the strided form is 3 to 5 times slower. Tracing, export and
    compile get the plain form."""
    stride, kernel = conv.stride[0], conv.kernel_size[0]
    if not is_eager(x) or not (
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


# ============================================================================ helpers: grouping
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
def relative_offsets(group_h: int, group_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`crossformer.grouping.relative_offsets` on ``device``: the float table of offsets
    ``(dy, dx)`` inside a ``group_h x group_w`` grid and the row of each (query, key) pair."""
    table, index = plain_grouping.relative_offsets(group_h, group_w, partial(torch.arange, device=device))
    return table.float(), index


@register_notrace_function
@torch.fx.wrap
def group_index(H: int, W: int, layout: GroupLayout, device: torch.device) -> Tensor:
    """:func:`crossformer.grouping.group_positions` on ``device``: ``(num_groups * group_h * group_w,)``,
    where each grouped embedding comes from in the flattened ``H x W`` map, ``H * W`` for padding."""
    return plain_grouping.group_positions(H, W, layout, partial(torch.arange, device=device))


@register_notrace_function
@torch.fx.wrap
def ungroup_index(H: int, W: int, layout: GroupLayout, device: torch.device) -> Tensor:
    """:func:`crossformer.grouping.ungroup_positions` on ``device``: ``(H, W)``, the position of each
    embedding in the flattened grouped tensor (inverse of :func:`group_index`)."""
    return plain_grouping.ungroup_positions(H, W, layout, partial(torch.arange, device=device))


def group_embeddings(x: Tensor, index: Tensor, members: int) -> Tensor:
    """Tokens ``(B, H*W, C)`` -> groups ``(B * num_groups, members, C)`` by a :func:`group_index`;
    padding is zeros. A gather rather than pad + view + permute: no view of a padded size that
    export must reason about. ``index_select`` rather than indexing: its gradient is an
    ``index_add``, several times faster on a CPU than the accumulating ``index_put`` that indexing
    backpropagates through."""
    x = F.pad(x, (0, 0, 0, 1))
    return x.index_select(1, index).unflatten(1, (-1, members)).flatten(0, 1)


def ungroup_embeddings(x: Tensor, index: Tensor, batch: int) -> Tensor:
    """Groups ``(batch * num_groups, members, C)`` -> tokens ``(batch, H*W, C)`` by an
    :func:`ungroup_index` (padding dropped)."""
    return x.unflatten(0, (batch, -1)).flatten(1, 2).index_select(1, index.flatten())


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
def grouping_tensors(H: int, W: int, layout: GroupLayout, device: torch.device,
                     masked: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """(:func:`group_index`, :func:`padding_mask` or None unless ``masked``, :func:`ungroup_index`)
    of a block for an ``H x W`` map."""
    index = group_index(H, W, layout, device)
    return index, padding_mask(index, H, W, layout) if masked else None, ungroup_index(H, W, layout, device)


def unpack3(triple: tuple) -> tuple:
    """The three items of a tuple, also when FX traces it as one value (unpacking it would iterate)."""
    return triple[0], triple[1], triple[2]


# ============================================================================ helpers: attention
@register_notrace_function
@torch.fx.wrap
def attention_mask(bias: Tensor | None, mask: Tensor | None, padded_keys: Tensor | None,
                   rows: int) -> Tensor | None:
    """Additive mask for ``scaled_dot_product_attention`` over ``rows = batch * num_groups`` groups:
    the ``(heads, N, N)`` position bias (None without one: USE_CPE), plus the additive
    ``(num_groups, N, N)`` ``mask`` of the authors' interface, and padded keys (``padded_keys``:
    ``(num_groups, N)``, True where padded) pushed to ``PADDED_KEY_SCORE``; None when there is
    none of them."""
    if mask is None and padded_keys is None:
        return None if bias is None else bias.unsqueeze(0)
    if bias is None:
        keys = (mask if mask is not None else padded_keys).shape[-1]
        device = (mask if mask is not None else padded_keys).device
        bias = torch.zeros(1, keys, keys, device=device)
    total = bias.unsqueeze(0)
    if mask is not None:
        total = total + mask.unsqueeze(1)
    if padded_keys is not None:
        total = total.masked_fill(padded_keys[:, None, None, :], PADDED_KEY_SCORE)
    # repeat, not expand + flatten: that reshape is a view only for a single group, a guard that
    # would make torch.compile build another graph when the group count changes
    return total.repeat(rows // total.shape[0], 1, 1, 1)
