"""CrossFormer / CrossFormer++ in Flax NNX: the model of ``crossformer/model.py``, number for number.

Images and maps are channels-last: ``(B, H, W, 3)`` in, ``(B, h, w, C)`` between layers. Module and
attribute names follow the PyTorch state dict (``layers.0.blocks.1.attn.qkv`` is
``model.layers[0].blocks[1].attn.qkv``), so :mod:`crossformer.flax.convert` maps weights by name.

What parity needs, besides the same arithmetic: explicit conv padding ``(k - s) // 2`` (not
'SAME'), LayerNorm epsilon 1e-5 with the two-pass variance, exact (erf) GELU, and padded keys
scored ``PADDED_KEY_SCORE`` like the PyTorch attention mask.

What the two models share is imported from the torch-free modules the PyTorch model uses too:
the per-block group sizes, the grouping layout of a map of any size (``grouping``: the ICLR
backbone's or the CrossFormer++ backbone's), the index tables that gather a map's groups and
scatter them back, the DPB offsets and the padded-key score (:mod:`crossformer.grouping`), the
per-stage arguments, layer sizes and the input-size check (:mod:`crossformer.shapes`). Layouts
and tables are worked out per call from static shapes, so any input size works under ``jax.jit``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossformer.grouping import (PADDED_KEY_SCORE, GroupLayout, block_group_sizes, group_layout, group_positions,
                                  relative_offsets, resolve_grouping, ungroup_positions)
from crossformer.shapes import checked_stage_sizes, conv_output_size, cross_scale_channels, stage_arguments

_linear_init = nnx.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d weight distribution: uniform with variance 1 / (3 * fan_in).
_conv_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _linear(in_dim: int, out_dim: int, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_dim, out_dim, use_bias=use_bias, kernel_init=_linear_init, rngs=rngs)


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # PyTorch's LayerNorm: epsilon 1e-5, variance as mean((x - mean)^2).
    return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


def _conv(in_dim: int, out_dim: int, kernel: int, stride: int, padding: int, rngs: nnx.Rngs,
          groups: int = 1) -> nnx.Conv:
    return nnx.Conv(in_dim, out_dim, (kernel, kernel), strides=(stride, stride),
                    padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                    kernel_init=_conv_init, rngs=rngs)


@lru_cache(maxsize=64)
def grouping_plan(H: int, W: int, layout: GroupLayout,
                  masked: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The grouping of an ``H x W`` map by ``layout``: where each grouped embedding comes from in
    the flattened map (``H * W`` for padding), the ``(num_groups, members)`` padded keys (None
    without padding or unless ``masked``) and where each embedding goes back to, ``(H, W)``."""
    index = group_positions(H, W, layout, np.arange)
    padded = index.reshape(-1, layout.group_h * layout.group_w) == H * W if masked and any(layout[3:]) else None
    return index, padded, ungroup_positions(H, W, layout, np.arange)


def group_embeddings(x: jax.Array, index: np.ndarray, members: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, num_groups, members, C)`` by the index of :func:`grouping_plan`
    (padding is zeros)."""
    B, H, W, C = x.shape
    x = jnp.pad(x.reshape(B, H * W, C), ((0, 0), (0, 1), (0, 0)))
    return x[:, index].reshape(B, -1, members, C)


def ungroup_embeddings(x: jax.Array, inverse: np.ndarray) -> jax.Array:
    """``(B, num_groups, members, C)`` -> ``(B, H, W, C)`` by the inverse of :func:`grouping_plan`."""
    return x.reshape(x.shape[0], -1, x.shape[-1])[:, inverse]


def resize_bicubic(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``(B, h, w, C)`` -> ``(B, *size, C)`` as PyTorch's bicubic ``interpolate`` (cubic
    coefficient -0.75, half-pixel centres, edge clamping, no antialias). Hand-written because
    ``jax.image.resize`` uses the -0.5 kernel and so gives other numbers."""
    for axis, out in zip((1, 2), size):
        x = jnp.tensordot(x, _bicubic_matrix(x.shape[axis], out), axes=[[axis], [1]])
        x = jnp.moveaxis(x, -1, axis)
    return x


@lru_cache(maxsize=16)
def _bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    def cubic(t):
        t = np.abs(t)
        return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

    source = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
    start = np.floor(source).astype(int)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for tap in range(-1, 3):
        np.add.at(matrix, (np.arange(out_size), np.clip(start + tap, 0, in_size - 1)),
                  cubic(source - (start + tap)))
    return matrix.astype(np.float32)


