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
        total += sum(10 * h * w * b.norm1.normalized_shape[0] for b in layer.blocks if b.use_extra_conv)
    return total


def small_model(**overrides) -> CrossFormer:
    args = dict(img_size=64, patch_size=(4, 8, 16, 32), merge_size=((2, 4),) * 3, embed_dim=16,
                depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), group_size=(4, 4, 4, 4), interval=(4, 2, 1, 1),
                num_classes=10, drop_path_rate=0.0)
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
    """softmax(Q K^T * scale + bias + mask) V written out, as the reference for the SDPA path;
    ``x``: ``(num_groups * B, N, C)``."""
    rows, N, C = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).view(rows, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    table = torch.stack(torch.meshgrid(torch.arange(1 - group, group), torch.arange(1 - group, group),
                                       indexing="ij"), -1).reshape(-1, 2).float()
    coords = [(i // group, i % group) for i in range(N)]
    index = torch.tensor([[(a[0] - b[0] + group - 1) * (2 * group - 1) + a[1] - b[1] + group - 1
                           for b in coords] for a in coords])
    scores = scores + attn.pos(table)[index].permute(2, 0, 1)
    if padded_keys is not None:  # row b * num_groups + g holds group g
        scores = scores + padded_keys.repeat(rows // len(padded_keys), 1)[:, None, None, :].float() * -1e6
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(rows, N, C)
    return attn.proj(out)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_explicit_softmax_attention(masked):
    torch.manual_seed(0)
    attn = Attention(dim=32, group_size=(4, 4), num_heads=4).eval()
    x = torch.randn(3 * 5, 16, 32)
    padded = (torch.rand(5, 16) < 0.4) if masked else None
    if masked:
        padded[:, 0] = False  # every group keeps one real key, as real padding always does
    with torch.no_grad():
        torch.testing.assert_close(attn(x, padded_keys=padded), explicit_attention(attn, x, 4, padded),
                                   rtol=0, atol=1e-5)


def test_grouping_round_trip_and_lda_members_are_interval_apart():
    x = torch.arange(32 * 32).float().view(1, 32 * 32, 1)
    for group_h, group_w, interval in [(4, 4, 1), (4, 4, 4), (2, 2, 8), (2, 4, 8), (8, 4, 4)]:
        layout = GroupLayout(group_h, group_w, interval, 0, 0, 0, 0)
        groups = group_embeddings(x, group_index(32, 32, layout, x.device), group_h * group_w)
        assert groups.shape == (32 * 32 // (group_h * group_w), group_h * group_w, 1)
        torch.testing.assert_close(ungroup_embeddings(groups, ungroup_index(32, 32, layout, x.device), 1), x)
        first = groups[1, :, 0].long()  # second group of the first region
        rows, cols = first // 32, first % 32
        assert set(rows.diff().tolist()) <= {0, interval} and set(cols.unique().diff().tolist()) == {interval}
        assert len(rows.unique()) == group_h and len(cols.unique()) == group_w


def test_padded_grouping_round_trip_and_padding_is_zero():
    x = torch.randn(2, 17 * 18, 3)
    for pad_type in (0, 1):
        block = CrossFormerBlock(dim=8, input_resolution=(17, 18), num_heads=1, group_size=4, interval=2,
                                 lsda_flag=1, pad_type=pad_type, grouping="crossformer_pp")
        layout = block.layout(17, 18)
        index = group_index(17, 18, layout, x.device)
        groups = group_embeddings(x, index, 16)
        assert groups.shape == (2 * 3 * 3 * 4, 16, 3)  # padded to 24x24: 3x3 regions of 2x2 groups
        padded = (index == 17 * 18).view(-1, 16)
        assert int(padded.sum()) == 24 * 24 - 17 * 18 and (groups.unflatten(0, (2, -1))[:, padded] == 0).all()
        torch.testing.assert_close(ungroup_embeddings(groups, ungroup_index(17, 18, layout, x.device), 2), x)


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


def test_kept_tensors_belong_to_their_model_and_follow_dtype_changes():
    """Grouping tensors and the DPB bias are kept on the model's modules, not in module-level
    caches: they go with the model, and one model's never serve another."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        model(x)
    block = model.layers[0].blocks[1]
    kept = [weakref.ref(t) for t in (block._kept_grouping[1][0], block.attn._kept_bias[1])]
    other = small_model().eval()
    assert other.layers[0].blocks[1]._kept_grouping is None and other.layers[0].blocks[1].attn._kept_bias is None
    with torch.no_grad():
        reference = model.double()(x.double())  # new dtype: the bias is made again
        assert reference.dtype == torch.float64
        model.train()  # with gradients: computed, not kept
        torch.testing.assert_close(model.eval()(x.double()), reference)
    del model, block
    gc.collect()
    assert all(ref() is None for ref in kept)


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
    # the logits are the head on the normalised last map, averaged over its positions
    tokens = torch.nn.functional.layer_norm(maps[-1].flatten(2).transpose(1, 2), (512,), model.norm.weight,
                                            model.norm.bias, model.norm.eps)
    torch.testing.assert_close(logits, model.head(tokens.mean(1)), rtol=0, atol=1e-5)


def test_fully_padded_groups_give_no_nan_forward_or_backward():
    torch.manual_seed(0)
    block = CrossFormerBlock(16, (17, 18), 2, group_size=4, interval=4, lsda_flag=1, grouping="crossformer_pp").train()
    x = torch.randn(2, 17 * 18, 16, requires_grad=True)  # padded to 32x32: some groups hold only padding
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
    block = CrossFormerBlock(16, (20, 20), 2, group_size=4, interval=2, lsda_flag=1, pad_type=1, grouping=grouping)
    # 20x20 with G=4, I=2: CrossFormer++ tiles 8x8 regions (padded to 24x24), the ICLR layout keeps
    # I and grows the groups to 10x10
    assert block.layout(20, 20) == ((4, 4, 2, 2, 2, 2, 2) if grouping == "crossformer_pp" else (10, 10, 2, 0, 0, 0, 0))
    assert block.layout(3, 10) == small_map
    out = block(torch.randn(1, 3 * 10, 16), 3, 10)
    assert out.shape == (1, 30, 16) and torch.isfinite(out).all()
    assert block.group_size == 4 and block.lsda_flag == 1  # decided per call: the block's state is unchanged
    assert block.layout(20, 20).interval == 2


@pytest.mark.parametrize("grouping", ["crossformer", "crossformer_pp"])
def test_padded_keys_get_no_weight(grouping):
    """The 2x2 real corner of a 6x6 map sits in a 4x4 group that is three-quarters padding; with
    the padding masked it must equal the block run on that 2x2 alone (same offsets, same DPB)."""
    torch.manual_seed(0)
    block = CrossFormerBlock(16, (6, 6), 2, group_size=4, interval=1, lsda_flag=0, use_extra_conv=False,
                             grouping=grouping).eval()
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        alone = block(x[:, 4:, 4:].flatten(1, 2), 2, 2)
        corner = block(x.flatten(1, 2)).unflatten(1, (6, 6))[:, 4:, 4:].flatten(1, 2)
        torch.testing.assert_close(corner, alone, rtol=0, atol=1e-5)
        block.no_mask = True
        assert not torch.allclose(block(x.flatten(1, 2)).unflatten(1, (6, 6))[:, 4:, 4:].flatten(1, 2), alone,
                                  atol=1e-3)


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


# ----------------------------------------------------------------------------- the authors' module API
# The model snippets of the authors' API document and module card, as written there (only sizes
# shrink), through ``models.crossformer``.
def test_api_document_class_snippet_and_example_usage():
    from models.crossformer import CrossFormer

    model = CrossFormer(
        img_size=224,                    # Input image size
        patch_size=[4, 8, 16, 32],      # Multi-scale patch sizes
        in_chans=3,                     # Input channels
        num_classes=1000,               # Number of output classes
        embed_dim=24,                   # Embedding dimension (96 in the document)
        depths=[2, 2, 6, 2],           # Number of blocks per stage
        num_heads=[3, 6, 12, 24],      # Attention heads per stage
        group_size=[7, 7, 7, 7],       # Group size for attention
        mlp_ratio=4.0,                 # MLP expansion ratio
        qkv_bias=True,                 # Enable query/key/value bias
        qk_scale=None,                 # Override default QK scale
        drop_rate=0.0,                 # Dropout rate
        drop_path_rate=0.1,            # Stochastic depth rate
        ape=False,                     # Absolute position embedding
        patch_norm=True,               # Patch embedding normalization
        use_checkpoint=False,          # Gradient checkpointing
        merge_size=[[2], [2], [2]]     # Patch merging sizes
    )
    assert model(torch.randn(1, 3, 112, 112)).shape == (1, 1000)

    # Example Usage (a smaller input)
    model = CrossFormer(num_classes=1000)
    x = torch.randn(2, 3, 64, 64)
    output = model(x)
    assert output.shape == (2, 1000)
    flops = model.flops()
    assert isinstance(flops, int) and flops == model.flops(224) == model.flops((224, 224)) < model.flops(256)


def test_api_document_components():
    from models.crossformer import Attention, CrossFormerBlock, DynamicPosBias

    block = CrossFormerBlock(
        dim=24,                        # Feature dimension (96 in the document)
        input_resolution=(14, 14),     # Input spatial resolution ((56, 56) there)
        num_heads=3,                   # Number of attention heads
        group_size=7,                  # Attention group size
        lsda_flag=0,                   # 0 for SDA, 1 for LDA
        mlp_ratio=4.0,                 # MLP expansion ratio
        qkv_bias=True,                 # Enable QKV bias
        drop=0.0,                      # Dropout rate
        attn_drop=0.0,                 # Attention dropout
        drop_path=0.0                  # Stochastic depth rate
    )
    assert block(torch.randn(2, 14 * 14, 24)).shape == (2, 14 * 14, 24)  # tokens (B, L, C)
    attention = Attention(
        dim=24,                        # Input dimension
        group_size=(7, 7),            # Attention group size
        num_heads=3,                   # Number of heads
        qkv_bias=True,                # Enable QKV bias
        attn_drop=0.0,                # Attention dropout
        proj_drop=0.0,                # Projection dropout
        position_bias=True            # Enable position bias
    )
    assert attention(torch.randn(4 * 2, 49, 24)).shape == (8, 49, 24)  # (num_groups * B, N, C)
    pos_bias = DynamicPosBias(
        dim=24,                       # Position dimension (dim // 4)
        num_heads=3,                  # Number of attention heads
        residual=False                # Use residual connections
    )
    assert pos_bias(torch.randn(13 * 13, 2)).shape == (169, 3)


def test_api_document_variants_and_flops_example_run_as_written():
    """The document's T/S/B/L settings (not the released models': see configs/crossformer/), built
    on the meta device as sizes may shrink. They count parameters and FLOPs; its CrossFormer-S
    cannot run: 64 channels do not split into 3 heads (the authors' code fails there too)."""
    from models.crossformer import CrossFormer

    with torch.device("meta"):
        models = {
            'CrossFormer-T': CrossFormer(embed_dim=48, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
            'CrossFormer-S': CrossFormer(embed_dim=64, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
            'CrossFormer-B': CrossFormer(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
            'CrossFormer-L': CrossFormer(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
        }
        for name, model in models.items():
            flops = model.flops()
            params = sum(p.numel() for p in model.parameters())
            assert flops > 0 and params > 0
            if name == 'CrossFormer-S':
                with pytest.raises(RuntimeError, match="invalid"):
                    model(torch.randn(2, 3, 224, 224))
            else:
                assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    # FLOPs grow with the settings, and none of them is a released model
    assert [m.flops() for m in models.values()] == sorted(m.flops() for m in models.values())
    released = {reference["official_flops"] for reference in OFFICIAL.values()}
    assert not released & {m.flops() for m in models.values()}


def test_api_document_inference_example(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import transforms

    from models.crossformer import CrossFormer

    torch.save({"model": CrossFormer(num_classes=1000).state_dict()}, tmp_path / "crossformer_tiny.pth")
    Image.new("RGB", (90, 80), (120, 30, 200)).save(tmp_path / "example.jpg")
    monkeypatch.chdir(tmp_path)
    model = CrossFormer(num_classes=1000)
    checkpoint = torch.load('crossformer_tiny.pth', map_location='cpu')
    model.load_state_dict(checkpoint['model'])
    model.eval()
    transform = transforms.Compose([
        transforms.Resize(72),          # 256 there
        transforms.CenterCrop(64),      # 224 there
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406],
                             std=[0.229, 0.224, 0.225])
    ])
    image = Image.open('example.jpg').convert('RGB')
    input_tensor = transform(image).unsqueeze(0)
    with torch.no_grad():
        output = model(input_tensor)
        probabilities = torch.nn.functional.softmax(output[0], dim=0)
    top5_prob, top5_indices = torch.topk(probabilities, 5)
    assert top5_indices.shape == (5,) and float(probabilities.sum()) == pytest.approx(1.0)


def test_module_card_example():
    from models.crossformer import CrossFormer

    input = torch.randn(1, 3, 224, 224)
    model = CrossFormer(img_size=224,
        patch_size=[4, 8, 16, 32],
        in_chans= 3,
        num_classes=1000,
        embed_dim=48,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        group_size=[7, 7, 7, 7],
        mlp_ratio=4.,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.0,
        drop_path_rate=0.1,
        ape=False,
        patch_norm=True,
        use_checkpoint=False,
        merge_size=[[2, 4], [2,4], [2, 4]]
    )
    output=model(input)
    assert output.shape == (1, 1000)


def test_class_defaults_are_the_authors_and_interval_is_a_synonym():
    import inspect

    from models.crossformer import CrossFormer as AuthorsName

    assert AuthorsName is CrossFormer
    defaults = {k: p.default for k, p in inspect.signature(CrossFormer).parameters.items()}
    assert defaults["patch_size"] == (4,) and defaults["merge_size"] == ((2,), (2,), (2,))
    assert defaults["embed_dim"] == 96 and defaults["depths"] == (2, 2, 6, 2) and defaults["num_heads"] == (3, 6, 12, 24)
    assert defaults["group_size"] == (7, 7, 7, 7) and defaults["crs_interval"] == (8, 4, 2, 1)
    assert defaults["drop_path_rate"] == 0.1 and defaults["use_acl"] is False
    with torch.device("meta"):
        same = [CrossFormer(depths=[1, 1, 1, 1], group_size=7, **kw) for kw in
                (dict(crs_interval=[8, 4, 2, 1]), dict(interval=[8, 4, 2, 1]), {})]
        assert all(b.interval == 8 and b.group_size == 7 for m in same for b in m.layers[0].blocks)
        with pytest.raises(ValueError, match="crs_interval .* or interval"):
            CrossFormer(crs_interval=[8, 4, 2, 1], interval=[8, 4, 2, 1])


def block_calls(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> tuple[tuple, dict, torch.Tensor]:
    """The positional arguments, keyword arguments and output of ``module``'s first call in ``model(x)``."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: seen.append((args, kwargs, out)),
                                          with_kwargs=True)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("grouping", ["crossformer", "crossformer_pp"])
def test_authors_classes_equal_the_same_computation_inside_the_model(grouping):
    from models.crossformer import Attention as A, CrossFormerBlock as Block, PatchEmbed as Embed, \
        PatchMerging as Merging, Stage as StageClass

    torch.manual_seed(0)
    model = small_model(use_acl=True, grouping=grouping, depths=(2, 4, 2, 2)).eval()  # cooling: stage 2, block 3
    x = torch.randn(2, 3, 64, 64)
    # a block on tokens, at the configured size (input_resolution) and, with H, W, at another
    (tokens, H, W), _, out = block_calls(model, model.layers[1].blocks[2], x)
    block = Block(dim=32, input_resolution=(8, 8), num_heads=2, group_size=4, interval=2, lsda_flag=0,
                  use_extra_conv=True, grouping=grouping).eval()
    block.load_state_dict(model.layers[1].blocks[2].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(tokens), out, rtol=0, atol=1e-6)
    (tokens, H, W), _, out = block_calls(model, model.layers[0].blocks[1], torch.randn(1, 3, 80, 112))
    block = Block(dim=16, input_resolution=(16, 16), num_heads=1, group_size=4, interval=4, lsda_flag=1,
                  use_extra_conv=False, grouping=grouping).eval()
    block.load_state_dict(model.layers[0].blocks[1].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(block(tokens, H, W), out, rtol=0, atol=1e-6)
    assert (H, W) == (20, 28)
    # the patch embedding and merging, and a stage (blocks, then merging) on tokens
    _, _, embedded = block_calls(model, model.patch_embed, x)
    embed = Embed(img_size=64, patch_size=[4, 8, 16, 32], in_chans=3, embed_dim=16, norm_layer=torch.nn.LayerNorm)
    embed.load_state_dict(model.patch_embed.state_dict())
    (tokens, H, W), _, merged = block_calls(model, model.layers[0].downsample, x)
    merging = Merging(input_resolution=(16, 16), dim=16, patch_size=[2, 4], num_input_patch_size=4)
    merging.load_state_dict(model.layers[0].downsample.state_dict())
    (stage_in, _, _), _, _ = block_calls(model, model.layers[1].blocks[0], x)
    _, _, stage_out = block_calls(model, model.layers[1].downsample, x)
    stage = StageClass(dim=32, input_resolution=(8, 8), depth=4, num_heads=2, group_size=4, interval=2,
                       downsample=Merging, patch_size_end=[2, 4], num_patch_size=2, use_acl=True,
                       grouping=grouping).eval()
    stage.load_state_dict(model.layers[1].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(embed(x), embedded, rtol=0, atol=0)
        torch.testing.assert_close(merging(tokens), merged, rtol=0, atol=0)
        assert embedded.shape == (2, 16 * 16, 16) and merged.shape == (2, 8 * 8, 32)
        torch.testing.assert_close(stage(stage_in), stage_out, rtol=0, atol=1e-6)
    # attention on (num_groups * B, N, C) with the authors' additive mask equals the block's own
    # call with padded keys (stage 1 at 80x112 is padded)
    block = model.layers[1].blocks[0]
    (groups,), kwargs, out = block_calls(model, block.attn, torch.randn(1, 3, 80, 112))
    assert kwargs["padded_keys"] is not None and kwargs["padded_keys"].any()
    attention = A(dim=32, group_size=kwargs["group_size"], num_heads=2).eval()
    attention.load_state_dict(block.attn.state_dict())
    mask = torch.zeros(len(kwargs["padded_keys"]), groups.shape[1], groups.shape[1])
    mask = mask.masked_fill(kwargs["padded_keys"][:, None, :], -1e6)  # the authors' (0 / -inf) mask
    with torch.no_grad():
        torch.testing.assert_close(attention(groups, mask), out, rtol=0, atol=1e-6)


def test_dynamic_position_bias_residual_form_and_mlp_positional_arguments():
    from models.crossformer import DynamicPosBias, Mlp

    torch.manual_seed(0)
    dpb = DynamicPosBias(32, 2, residual=True)
    offsets = torch.randn(9, 2)
    pos = dpb.pos_proj(offsets)
    pos = pos + dpb.pos1(pos)
    pos = pos + dpb.pos2(pos)
    torch.testing.assert_close(dpb(offsets), dpb.pos3(pos))
    dpb.residual = False
    torch.testing.assert_close(dpb(offsets), dpb.pos3(dpb.pos2(dpb.pos1(dpb.pos_proj(offsets)))))
    mlp = Mlp(8, 32, 8, torch.nn.GELU, 0.5)  # the authors' fifth argument is the dropout
    assert mlp.drop1.p == mlp.drop2.p == 0.5 and mlp.fc1.out_features == 32
