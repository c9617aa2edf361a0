"""Configuration: yacs defaults with the official CrossFormer key names, YAML files, overrides.

A YAML file may name parent files under ``BASE`` (paths relative to itself); they are merged
first. Command-line values go through ``--opts KEY VALUE ...`` and the dedicated flags of main.py
(the authors' flags: ``add_official_arguments``).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import glob
import os
from typing import Iterable, Sequence

import yaml
from yacs.config import CfgNode as CN


class UserError(Exception):
    """Bad input from the user (file, key, value): main.py reports it as one line and exits 2."""


REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_FILE = os.path.join(REPO_ROOT, "crossformer", "model.py")


def class_defaults(path: str = MODEL_FILE, class_name: str = "CrossFormer") -> dict[str, object]:
    """The keyword defaults of ``class_name.__init__`` in the Python file ``path`` that are literals
    or module-level constants (``nn.LayerNorm`` is left out). Read from the source, so that this
    module does not import torch; the MODEL defaults below take their values from it."""
    with open(path, encoding="utf-8") as f:
        module = ast.parse(f.read(), path)
    constants = {target.id: node.value for node in module.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}
    init = next(node for cls in module.body if isinstance(cls, ast.ClassDef) and cls.name == class_name
                for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    arguments = init.args
    pairs = list(zip(arguments.args[len(arguments.args) - len(arguments.defaults):], arguments.defaults))
    pairs += [(arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults)
              if default is not None]
    defaults = {}
    for arg, node in pairs:
        try:
            defaults[arg.arg] = ast.literal_eval(constants.get(node.id, node) if isinstance(node, ast.Name) else node)
        except ValueError:
            continue
    return defaults


def _as_lists(value):
    """Tuples (the class's sequence defaults) as lists, the type YAML files give."""
    return [_as_lists(item) for item in value] if isinstance(value, (tuple, list)) else value


# CrossFormer's defaults, the source of every MODEL default that the class also has
MODEL_DEFAULTS = {name: _as_lists(value) for name, value in class_defaults().items()}


def per_stage(mlp_ratio: float) -> list[float]:
    """The ICLR code's single MLP_RATIO (its configs, its ``--mlp_ratio``) as one value per stage."""
    return [float(mlp_ratio)] * 4


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
# Official keys of a feature not implemented here (token labelling): accepted at these defaults only.
_C.DATA.TOKEN_LABEL = False
_C.DATA.TOKEN_LABEL_SIZE = 7
_C.DATA.PREFETCH = False
_C.DATA.MIX_GROUNDTRUTH = False
_C.DATA.CLS_WEIGHT = 1.0
_C.DATA.DENSE_WEIGHT = 0.5

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = "cross-scale"
_C.MODEL.NAME = "tiny_patch4_group7_224"
_C.MODEL.PRETRAINED = ""  # weights to fine-tune from (model only)
_C.MODEL.RESUME = ""  # full training state to continue from
_C.MODEL.NUM_CLASSES = MODEL_DEFAULTS["num_classes"]
_C.MODEL.DROP_RATE = MODEL_DEFAULTS["drop_rate"]
_C.MODEL.DROP_PATH_RATE = MODEL_DEFAULTS["drop_path_rate"]
_C.MODEL.LABEL_SMOOTHING = 0.1
# Official keys of features not implemented here (dense supervision, token mixing, variant
# switches): accepted at these defaults only. MODEL.FROM_PRETRAIN: use RESUME or PRETRAINED.
_C.MODEL.FROM_PRETRAIN = ""
_C.MODEL.IMPL_TYPE = ""
_C.MODEL.CONV_BLOCKS = ""
_C.MODEL.RETURN_DENSE = True
_C.MODEL.MIX_TOKEN = True
_C.MODEL.LOSS = CN()
_C.MODEL.LOSS.ALPHA2 = 0.1
_C.MODEL.LOSS.ALPHA3 = 0.1
_C.MODEL.LOSS.ALPHA4 = 0.25

# The class's defaults (MODEL_DEFAULTS), except for four keys where the authors' config.py
# differs from their class and this file keeps their config.py: its four-kernel embeddings and
# merges, EMBED_DIM 48 and USE_ACL True, where their class has one 4x4 patch kernel, single 2x2
# merges, embed_dim 96 and use_acl False.
_C.MODEL.CROS = CN()
_C.MODEL.CROS.PATCH_SIZE = [4, 8, 16, 32]
_C.MODEL.CROS.MERGE_SIZE = [[2, 4], [2, 4], [2, 4]]
_C.MODEL.CROS.IN_CHANS = MODEL_DEFAULTS["in_chans"]
_C.MODEL.CROS.EMBED_DIM = 48
_C.MODEL.CROS.DEPTHS = MODEL_DEFAULTS["depths"]
_C.MODEL.CROS.NUM_HEADS = MODEL_DEFAULTS["num_heads"]
_C.MODEL.CROS.GROUP_SIZE = MODEL_DEFAULTS["group_size"]
_C.MODEL.CROS.INTERVAL = MODEL_DEFAULTS["crs_interval"]
_C.MODEL.CROS.MLP_RATIO = per_stage(MODEL_DEFAULTS["mlp_ratio"])  # per stage; a single number is accepted too
_C.MODEL.CROS.QKV_BIAS = MODEL_DEFAULTS["qkv_bias"]
_C.MODEL.CROS.QK_SCALE = MODEL_DEFAULTS["qk_scale"]
_C.MODEL.CROS.APE = MODEL_DEFAULTS["ape"]
_C.MODEL.CROS.PATCH_NORM = MODEL_DEFAULTS["patch_norm"]
_C.MODEL.CROS.GROUP_TYPE = MODEL_DEFAULTS["group_type"]  # constant, linear, linear_div, alter, 7_14 (CrossFormer++)
_C.MODEL.CROS.USE_ACL = True  # activation cooling (CrossFormer++); the ICLR configs set False
_C.MODEL.CROS.USE_CPE = MODEL_DEFAULTS["use_cpe"]  # CrossFormer++'s convolutional position encoding instead of DPB
_C.MODEL.CROS.ADAPT_INTER = MODEL_DEFAULTS["adaptive_interval"]  # LDA interval ceil(map size / G) per block, not INTERVAL
_C.MODEL.CROS.PAD_TYPE = MODEL_DEFAULTS["pad_type"]  # 0: pad bottom/right, 1: split the padding between both sides
_C.MODEL.CROS.NO_MASK = MODEL_DEFAULTS["no_mask"]
# Grouping layout at sizes other than the configured square (detection, segmentation): auto,
# crossformer (the ICLR backbone's) or crossformer_pp (the CrossFormer++ backbone's); auto follows
# USE_ACL (the ICLR configs set it False). See docs/models.md.
_C.MODEL.CROS.GROUPING = MODEL_DEFAULTS["grouping"]

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
_C.TRAIN.CHECKPOINT_MINUTES = 10.0  # save the full training state every N minutes at a step boundary (0: off)

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine, linear, step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw, sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# mmcv's rule (the dense configs): parameters whose name contains one of these go without weight
# decay, all others (norms and biases included) with it. None: classification's rule (optimizer.py).
_C.TRAIN.OPTIMIZER.NO_DECAY_KEYS = None

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

# ----------------------------------------------------------------------------- detection (detection/)
# Used only by detection/train.py and detection/test.py. DATA.DATASET is 'coco' (a COCO-layout
# folder) or 'digits' (the bundled demo set); MODEL.NUM_CLASSES counts object categories.
_C.DET = CN()
_C.DET.TYPE = "mask_rcnn"  # mask_rcnn, faster_rcnn, retinanet, cascade_mask_rcnn
_C.DET.FPN_CHANNELS = 256
_C.DET.MIN_SIZE = [800]  # short side; several values: one drawn per training image, the last one at test
_C.DET.MAX_SIZE = 1333  # long-side limit
_C.DET.ANCHOR_SIZES = [32, 64, 128, 256, 512]  # one base size per pyramid level
_C.DET.ASPECT_RATIOS = [0.5, 1.0, 2.0]
_C.DET.P7_RELU = False  # RetinaNet: ReLU on P6 before the P7 conv (torchvision's LastLevelP6P7; mmdet has none)
_C.DET.RPN_PRE_NMS_TOP_N_TRAIN = 2000  # proposals per level before NMS
_C.DET.RPN_PRE_NMS_TOP_N_TEST = 1000
_C.DET.RPN_POST_NMS_TOP_N_TRAIN = 1000  # proposals per image after NMS (mmdet's Cascade R-CNN: 2000)
_C.DET.RPN_POST_NMS_TOP_N_TEST = 1000
_C.DET.RPN_BOX_LOSS = "l1"  # l1 (mmdet's Mask R-CNN) or smooth_l1 (beta 1/9: torchvision, mmdet's Cascade R-CNN)
_C.DET.ROI_ALIGN_ALIGNED = True  # half-pixel offset of mmcv's RoIAlign (torchvision's default: False)
_C.DET.ROI_ALIGN_SAMPLING_RATIO = 0  # points per bin side; 0: adaptive, as mmcv (torchvision's default: 2)
_C.DET.BOX_BATCH_SIZE_PER_IMAGE = 512  # sampled RoIs per image for the box head
_C.DET.BOX_HEAD_CONVS = 0  # 3x3 conv + BatchNorm + ReLU layers (FPN_CHANNELS wide) before the FC layers
_C.DET.BOX_HEAD_FCS = 2  # fully connected layers of the box head, BOX_HEAD_DIM wide
_C.DET.BOX_HEAD_DIM = 1024
_C.DET.ROI_BOX_LOSS = "l1"  # l1, smooth_l1 (beta 1/9, torchvision's) or giou (on the decoded boxes)
_C.DET.ROI_BOX_LOSS_WEIGHT = 1.0
# One entry per R-CNN stage: one for mask_rcnn and faster_rcnn, several for cascade_mask_rcnn.
_C.DET.ROI_IOU_THRESHOLDS = [0.5]  # a sampled RoI is positive at this IoU with a ground-truth box, else negative
_C.DET.ROI_STAGE_WEIGHTS = [1.0]  # loss weight of each stage
_C.DET.ROI_TARGET_STDS = [[0.1, 0.1, 0.2, 0.2]]  # box deltas are divided by these (mmdet's target_stds)
_C.DET.MASK_HEAD_CONVS = 4
_C.DET.SCORE_THRESH = 0.05
_C.DET.DETECTIONS_PER_IMG = 100
_C.DET.TEST_BATCH_SIZE = 1  # images per process at evaluation (a batch pads its images to one size)
_C.DET.LR_STEPS = [8, 11]  # epochs after which the learning rate is multiplied by TRAIN.LR_SCHEDULER.DECAY_RATE
_C.DET.WARMUP_ITERS = 500  # linear warm-up from BASE_LR * WARMUP_RATIO, in optimizer steps
_C.DET.WARMUP_RATIO = 0.001
_C.DET.HFLIP = 0.5
# Swin Transformer's 3x crop policy: with probability CROP_PROB a training image is resized to a short
# side drawn from CROP_SHORT_SIDES (long side <= MAX_SIZE) and cropped to a random height and width in
# CROP_SIZE (pixels, at most the image's); then MIN_SIZE's multi-scale resize applies as to every image.
_C.DET.CROP_PROB = 0.0
_C.DET.CROP_SHORT_SIDES = [400, 500, 600]
_C.DET.CROP_SIZE = [384, 600]
# ----------------------------------------------------------------------------- segmentation
# segmentation/train.py and test.py only (mmseg's names where they have one). DATA.DATASET is
# 'ade20k' (the ADE20K folder layout) or 'digit_scenes' (the bundled demo, written once).
_C.SEG = CN()
_C.SEG.HEAD = "fpn"  # fpn: Semantic FPN; upernet: UPerNet (+ auxiliary FCN head)
_C.SEG.NECK_CHANNELS = 256  # Semantic FPN: FPN neck channels
_C.SEG.CHANNELS = 128  # decode head channels (Semantic FPN 128, UPerNet 512)
_C.SEG.POOL_SCALES = [1, 2, 3, 6]  # UPerNet pyramid pooling
_C.SEG.DROPOUT = 0.1  # before the classifier of each head
_C.SEG.AUX_WEIGHT = 0.0  # loss weight of the auxiliary FCN head on stage 3; 0: no auxiliary head
_C.SEG.AUX_CHANNELS = 256
_C.SEG.IGNORE_INDEX = 255
_C.SEG.REDUCE_ZERO_LABEL = True  # label 0 is ignored, 1..N become 0..N-1
_C.SEG.IMG_SCALE = [2048, 512]  # (long, short) side limits of the keep-ratio resize
_C.SEG.RATIO_RANGE = [0.5, 2.0]  # training: random multiple of IMG_SCALE
_C.SEG.CROP_SIZE = [512, 512]  # training crop (height, width)
_C.SEG.CAT_MAX_RATIO = 0.75  # a crop may hold at most this share of one class (10 tries)
_C.SEG.FLIP_PROB = 0.5
_C.SEG.PHOTOMETRIC = True  # brightness, contrast, saturation, hue distortion
_C.SEG.SIZE_DIVISOR = 32  # align resize at test time: sides rounded up to a multiple of this
_C.SEG.TEST_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]  # --aug-test scales
_C.SEG.TEST_FLIP = True  # --aug-test also averages the flipped image
_C.SEG.MAX_ITERS = 80000
_C.SEG.WARMUP_ITERS = 0  # linear warm-up (a factor on the poly rate, from WARMUP_RATIO to 1)
_C.SEG.WARMUP_RATIO = 1e-6
_C.SEG.POWER = 0.9  # poly decay: (1 - iter / MAX_ITERS) ** POWER
_C.SEG.MIN_LR = 0.0
_C.SEG.EVAL_INTERVAL = 8000  # iterations between evaluations (and at the end)
_C.SEG.CHECKPOINT_INTERVAL = 8000  # iterations between ckpt_iter_N.pth files (and at the end)

