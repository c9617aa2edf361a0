"""The optimizer: AdamW or SGD over two parameter groups, with and without weight decay."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from config import UserError

OPTIMIZER_NAMES = ("adamw", "sgd")


def _skips_weight_decay(name: str, param: nn.Parameter, skip_names: set[str],
                        skip_keywords: Iterable[str]) -> bool:
    """Norm weights, biases and the parameters the model names are trained without decay."""
    return (param.ndim <= 1 or name.endswith(".bias") or name in skip_names
            or any(keyword in name for keyword in skip_keywords))


def _no_decay_test(model: nn.Module, no_decay_keys: Iterable[str] | None) -> Callable[[str, nn.Parameter], bool]:
    """Whether a named parameter trains without weight decay (the rules of split_weight_decay_groups)."""
    if no_decay_keys is not None:
        keys = tuple(no_decay_keys)
        return lambda name, param: any(key in name for key in keys)
    skip_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    skip_keywords = (set(model.no_weight_decay_keywords())
                     if hasattr(model, "no_weight_decay_keywords") else set())
    return lambda name, param: _skips_weight_decay(name, param, skip_names, skip_keywords)


def split_weight_decay_groups(model: nn.Module, weight_decay: float,
                              no_decay_keys: Iterable[str] | None = None) -> list[dict]:
    """Trainable parameters as ``[decayed, not decayed]`` optimizer groups (empty ones left out).

    Not decayed: scalar and 1-D parameters (norm weights, biases), names ending in ``.bias``,
    names in ``model.no_weight_decay()`` and names containing a keyword of
    ``model.no_weight_decay_keywords()``. With ``no_decay_keys`` (TRAIN.OPTIMIZER.NO_DECAY_KEYS:
    mmcv's ``paramwise_cfg`` with ``decay_mult=0``, as the detection and segmentation configs use
    it) only the names containing one of those keys go without decay.
    """
    skips = _no_decay_test(model, no_decay_keys)
    decayed, not_decayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if skips(name, param):
            not_decayed.append(param)
        else:
            decayed.append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": not_decayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def all_on_cuda(groups: list[dict]) -> bool:
    """Whether every parameter of the optimizer groups lives on a CUDA device, where torch's
    fused AdamW updates all of them in a few kernels instead of several per tensor."""
    params = [param for group in groups for param in group["params"]]
    return bool(params) and all(param.device.type == "cuda" for param in params)


def build_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by TRAIN.OPTIMIZER.NAME, at the (already scaled) TRAIN.BASE_LR. AdamW
    is fused when the model is on CUDA; elsewhere torch picks its implementation as before."""
    train = config.TRAIN
    groups = split_weight_decay_groups(model, train.WEIGHT_DECAY, train.OPTIMIZER.NO_DECAY_KEYS)
    name = train.OPTIMIZER.NAME.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=train.BASE_LR, eps=train.OPTIMIZER.EPS,
                                 betas=tuple(train.OPTIMIZER.BETAS), fused=True if all_on_cuda(groups) else None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=train.BASE_LR, momentum=train.OPTIMIZER.MOMENTUM,
                               nesterov=True)
    raise UserError(f"TRAIN.OPTIMIZER.NAME: unknown optimizer {train.OPTIMIZER.NAME!r}; "
                    f"known: {', '.join(OPTIMIZER_NAMES)}")
