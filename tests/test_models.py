"""The models against the official code: parity fixtures, state-dict layout, FLOPs, any input size."""
import json
import os

import pytest
import torch
import yaml
from yacs.config import CfgNode

from config import UserError, get_default_config, load_config
from models import CrossFormer, build_model
from crossformer.model import (Attention, CrossFormerBlock, GroupLayout, group_embeddings, group_index,
                               strided_conv, ungroup_embeddings, ungroup_index)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
with open(os.path.join(FIXTURES, "official_models.json")) as f:
    OFFICIAL = json.load(f)
with open(os.path.join(ROOT, "README.md")) as f:
    README_ROWS = {line.split("`")[1]: line for line in f if line.startswith("| `crossformer")}


def fixture_model(name: str):
    fixture = torch.load(os.path.join(FIXTURES, f"{name}.pt"), weights_only=True)
    config = get_default_config()
    config.merge_from_other_cfg(CfgNode(yaml.safe_load(fixture["config_yaml"])))
    config.freeze()
    return build_model(config).eval(), fixture


def acl_flops(model: CrossFormer, size: int) -> int:
    """Depthwise 3x3 conv (9 MACs) plus LayerNorm (1) per element of every cooling layer."""
    total = 0
    for layer, (h, w) in zip(model.layers, model.stage_sizes(size, size)):
        total += sum(10 * h * w * b.norm1.normalized_shape[0] for b in layer.blocks if b.use_acl)
    return total


def small_model(**overrides) -> CrossFormer:
    args = dict(img_size=64, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                group_size=(4, 4, 4, 4), interval=(4, 2, 1, 1), num_classes=10, drop_path_rate=0.0)
    args.update(overrides)
    return CrossFormer(**args)


