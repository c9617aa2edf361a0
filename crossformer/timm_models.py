"""The eight official models registered with timm: ``timm.create_model(name, ...)`` once
``crossformer`` is imported.

Names: ``crossformer_{tiny,small,base,large}_patch4_group7_224`` (ICLR 2022) and
``crossformer_pp_{small,base,large,huge}_patch4_group_const_224`` (TPAMI). No weights are
downloaded; ``pretrained=True`` needs a file:
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``, where the file
is an official release (``{'model': state_dict}``) or a checkpoint written by our ``main.py``.
``features_only=True`` uses timm's ``getter`` wrapper (:meth:`CrossFormer.forward_intermediates`);
other ``feature_cls`` values are refused.
"""
from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet
from torch import Tensor

from crossformer.model import CrossFormer

_V1 = dict(patch_size=(4, 8, 16, 32), merge_size=((2, 4), (2, 4), (2, 4)), group_size=(7, 7, 7, 7),
           interval=(8, 4, 2, 1))
_PP = dict(patch_size=(4, 8, 16, 32), merge_size=((2, 4), (2, 4), (2, 4)), group_size=(4, 4, 14, 7),
           interval=(4, 2, 1, 1), use_acl=True)

# name -> (architecture, stochastic depth of the official training recipe, ImageNet-1K top-1 of the paper)
MODELS: dict[str, tuple[dict, float, float]] = {
    "crossformer_tiny_patch4_group7_224": (
        dict(_V1, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16)), 0.1, 81.5),
    "crossformer_small_patch4_group7_224": (
        dict(_V1, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), 0.2, 82.5),
    "crossformer_base_patch4_group7_224": (
        dict(_V1, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), 0.3, 83.4),
    "crossformer_large_patch4_group7_224": (
        dict(_V1, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), 0.5, 84.0),
    "crossformer_pp_small_patch4_group_const_224": (
        dict(_PP, embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16)), 0.2, 83.2),
    "crossformer_pp_base_patch4_group_const_224": (
        dict(_PP, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), 0.3, 84.2),
    "crossformer_pp_large_patch4_group_const_224": (
        dict(_PP, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), 0.5, 84.7),
    "crossformer_pp_huge_patch4_group_const_224": (
        dict(_PP, embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32)), 0.5, 84.9),
}

# ICLR checkpoints store these index tables per attention layer; the model derives them.
DERIVED_BUFFERS = ("attn.biases", "attn.relative_position_index")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: CrossFormer) -> dict[str, Tensor]:
    """An official release or one of our training checkpoints -> the model's state dict: unwraps
    ``{'model': ...}``, strips a DistributedDataParallel ``module.`` prefix, drops the derived
    DPB index buffers."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return {key.removeprefix("module."): value for key, value in state_dict.items()
            if not key.endswith(DERIVED_BUFFERS)}


def _cfg(top1: float) -> dict[str, Any]:
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=tuple(f"patch_embed.projs.{i}" for i in range(4)), classifier="head",
        license="mit", notes=(f"ImageNet-1K top-1 {top1} (paper); no hosted weights, load a file with "
                              "pretrained_cfg_overlay=dict(file=...)",),
    )


default_cfgs = generate_default_cfgs({name: _cfg(top1) for name, (_, _, top1) in MODELS.items()})


def _weights_source(kwargs: dict[str, Any]) -> bool:
    """Whether the caller named weights (no weights are hosted for these names)."""
    cfgs = [kwargs.get("pretrained_cfg_overlay"), kwargs.get("pretrained_cfg")]
    return any(isinstance(cfg, dict) and any(cfg.get(key) for key in ("file", "url", "hf_hub_id", "state_dict"))
               for cfg in cfgs)


def _create(name: str, pretrained: bool, **kwargs: Any) -> CrossFormer:
    if pretrained and not _weights_source(kwargs):
        raise ValueError(f"{name}: no weights are hosted for it; pass the file of an official release or of "
                         "a main.py checkpoint: pretrained_cfg_overlay=dict(file=path)")
    feature_cls = kwargs.get("feature_cls", "getter")
    if kwargs.get("features_only") and feature_cls not in ("getter", FeatureGetterNet):
        raise ValueError(f"{name}: features_only supports feature_cls='getter' (the default, through "
                         f"forward_intermediates), not {feature_cls!r}: the modules named by feature_info "
                         "(layers.i) are not called with the stage maps as their output")
    architecture, drop_path_rate, _ = MODELS[name]
    args = dict(architecture, drop_path_rate=drop_path_rate)
    args.update(kwargs)
    return build_model_with_cfg(
        CrossFormer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **args)


@register_model
def crossformer_tiny_patch4_group7_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_tiny_patch4_group7_224", pretrained, **kwargs)


@register_model
def crossformer_small_patch4_group7_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_small_patch4_group7_224", pretrained, **kwargs)


@register_model
def crossformer_base_patch4_group7_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_base_patch4_group7_224", pretrained, **kwargs)


@register_model
def crossformer_large_patch4_group7_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_large_patch4_group7_224", pretrained, **kwargs)


@register_model
def crossformer_pp_small_patch4_group_const_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_pp_small_patch4_group_const_224", pretrained, **kwargs)


@register_model
def crossformer_pp_base_patch4_group_const_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_pp_base_patch4_group_const_224", pretrained, **kwargs)


@register_model
def crossformer_pp_large_patch4_group_const_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_pp_large_patch4_group_const_224", pretrained, **kwargs)


@register_model
def crossformer_pp_huge_patch4_group_const_224(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    return _create("crossformer_pp_huge_patch4_group_const_224", pretrained, **kwargs)