# ----------------------------------------------------------------------------- misc
# Mixed precision: 'native' (the official default), '', O1 and O2 autocast to AMP_DTYPE; O0 is float32.
_C.AMP_OPT_LEVEL = "native"
# auto: bfloat16 on CUDA compute capability >= 8 and on CPUs with AMX or avx512_bf16, float16 (with a
# gradient scaler) on older CUDA GPUs, float32 elsewhere; or float16, bfloat16 (see runtime.Precision)
_C.AMP_DTYPE = "auto"
_C.DEVICE = ""  # '' picks cuda when available, else cpu
_C.OUTPUT = ""
_C.TAG = "default"
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 50
_C.SEED = 0
_C.DETERMINISTIC = False
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0
_C.TRUST_CHECKPOINTS = False  # allow full unpickling of checkpoint files (runs code in them)
_C.KEEP_CHECKPOINTS = 3  # newest ckpt_epoch_N.pth files kept (best.pth is kept besides); 0 keeps all
_C.MODEL_EMA = False  # keep an exponential moving average of the weights (timm ModelEmaV3), validated each epoch
_C.MODEL_EMA_DECAY = 0.9999
_C.MODEL_EMA_EVAL = False  # the EMA weights are the ones that count: best.pth by EMA top-1, --eval scores them
_C.COMPILE = False  # torch.compile the model (dynamic sizes) for training, --eval and --throughput (main.py)
# Official keys that the official main.py overwrites from OUTPUT and TAG; here everything a run
# writes goes to OUTPUT/<MODEL.NAME>/<TAG>. Accepted at these defaults only.
_C.LOG_OUTPUT = ""
_C.WEIGHT_OUTPUT = ""

