"""torch.hub entry points: ``torch.hub.load(repo_or_dir, name, pretrained=False, **kwargs)`` for the
eight official CrossFormer / CrossFormer++ models (``source='local'`` from a checkout).

No weights are downloaded: ``pretrained=True`` needs ``file=<path>`` naming an official release or a
checkpoint written by main.py; other keyword arguments go to ``timm.create_model`` (``num_classes``,
``in_chans``, ``drop_path_rate``, ``features_only``, ...).
"""
from __future__ import annotations

from typing import Any

import timm

import crossformer  # noqa: F401  (registers the models with timm)

dependencies = ["torch", "timm"]


def _load(name: str, pretrained: bool, file: str | None, kwargs: dict[str, Any]):
    if pretrained and not file:
        raise ValueError(f"{name}: pretrained=True needs file=<checkpoint path>; no weights are hosted")
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = dict(file=file)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def crossformer_tiny_patch4_group7_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_tiny_patch4_group7_224", pretrained, file, kwargs)


def crossformer_small_patch4_group7_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_small_patch4_group7_224", pretrained, file, kwargs)


def crossformer_base_patch4_group7_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_base_patch4_group7_224", pretrained, file, kwargs)


def crossformer_large_patch4_group7_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_large_patch4_group7_224", pretrained, file, kwargs)


def crossformer_pp_small_patch4_group_const_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_pp_small_patch4_group_const_224", pretrained, file, kwargs)


def crossformer_pp_base_patch4_group_const_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_pp_base_patch4_group_const_224", pretrained, file, kwargs)


def crossformer_pp_large_patch4_group_const_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_pp_large_patch4_group_const_224", pretrained, file, kwargs)


def crossformer_pp_huge_patch4_group_const_224(pretrained: bool = False, file: str | None = None, **kwargs: Any):
    return _load("crossformer_pp_huge_patch4_group_const_224", pretrained, file, kwargs)
