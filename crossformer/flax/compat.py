"""The keyword form of the community Flax CrossFormer (lucidrains' style), on the real model.

Code written against that package runs unchanged after swapping the import::

    from crossformer.flax.compat import CrossFormer
    v = CrossFormer(num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2),
                    global_window_size=(8, 4, 2, 1), local_window_size=7)
    params = v.init({'params': key1, 'dropout': key2}, img)   # img: (B, H, W, 3)
    out = v.apply(params, img, rngs={'dropout': key2})         # (B, 1000)

The result is a Linen module (``flax.nnx.bridge.to_linen`` around :class:`crossformer.flax.CrossFormer`);
its ``params`` have the layout of :func:`crossformer.flax.torch_to_flax`, so our PyTorch weights load
into it.
"""
from __future__ import annotations

from typing import Sequence

from flax import linen
from flax.nnx import bridge

from crossformer.flax.model import CrossFormer as _CrossFormer

DEFAULT_KERNEL_SIZES = ((4, 8, 16, 32), (2, 4), (2, 4), (2, 4))


def model_kwargs(num_classes: int, dim: Sequence[int], depth: Sequence[int], global_window_size: Sequence[int],
                 local_window_size: int | Sequence[int],
                 cross_embed_kernel_sizes: Sequence[Sequence[int]] = DEFAULT_KERNEL_SIZES,
                 cross_embed_strides: Sequence[int] = (4, 2, 2, 2), attn_dropout: float = 0.0,
                 ff_dropout: float = 0.0, channels: int = 3, dim_head: int = 32) -> dict:
    """The keyword form's arguments as :class:`crossformer.flax.CrossFormer` arguments:
    ``dim[i] = embed_dim * 2**i``, ``depth`` = blocks per stage, ``global_window_size`` = the LDA
    interval per stage, ``local_window_size`` = the group size, heads = ``dim[i] // dim_head``,
    ``cross_embed_kernel_sizes`` = the patch-embedding then the merging kernels."""
    stages = len(dim)
    if any(d != dim[0] * 2 ** i for i, d in enumerate(dim)):
        raise ValueError(f"dim must double every stage (CrossFormer's patch merging does), got {tuple(dim)}")
    group = [local_window_size] * stages if isinstance(local_window_size, int) else list(local_window_size)
    for name, values in (("depth", depth), ("global_window_size", global_window_size),
                         ("local_window_size", group), ("cross_embed_kernel_sizes", cross_embed_kernel_sizes),
                         ("cross_embed_strides", cross_embed_strides)):
        if len(values) != stages:
            raise ValueError(f"{name} needs one entry per stage ({stages}), got {values}")
    kernels = [sorted(k) for k in cross_embed_kernel_sizes]
    if cross_embed_strides[0] != kernels[0][0] or any(s != 2 for s in cross_embed_strides[1:]):
        raise ValueError("cross_embed_strides must be (smallest embedding kernel, 2, 2, ...), "
                         f"got {tuple(cross_embed_strides)}")
    if any(d % dim_head for d in dim):
        raise ValueError(f"every dim must be a multiple of dim_head {dim_head}, got {tuple(dim)}")
    return dict(num_classes=num_classes, embed_dim=dim[0], depths=tuple(depth),
                num_heads=tuple(d // dim_head for d in dim), group_size=tuple(group),
                interval=tuple(global_window_size), patch_size=tuple(kernels[0]),
                merge_size=tuple(tuple(k) for k in kernels[1:]), in_chans=channels,
                attn_drop_rate=attn_dropout, drop_rate=ff_dropout, drop_path_rate=0.0)


def CrossFormer(**kwargs) -> linen.Module:  # noqa: N802 - the community package's class name
    """A Linen module from the keyword form (arguments of :func:`model_kwargs`)."""
    return bridge.to_linen(_CrossFormer, **model_kwargs(**kwargs))