# Official keys accepted only at their default, and what setting them would have asked for.
UNIMPLEMENTED_KEYS = {
    "DATA.TOKEN_LABEL": "token labelling",
    "DATA.TOKEN_LABEL_SIZE": "token labelling",
    "DATA.PREFETCH": "token labelling's prefetching loader",
    "DATA.MIX_GROUNDTRUTH": "token labelling",
    "DATA.CLS_WEIGHT": "token labelling's loss weights",
    "DATA.DENSE_WEIGHT": "token labelling's loss weights",
    "MODEL.FROM_PRETRAIN": "loading a full training state before training (use MODEL.RESUME / --resume "
                           "to continue a run, MODEL.PRETRAINED / --pretrained to start from weights)",
    "MODEL.IMPL_TYPE": "the official code's model variants",
    "MODEL.CONV_BLOCKS": "the official code's convolutional-block variant",
    "MODEL.RETURN_DENSE": "token labelling's dense outputs",
    "MODEL.MIX_TOKEN": "token labelling's token mixing",
    "MODEL.LOSS.ALPHA2": "supervision of intermediate feature maps",
    "MODEL.LOSS.ALPHA3": "supervision of intermediate feature maps",
    "MODEL.LOSS.ALPHA4": "supervision of intermediate feature maps",
    "LOG_OUTPUT": "a separate log folder (logs go to OUTPUT/<MODEL.NAME>/<TAG>)",
    "WEIGHT_OUTPUT": "a separate checkpoint folder (checkpoints go to OUTPUT/<MODEL.NAME>/<TAG>)",
}

