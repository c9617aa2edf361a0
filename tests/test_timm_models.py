"""CrossFormer elsewhere: timm registration and interface (mirroring timm's own model tests on a
tiny config), features_only, FX, torch.export / ONNX at several sizes, checkpoints through timm's
loader, torch.hub, segmentation_models_pytorch encoders, and timm models in main.py."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from timm.optim import param_groups_layer_decay

import timm
import crossformer
from crossformer.timm_models import MODELS, TOP1
from conftest import accuracies, check_ok, load_ckpt, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(MODELS)
TINY = dict(embed_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4))  # architecture overrides
SIZES = ((224, 224), (256, 256), (288, 320))  # stage-4 maps 7x7 (one group), 8x8 (padded), 9x10
with open(os.path.join(ROOT, "tests", "fixtures", "official_models.json")) as f:
    OFFICIAL = json.load(f)


def tiny(name: str = "crossformer_pp_small_patch4_group_const_224", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **TINY, **kwargs)


# ----------------------------------------------------------------------------- registration, cfgs
@pytest.mark.parametrize("name", NAMES)
def test_registered_with_official_shapes_and_default_cfg(name):
    official = "crossformer_pp/" if name.startswith("crossformer_pp_") else "crossformer/"
    official += name.removeprefix("crossformer_pp_").removeprefix("crossformer_")
    with torch.device("meta"):
        model = timm.create_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: s for k, s, kind in OFFICIAL[official]["state_dict"] if kind == "param"}
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["classifier"] == "head" and "head.weight" in shapes
    assert all(f"{conv}.weight" in shapes for conv in cfg["first_conv"])
    assert f"top-1 {TOP1[name]}" in cfg["notes"][0]
    assert model.num_features == model.head_hidden_size == shapes["norm.weight"][0]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


def test_pretrained_without_a_file_is_an_error():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file=path\\)"):
        timm.create_model(NAMES[0], pretrained=True)


# ----------------------------------------------------------------------------- the timm interface
def test_forward_backward_head_and_pooling_interface():
    model = tiny(num_classes=42).train()
    x = torch.randn(2, 3, 96, 128)
    out = model(x)
    out.mean().backward()
    assert out.shape == (2, 42) and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)  # NHWC, as model.output_fmt says
        assert model.output_fmt == "NHWC" and features.shape == (2, 3, 4, model.num_features)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
        model.reset_classifier(5, "avg")
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, "max")


def test_forward_intermediates_features_only_and_pruning():
    model = tiny().eval()
    x = torch.randn(1, 3, 100, 140)  # not a multiple of any group: padded everywhere
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        for info, feature in zip(model.feature_info, maps):
            r = info["reduction"]
            assert feature.shape[1] == info["num_chs"]
            assert feature.shape[2] <= math.ceil(100 / r) + 1 and feature.shape[3] <= math.ceil(140 / r) + 1
        features = timm.create_model("crossformer_pp_small_patch4_group_const_224", features_only=True,
                                     out_indices=(1, 3), **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # pruned: no norm, no head
        outs = features(x)
        assert features.feature_info.channels() == [32, 128]
        torch.testing.assert_close(outs[0], maps[1])
        torch.testing.assert_close(outs[1], maps[3])
        kept = model.prune_intermediate_layers((0, 1))
        assert kept == [0, 1] and len(model.layers) == 2
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[1], maps[1])


def test_grad_checkpointing_and_layer_decay_groups():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), plain)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    assert len({g["lr_scale"] for g in groups}) == sum(TINY["depths"]) + 3 + 2  # stem, blocks, mergings, norm+head

    def scale(param):
        return next(g["lr_scale"] for g in groups if any(p is param for p in g["params"]))
    assert scale(model.head.weight) == 1.0 and scale(model.patch_embed.projs[0].weight) == min(
        g["lr_scale"] for g in groups)
    assert scale(model.layers[0].blocks[0].attn.qkv.weight) < scale(model.layers[0].downsample.norm.weight) \
        < scale(model.layers[1].blocks[0].attn.qkv.weight)
    assert model.no_weight_decay() == {"absolute_pos_embed"} and not hasattr(model, "no_weight_decay_keywords")


# ----------------------------------------------------------------------------- tracing and export
@pytest.mark.parametrize("name", ["crossformer_pp_small_patch4_group_const_224", "crossformer_tiny_patch4_group7_224"])
def test_fx_and_feature_extractors_follow_the_input_size(name):
    """Both grouping layouts (CrossFormer++ and the ICLR one), at sizes where the groups are padded
    and, at 96x160, where the last stage's 3x5 map is smaller than a group."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = tiny(name).eval()
    graph = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, {"layers.2.blocks.1": "stage3", "head": "logits"})
    with torch.no_grad():
        for size in SIZES[:2] + ((96, 160),):
            x = torch.randn(1, 3, *size)
            logits, maps = model(x), model.forward_intermediates(x, intermediates_only=True)
            assert torch.equal(graph(x), logits) and torch.equal(extractor(x)["logits"], logits)
            # a block's output: the authors' tokens (B, h*w, C)
            torch.testing.assert_close(extractor(x)["stage3"].transpose(1, 2).reshape(maps[2].shape), maps[2])


