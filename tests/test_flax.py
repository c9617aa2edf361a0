"""The Flax model against the PyTorch one and the official logits: converted weights, jit, any size."""
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from yacs.config import CfgNode

jax = pytest.importorskip("jax", reason="jax is not installed (pip install -r requirements-jax.txt)")
pytest.importorskip("flax", reason="flax is not installed (pip install -r requirements-jax.txt)")
from flax import nnx  # noqa: E402

from config import UserError, get_default_config, load_config  # noqa: E402
from crossformer import CrossFormer as TorchCrossFormer  # noqa: E402
from crossformer.flax import flax_to_torch, from_torch, load_torch_state_dict, model_params, torch_to_flax  # noqa: E402
from crossformer.flax.compat import CrossFormer as KeywordCrossFormer, model_kwargs  # noqa: E402
from crossformer.flax.model import CrossFormer as FlaxCrossFormer  # noqa: E402
from models import build_model  # noqa: E402
from models.build import build_flax_model, cross_scale_kwargs  # noqa: E402
from test_models import DENSE, DENSE_LAYOUT, OFFICIAL, ROOT, dense_input, dense_model, fixture_model  # noqa: E402

DEFAULT_CONFIGS = ["crossformer/tiny_patch4_group7_224", "crossformer_pp/small_patch4_group_const_224"]
# at 256x320 most stages pad their maps (padding and masks run) and group by their family's layout
SIZES = [(224, 224), (256, 320)]


def config_of(name: str):
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))


def fixture_config(fixture: dict):
    config = get_default_config()
    config.merge_from_other_cfg(CfgNode(yaml.safe_load(fixture["config_yaml"])))
    config.freeze()
    return config


def load_config_with(config, opts: list):
    config = config.clone()
    config.defrost()
    config.merge_from_list(opts)
    config.freeze()
    return config


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def jitted(model: nnx.Module):
    """``jax.jit`` of the functional apply: ``(state, images) -> logits``."""
    graphdef, state = nnx.split(model)
    apply = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    return lambda images: np.asarray(apply(state, images))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its init (LayerNorm weights off 1, biases off 0), so a swapped or
    mis-transposed tensor shows in the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def check_against_torch(name: str) -> None:
    config = config_of(name)
    torch_model = randomized(build_model(config))
    flax_apply = jitted(build_flax_model(config, torch_model.state_dict()))
    for height, width in SIZES:
        images = torch.randn(1, 3, height, width)
        with torch.no_grad():
            expected = torch_model(images).numpy()
        np.testing.assert_allclose(flax_apply(nhwc(images)), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", DEFAULT_CONFIGS)
def test_official_config_logits_equal_pytorch_under_jit(name):
    check_against_torch(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(OFFICIAL) - set(DEFAULT_CONFIGS)))
def test_every_official_config_logits_equal_pytorch_under_jit(name):
    check_against_torch(name)


@pytest.mark.parametrize("name", ["v1_micro", "pp_micro"])
def test_fixture_logits_equal_official_under_jit(name):
    torch_model, fixture = fixture_model(name)
    flax_apply = jitted(build_flax_model(fixture_config(fixture), fixture["model"]))
    np.testing.assert_allclose(flax_apply(nhwc(fixture["input"])), fixture["logits"].numpy(), rtol=0, atol=1e-4)
    torch_model.load_state_dict(fixture["model"])
    padded = torch.randn(1, 3, 72, 88)  # no multiple of group x interval in any stage
    with torch.no_grad():
        expected = torch_model(padded).numpy()
    np.testing.assert_allclose(flax_apply(nhwc(padded)), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["pp_linear_micro", "pp_alter_micro"])
def test_group_type_fixture_logits_equal_official_under_jit(name):
    """CrossFormer++ per-block group sizes (GROUP_TYPE), shared with the PyTorch model."""
    _, fixture = fixture_model(name)
    flax_apply = jitted(build_flax_model(fixture_config(fixture), fixture["model"]))
    np.testing.assert_allclose(flax_apply(nhwc(fixture["input"])), fixture["logits"].numpy(), rtol=0, atol=1e-4)