# Evaluation and throughput runs write to <output>/<MODEL.NAME>/<TAG><suffix>, never into the
# training run's folder.
MODE_SUFFIXES = {"EVAL_MODE": "-eval", "THROUGHPUT_MODE": "-throughput"}

# ----------------------------------------------------------------------------- loading and merging


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
        cros["MLP_RATIO"] = per_stage(cros["MLP_RATIO"])


def _quote_strings(config: CN, data: dict) -> None:
    """Quote the values of string keys: yacs reads values as Python literals, which would turn
    GROUP_TYPE '7_14' into the number 714."""
    for key, value in data.items():
        default = config.get(key) if isinstance(config, CN) else None
        if isinstance(value, dict):
            _quote_strings(default, value)
        elif isinstance(value, str) and isinstance(default, str):
            data[key] = repr(value)


def _dotted_keys(config: CN, prefix: str = "") -> list[str]:
    """Every key of ``config`` as ``A.B.C``, sections included."""
    keys = []
    for name, value in config.items():
        keys.append(prefix + name)
        if isinstance(value, CN):
            keys += _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _check_known_key(config: CN, key: str, culprit: str) -> None:
    """UserError naming ``key`` and the closest known keys when ``config`` has no such key."""
    node = config
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            break
        node = node[part]
    else:
        return
    # the known keys most like it: at least 0.7 alike (difflib's ratio), and within 0.1 of the best
    likeness = {known: difflib.SequenceMatcher(None, key.upper(), known).ratio() for known in _dotted_keys(config)}
    cutoff = max(0.7, max(likeness.values()) - 0.1)
    close = sorted((known for known, ratio in likeness.items() if ratio >= cutoff), key=likeness.get, reverse=True)
    hint = f"; did you mean {' or '.join(close[:3])}?" if close else ""
    raise UserError(f"{culprit}: unknown config key {key}{hint}")


