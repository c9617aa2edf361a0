"""The eight official models registered with timm: ``timm.create_model(name, ...)`` once
``crossformer`` is imported.

Names: ``crossformer_{tiny,small,base,large}_patch4_group7_224`` (ICLR 2022) and
``crossformer_pp_{small,base,large,huge}_patch4_group_const_224`` (TPAMI), one per official config
(``configs/crossformer/*.yaml``, ``configs/crossformer_pp/*.yaml``): the architecture and the
stochastic depth of the official recipe come from the YAML, the rest from the class defaults.
No weights are downloaded; ``pretrained=True`` needs a file:
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``, where the file
is an official release (``{'model': state_dict}``) or a checkpoint written by our ``main.py``.
``features_only=True`` uses timm's ``getter`` wrapper (:meth:`CrossFormer.forward_intermediates`);
other ``feature_cls`` values are refused.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet
from torch import Tensor

from crossformer.model import CrossFormer
from crossformer.official import official_models

# name -> CrossFormer keyword arguments of the official config (drop_path_rate included)
MODELS: dict[str, dict[str, Any]] = official_models()

# ImageNet-1K top-1 of the papers (not in the configs)
TOP1 = {
    "crossformer_tiny_patch4_group7_224": 81.5, "crossformer_small_patch4_group7_224": 82.5,
    "crossformer_base_patch4_group7_224": 83.4, "crossformer_large_patch4_group7_224": 84.0,
    "crossformer_pp_small_patch4_group_const_224": 83.2, "crossformer_pp_base_patch4_group_const_224": 84.2,
    "crossformer_pp_large_patch4_group_const_224": 84.7, "crossformer_pp_huge_patch4_group_const_224": 84.9,
}


def checkpoint_filter_fn(state_dict: dict[str, Any], model: CrossFormer) -> dict[str, Tensor]:
    """An official release or one of our training checkpoints -> the model's state dict: unwraps
    ``{'model': ...}`` and strips a DistributedDataParallel ``module.`` prefix. (The ICLR index
    buffers are dropped by the model's own ``load_state_dict``.)"""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _setting(name: str, keyword: str) -> Any:
    """Model ``name``'s ``keyword`` argument: its official config's value, else the class default."""
    return MODELS[name].get(keyword, inspect.signature(CrossFormer).parameters[keyword].default)


def _cfg(name: str) -> dict[str, Any]:
    size = _setting(name, "img_size")
    patch_size, depths = _setting(name, "patch_size"), _setting(name, "depths")
    last_map = size // patch_size[0] // 2 ** (len(depths) - 1)
    return dict(
        url="", num_classes=_setting(name, "num_classes"), input_size=(3, size, size),
        pool_size=(last_map, last_map), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv=tuple(f"patch_embed.projs.{i}" for i in range(len(patch_size))), classifier="head",
        license="mit", notes=(f"ImageNet-1K top-1 {TOP1[name]} (paper); no hosted weights, load a file with "
                              "pretrained_cfg_overlay=dict(file=...)",),
    )


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in MODELS})


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
    return build_model_with_cfg(
        CrossFormer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **{**MODELS[name], **kwargs})


def _entrypoint(name: str) -> Callable[..., CrossFormer]:
    def create(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
        return _create(name, pretrained, **kwargs)
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"The CrossFormer of the official config behind the timm name {name}."
    return create


for _name in MODELS:
    globals()[_name] = register_model(_entrypoint(_name))
