"""config.py: BASE inheritance, overrides, main.py flags, and errors that name the culprit."""
import inspect
import json
import os
import re

import pytest
import torch
import yaml

from config import UserError, class_defaults, get_config, get_default_config, load_config
from main import build_parser, scale_learning_rates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "crossformer", "tiny_patch4_group7_224.yaml")


def test_official_config_values_and_defaults():
    config = load_config(TINY)
    assert config.MODEL.TYPE == "cross-scale" and config.MODEL.NAME == "cros_tiny_patch4_group7_224"
    assert config.MODEL.CROS.DEPTHS == [1, 1, 8, 6] and config.MODEL.DROP_PATH_RATE == 0.1
    assert config.MODEL.CROS.INTERVAL == [8, 4, 2, 1] and config.TRAIN.BASE_LR == 5e-4
    assert config.is_frozen()


def test_base_inheritance_is_relative_to_the_file_and_children_win(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "BASE: ['../parent.yaml']\nTRAIN:\n  EPOCHS: 7\nMODEL:\n  CROS:\n    MLP_RATIO: 2.\n")
    (tmp_path / "parent.yaml").write_text("TRAIN:\n  EPOCHS: 3\n  WARMUP_EPOCHS: 1\nDATA:\n  IMG_SIZE: 96\n")
    config = load_config(str(tmp_path / "sub" / "child.yaml"), ["DATA.IMG_SIZE", 128])
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS, config.DATA.IMG_SIZE) == (7, 1, 128)
    assert config.MODEL.CROS.MLP_RATIO == [2.0] * 4  # the ICLR configs' single number, per stage


@pytest.mark.parametrize("content,opts,message", [
    (None, [], "config file not found: {path}"),
    ("TRAIN: [unclosed", [], "config file {path} is not valid YAML"),
    ("TRAIN:\n  NOT_A_KEY: 1\n", [], "config file {path}: unknown config key TRAIN.NOT_A_KEY"),
    ("MODEL:\n  CROS:\n    GROUP_SZE: [7, 7, 7, 7]\n", [],
     "config file {path}: unknown config key MODEL.CROS.GROUP_SZE; did you mean MODEL.CROS.GROUP_SIZE or "
     "MODEL.CROS.GROUP_TYPE?"),
    ("TRAN:\n  EPOCHS: 3\n", [], "config file {path}: unknown config key TRAN; did you mean TRAIN?"),
    ("TRAIN:\n  EPOCHS: 3\n", ["TRAIN.BASE_LRR", "1e-3"],
     "--opts: unknown config key TRAIN.BASE_LRR; did you mean TRAIN.BASE_LR?"),
    ("TRAIN:\n  EPOCHS: 3\n", ["BATCH_SIZE", "8"],
     "--opts: unknown config key BATCH_SIZE; did you mean DATA.BATCH_SIZE?"),
    ("BASE: ['cfg.yaml']\n", [], "includes itself through BASE"),
    ("TRAIN:\n  EPOCHS: 3\n", ["TRAIN.EPOCHS", "x"], "--opts: Type mismatch"),
    ("TRAIN:\n  EPOCHS: 3\n", ["TRAIN.EPOCHS"], "--opts needs KEY VALUE pairs"),
])
def test_bad_config_is_a_user_error_naming_the_culprit(tmp_path, content, opts, message):
    path = tmp_path / "cfg.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        load_config(str(path), opts)
    assert message.format(path=path) in str(err.value)
    assert "\n" not in str(err.value)


def test_main_flags_land_in_the_official_keys(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args = build_parser().parse_args(["--cfg", TINY, "--batch-size", "32", "--data-path", "/data", "--zip", "--cache-mode", "full",
                         "--accumulation-steps", "4", "--use-checkpoint", "--amp-opt-level", "O0", "--amp-dtype",
                         "bfloat16", "--epochs", "9", "--lr", "0.001", "--seed", "5", "--tag", "t", "--eval",
                         "--resume", "ckpt.pth", "--local-rank", "3", "--opts", "MODEL.NUM_CLASSES", "100"])
    config = get_config(args)
    assert (config.DATA.BATCH_SIZE, config.DATA.DATA_PATH, config.DATA.ZIP_MODE, config.DATA.CACHE_MODE) == \
        (32, "/data", True, "full")
    assert (config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.USE_CHECKPOINT, config.TRAIN.EPOCHS) == (4, True, 9)
    assert (config.AMP_OPT_LEVEL, config.AMP_DTYPE, config.TRAIN.BASE_LR, config.SEED) == ("O0", "bfloat16", 1e-3, 5)
    assert config.EVAL_MODE and not config.THROUGHPUT_MODE and config.LOCAL_RANK == 3
    assert config.MODEL.NUM_CLASSES == 100
    assert config.MODEL.RESUME == "ckpt.pth"
    assert config.OUTPUT == os.path.join("output", "cros_tiny_patch4_group7_224", "t-eval")  # never the training run's


def test_learning_rates_scale_with_global_batch_and_accumulation():
    config = load_config(TINY, ["DATA.BATCH_SIZE", 64, "TRAIN.ACCUMULATION_STEPS", 2])
    scale_learning_rates(config, world_size=8)  # 64 x 8 / 512 x 2 = 2
    assert (config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR) == pytest.approx((1e-3, 1e-6, 1e-5))
    assert config.is_frozen()


def test_device_flag_errors_name_the_device(monkeypatch):
    from utils import init_distributed

    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserError, match="--device 'gpu0' is not a device name"):
        init_distributed("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda asked for CUDA, but no CUDA device is available"):
            init_distributed("cuda")
    assert init_distributed("cpu").device == torch.device("cpu")


