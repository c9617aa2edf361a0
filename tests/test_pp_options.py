"""The CrossFormer++ options the official configs leave at their defaults (GROUP_TYPE linear,
linear_div, alter, 7_14; ADAPT_INTER; USE_CPE) against fixtures made with the official code."""
import math
import os

import pytest
import torch

from config import load_config
from crossformer.model import RowConvPositionEncoding, block_group_sizes
from models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OPTIONS = ["pp_linear_micro", "pp_linear_div_micro", "pp_alter_micro", "pp_7_14_micro", "pp_adapt_inter_micro",
           "pp_cpe_micro"]
# What each fixture sets; the same model without it must give other logits.
OPTION_KEYS = {"pp_linear_micro": ("MODEL.CROS.GROUP_TYPE", "constant"),
               "pp_linear_div_micro": ("MODEL.CROS.GROUP_TYPE", "linear"),
               "pp_alter_micro": ("MODEL.CROS.GROUP_TYPE", "linear"),
               "pp_7_14_micro": ("MODEL.CROS.GROUP_TYPE", "constant"),
               "pp_adapt_inter_micro": ("MODEL.CROS.ADAPT_INTER", False)}


def fixture_model(name: str, tmp_path, opts=()):
    """The fixture and our model built from its config (through the YAML loader, as a user would)."""
    fixture = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(fixture["config_yaml"])
    return build_model(load_config(str(path), opts)).eval(), fixture


@pytest.mark.parametrize("name", OPTIONS)
def test_option_gives_the_official_logits_and_group_sizes(name, tmp_path):
    model, fixture = fixture_model(name, tmp_path)
    assert model.group_sizes == fixture["group_sizes"]
    model.load_state_dict(fixture["model"], strict=True)  # the official parameter names
    assert sum(p.numel() for p in model.parameters()) == fixture["params"]
    with torch.no_grad():
        logits = model(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], rtol=0, atol=1e-5)

    if name in OPTION_KEYS:  # the fixture pins the option down: without it the logits differ
        other, _ = fixture_model(name, tmp_path, OPTION_KEYS[name])
        other.load_state_dict(fixture["model"], strict=True)
        with torch.no_grad():
            assert (other(fixture["input"]) - fixture["logits"]).abs().max() > 1e-3


def test_group_sizes_of_the_paper_model_at_224():
    """CrossFormer++-S's depths at 224: the first stage has 56 rows, so block k (of 24) gets the
    fraction (4 + 52 k / 24) / 56 of its stage's rows, rounded up, at least 4; e.g. block 1:
    56 x 0.110 = 6.2 -> 7; block 12 (third stage, 14 rows): 7.5 -> 8, which linear_div and alter
    cut to half the map (7), and block 13: 8.04 -> whole map (14) for alter only."""
    depths, group_size = [2, 2, 18, 2], [4, 4, 14, 7]
    head, tail = [[4, 7], [5, 6]], [[7, 7]]
    third = [4, 4, 5, 5, 6, 6, 7, 7]
    assert block_group_sizes("linear", group_size, depths, 56) == \
        head + [third + [8, 9, 9, 10, 10, 11, 11, 12, 12, 13]] + tail
    assert block_group_sizes("linear_div", group_size, depths, 56) == head + [third + [7] * 6 + [14] * 4] + tail
    assert block_group_sizes("alter", group_size, depths, 56) == head + [third + [7] + [14, 7] * 4 + [14]] + tail
    assert block_group_sizes("7_14", group_size, depths, 56) == [[4] * 2, [4] * 2, [7] * 4 + [14] * 14, [7] * 2]
    assert block_group_sizes("constant", group_size, depths, 56) == [[4] * 2, [4] * 2, [14] * 18, [7] * 2]
    assert block_group_sizes("linear", [7] * 4, depths, 4) == [[4] * d for d in depths]  # tiny maps