def _check_known_keys(config: CN, data: dict, culprit: str, prefix: str = "") -> None:
    """``_check_known_key`` for every key of the nested mapping ``data`` (a YAML file's)."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        _check_known_key(config, key, culprit)
        if isinstance(value, dict):
            _check_known_keys(config, value, culprit, key + ".")


def _merge(config: CN, data: dict, culprit: str) -> None:
    _check_known_keys(config, data, culprit)
    _quote_strings(config, data)
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
    opts = list(opts)
    for i in range(0, len(opts), 2):
        _check_known_key(config, opts[i], "--opts")
        node = config
        for part in opts[i].split("."):
            node = node.get(part) if isinstance(node, CN) else None
        if isinstance(node, str) and isinstance(opts[i + 1], str):
            opts[i + 1] = repr(opts[i + 1])  # see _quote_strings
    try:
        config.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as err:
        raise UserError(f"--opts: {err.args[0] if err.args else err}") from err


def _check_unimplemented(config: CN, flags: dict[str, str] | None = None) -> None:
    """A UserError for the first official key set to something other than its default whose
    feature this code does not have; ``flags`` (key -> flag) names the flag that set it."""
    for key, feature in UNIMPLEMENTED_KEYS.items():
        value, default = config, _C
        for part in key.split("."):
            value, default = value[part], default[part]
        if value != default:
            culprit = f"{key} ({flags[key]})" if flags and key in flags else key
            raise UserError(f"{culprit} is {value!r}, but {feature} is not implemented here; "
                            f"only the official default {default!r} is accepted")


def get_default_config() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def _lookup(config: CN, key: str):
    """The value of a dotted key, or None where the config has no such key."""
    node = config
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            return None
        node = node[part]
    return node


# ----------------------------------------------------------------------------- config files
DENSE_TASKS = ("detection", "segmentation")  # the authors kept their mmdet/mmseg configs in <task>/configs/


def resolve_config_path(path: str) -> str:
    """The config file ``path`` names: as given (relative to the current folder), else relative to
    the repository root, so that ``cd detection; python train.py --cfg configs/detection/...``
    works. A Python config (the authors' mmdetection/mmsegmentation ones) or a file found in
    neither place is a UserError naming the YAML config here that is closest by name."""
    if path.endswith(".py"):
        raise UserError(f"{path}: Python configs (the authors' mmdetection/mmsegmentation ones) are not read here; "
                        f"configs are YAML files, and the closest by name is {closest_yaml_config(path)}")
    if os.path.exists(path) or os.path.isabs(path):
        return path
    from_root = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(from_root):
        raise UserError(f"config file not found: {path} (nor {from_root}); the closest by name is "
                        f"{closest_yaml_config(path)}")
    return from_root


def closest_yaml_config(path: str) -> str:
    """The YAML config (relative to the repository root) whose name is closest to that of
    ``path``, of the same model family (CrossFormer++ when the path says ``crossformerpp`` or
    ``crossformer_pp``, as the authors' ++ configs do; CrossFormer otherwise); one under
    ``detection/`` or ``segmentation/`` (the authors' layout) is matched with configs/detection
    or configs/segmentation only."""
    task = os.path.relpath(os.path.abspath(path), REPO_ROOT).split(os.sep)[0]
    folder = os.path.join(REPO_ROOT, "configs", task if task in DENSE_TASKS else "")
    candidates = sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(folder, "**", "*.yaml"),
                                                                           recursive=True))
    plus_plus = "crossformer_pp" in path.replace("crossformerpp", "crossformer_pp")
    candidates = [p for p in candidates if ("crossformer_pp" in p) == plus_plus] or candidates
    names = [os.path.splitext(os.path.basename(p))[0] for p in candidates]
    query = os.path.splitext(os.path.basename(path))[0].replace("crossformerpp", "crossformer_pp")
    best = difflib.get_close_matches(query, names, n=1, cutoff=0)
    return candidates[names.index(best[0])] if best else os.path.join("configs", task)


def load_config(cfg_file: str, opts: Iterable[str] = ()) -> CN:
    """Defaults, then ``cfg_file`` (with its BASE files), then ``opts`` pairs; returned frozen."""
    config = get_default_config()
    _merge_file(config, resolve_config_path(cfg_file))
    _merge_opts(config, [str(o) for o in opts])
    _check_unimplemented(config)
    config.freeze()
    return config


# ----------------------------------------------------------------------------- command-line flags
# Flags of main.py (the authors' names, both versions of their main.py, plus ours) and the key each
# sets. A flag that was not given (None, or False for a switch) leaves the key as the config file
# has it; the authors' argparse defaults (--epochs 300, --warmup_epochs 20, --img_size 224, ...)
# overwrote the file's values even when the flag was not given.
FLAG_KEYS = {
    "--batch-size": "DATA.BATCH_SIZE",
    "--data-path": "DATA.DATA_PATH",
    "--data-set": "DATA.DATASET",
    "--img_size": "DATA.IMG_SIZE",
    "--cache-mode": "DATA.CACHE_MODE",
    "--num_workers": "DATA.NUM_WORKERS",
    "--pretrained": "MODEL.PRETRAINED",
    "--resume": "MODEL.RESUME",
    "--impl_type": "MODEL.IMPL_TYPE",
    "--embed_dim": "MODEL.CROS.EMBED_DIM",
    "--mlp_ratio": "MODEL.CROS.MLP_RATIO",
    "--accumulation-steps": "TRAIN.ACCUMULATION_STEPS",
    "--epochs": "TRAIN.EPOCHS",
    "--warmup_epochs": "TRAIN.WARMUP_EPOCHS",
    "--lr": "TRAIN.BASE_LR",
    "--min_lr": "TRAIN.MIN_LR",
    "--warmup_lr": "TRAIN.WARMUP_LR",
    "--weight_decay": "TRAIN.WEIGHT_DECAY",
    "--amp-opt-level": "AMP_OPT_LEVEL",
    "--amp-dtype": "AMP_DTYPE",
    "--device": "DEVICE",
    "--output": "OUTPUT",
    "--tag": "TAG",
    "--seed": "SEED",
}
SWITCH_KEYS = {"--zip": "DATA.ZIP_MODE", "--use-checkpoint": "TRAIN.USE_CHECKPOINT", "--eval": "EVAL_MODE",
               "--throughput": "THROUGHPUT_MODE", "--trust-checkpoints": "TRUST_CHECKPOINTS", "--compile": "COMPILE"}
# Flags the CrossFormer++ main.py parsed and then never read: its model followed these keys.
IGNORED_FLAG_KEYS = {"--group_type": "MODEL.CROS.GROUP_TYPE", "--use_cpe": "MODEL.CROS.USE_CPE",
                     "--pad_type": "MODEL.CROS.PAD_TYPE", "--no_mask": "MODEL.CROS.NO_MASK",
                     "--adaptive_interval": "MODEL.CROS.ADAPT_INTER"}
# The official TFRecord datasets (their --data-set names), which are not implemented here.
TFRECORD_DATASETS = ("ImageNet", "ImageNet22K")

OFFICIAL_ARGUMENTS: tuple[tuple[tuple[str, ...], dict], ...] = (
    (("--data-set",), dict(type=str, help="dataset: imagenet (an image folder), digits (bundled), fake")),
    (("--zip",), dict(action="store_true", help="read train.zip/val.zip instead of folders")),
    (("--cache-mode",), dict(type=str, choices=["no", "full", "part"],
                             help="zip mode: no cache, cache everything, or cache this rank's shard")),
    (("--accumulation-steps",), dict(type=int, help="gradient accumulation steps")),
    (("--use-checkpoint",), dict(action="store_true", help="gradient checkpointing to save memory")),
    (("--throughput",), dict(action="store_true", help="only measure throughput")),
    (("--num_workers",), dict(type=int, help="data-loading workers per process")),
    (("--epochs",), dict(type=int, help="training epochs (TRAIN.EPOCHS)")),
    (("--warmup_epochs",), dict(type=int, help="warm-up epochs (TRAIN.WARMUP_EPOCHS)")),
    (("--lr",), dict(type=float, help="base learning rate for a global batch of 512 (TRAIN.BASE_LR)")),
    (("--min_lr",), dict(type=float, help="final learning rate of the cosine schedule (TRAIN.MIN_LR)")),
    (("--warmup_lr",), dict(type=float, help="learning rate the warm-up starts from (TRAIN.WARMUP_LR)")),
    (("--weight_decay",), dict(type=float, help="weight decay (TRAIN.WEIGHT_DECAY)")),
    (("--img_size",), dict(type=int, help="input resolution (DATA.IMG_SIZE)")),
    (("--embed_dim",), dict(type=int, nargs="+", help="embedding width of stage 1 (MODEL.CROS.EMBED_DIM): one number")),
    (("--mlp_ratio",), dict(type=float, help="MLP expansion of every stage (MODEL.CROS.MLP_RATIO)")),
    (("--impl_type",), dict(type=str, help="the official code's model variants: only '' (none) is implemented")),
    (("--group_type",), dict(type=str, help="ignored by the official main.py: only MODEL.CROS.GROUP_TYPE's value "
                                             "is accepted (set it with --opts)")),
    (("--use_cpe",), dict(action="store_true", help="ignored by the official main.py: accepted only when "
                                                     "MODEL.CROS.USE_CPE is True")),
    (("--pad_type",), dict(type=int, help="ignored by the official main.py: only MODEL.CROS.PAD_TYPE's value is "
                                           "accepted")),
    (("--no_mask",), dict(action="store_true", help="ignored by the official main.py: accepted only when "
                                                     "MODEL.CROS.NO_MASK is True")),
    (("--adaptive_interval",), dict(action="store_true", help="ignored by the official main.py: accepted only "
                                                               "when MODEL.CROS.ADAPT_INTER is True")),
)


def add_official_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of the authors' main.py (ICLR and CrossFormer++) that ``parser`` does not have
    yet (``runtime.add_common_arguments`` defines --cfg, --opts, --batch-size, --data-path,
    --resume, --amp-opt-level, --output, --tag, --eval, --local_rank). Every one defaults to
    "not given"; ``get_config`` maps the given ones onto their config keys."""
    for flags, options in OFFICIAL_ARGUMENTS:
        try:
            parser.add_argument(*flags, **options)
        except argparse.ArgumentError:  # the script defines this flag itself
            pass


def _given(args: argparse.Namespace, flag: str):
    """The value of ``flag`` in ``args`` (its argparse destination), None when it was not given."""
    return getattr(args, flag.lstrip("-").replace("-", "_"), None)


def _flag_value(flag: str, value):
    """A given flag's value as its config key takes it; a UserError for one that cannot be honoured."""
    if flag == "--embed_dim" and isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise UserError(f"--embed_dim takes one number (MODEL.CROS.EMBED_DIM, the width of stage 1), "
                            f"got {len(value)}: {' '.join(map(str, value))}")
        return value[0]
    if flag == "--mlp_ratio":
        return per_stage(value)
    if flag == "--data-set":
        from data.build import DATASETS  # the data pipeline imports config: import it only here

        if value in TFRECORD_DATASETS:
            raise UserError(f"--data-set {value}: the official code's TFRecord datasets ({', '.join(TFRECORD_DATASETS)}) "
                            "are not implemented here; use an image folder (--data-set imagenet) or --zip")
        if value not in DATASETS:
            raise UserError(f"--data-set {value}: unknown dataset; known: {', '.join(DATASETS)}")
    return value


def _check_ignored_flags(config: CN, args: argparse.Namespace) -> None:
    """The flags the official main.py parsed but never read are accepted only at the value the
    config already has: with the official code they did not change the model."""
    for flag, key in IGNORED_FLAG_KEYS.items():
        value, current = _given(args, flag), _lookup(config, key)
        if value is not None and value is not False and value != current:
            raise UserError(f"{flag} {value}: the official main.py accepted this flag but never used it (its model "
                            f"follows {key}, here {current!r}); to ask for {value!r}, use --opts {key} {value}")


# ----------------------------------------------------------------------------- the config of a run


def run_folder(config: CN) -> str:
    """``<OUTPUT>/<MODEL.NAME>/<TAG>``, with ``-eval`` or ``-throughput`` after the tag for those
    modes, so they never write into (or over) a training run's files."""
    suffix = "".join(s for key, s in MODE_SUFFIXES.items() if config.get(key, False))
    return os.path.join(config.OUTPUT or "output", config.MODEL.NAME, config.TAG + suffix)


# the smallest value each key accepts, and the flag that sets it (named in the error)
MINIMUM_VALUES = {"DATA.BATCH_SIZE": (1, "--batch-size"), "DATA.NUM_WORKERS": (0, "--num_workers"),
                  "DATA.IMG_SIZE": (1, "--img_size"), "TRAIN.EPOCHS": (1, "--epochs"),
                  "TRAIN.WARMUP_EPOCHS": (0, "--warmup_epochs"), "SAVE_FREQ": (1, ""), "PRINT_FREQ": (1, ""),
                  "KEEP_CHECKPOINTS": (0, "")}


def check_values(config: CN) -> None:
    """UserError for values no run can use (one line naming the key), before anything starts."""
    for key, (minimum, flag) in MINIMUM_VALUES.items():
        value = _lookup(config, key)
        if value is not None and value < minimum:
            raise UserError(f"{key}{f' ({flag})' if flag else ''} must be at least {minimum}, got {value}")
    if config.get("EVAL_MODE", False) and not (config.MODEL.RESUME or config.MODEL.PRETRAINED):
        raise UserError("--eval needs weights to evaluate: pass --resume CHECKPOINT or --pretrained WEIGHTS")


def get_config(args: argparse.Namespace) -> CN:
    """Config from parsed main.py arguments (any Namespace with ``cfg``; a missing attribute is a
    flag not given): the YAML, then --opts, then the flags that were given."""
    if not getattr(args, "cfg", None):
        raise UserError("get_config needs args.cfg: the path of a config file")
    config = get_default_config()
    _merge_file(config, resolve_config_path(args.cfg))
    _merge_opts(config, [str(o) for o in (getattr(args, "opts", None) or [])])
    pairs, given = [], {}
    for flag, key in FLAG_KEYS.items():
        value = _given(args, flag)
        if value is not None:
            pairs += [key, _flag_value(flag, value)]
            given[key] = flag
    for flag, key in SWITCH_KEYS.items():
        if _given(args, flag):
            pairs += [key, True]
    _merge_opts(config, pairs)  # typed values: yacs keeps them as they are
    _check_unimplemented(config, given)
    _check_ignored_flags(config, args)
    config.LOCAL_RANK = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    config.OUTPUT = run_folder(config)
    check_values(config)
    config.freeze()
    return config