def test_fx_backward():
    """The traced graph in training mode (drop path included, drawn from the same seed) gives the
    eager outputs and gradients."""
    model = tiny(num_classes=7, drop_path_rate=0.2).train()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 96)
    results = []
    for module in (graph, model):
        module.zero_grad()
        torch.manual_seed(1)
        out = module(x)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (traced, traced_grads), (eager, eager_grads) = results
    assert traced.shape == (2, 7) and set(traced_grads) == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(traced, eager, rtol=0, atol=1e-6)
    assert traced_grads.keys() == eager_grads.keys()
    for name, grad in traced_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().max() > 1e-4 for g in eager_grads.values())  # not a comparison of zeros


# timm's own FX tests (tests/test_models.py of pytorch-image-models: test_model_forward_fx and
# test_model_backward_fx) trace with timm's tracer settings and check the extractor's output; the same
# here on the tiny configuration, also against the eager outputs and gradients.
TIMM_FX_NAMES = ["crossformer_tiny_patch4_group7_224", "crossformer_pp_small_patch4_group_const_224"]


def timm_fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The graph module timm's FX tests run: traced with timm's leaf modules and autowrapped
    functions (FX leaves), in train and eval mode, each returning the nodes that feed the output."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    mode, returned = model.training, {}
    for train in (True, False):
        tracer = NodePathTracer(**tracer_kwargs)
        graph = tracer.trace(model.train(train))
        output = next(node for node in graph.nodes if node.op == "output")
        returned[train] = [tracer.node_to_qualname[node] for node in output.all_input_nodes]
    model.train(mode)
    return create_feature_extractor(model, train_return_nodes=returned[True], eval_return_nodes=returned[False],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", TIMM_FX_NAMES)
def test_timm_fx_forward_under_inference_mode_equals_eager(name):
    model = tiny(name).eval()
    with torch.inference_mode():  # as timm's test: tracing sees no gradients (the kept-bias path)
        inputs = torch.randn(1, 3, 128, 128)
        outputs = model(inputs)
        fx_outputs = torch.cat(tuple(timm_fx_model(model)(inputs).values()))
        other = torch.randn(1, 3, 96, 160)  # the graph follows the size
        torch.testing.assert_close(torch.cat(tuple(timm_fx_model(model)(other).values())), model(other))
    assert torch.all(fx_outputs == outputs)
    assert outputs.shape[0] == 1 and not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", TIMM_FX_NAMES)
def test_timm_fx_backward_gives_the_eager_gradients(name):
    # Without drop path: create_feature_extractor's dead-code elimination drops the in-place 1/keep
    # rescaling (``div_``) of timm's DropPath, so with it the extractor's training outputs differ
    model = tiny(name, num_classes=42, drop_path_rate=0.0).train()
    inputs = torch.randn(2, 3, 128, 128)
    fx_model = timm_fx_model(model)
    outputs = torch.cat(tuple(fx_model(inputs).values()))
    outputs.mean().backward()
    fx_grads = {n: p.grad.clone() for n, p in fx_model.named_parameters() if p.grad is not None}
    assert set(fx_grads) == {n for n, _ in fx_model.named_parameters()}
    assert sum(g.numel() for g in fx_grads.values()) == sum(p.numel() for p in model.parameters())
    assert outputs.shape[-1] == 42 and not torch.isnan(outputs).any()
    model.zero_grad()
    eager = model(inputs)
    eager.mean().backward()
    torch.testing.assert_close(outputs, eager, rtol=0, atol=1e-6)
    eager_grads = dict(model.named_parameters())
    for n, grad in fx_grads.items():
        torch.testing.assert_close(grad, eager_grads[n].grad, rtol=1e-5, atol=1e-7)


def test_features_only_with_another_feature_class_is_a_clear_error():
    with pytest.raises(ValueError, match="features_only supports feature_cls='getter'.*not 'fx'"):
        timm.create_model(NAMES[0], features_only=True, feature_cls="fx", **TINY)
    maps = timm.create_model(NAMES[0], features_only=True, feature_cls="getter", **TINY).eval()
    assert [m.shape[1] for m in maps(torch.randn(1, 3, 64, 64))] == [16, 32, 64, 128]


def test_jit_trace_and_torchscript_onnx_exporter_refuse():
    model = tiny().eval()
    with pytest.raises(RuntimeError, match="cannot be traced by torch.jit.trace"):
        torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(Exception, match="cannot be traced by torch.jit.trace"):
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), os.devnull, dynamo=False)