@pytest.mark.parametrize("name", ["v1_micro", "pp_micro"])
def test_fixture_logits_params_flops_match_official(name):
    model, fixture = fixture_model(name)
    model.load_state_dict(fixture["model"], strict=True)  # v1 also carries the DPB index buffers
    with torch.no_grad():
        logits = model(fixture["input"])
    torch.testing.assert_close(logits, fixture["logits"], rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == fixture["params"]
    size = fixture["input"].shape[-1]
    assert model.flops() - acl_flops(model, size) == fixture["official_flops"]


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_configs_match_state_dict_params_and_flops(name):
    reference = OFFICIAL[name]
    model = build_model(load_config(os.path.join(ROOT, "configs", f"{name}.yaml")))
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    official_params = {key: shape for key, shape, kind in reference["state_dict"] if kind == "param"}
    assert ours == official_params
    assert sum(p.numel() for p in model.parameters()) == reference["params"]
    if name.startswith("crossformer/"):
        assert model.flops() == reference["official_flops"]
        assert acl_flops(model, 224) == 0
    else:
        assert acl_flops(model, 224) > 0
        assert model.flops() == reference["official_flops"] + acl_flops(model, 224)
    cells = [cell.strip() for cell in README_ROWS[name].split("|")]
    assert cells[2] == f"{reference['params'] / 1e6:.2f}M" and cells[4] == f"{model.flops() / 1e9:.3f}"


def test_released_checkpoint_with_index_buffers_loads():
    model, fixture = fixture_model("v1_micro")
    state = fixture["model"]
    assert any(k.endswith("attn.relative_position_index") for k in state)
    fresh = small_model(num_classes=10)
    result = fresh.load_state_dict(dict(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(k.endswith(("attn.biases", "relative_position_index")) for k in fresh.state_dict())


DENSE = {name: torch.load(os.path.join(FIXTURES, f"{name}_dense_micro.pt"), weights_only=True)
         for name in ("v1", "pp")}
DENSE_LAYOUT = {"v1": "crossformer", "pp": "crossformer_pp"}  # the layout of each official backbone


def dense_model(name: str, case: dict, grouping: str = "auto") -> CrossFormer:
    """Our model with the official backbone's weights (no final norm, no head) and the case's
    group sizes and intervals."""
    config = DENSE[name]["config"]
    model = CrossFormer(patch_size=config["patch_size"], merge_size=config["merge_size"],
                        embed_dim=config["embed_dim"], depths=config["depths"], num_heads=config["num_heads"],
                        group_size=case["group_size"], interval=case["interval"], mlp_ratio=config["mlp_ratio"],
                        qkv_bias=config["qkv_bias"], use_acl=config["use_acl"], num_classes=0,
                        grouping=grouping).eval()
    result = model.load_state_dict(DENSE[name]["state_dict"], strict=False)
    assert not result.unexpected_keys and {key.split(".")[0] for key in result.missing_keys} == {"norm"}
    return model


def dense_input(case: dict) -> torch.Tensor:
    x = torch.randn(1, 3, *case["input_size"], generator=torch.Generator().manual_seed(case["input_seed"]))
    assert x.sum().item() == pytest.approx(case["input_sum"], abs=1e-3)  # the fixture's input
    return x


@pytest.mark.parametrize("name,case", [(name, i) for name in DENSE for i in range(6)])
def test_dense_stage_maps_match_the_official_backbone_of_the_layout(name, case):
    """At detection/segmentation sizes (224x352, 256x320, 352x224) the two official backbones
    group differently; each layout reproduces its own backbone's raw stage maps, the other does not."""
    case = DENSE[name]["cases"][case]
    x = dense_input(case)
    other = "crossformer_pp" if DENSE_LAYOUT[name] == "crossformer" else "crossformer"
    differences = {}
    for grouping in ("auto", other):  # auto: the family's layout (USE_ACL)
        model = dense_model(name, case, grouping)
        with torch.no_grad():
            maps = model.forward_intermediates(x, intermediates_only=True)
        assert [m.shape for m in maps] == [m.shape for m in case["maps"]]
        differences[model.grouping] = max((ours - official).abs().max().item()
                                          for ours, official in zip(maps, case["maps"]))
    assert differences[DENSE_LAYOUT[name]] <= 1e-4 and differences[other] > 0.1, differences


def explicit_attention(attn: Attention, x: torch.Tensor, group: int, padded_keys):
    """softmax(Q K^T * scale + bias + mask) V written out, as the reference for the SDPA path."""
    B, num_groups, N, C = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).view(B, num_groups, N, 3, heads, C // heads).permute(3, 0, 1, 4, 2, 5)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    table, index = (torch.stack(torch.meshgrid(torch.arange(1 - group, group), torch.arange(1 - group, group),
                                               indexing="ij"), -1).reshape(-1, 2).float(), None)
    coords = [(i // group, i % group) for i in range(N)]
    index = torch.tensor([[(a[0] - b[0] + group - 1) * (2 * group - 1) + a[1] - b[1] + group - 1
                           for b in coords] for a in coords])
    scores = scores + attn.pos(table)[index].permute(2, 0, 1)
    if padded_keys is not None:
        scores = scores + padded_keys[None, :, None, None, :].float() * -1e6
    out = (scores.softmax(-1) @ v).permute(0, 1, 3, 2, 4).reshape(B, num_groups, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_explicit_softmax_attention(masked):
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4).eval()
    x = torch.randn(3, 5, 16, 32)
    padded = (torch.rand(5, 16) < 0.4) if masked else None
    if masked:
        padded[:, 0] = False  # every group keeps one real key, as real padding always does
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (4, 4), padded), explicit_attention(attn, x, 4, padded), rtol=0, atol=1e-5)