def flat_items(node, prefix: str = "") -> dict:
    """{'A.B.C': value} for every leaf key of a (nested) mapping."""
    items = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(flat_items(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def differences_page() -> str:
    with open(os.path.join(ROOT, "docs", "differences.md"), encoding="utf-8") as f:
        return f.read()


# Official defaults kept different here, each explained in docs/differences.md.
DIFFERING_DEFAULTS = {"AMP_OPT_LEVEL", "SAVE_FREQ", "PRINT_FREQ"}


@pytest.mark.parametrize("repository", ["crossformer", "crossformer_pp"])
def test_every_official_key_at_its_default_loads_and_differences_are_documented(repository):
    path = os.path.join(ROOT, "tests", "fixtures", f"official_defaults_{repository}.yaml")
    config = load_config(path)
    with open(path, encoding="utf-8") as f:
        official = flat_items(yaml.safe_load(f))
    ours = flat_items(yaml.safe_load(get_default_config().dump()))
    official.pop("BASE")
    assert set(official) <= set(ours)
    loaded = flat_items(yaml.safe_load(config.dump()))
    assert all(loaded[key] == value or key == "MODEL.CROS.MLP_RATIO" for key, value in official.items())
    differing = {key for key, value in official.items() if ours[key] != value and key != "MODEL.CROS.MLP_RATIO"}
    assert differing <= DIFFERING_DEFAULTS
    section = differences_page()
    for key in DIFFERING_DEFAULTS:
        assert f"`{key}`" in section


def test_model_defaults_come_from_the_class_but_four_from_the_authors_config():
    from crossformer.model import CrossFormer
    from crossformer.official import CROS_KEYWORDS, MODEL_KEYWORDS

    signature = {name: parameter.default for name, parameter in inspect.signature(CrossFormer).parameters.items()
                 if parameter.default is not inspect.Parameter.empty}
    assert class_defaults() == {name: value for name, value in signature.items() if name != "norm_layer"}
    signature = json.loads(json.dumps({**signature, "norm_layer": None}))  # tuples as lists, as in the config
    signature["interval"] = signature["crs_interval"]  # interval is the synonym that defaults to crs_interval's
    model = get_default_config().MODEL
    ours = {keyword: model[key] for key, keyword in MODEL_KEYWORDS.items()}
    ours.update({keyword: model.CROS[key] for key, keyword in CROS_KEYWORDS.items()}, grouping=model.CROS.GROUPING)
    assert ours["mlp_ratio"] == [signature["mlp_ratio"]] * 4  # one per stage
    differing = {keyword for keyword, value in ours.items() if keyword != "mlp_ratio" and value != signature[keyword]}
    assert differing == {"patch_size", "merge_size", "embed_dim", "use_acl"}  # the authors' config.py's own


@pytest.mark.parametrize("key,value", [
    ("DATA.TOKEN_LABEL", True), ("MODEL.MIX_TOKEN", False), ("MODEL.LOSS.ALPHA4", 0.5),
    ("LOG_OUTPUT", "logs"), ("MODEL.FROM_PRETRAIN", "ckpt.pth"),
])
def test_unimplemented_official_keys_only_take_their_default(tmp_path, key, value):
    with pytest.raises(UserError, match=rf"^{re.escape(key)} is .*not implemented here; only the official default"):
        load_config(TINY, [key, value])
    args = build_parser().parse_args(["--cfg", TINY, "--opts", key, str(value)])
    with pytest.raises(UserError, match=re.escape(key)):
        get_config(args)


def test_amp_opt_levels():
    from runtime import Precision

    device = torch.device("cpu")
    for level in ("", "native", "O1", "O2"):
        assert Precision(load_config(TINY, ["AMP_OPT_LEVEL", level, "AMP_DTYPE", "bfloat16"]), device).enabled
    assert not Precision(load_config(TINY, ["AMP_OPT_LEVEL", "O0", "AMP_DTYPE", "bfloat16"]), device).enabled
    assert build_parser().parse_args(["--cfg", TINY, "--amp-opt-level", "native"]).amp_opt_level == "native"
    with pytest.raises(UserError, match="AMP_OPT_LEVEL must be one of .*got 'O3'"):
        Precision(load_config(TINY, ["AMP_OPT_LEVEL", "O3"]), device)
