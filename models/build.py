"""``build_model(config)`` (PyTorch) and ``build_flax_model(config)`` (Flax): the model named by
MODEL.TYPE: ``cross-scale`` (CrossFormer, with the MODEL.CROS settings) or, in PyTorch, ``timm``
(any timm model, MODEL.TIMM.NAME)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import timm
from torch import nn
from yacs.config import CfgNode

from config import UserError
from crossformer import CrossFormer

if TYPE_CHECKING:  # jax and flax stay optional
    import crossformer.flax


def cross_scale_kwargs(config: CfgNode) -> dict:
    """The constructor arguments of a cross-scale model (PyTorch and Flax take the same ones)."""
    cros = config.MODEL.CROS
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=cros.PATCH_SIZE,
        in_chans=cros.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=cros.EMBED_DIM,
        depths=cros.DEPTHS,
        num_heads=cros.NUM_HEADS,
        group_size=cros.GROUP_SIZE,
        interval=cros.INTERVAL,
        mlp_ratio=cros.MLP_RATIO,
        qkv_bias=cros.QKV_BIAS,
        qk_scale=cros.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=cros.APE,
        patch_norm=cros.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        merge_size=cros.MERGE_SIZE,
        group_type=cros.GROUP_TYPE,
        use_acl=cros.USE_ACL,
        pad_type=cros.PAD_TYPE,
        no_mask=cros.NO_MASK,
        adaptive_interval=cros.ADAPT_INTER,
        use_cpe=cros.USE_CPE,
    )


def _cross_scale(config: CfgNode) -> CrossFormer:
    # MODEL.CROS.GROUPING is the PyTorch model's alone until the Flax port takes it too
    return CrossFormer(**cross_scale_kwargs(config), grouping=config.MODEL.CROS.GROUPING)


def _timm(config: CfgNode) -> nn.Module:
    name = config.MODEL.TIMM.NAME
    if not timm.is_model(name):
        raise UserError(f"MODEL.TIMM.NAME: unknown timm model {name!r}")
    # models built for one input size (CrossViT, Swin) are built for DATA.IMG_SIZE
    extra = dict(img_size=config.DATA.IMG_SIZE) if timm.get_pretrained_cfg_value(name, "fixed_input_size") else {}
    return timm.create_model(name, pretrained=False, num_classes=config.MODEL.NUM_CLASSES,
                             in_chans=config.MODEL.CROS.IN_CHANS, drop_rate=config.MODEL.DROP_RATE,
                             drop_path_rate=config.MODEL.DROP_PATH_RATE, **extra)


MODEL_TYPES = {"cross-scale": _cross_scale, "timm": _timm}


def build_model(config: CfgNode) -> nn.Module:
    """Build the model of ``config``; bad settings raise :class:`config.UserError`."""
    if config.MODEL.TYPE not in MODEL_TYPES:
        raise UserError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; known types: {', '.join(MODEL_TYPES)}")
    try:
        model = MODEL_TYPES[config.MODEL.TYPE](config)
        if isinstance(model, CrossFormer):
            model.stage_sizes(config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    except (ValueError, TypeError, AssertionError) as err:
        raise UserError(f"model {config.MODEL.NAME}: {err}") from err
    return model


def build_flax_model(config: CfgNode, state_dict: dict | None = None, seed: int = 0) -> crossformer.flax.CrossFormer:
    """The Flax NNX model of ``config`` (needs jax and flax): holding ``state_dict`` (PyTorch
    weights, converted) when given, else randomly initialised from ``seed``."""
    from flax import nnx

    from crossformer.flax import CrossFormer as FlaxCrossFormer, from_torch

    if config.MODEL.TYPE != "cross-scale":
        raise UserError(f"MODEL.TYPE {config.MODEL.TYPE!r}: the Flax port builds only 'cross-scale' (CrossFormer)")
    kwargs = cross_scale_kwargs(config)
    try:
        if state_dict is not None:
            model = from_torch(state_dict, seed, **kwargs)
        else:
            model = FlaxCrossFormer(**kwargs, rngs=nnx.Rngs(params=seed, dropout=seed))
        model.stage_sizes(config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    except ValueError as err:
        raise UserError(f"model {config.MODEL.NAME}: {err}") from err
    return model