def test_grouping_round_trip_and_lda_members_are_interval_apart():
    x = torch.arange(32 * 32).float().view(1, 32, 32, 1)
    for group_h, group_w, interval in [(4, 4, 1), (4, 4, 4), (2, 2, 8), (2, 4, 8), (8, 4, 4)]:
        layout = GroupLayout(group_h, group_w, interval, 0, 0, 0, 0)
        groups = group_embeddings(x, group_index(32, 32, layout, x.device), group_h * group_w)
        assert groups.shape == (1, 32 * 32 // (group_h * group_w), group_h * group_w, 1)
        torch.testing.assert_close(ungroup_embeddings(groups, ungroup_index(32, 32, layout, x.device)), x)
        first = groups[0, 1, :, 0].long()  # second group of the first region
        rows, cols = first // 32, first % 32
        assert set(rows.diff().tolist()) <= {0, interval} and set(cols.unique().diff().tolist()) == {interval}
        assert len(rows.unique()) == group_h and len(cols.unique()) == group_w


def test_padded_grouping_round_trip_and_padding_is_zero():
    x = torch.randn(2, 17, 18, 3)
    for pad_type in (0, 1):
        block = CrossFormerBlock(dim=8, num_heads=1, group_size=4, interval=2, use_lda=True, pad_type=pad_type,
                                 grouping="crossformer_pp")
        layout = block.layout(17, 18)
        index = group_index(17, 18, layout, x.device)
        groups = group_embeddings(x, index, 16)
        assert groups.shape == (2, 3 * 3 * 4, 16, 3)  # padded to 24x24: 3x3 regions of 2x2 groups
        padded = (index == 17 * 18).view(-1, 16)
        assert int(padded.sum()) == 24 * 24 - 17 * 18 and (groups[:, padded] == 0).all()
        torch.testing.assert_close(ungroup_embeddings(groups, ungroup_index(17, 18, layout, x.device)), x)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    model = small_model(drop_path_rate=0.3, use_acl=True).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=1e-6)


def autograd_ops(tensor: torch.Tensor) -> set[str]:
    """The names of the backward nodes that produced ``tensor``."""
    names, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kernel,stride,height,width", [(32, 4, 64, 64), (16, 4, 70, 61), (8, 2, 30, 31)])
