"""torch.hub entry points: ``torch.hub.load(repo_or_dir, name, pretrained=False, **kwargs)`` for the
eight official CrossFormer / CrossFormer++ models (``source='local'`` from a checkout).

No weights are downloaded: ``pretrained=True`` needs ``file=<path>`` naming an official release or a
checkpoint written by main.py; other keyword arguments go to ``timm.create_model`` (``num_classes``,
``in_chans``, ``drop_path_rate``, ``features_only``, ...).
"""
from __future__ import annotations

from typing import Any

import timm

from crossformer.timm_models import MODELS  # importing crossformer registers the models with timm

dependencies = ["torch", "timm"]


def _load(name: str, pretrained: bool, file: str | None, kwargs: dict[str, Any]):
    if pretrained and not file:
        raise ValueError(f"{name}: pretrained=True needs file=<checkpoint path>; no weights are hosted")
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = dict(file=file)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _entrypoint(name: str):
    def load(pretrained: bool = False, file: str | None = None, **kwargs: Any):
        return _load(name, pretrained, file, kwargs)
    load.__name__ = load.__qualname__ = name
    load.__doc__ = f"timm's {name} (see crossformer.timm_models); pretrained=True needs file=<path>."
    return load


for _name in MODELS:  # one entry point per official model
    globals()[_name] = _entrypoint(_name)