def test_exported_program_matches_eager_at_every_size_then_eager_still_right():
    model = tiny("crossformer_tiny_patch4_group7_224").eval()  # the ICLR layout: LDA groups grow with the map
    assert model.grouping == "crossformer"
    inputs = [torch.randn(1, 3, *size) for size in SIZES + ((264, 300),)]  # 264x300: LDA groups padded
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    program = crossformer.export_program(model, inputs[0])
    for x, logits in zip(inputs, expected):
        torch.testing.assert_close(program.module()(x), logits, rtol=0, atol=1e-4)
    with pytest.raises(Exception, match="224"):
        program.module()(torch.randn(1, 3, 160, 160))  # below the exported range: refused
    with torch.no_grad():
        for x, logits in zip(inputs, expected):
            out = model(x)
            assert type(out) is torch.Tensor and torch.equal(out, logits)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_with_eager_logits(tmp_path):
    import onnxruntime
    model = tiny("crossformer_tiny_patch4_group7_224").eval()
    inputs = [torch.randn(1, 3, *size) for size in SIZES]
    program = crossformer.export_program(model, inputs[0])
    path = str(tmp_path / "crossformer.onnx")
    torch.onnx.export(program, (inputs[0],), path, dynamo=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for x in inputs:
            out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_compile_dynamic_does_not_recompile_per_size():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny("crossformer_tiny_patch4_group7_224").eval()
    compiled = torch.compile(model, dynamic=True, backend="eager")
    graphs = []
    with torch.no_grad():
        for size in SIZES + ((320, 256), (352, 384), (416, 480)):
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-4)
            graphs.append(counters["stats"]["unique_graphs"])
    # torch specialises the first graph on the 7x7 single-group stage and square size of 224x224, and
    # the second on a convolution-size heuristic; after that, new sizes reuse the graph
    assert graphs[2] <= 3 and graphs[-1] == graphs[2]


# ----------------------------------------------------------------------------- checkpoints
def test_official_file_through_timm_loader_equals_our_loader(tmp_path):
    from utils import load_pretrained
    model = tiny("crossformer_tiny_patch4_group7_224", num_classes=10).eval()
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("attn.qkv.weight")]:  # the ICLR index buffers
        prefix = key.removesuffix("qkv.weight")
        state[prefix + "relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
        state[prefix + "biases"] = torch.zeros(169, 2)
    official, training = tmp_path / "official.pth", tmp_path / "ckpt_epoch_0.pth"
    torch.save({"model": state}, official)
    torch.save({"model": state, "optimizer": {}, "epoch": 0, "config": "MODEL:\n  NAME: x\n"}, training)
    x = torch.randn(2, 3, 96, 96)
    ours = tiny("crossformer_tiny_patch4_group7_224", num_classes=10).eval()
    load_pretrained(ours, str(official))
    with torch.no_grad():
        expected = ours(x)
        for path in (official, training):
            loaded = timm.create_model("crossformer_tiny_patch4_group7_224", pretrained=True, num_classes=10,
                                       pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY).eval()
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        other = timm.create_model("crossformer_tiny_patch4_group7_224", pretrained=True, num_classes=3, in_chans=1,
                                  pretrained_cfg_overlay=dict(file=str(official), num_classes=10), **TINY).eval()
        assert other(torch.randn(1, 1, 64, 64)).shape == (1, 3)
        torch.testing.assert_close(other.layers[0].blocks[0].attn.qkv.weight, ours.layers[0].blocks[0].attn.qkv.weight)
        torch.testing.assert_close(other.patch_embed.projs[0].weight,
                                   ours.patch_embed.projs[0].weight.sum(dim=1, keepdim=True))


def test_hub_local_source(tmp_path):
    for name in ("crossformer_small_patch4_group7_224", "crossformer_pp_huge_patch4_group_const_224"):
        model = torch.hub.load(ROOT, name, source="local", pretrained=False, **TINY)
        assert model.num_classes == 1000 and model.default_cfg["architecture"] == name
    with pytest.raises(ValueError, match="file="):
        torch.hub.load(ROOT, NAMES[0], source="local", pretrained=True)
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict()}, path)
    again = torch.hub.load(ROOT, "crossformer_pp_huge_patch4_group_const_224", source="local", pretrained=True,
                           file=str(path), **TINY)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# ----------------------------------------------------------------------------- segmentation_models_pytorch