class PatchEmbed(nnx.Module):
    """Cross-scale embedding of the image: ``(B, H, W, 3)`` -> ``(B, H/s, W/s, C)``."""

    def __init__(self, patch_size: Sequence[int], in_chans: int, embed_dim: int, patch_norm: bool, *, rngs: nnx.Rngs):
        self.patch_size = tuple(patch_size)
        stride = patch_size[0]
        self.projs = nnx.List([_conv(in_chans, channels, kernel, stride, (kernel - stride) // 2, rngs)
                               for channels, kernel in zip(cross_scale_channels(embed_dim, len(patch_size)), patch_size)])
        self.norm = _layer_norm(embed_dim, rngs) if patch_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.concatenate([proj(x) for proj in self.projs], axis=-1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nnx.Module):
    """Cross-scale embedding between stages: ``(B, H, W, C)`` -> ``(B, H/2, W/2, 2C)``."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int], *, rngs: nnx.Rngs):
        self.kernel_sizes = tuple(kernel_sizes)
        self.norm = _layer_norm(dim, rngs)
        self.reductions = nnx.List([_conv(dim, channels, kernel, 2, (kernel - 2) // 2, rngs)
                                    for channels, kernel in zip(cross_scale_channels(2 * dim, len(kernel_sizes)),
                                                                kernel_sizes)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        return jnp.concatenate([reduce(x) for reduce in self.reductions], axis=-1)


class DynamicPosBiasLayer(nnx.Module):
    """LayerNorm -> ReLU -> Linear (PyTorch: ``nn.Sequential`` entries 0 and 2)."""

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.norm = _layer_norm(dim, rngs)
        self.fc = _linear(dim, out_dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(jax.nn.relu(self.norm(x)))


class DynamicPosBias(nnx.Module):
    """DPB: an MLP mapping a relative offset ``(dy, dx)`` to one attention bias per head."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.pos_dim = dim // 4
        self.pos_proj = _linear(2, self.pos_dim, rngs)
        self.pos1 = DynamicPosBiasLayer(self.pos_dim, self.pos_dim, rngs=rngs)
        self.pos2 = DynamicPosBiasLayer(self.pos_dim, self.pos_dim, rngs=rngs)
        self.pos3 = DynamicPosBiasLayer(self.pos_dim, num_heads, rngs=rngs)

    def __call__(self, offsets: jax.Array) -> jax.Array:
        """``(..., 2)`` offsets -> ``(..., num_heads)`` biases."""
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))