def test_space_to_depth_training_convolution_equals_the_strided_one(kernel, stride, height, width):
    conv = torch.nn.Conv2d(3, 8, kernel, stride=stride, padding=(kernel - stride) // 2).train()
    x = torch.randn(2, 3, height, width)
    out = strided_conv(conv, x)
    assert ("PermuteBackward0" in autograd_ops(out)) == (kernel >= 4 * stride)  # the rearranged kernel
    reference = conv(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad, = torch.autograd.grad(out.square().sum(), conv.weight)
    expected, = torch.autograd.grad(reference.square().sum(), conv.weight)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-4)
    assert "PermuteBackward0" not in autograd_ops(strided_conv(conv.eval(), x))  # eval: the plain one


def test_kept_position_bias_follows_weight_changes_and_training_after_inference():
    torch.manual_seed(0)
    model, other = small_model().eval(), small_model().eval()
    x = torch.randn(2, 3, 64, 64)

    def fresh_logits():  # with gradients enabled nothing is kept
        return model(x).detach()
    with torch.inference_mode():
        before = model(x)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        loaded = model(x)
    assert not torch.allclose(before, loaded)
    torch.testing.assert_close(loaded, fresh_logits(), rtol=1e-5, atol=1e-6)

    # the grouping tensors kept by inference mode serve a training step; the step changes the DPB
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        stepped = model(x)
    assert not torch.allclose(stepped, loaded)
    torch.testing.assert_close(stepped, fresh_logits(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height,width", [(224, 320), (256, 256), (200, 200)])
def test_any_input_size_logits_and_pyramid_strides(height, width):
    torch.manual_seed(0)
    model = build_model(load_config(os.path.join(ROOT, "configs/crossformer_pp/small_patch4_group_const_224.yaml"),
                                    ["MODEL.NUM_CLASSES", 7])).eval()
    images = torch.randn(1, 3, height, width)
    with torch.no_grad():
        logits = model(images)
        maps = model.forward_intermediates(images, intermediates_only=True)
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()
    for stage, (stride, feature) in enumerate(zip((4, 8, 16, 32), maps)):
        assert feature.shape == (1, 64 * 2 ** stage, height // stride, width // stride)
        assert torch.isfinite(feature).all()


def test_fully_padded_groups_give_no_nan_forward_or_backward():
    torch.manual_seed(0)
    block = CrossFormerBlock(dim=16, num_heads=2, group_size=4, interval=4, use_lda=True,
                             grouping="crossformer_pp").train()
    x = torch.randn(2, 17, 18, 16, requires_grad=True)  # padded to 32x32: some groups hold only padding
    padded = group_index(17, 18, block.layout(17, 18), x.device).view(-1, 16) == 17 * 18
    assert padded.all(dim=1).any()
    out = block(x)
    out.square().sum().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters()) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("grouping,small_map", [
    # the ICLR backbone: SDA with G' = min(H, W) = 3, the 10 columns padded to 12 (split: 1 + 1)
    ("crossformer", GroupLayout(3, 3, 1, 0, 0, 1, 1)),
    # the CrossFormer++ backbone: one group of max(H, W) = 10, the 3 rows padded to 10 (split: 3 + 4)
    ("crossformer_pp", GroupLayout(10, 10, 1, 3, 4, 0, 0))])
def test_padding_split_and_small_map_falls_back_to_sda(grouping, small_map):
    block = CrossFormerBlock(dim=16, num_heads=2, group_size=4, interval=2, use_lda=True, pad_type=1,
                             grouping=grouping)
    # 20x20 with G=4, I=2: CrossFormer++ tiles 8x8 regions (padded to 24x24), the ICLR layout keeps
    # I and grows the groups to 10x10
    assert block.layout(20, 20) == ((4, 4, 2, 2, 2, 2, 2) if grouping == "crossformer_pp" else (10, 10, 2, 0, 0, 0, 0))
    assert block.layout(3, 10) == small_map
    out = block(torch.randn(1, 3, 10, 16))
    assert out.shape == (1, 3, 10, 16) and torch.isfinite(out).all()
    assert block.group_size == 4 and block.use_lda  # decided per call: the block's state is unchanged
    assert block.layout(20, 20).interval == 2


@pytest.mark.parametrize("grouping", ["crossformer", "crossformer_pp"])
def test_padded_keys_get_no_weight(grouping):
    """The 2x2 real corner of a 6x6 map sits in a 4x4 group that is three-quarters padding; with
    the padding masked it must equal the block run on that 2x2 alone (same offsets, same DPB)."""
    torch.manual_seed(0)
    block = CrossFormerBlock(dim=16, num_heads=2, group_size=4, interval=1, use_lda=False, grouping=grouping).eval()
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        alone = block(x[:, 4:, 4:])
        torch.testing.assert_close(block(x)[:, 4:, 4:], alone, rtol=0, atol=1e-5)
        block.no_mask = True
        assert not torch.allclose(block(x)[:, 4:, 4:], alone, atol=1e-3)


def test_too_small_input_is_a_clear_error():
    model = small_model()
    with pytest.raises(ValueError, match=r"input 20x20 is too small.*at least 32x32"):
        model(torch.randn(1, 3, 20, 20))
    config = get_default_config()
    config.DATA.IMG_SIZE = 16
    with pytest.raises(UserError, match="too small"):
        build_model(config)


def test_unknown_model_type_lists_known_types():
    config = get_default_config()
    config.MODEL.TYPE = "swin"
    with pytest.raises(UserError, match=r"unknown MODEL.TYPE 'swin'; known types: cross-scale"):
        build_model(config)


def test_flops_at_other_input_size_counts_padded_free_groups():
    model = small_model()
    assert model.flops(128) > model.flops() > 0
    assert model.flops((64, 96)) == pytest.approx(model.flops() * 1.5, rel=0.05)


def test_absolute_position_embedding_follows_the_input_size():
    torch.manual_seed(0)
    model = small_model(ape=True).eval()
    assert model.absolute_pos_embed.shape == (1, 16 * 16, 16)
    assert "absolute_pos_embed" in model.no_weight_decay()
    with torch.no_grad():
        for size in (64, 96):
            assert torch.isfinite(model(torch.randn(1, 3, size, size))).all()
