"""Configuration: yacs defaults with the official CrossFormer key names, YAML files, overrides.

A YAML file may name parent files under ``BASE`` (paths relative to itself); they are merged
first. Command-line values go through ``--opts KEY VALUE ...`` and the dedicated flags of main.py.
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN


class UserError(Exception):
    """Bad input from the user (file, key, value): main.py reports it as one line and exits 2."""


_C = CN()
_C.BASE = [""]

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per GPU / process
_C.DATA.DATA_PATH = ""  # digits: where the image folder is written (default ~/.cache/crossformer/digits)
_C.DATA.DATASET = "imagenet"  # imagenet (any image folder), digits, fake
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = "bicubic"  # random, bilinear, bicubic
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = "part"  # no, full, part (zip mode only)
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.FAKE_SIZE = 1024  # images per split of the 'fake' dataset

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = "cross-scale"
_C.MODEL.NAME = "cros_tiny_patch4_group7_224"
_C.MODEL.PRETRAINED = ""  # weights to fine-tune from (model only)
_C.MODEL.RESUME = ""  # full training state to continue from
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.CROS = CN()
_C.MODEL.CROS.PATCH_SIZE = [4, 8, 16, 32]
_C.MODEL.CROS.MERGE_SIZE = [[2, 4], [2, 4], [2, 4]]
_C.MODEL.CROS.IN_CHANS = 3
_C.MODEL.CROS.EMBED_DIM = 96
_C.MODEL.CROS.DEPTHS = [2, 2, 6, 2]
_C.MODEL.CROS.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.CROS.GROUP_SIZE = [7, 7, 7, 7]
_C.MODEL.CROS.INTERVAL = [8, 4, 2, 1]
_C.MODEL.CROS.MLP_RATIO = [4.0, 4.0, 4.0, 4.0]  # per stage; a single number is accepted too
_C.MODEL.CROS.QKV_BIAS = True
_C.MODEL.CROS.QK_SCALE = None
_C.MODEL.CROS.APE = False
_C.MODEL.CROS.PATCH_NORM = True
_C.MODEL.CROS.GROUP_TYPE = "constant"
_C.MODEL.CROS.USE_ACL = False
_C.MODEL.CROS.PAD_TYPE = 0  # 0: pad bottom/right, 1: split the padding between both sides
_C.MODEL.CROS.NO_MASK = False

# MODEL.TYPE timm: any timm model by name. Class count, dropout and drop path come from
# MODEL.NUM_CLASSES / DROP_RATE / DROP_PATH_RATE, input channels from MODEL.CROS.IN_CHANS.
_C.MODEL.TIMM = CN()
_C.MODEL.TIMM.NAME = ""  # e.g. crossvit_9_240, swin_tiny_patch4_window7_224, resnet18

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0  # max gradient norm; 0 turns clipping off
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 0  # 0 or 1: no accumulation
_C.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine, linear, step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw, sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = "pixel"
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = "batch"
_C.AUG.HFLIP = 0.5  # horizontal-flip probability (0 for digits and text)

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True

# ----------------------------------------------------------------------------- misc
_C.AMP_OPT_LEVEL = "O1"  # kept from the apex days: O0 turns mixed precision off
_C.AMP_DTYPE = "float16"  # float16 (with a gradient scaler) or bfloat16
_C.DEVICE = ""  # '' picks cuda when available, else cpu
_C.OUTPUT = ""
_C.TAG = "default"
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.DETERMINISTIC = False
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.TRUST_CHECKPOINTS = False  # allow full unpickling of checkpoint files (runs code in them)


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys")
    return data


def _accept_scalar_mlp_ratio(data: dict) -> None:
    """CrossFormer (ICLR) configs give MLP_RATIO as one number; here it is one per stage."""
    cros = (data.get("MODEL") or {}).get("CROS") or {}
    if isinstance(cros.get("MLP_RATIO"), (int, float)):
        cros["MLP_RATIO"] = [float(cros["MLP_RATIO"])] * 4


def _merge(config: CN, data: dict, culprit: str) -> None:
    try:
        config.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as err:
        raise UserError(f"{culprit}: {err.args[0] if err.args else err}") from err


def _merge_file(config: CN, cfg_file: str, seen: tuple[str, ...] = ()) -> None:
    cfg_file = os.path.abspath(cfg_file)
    if cfg_file in seen:
        raise UserError(f"config file {cfg_file} includes itself through BASE")
    data = _read_yaml(cfg_file)
    for base in data.pop("BASE", None) or []:
        if base:
            _merge_file(config, os.path.join(os.path.dirname(cfg_file), base), seen + (cfg_file,))
    _accept_scalar_mlp_ratio(data)
    _merge(config, data, f"config file {cfg_file}")


def _merge_opts(config: CN, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise UserError(f"--opts needs KEY VALUE pairs, got an odd count: {list(opts)}")
    try:
        config.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as err:
        raise UserError(f"--opts: {err.args[0] if err.args else err}") from err


def get_default_config() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def load_config(cfg_file: str, opts: Iterable[str] = ()) -> CN:
    """Defaults, then ``cfg_file`` (with its BASE files), then ``opts`` pairs; returned frozen."""
    config = get_default_config()
    _merge_file(config, cfg_file)
    _merge_opts(config, [str(o) for o in opts])
    config.freeze()
    return config


def get_config(args: argparse.Namespace) -> CN:
    """Config from parsed main.py arguments: the YAML, then --opts, then the dedicated flags."""
    config = get_default_config()
    _merge_file(config, args.cfg)
    _merge_opts(config, [str(o) for o in (args.opts or [])])
    flags = {
        "batch_size": "DATA.BATCH_SIZE",
        "data_path": "DATA.DATA_PATH",
        "cache_mode": "DATA.CACHE_MODE",
        "num_workers": "DATA.NUM_WORKERS",
        "pretrained": "MODEL.PRETRAINED",
        "resume": "MODEL.RESUME",
        "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
        "epochs": "TRAIN.EPOCHS",
        "lr": "TRAIN.BASE_LR",
        "amp_opt_level": "AMP_OPT_LEVEL",
        "amp_dtype": "AMP_DTYPE",
        "device": "DEVICE",
        "output": "OUTPUT",
        "tag": "TAG",
        "seed": "SEED",
    }
    pairs: list = []
    for flag, key in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            pairs += [key, value]
    for flag, key in {"zip": "DATA.ZIP_MODE", "use_checkpoint": "TRAIN.USE_CHECKPOINT",
                      "eval": "EVAL_MODE", "throughput": "THROUGHPUT_MODE",
                      "trust_checkpoints": "TRUST_CHECKPOINTS"}.items():
        if getattr(args, flag, False):
            pairs += [key, True]
    _merge_opts(config, pairs)  # typed values: yacs keeps them as they are
    config.LOCAL_RANK = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    config.OUTPUT = os.path.join(config.OUTPUT or "output", config.MODEL.NAME, config.TAG)
    config.freeze()
    return config