class Attention(nnx.Module):
    """Multi-head self-attention inside groups, with a dynamic position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None, attn_drop: float,
                 proj_drop: float, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads, rngs=rngs)
        self.qkv = _linear(dim, 3 * dim, rngs, use_bias=qkv_bias)
        self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
        self.proj = _linear(dim, dim, rngs)
        self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

    def position_bias(self, group_shape: tuple[int, int]) -> jax.Array:
        """``(num_heads, N, N)`` bias of a ``Gh x Gw`` group from one DPB pass over all offsets."""
        table, index = relative_offsets(*group_shape, np.arange)
        return self.pos(jnp.asarray(table, self.qkv.kernel.dtype))[index].transpose(2, 0, 1)

    def __call__(self, x: jax.Array, group_shape: tuple[int, int], padded_keys: np.ndarray | None = None,
                 deterministic: bool | None = None) -> jax.Array:
        """``x``: ``(B, num_groups, N, C)`` for groups of ``group_shape = (Gh, Gw)``, ``N = Gh * Gw``
        -> same shape; ``padded_keys``: ``(num_groups, N)``, True where a key is padding."""
        B, num_groups, N, C = x.shape
        qkv = self.qkv(x).reshape(B, num_groups, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.transpose(3, 0, 1, 4, 2, 5)  # each (B, groups, heads, N, head_dim)
        mask = self.position_bias(group_shape)[None]
        if padded_keys is not None:
            mask = jnp.where(padded_keys[:, None, None, :], PADDED_KEY_SCORE, mask)
        scores = jnp.einsum("bghqd,bghkd->bghqk", q, k) * self.scale + mask.astype(q.dtype)
        weights = self.attn_drop(jax.nn.softmax(scores, axis=-1), deterministic=deterministic)
        x = jnp.einsum("bghqk,bghkd->bgqhd", weights, v).reshape(B, num_groups, N, C)
        return self.proj_drop(self.proj(x), deterministic=deterministic)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float, *, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden_dim, rngs)
        self.fc2 = _linear(hidden_dim, dim, rngs)
        self.drop = nnx.Dropout(drop, rngs=rngs)

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        x = self.drop(jax.nn.gelu(self.fc1(x), approximate=False), deterministic=deterministic)
        return self.drop(self.fc2(x), deterministic=deterministic)


class CrossFormerBlock(nnx.Module):
    """Norm -> group -> attend -> ungroup -> residual -> MLP residual [-> activation cooling].

    ``lda`` False makes it an SDA block, True an LDA block with ``interval``; the map is grouped by
    the layout ``grouping`` (``crossformer`` or ``crossformer_pp``) as the PyTorch block groups it."""

    def __init__(self, dim: int, num_heads: int, group_size: int, interval: int, lda: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, pad_type: int = 0, no_mask: bool = False, use_acl: bool = False,
                 adaptive_interval: bool = False, grouping: str = "crossformer_pp", *, rngs: nnx.Rngs):
        self.group_size = group_size
        self.interval = interval
        self.lda = lda
        self.pad_type = pad_type
        self.no_mask = no_mask
        self.adaptive_interval = adaptive_interval
        self.grouping = grouping
        self.norm1 = _layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, rngs=rngs)
        # Drop path is dropout of whole samples: one draw per sample, kept ones scaled by 1/(1-p).
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
        self.norm2 = _layer_norm(dim, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop, rngs=rngs)
        self.use_acl = use_acl
        if use_acl:  # activation cooling layer
            self.ex_conv = _conv(dim, dim, 3, 1, 1, rngs, groups=dim)
            self.ex_ln = _layer_norm(dim, rngs)

    def layout(self, H: int, W: int) -> GroupLayout:
        """How this block groups and pads an ``H x W`` map (group shape, interval, padding)."""
        return group_layout(H, W, self.group_size, self.interval, self.lda, self.grouping, self.pad_type,
                            self.adaptive_interval)

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """``(B, H, W, C)`` -> same shape."""
        H, W = x.shape[1:3]
        layout = self.layout(H, W)
        index, padded_keys, inverse = grouping_plan(H, W, layout, not self.no_mask)
        shortcut = x
        x = group_embeddings(self.norm1(x), index, layout.group_h * layout.group_w)
        x = ungroup_embeddings(self.attn(x, (layout.group_h, layout.group_w), padded_keys, deterministic=deterministic),
                               inverse)
        x = shortcut + self.drop_path(x, deterministic=deterministic)
        x = x + self.drop_path(self.mlp(self.norm2(x), deterministic=deterministic), deterministic=deterministic)
        if self.use_acl:
            x = self.ex_ln(self.ex_conv(x))
        return x


class Stage(nnx.Module):
    """Blocks (SDA and LDA alternating, each with its own group size), then an optional
    cross-scale merging."""

    def __init__(self, dim: int, num_heads: int, group_sizes: Sequence[int], interval: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float, drop_path: Sequence[float],
                 merge_size: Sequence[int] | None, pad_type: int, no_mask: bool, use_acl: bool,
                 use_checkpoint: bool = False, adaptive_interval: bool = False, grouping: str = "crossformer_pp",
                 *, rngs: nnx.Rngs):
        depth = len(group_sizes)
        self.blocks = nnx.List([
            CrossFormerBlock(dim, num_heads, group, interval, i % 2 == 1, mlp_ratio, qkv_bias, qk_scale, drop,
                             attn_drop, drop_path[i], pad_type, no_mask,
                             use_acl and (i + 1) % 3 == 0 and i < depth - 1, adaptive_interval, grouping, rngs=rngs)
            for i, group in enumerate(group_sizes)
        ])
        self.downsample = PatchMerging(dim, merge_size, rngs=rngs) if merge_size else None
        self.use_checkpoint = use_checkpoint

    def forward_blocks(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        for block in self.blocks:
            if self.use_checkpoint:  # recompute the block's activations in the backward pass
                x = nnx.remat(CrossFormerBlock.__call__, static_argnums=(2,))(block, x, deterministic)
            else:
                x = block(x, deterministic=deterministic)
        return x


class CrossFormer(nnx.Module):
    """CrossFormer / CrossFormer++ classifier, the constructor arguments of the PyTorch
    ``crossformer.CrossFormer`` (``interval`` for the LDA intervals; ``grouping`` the layout at
    sizes other than the configured square one, ``auto`` following the family as there) plus
    ``rngs``; any input size at run time.

    ``model(images)`` maps ``(B, H, W, in_chans)`` to ``(B, num_classes)`` logits. Dropout and drop
    path follow ``model.train()`` / ``model.eval()`` unless ``deterministic`` is given.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: Sequence[int] = (4,),
                 in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 group_size: int | Sequence[int] = (7, 7, 7, 7), interval: Sequence[int] = (8, 4, 2, 1),
                 mlp_ratio: float | Sequence[float] = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True,
                 use_checkpoint: bool = False,
                 merge_size: Sequence[Sequence[int]] = ((2,), (2,), (2,)),
                 group_type: str = "constant", use_acl: bool = False, pad_type: int = 0,
                 no_mask: bool = False, adaptive_interval: bool = False, use_cpe: bool = False, *,
                 grouping: str = "auto", rngs: nnx.Rngs):
        """The arguments of the PyTorch model, with its defaults (a test holds them equal);
        ``interval`` is its ``crs_interval``. ``use_cpe`` (a CrossFormer++ option that no official
        config uses) is not ported yet and raises ValueError."""
        if use_cpe:
            raise ValueError("the Flax model does not support use_cpe (MODEL.CROS.USE_CPE) yet; use the PyTorch model")
        num_stages = len(depths)
        group_size, mlp_ratios = stage_arguments(depths, num_heads, group_size, interval, mlp_ratio, merge_size,
                                                 pad_type)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grouping = resolve_grouping(grouping, use_acl)
        # the first stage's resolution as the official code counts it (image height // patch stride)
        group_sizes = block_group_sizes(group_type, group_size, depths, self.img_size[0] // patch_size[0])
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (num_stages - 1)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm, rngs=rngs)
        # learned for the configured size; resized for others
        self.pos_embed_grid = tuple(conv_output_size(s, patch_size, patch_size[0]) for s in self.img_size)
        self.absolute_pos_embed = nnx.Param(
            _linear_init(rngs.params(), (1, math.prod(self.pos_embed_grid), embed_dim))) if ape else None
        self.pos_drop = nnx.Dropout(drop_rate, rngs=rngs)
        drop_paths = np.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nnx.List([
            Stage(embed_dim * 2 ** i, num_heads[i], group_sizes[i], interval[i], mlp_ratios[i], qkv_bias, qk_scale,
                  drop_rate, attn_drop_rate, drop_paths[sum(depths[:i]):sum(depths[:i + 1])],
                  merge_size[i] if i < num_stages - 1 else None, pad_type, no_mask, use_acl, use_checkpoint,
                  adaptive_interval, self.grouping, rngs=rngs)
            for i in range(num_stages)
        ])
        self.norm = _layer_norm(self.num_features, rngs)
        self.head = _linear(self.num_features, num_classes, rngs) if num_classes > 0 else None

    def stage_sizes(self, H: int, W: int) -> list[tuple[int, int]]:
        """Map size ``(h, w)`` of every stage for an ``H x W`` input; ValueError if too small."""
        return checked_stage_sizes(H, W, self.patch_embed.patch_size,
                                   [layer.downsample.kernel_sizes for layer in list(self.layers)[:-1]])

    def _embed(self, x: jax.Array, deterministic: bool | None) -> jax.Array:
        self.stage_sizes(x.shape[1], x.shape[2])
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed[...].reshape(1, *self.pos_embed_grid, -1)
            if x.shape[1:3] != self.pos_embed_grid:
                pos = resize_bicubic(pos, x.shape[1:3])
            x = x + pos
        return self.pos_drop(x, deterministic=deterministic)

    def forward_features(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """``(B, H, W, in_chans)`` image -> ``(B, h, w, num_features)`` normalised last-stage map."""
        x = self._embed(x, deterministic)
        for layer in self.layers:
            x = layer.forward_blocks(x, deterministic)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.norm(x)

    def forward_intermediates(self, x: jax.Array, deterministic: bool | None = None) -> list[jax.Array]:
        """The output of every stage before its patch merging, ``(B, h, w, C)`` at strides 4, 8,
        16, 32 (the PyTorch ``forward_intermediates`` maps, channels-last)."""
        x = self._embed(x, deterministic)
        maps = []
        for layer in self.layers:
            x = layer.forward_blocks(x, deterministic)
            maps.append(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        x = x.mean(axis=(1, 2))
        return x if pre_logits or self.head is None else self.head(x)

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """``(B, H, W, in_chans)`` -> ``(B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x, deterministic))