@pytest.mark.parametrize("name", OPTIONS)
def test_option_runs_at_other_input_sizes(name, tmp_path):
    """The official code runs only at its configured size; at others (padded groups, maps smaller
    than a group, other CPE heights) the evaluation path (position biases kept, no autograd) gives
    the logits of the training path (biases computed, the space-to-depth patch convolution,
    autograd on), of the FX graph, and of each image alone. (torch.fx cannot trace the CPE, whose
    weights are resized to the map's height in Python.)"""
    model, fixture = fixture_model(name, tmp_path, ["MODEL.DROP_PATH_RATE", 0.0])
    model.load_state_dict(fixture["model"], strict=True)
    graph = model if name == "pp_cpe_micro" else torch.fx.symbolic_trace(model)
    for size in [(96, 160), (200, 72)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        with torch.no_grad():
            logits = model.eval()(x)
            traced = graph(x)
            alone = torch.cat([model(image[None]) for image in x])
        training = model.train()(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        for other in (training.detach(), traced, alone):
            torch.testing.assert_close(other, logits, rtol=0, atol=1e-5)
        assert (logits[0] - logits[1]).abs().max() > 1e-3  # two images, two answers


def test_adaptive_interval_follows_the_map_at_run_time(tmp_path):
    model, _ = fixture_model("pp_adapt_inter_micro", tmp_path)
    lda = model.layers[0].blocks[1]
    assert model.grouping == "crossformer_pp"  # USE_ACL
    assert lda.layout(32, 32) == (7, 7, 5, 0, 3, 0, 3)  # the official ceil(32 / 7) at the configured 128x128
    assert lda.layout(48, 80) == (7, 7, math.ceil(80 / 7), 0, 7 * 12 - 48, 0, 7 * 12 - 80)
    assert model.layers[0].blocks[0].layout(48, 80).interval == 1  # SDA blocks keep interval 1
    lda.grouping = "crossformer"  # the ICLR layout keeps the interval and grows the groups
    assert lda.layout(48, 80) == (math.ceil(48 / 12), math.ceil(80 / 12), 12, 0, 0, 0, 84 - 80)


def test_cpe_is_the_official_row_wise_convolution_and_follows_other_heights():
    torch.manual_seed(0)
    cpe = RowConvPositionEncoding(8)
    x = torch.randn(2, 8, 5, 6)  # (B, H, W, C)
    # The official computation: a Conv2d with H channels applied to (B, H, W, C) as if NCHW.
    reference = torch.nn.functional.conv2d(x, cpe.weight, cpe.bias, padding=1, groups=8)
    torch.testing.assert_close(cpe(x), reference, rtol=0, atol=0)
    row = x[:, 3:4]  # row 3 alone, convolved over its (column, channel) plane with kernel 3
    torch.testing.assert_close(cpe(x)[:, 3:4], torch.nn.functional.conv2d(row, cpe.weight[3:4], cpe.bias[3:4],
                                                                          padding=1))
    with torch.no_grad():  # equal rows stay equal at any height
        cpe.weight.copy_(cpe.weight[:1].expand_as(cpe.weight))
        cpe.bias.fill_(0.5)
    tall = torch.randn(1, 13, 5, 6)
    expected = torch.nn.functional.conv2d(tall.reshape(13, 1, 5, 6), cpe.weight[:1], cpe.bias[:1], padding=1)
    torch.testing.assert_close(cpe(tall), expected.reshape(1, 13, 5, 6))


def test_group_type_values_load_as_strings_and_unknown_ones_are_named(tmp_path):
    from config import UserError

    tiny = os.path.join(os.path.dirname(os.path.dirname(FIXTURES)), "configs", "crossformer_pp",
                        "small_patch4_group_const_224.yaml")
    assert load_config(tiny, ["MODEL.CROS.GROUP_TYPE", "7_14"]).MODEL.CROS.GROUP_TYPE == "7_14"  # not 714
    path = tmp_path / "cfg.yaml"
    path.write_text(f"BASE: ['{tiny}']\nMODEL:\n  CROS:\n    GROUP_TYPE: '7_14'\n")  # quoted: YAML reads 7_14 as 714
    assert load_config(str(path)).MODEL.CROS.GROUP_TYPE == "7_14"
    with pytest.raises(UserError, match="unknown group_type 'zigzag'; known: constant, linear, linear_div, alter, 7_14"):
        build_model(load_config(tiny, ["MODEL.CROS.GROUP_TYPE", "zigzag"]))
