"""What the official files hold, in plain Python: the eight official YAML configs as CrossFormer
keyword arguments (the timm registry is built from them), and the derivable buffers that
checkpoints of the ICLR code carry.

The YAMLs are those of ``configs/crossformer/`` and ``configs/crossformer_pp/`` in a checkout;
``pip install .`` installs them as ``crossformer/configs/`` (see pyproject.toml).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, MutableMapping, TypeVar

import yaml

FAMILIES = ("crossformer", "crossformer_pp")  # the folders of the official configs

# MODEL.CROS key -> CrossFormer keyword (the section of a config that sets the architecture)
CROS_KEYWORDS = {
    "PATCH_SIZE": "patch_size", "IN_CHANS": "in_chans", "EMBED_DIM": "embed_dim", "DEPTHS": "depths",
    "NUM_HEADS": "num_heads", "GROUP_SIZE": "group_size", "INTERVAL": "interval", "MLP_RATIO": "mlp_ratio",
    "QKV_BIAS": "qkv_bias", "QK_SCALE": "qk_scale", "APE": "ape", "PATCH_NORM": "patch_norm",
    "MERGE_SIZE": "merge_size", "GROUP_TYPE": "group_type", "USE_ACL": "use_acl", "PAD_TYPE": "pad_type",
    "NO_MASK": "no_mask", "ADAPT_INTER": "adaptive_interval", "USE_CPE": "use_cpe",
}
# MODEL key -> CrossFormer keyword
MODEL_KEYWORDS = {"NUM_CLASSES": "num_classes", "DROP_RATE": "drop_rate", "DROP_PATH_RATE": "drop_path_rate"}

# Checkpoints of the ICLR code store these DPB index tables in every attention layer
# (``...attn.biases``, ``...attn.relative_position_index``); the model derives them.
DERIVABLE_BUFFERS = ("biases", "relative_position_index")

S = TypeVar("S", bound=MutableMapping)


def model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """The CrossFormer keyword arguments that a config's MODEL section (a YAML mapping or a yacs
    node) sets: its MODEL.CROS keys, NUM_CLASSES, DROP_RATE and DROP_PATH_RATE. Keys it leaves out
    stay out, so the class defaults apply."""
    cros = model.get("CROS") or {}
    kwargs = {keyword: model[key] for key, keyword in MODEL_KEYWORDS.items() if key in model}
    kwargs.update({keyword: cros[key] for key, keyword in CROS_KEYWORDS.items() if key in cros})
    return kwargs


def config_folder() -> Path:
    """The folder holding the official configs: ``crossformer/configs`` when installed, the
    checkout's ``configs`` otherwise."""
    installed = Path(__file__).parent / "configs"
    return installed if installed.is_dir() else Path(__file__).parent.parent / "configs"


def official_models() -> dict[str, dict[str, Any]]:
    """``{timm name: CrossFormer keyword arguments}`` of the eight official configs, named
    ``<folder>_<file name>`` (``crossformer_tiny_patch4_group7_224``, ...)."""
    models = {}
    for family in FAMILIES:
        for path in sorted((config_folder() / family).glob("*.yaml")):
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
            kwargs = model_kwargs(config["MODEL"])
            if "IMG_SIZE" in (config.get("DATA") or {}):
                kwargs["img_size"] = config["DATA"]["IMG_SIZE"]
            models[f"{family}_{path.stem}"] = kwargs
    if len(models) != 8:
        raise FileNotFoundError(f"expected the eight official configs in {config_folder()}, found {sorted(models)}")
    return models


def drop_derivable_buffers(state_dict: S, prefix: str = "") -> S:
    """Remove, in place, the DPB index tables of ICLR checkpoints (:data:`DERIVABLE_BUFFERS`) among
    the keys under ``prefix``; returns ``state_dict``."""
    for key in [key for key in state_dict
                if key.startswith(prefix) and key.rpartition(".")[2] in DERIVABLE_BUFFERS]:
        del state_dict[key]
    return state_dict