def test_defaults_are_the_pytorch_models():
    """The Flax constructor's defaults are the PyTorch class's (``interval`` is its ``crs_interval``),
    and both build the same model from them."""
    torch_parameters = inspect.signature(TorchCrossFormer.__init__).parameters
    flax_parameters = inspect.signature(FlaxCrossFormer.__init__).parameters
    names = {"interval": "crs_interval"}
    for name, parameter in flax_parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == torch_parameters[names.get(name, name)].default, name
    model = nnx.eval_shape(lambda: FlaxCrossFormer(rngs=nnx.Rngs(0)))
    flax_count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert flax_count == sum(p.numel() for p in TorchCrossFormer().parameters())


def test_option_not_ported_is_a_clear_error():
    config = load_config_with(config_of("crossformer_pp/small_patch4_group_const_224"), ["MODEL.CROS.USE_CPE", True])
    with pytest.raises(UserError, match="does not support .*MODEL.CROS.USE_CPE"):
        build_flax_model(config)


@pytest.mark.parametrize("options,size", [
    # resized position embedding, padding split top/bottom; the ICLR layout (groups of the map's
    # short side in stage 3, LDA groups grown to ceil(H/I) x ceil(W/I))
    (dict(ape=True, pad_type=1), (80, 112)),
    # the CrossFormer++ layout: maps whose short side is <= G are one group of max(H, W)
    (dict(no_mask=True, use_acl=True, qkv_bias=False, patch_norm=False), (80, 112)),
    # each layout chosen against its family, the interval from the map size (ADAPT_INTER)
    (dict(grouping="crossformer_pp", adaptive_interval=True), (72, 104)),
    (dict(grouping="crossformer", use_acl=True, group_size=5), (80, 112)),
    (dict(use_checkpoint=True, num_classes=0), (64, 64)),
])
def test_model_options_equal_pytorch(options, size):
    kwargs = {**dict(img_size=64, patch_size=(4, 8, 16, 32), merge_size=((2, 4),) * 3, embed_dim=16,
                     depths=(2, 2, 3, 2), num_heads=(1, 2, 2, 4), group_size=(4, 4, 4, 4), interval=(4, 2, 1, 1),
                     num_classes=10), **options}
    torch_model = randomized(TorchCrossFormer(**kwargs))
    model = from_torch(torch_model.state_dict(), **kwargs)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = torch_model(images).numpy()
    np.testing.assert_allclose(jitted(model)(nhwc(images)), expected, rtol=0, atol=1e-4)


