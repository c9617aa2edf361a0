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
from crossformer.official import model_kwargs

if TYPE_CHECKING:  # jax and flax stay optional
    import crossformer.flax


def cross_scale_kwargs(config: CfgNode) -> dict:
    """The constructor arguments of a cross-scale model that PyTorch and Flax both take: the
    MODEL section's (:func:`crossformer.official.model_kwargs`), the image size, the grouping
    layout (MODEL.CROS.GROUPING) and TRAIN.USE_CHECKPOINT."""
    return dict(model_kwargs(config.MODEL), img_size=config.DATA.IMG_SIZE, grouping=config.MODEL.CROS.GROUPING,
                use_checkpoint=config.TRAIN.USE_CHECKPOINT)


def _cross_scale(config: CfgNode) -> CrossFormer:
    return CrossFormer(**cross_scale_kwargs(config))


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


def build_model(config: CfgNode, args: object = None) -> nn.Module:
    """Build the model of ``config``; bad settings raise :class:`config.UserError`. ``args`` (the
    parsed command line, in the authors' signature) is accepted and not used, as there."""
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