@pytest.mark.parametrize("architecture", ["UPerNet", "FPN"])
def test_smp_decoders_on_the_tu_encoder(architecture):
    """smp's encoder gives CrossFormer's stage maps (those of the same weights in our model) at
    strides 4 to 32, and its decoder and head run on exactly those maps."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = getattr(smp, architecture)("tu-crossformer_tiny_patch4_group7_224", encoder_weights=None, classes=5).eval()
    ours = timm.create_model("crossformer_tiny_patch4_group7_224", num_classes=0).eval()
    loaded = ours.load_state_dict(model.encoder.model.model.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(key.startswith("norm.") for key in loaded.missing_keys)
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        out = model(x)
        features = model.encoder(x)
        maps = ours.forward_intermediates(x, intermediates_only=True)
        assert len(features) == 2 + len(maps) and features[1].shape[1] == 0  # the input, an empty stride-2 level
        for stride, feature, expected in zip((4, 8, 16, 32), features[2:], maps):
            assert feature.shape[-2:] == (256 // stride, 320 // stride)
            torch.testing.assert_close(feature, expected, rtol=0, atol=0)
        decoded = model.segmentation_head(model.decoder([x, features[1], *maps]))
        torch.testing.assert_close(out, decoded, rtol=0, atol=0)
    assert out.shape == (1, 5, 256, 320) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- timm models in main.py
DIGITS_OPTS = ["DATA.DATASET", "digits", "MODEL.NUM_CLASSES", 10, "DATA.BATCH_SIZE", 64, "TRAIN.EPOCHS", 1,
               "TRAIN.WARMUP_EPOCHS", 0, "TRAIN.BASE_LR", 1e-3, "AUG.AUTO_AUGMENT", "none", "AUG.MIXUP", 0.0,
               "AUG.CUTMIX", 0.0, "AUG.REPROB", 0.0, "AUG.COLOR_JITTER", 0.0, "AUG.HFLIP", 0.0,
               "AMP_OPT_LEVEL", "O0", "PRINT_FREQ", 50]


@pytest.mark.parametrize("cfg,opts,run_name", [
    # CrossViT's second branch sees the image at 224/240 of its size, in 16-pixel patches: 120 -> 112
    pytest.param("configs/timm/crossvit_9_240.yaml", ["DATA.IMG_SIZE", 120, "MODEL.NAME", "crossvit_digits"],
                 "crossvit_digits", marks=pytest.mark.slow),
    ("configs/demo/digits.yaml", ["MODEL.TYPE", "timm", "MODEL.TIMM.NAME", "resnet10t", "MODEL.NAME", "resnet_digits"],
     "resnet_digits"),
])
def test_main_trains_and_evaluates_a_timm_model(cfg, opts, run_name, tmp_path):
    from data.digits import ensure_digits_folder
    digits = ensure_digits_folder(str(tmp_path / "digits"))
    args = ["--cfg", cfg, "--data-path", digits, "--output", tmp_path / "out", "--num_workers", 0]
    trained = run_main(*args, "--opts", *DIGITS_OPTS, *opts)
    check_ok(trained)
    checkpoint = tmp_path / "out" / run_name / "default" / "ckpt_epoch_0.pth"
    assert "GFLOPs" not in trained.stdout and "parameters" in trained.stdout
    assert set(load_ckpt(checkpoint)) >= {"model", "optimizer", "epoch"}
    evaluated = run_main(*args, "--eval", "--resume", checkpoint, "--opts", *DIGITS_OPTS, *opts)
    check_ok(evaluated)
    assert accuracies(evaluated.stdout)[-1] == accuracies(trained.stdout)[-1]


def test_unknown_timm_name_is_a_user_error():
    from config import UserError, get_default_config
    from models import build_model
    config = get_default_config()
    config.MODEL.TYPE, config.MODEL.TIMM.NAME = "timm", "no_such_model"
    with pytest.raises(UserError, match="MODEL.TIMM.NAME: unknown timm model 'no_such_model'"):
        build_model(config)