def test_intermediates_equal_pytorch():
    torch_model, fixture = fixture_model("pp_micro")
    torch_model.load_state_dict(fixture["model"])
    graphdef, state = nnx.split(build_flax_model(fixture_config(fixture), fixture["model"]))
    maps = jax.jit(lambda state, images: nnx.merge(graphdef, state).forward_intermediates(images))(
        state, nhwc(fixture["input"]))
    with torch.no_grad():
        expected = torch_model.forward_intermediates(fixture["input"], intermediates_only=True)
    assert len(maps) == len(expected) == 4
    for feature, reference in zip(maps, expected):
        np.testing.assert_allclose(np.asarray(feature), nhwc(reference), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,case", [("v1", 0), ("v1", 5), ("pp", 1), ("pp", 5)])
def test_dense_stage_maps_equal_the_official_backbone_of_the_layout(name, case):
    """At detection/segmentation sizes each family groups by its official backbone's layout (the
    default ``grouping``), and its stage maps are the backbone's."""
    case = DENSE[name]["cases"][case]
    config = DENSE[name]["config"]
    kwargs = {key: config[key] for key in ("patch_size", "merge_size", "embed_dim", "depths", "num_heads",
                                           "mlp_ratio", "qkv_bias", "use_acl")}
    model = from_torch(dense_model(name, case).state_dict(), num_classes=0, group_size=case["group_size"],
                       interval=case["interval"], **kwargs)  # the final norm: the PyTorch init (unused)
    assert model.grouping == DENSE_LAYOUT[name]
    graphdef, state = nnx.split(model)
    maps = jax.jit(lambda state, images: nnx.merge(graphdef, state).forward_intermediates(images))(
        state, nhwc(dense_input(case)))
    assert len(maps) == len(case["maps"]) == 4
    for feature, reference in zip(maps, case["maps"]):
        np.testing.assert_allclose(np.asarray(feature), nhwc(reference), rtol=0, atol=1e-4)


def test_round_trip_gives_identical_tensors():
    _, fixture = fixture_model("v1_micro")  # official checkpoint: also holds the DPB index buffers
    official = fixture["model"]
    back = flax_to_torch(torch_to_flax(official))
    learned = {k: v for k, v in official.items() if not k.endswith(("attn.biases", "attn.relative_position_index"))}
    assert back.keys() == learned.keys() and len(back) < len(official)
    assert all(torch.equal(back[k], learned[k]) for k in learned)
    # through a model, with convolutions of every kind (embedding, merging, depthwise cooling)
    _, fixture = fixture_model("pp_micro")
    kwargs = cross_scale_kwargs(fixture_config(fixture))
    assert kwargs["use_acl"]
    model = nnx.eval_shape(lambda: FlaxCrossFormer(**kwargs, rngs=nnx.Rngs(0)))
    load_torch_state_dict(model, fixture["model"])
    back = flax_to_torch(model_params(model))
    assert back.keys() == fixture["model"].keys()
    assert all(torch.equal(back[k], v) for k, v in fixture["model"].items())


def test_weights_that_do_not_fit_are_a_clear_error():
    _, fixture = fixture_model("pp_micro")
    config = fixture_config(fixture)
    state = dict(fixture["model"])
    del state["head.bias"]
    with pytest.raises(UserError, match=r"missing \['head.bias'\]"):
        build_flax_model(config, state)
    config = load_config_with(config, ["MODEL.NUM_CLASSES", 7])
    with pytest.raises(UserError, match=r"head.weight: shape \(\d+, \d+\) for Flax \(\d+, 7\)"):
        build_flax_model(config, fixture["model"])


def test_keyword_form_runs_as_written_and_loads_our_weights():
    key1, key2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    img = jax.random.normal(jax.random.PRNGKey(0), (1, 224, 224, 3))
    v = KeywordCrossFormer(num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2),
                           global_window_size=(8, 4, 2, 1), local_window_size=7)
    params = v.init({'params': key1, 'dropout': key2}, img)
    out = v.apply(params, img, rngs={'dropout': key2})
    assert out.shape == (1, 1000) and np.isfinite(np.asarray(out)).all()
    # the same architecture in PyTorch: its weights go straight into the keyword form's params
    torch_model = randomized(TorchCrossFormer(**model_kwargs(
        num_classes=1000, dim=(64, 128, 256, 512), depth=(2, 2, 8, 2), global_window_size=(8, 4, 2, 1),
        local_window_size=7)))
    assert sum(p.numel() for p in torch_model.parameters()) == sum(x.size for x in jax.tree.leaves(params))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(np.array(img)).permute(0, 3, 1, 2)).numpy()
    converted = {"params": torch_to_flax(torch_model.state_dict())}
    np.testing.assert_allclose(np.asarray(v.apply(converted, img, rngs={'dropout': key2})), expected,
                               rtol=0, atol=1e-4)


def test_keyword_form_rejects_what_crossformer_cannot_build():
    with pytest.raises(ValueError, match="dim must double"):
        model_kwargs(num_classes=10, dim=(64, 96, 256, 512), depth=(2, 2, 2, 2), global_window_size=(8, 4, 2, 1),
                     local_window_size=7)


def test_pytorch_code_never_imports_jax():
    code = ("import sys, crossformer, models, main; "
            "assert not {'jax', 'flax'} & set(sys.modules), sorted({'jax', 'flax'} & set(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
