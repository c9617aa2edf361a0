"""Semantic segmentation: heads, parameter counts, pipeline, metrics, align resize, aug-test,
training, exact iteration resume, 2-rank evaluation, bad inputs (segmentation/)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from config import load_config
from conftest import dense_fixture_input, dense_fixture_opts, load_dense_fixture, read_flops_table, write_ade
from models import build_model
from optimizer import build_optimizer
from runtime import Precision
from segmentation import predict as seg_predict
from segmentation import test as seg_test
from segmentation import train as seg_train
from segmentation.align_resize import aligned_resize_size, rescale_size
from segmentation.engine import poly_learning_rate, predict_probabilities
from segmentation.heads import build_segmentation_model
from segmentation.losses import SegmentationLoss
from segmentation.metrics import SegmentationMeter, area_counts
from segmentation.pipeline import random_crop_box, reduce_zero_label, train_transform
from training import load_backbone_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(REPO, "configs", "segmentation", "demo_digits.yaml")
MIOU_LINE = re.compile(r" \* mIoU (\d+\.\d+) mAcc (\d+\.\d+) aAcc (\d+\.\d+)")
# A model small enough for a few CPU steps on 32x32 crops; 4 classes.
TINY = ["MODEL.NUM_CLASSES", "4", "MODEL.CROS.EMBED_DIM", "16", "MODEL.CROS.DEPTHS", "[1, 1, 1, 1]",
        "MODEL.CROS.NUM_HEADS", "[1, 1, 1, 1]", "SEG.NECK_CHANNELS", "16", "SEG.CHANNELS", "8",
        "SEG.IMG_SCALE", "[40, 32]", "SEG.CROP_SIZE", "[32, 32]", "SEG.RATIO_RANGE", "[0.75, 1.25]",
        "SEG.FLIP_PROB", "0.5", "DATA.BATCH_SIZE", "2", "DATA.NUM_WORKERS", "0", "PRINT_FREQ", "1"]
PAPER_PARAMS = {"fpn_crossformer_s_ade20k_80k": 34.3e6, "fpn_crossformer_b_ade20k_80k": 55.6e6,
                "fpn_crossformer_l_ade20k_80k": 95.4e6, "upernet_crossformer_s_ade20k_160k": 62.3e6,
                "upernet_crossformer_b_ade20k_160k": 83.6e6, "upernet_crossformer_l_ade20k_160k": 125.5e6}


def tiny_config(*opts: str):
    return load_config(DEMO_CFG, TINY + list(opts))


def train_args(data: str, output: str, *opts: str) -> list[str]:
    return ["--cfg", DEMO_CFG, "--data-path", data, "--output", output, "--device", "cpu",
            "--opts", *TINY, "DATA.DATASET", "ade20k", *opts]


# ----------------------------------------------------------------------------- heads
@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_heads_give_logits_at_the_input_size_for_odd_sizes(head):
    torch.manual_seed(0)
    model = build_segmentation_model(tiny_config("SEG.HEAD", head, "SEG.AUX_WEIGHT", "0.4"))
    model.train()
    outputs = model(torch.randn(2, 3, 45, 67))
    assert outputs["out"].shape == (2, 4, 45, 67) and outputs["aux"].shape == (2, 4, 45, 67)
    model.eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 37, 53))
    assert list(outputs) == ["out"] and outputs["out"].shape == (1, 4, 37, 53)
    assert torch.isfinite(outputs["out"]).all()


@pytest.mark.parametrize("family, case", [(family, case) for family in ("v1", "pp") for case in range(6)])
def test_heads_get_the_official_backbones_raw_stage_maps(family, case):
    """The decode and auxiliary heads receive the stage maps of the authors' segmentation backbone
    of the config's family (ICLR or ++ layout by USE_ACL), unnormalised, at non-square sizes."""
    fixture = load_dense_fixture(family)
    case = fixture["cases"][case]
    model = build_segmentation_model(tiny_config(*dense_fixture_opts(fixture, case), "SEG.AUX_WEIGHT", "0.4"))
    model.backbone.load_state_dict(fixture["state_dict"])  # strict: neither head nor final norm is left
    received = []
    model.decode_head.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    model.aux_head.register_forward_pre_hook(lambda module, args: received.append([args[0]]))
    model.eval()
    with torch.no_grad():
        model(dense_fixture_input(case))
    model.train()
    with torch.no_grad():
        model(dense_fixture_input(case))
    decode, _, aux = received
    for ours, official in zip(decode, case["maps"]):
        torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)
    torch.testing.assert_close(aux[0], case["maps"][2], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, exempt", [("upernet_crossformer_s_ade20k_160k", "norm"),
                                          ("fpn_crossformer_s_ade20k_80k", None)])
def test_weight_decay_follows_the_authors_paramwise_rule(name, exempt):
    """UPerNet: weight decay 0.01 on everything but the parameters named 'norm' (the backbone's
    LayerNorms; BatchNorms, biases and the DPB decay); Semantic FPN: 1e-4 on every parameter."""
    config = load_config(os.path.join(REPO, "configs", "segmentation", f"{name}.yaml"))
    with torch.device("meta"):
        model = build_segmentation_model(config)
    optimizer = build_optimizer(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}
    assert set(groups) == ({config.TRAIN.WEIGHT_DECAY, 0.0} if exempt else {1e-4})
    free = groups.get(0.0, set())
    assert free == {n for n in names.values() if exempt and exempt in n}
    if exempt:
        assert "backbone.layers.0.blocks.0.norm1.weight" in free and "backbone.patch_embed.norm.bias" in free
        decayed = groups[config.TRAIN.WEIGHT_DECAY]
        assert {"backbone.layers.0.blocks.0.attn.pos.pos1.0.weight", "backbone.layers.0.blocks.0.attn.qkv.bias",
                "decode_head.fpn_bottleneck.1.weight"} <= decayed


def test_paper_schedules_of_the_segmentation_configs():
    """Semantic FPN S/B/L: groups [14, 14, 7, 7], intervals [16, 8, 2, 1], poly 0.9; UPerNet: poly 1.0."""
    for name in PAPER_PARAMS:
        config = load_config(os.path.join(REPO, "configs", "segmentation", f"{name}.yaml"))
        fpn = name.startswith("fpn")
        assert list(config.MODEL.CROS.GROUP_SIZE) == ([14, 14, 7, 7] if fpn else [7, 7, 7, 7])
        assert list(config.MODEL.CROS.INTERVAL) == ([16, 8, 2, 1] if fpn else [8, 4, 2, 1])
        assert config.SEG.POWER == (0.9 if fpn else 1.0) and config.SEG.MIN_LR == 0.0
        assert config.TRAIN.WEIGHT_DECAY == (1e-4 if fpn else 0.01)


def test_parameter_counts_of_the_paper_configs_within_one_percent():
    for name, paper in PAPER_PARAMS.items():
        model = build_segmentation_model(load_config(os.path.join(REPO, "configs", "segmentation", f"{name}.yaml")))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - paper) / paper < 0.01, (name, count)
        assert (model.aux_head is not None) == name.startswith("upernet")


def test_flops_table_lists_every_segmentation_config():
    """One row per config of configs/segmentation/ (the demos aside)."""
    configs = {name[:-5] for name in os.listdir(os.path.join(REPO, "configs", "segmentation"))} - {"demo_digits"}
    assert sorted(row["config"] for row in read_flops_table("segmentation.md")) == sorted(configs)


@pytest.mark.parametrize("row", read_flops_table("segmentation.md"), ids=lambda row: row["config"])
def test_flops_table_rows_are_the_scripts_count(row):
    """docs/segmentation.md's table is what segmentation/get_flops.py counts at 512x2048, within
    1.5% of the paper's figures."""
    from segmentation.get_flops import count
    params, macs, _ = count(load_config(os.path.join(REPO, "configs", "segmentation", f"{row['config']}.yaml")),
                            512, 2048)
    assert (row["parameters"], row["gflops"]) == (f"{params / 1e6:.2f}M", f"{macs / 1e9:.1f}")
    if row["paper_gflops"] != "—":
        paper = float(row["paper_gflops"])
        assert row["difference"] == f"{round(100 * (float(row['gflops']) / paper - 1), 1) + 0.0:+.1f}%"
        assert abs(macs / 1e9 / paper - 1) < 0.015



def test_a_training_step_runs_and_the_loss_falls_on_repeated_images():
    torch.manual_seed(0)
    model = build_segmentation_model(tiny_config("SEG.HEAD", "upernet", "SEG.AUX_WEIGHT", "0.4"))
    model.train()
    criterion = SegmentationLoss(0.4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.randn(2, 3, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)  # 8x8 blocks
    labels = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0).long()
    labels[:, :3] = 255
    losses = []
    for _ in range(25):
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- metrics
def test_miou_of_a_perfect_and_of_a_constant_prediction():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    meter = SegmentationMeter(3, 255, torch.device("cpu"))
    meter.update(label.clone().clamp(max=2), label)
    summary = meter.summary()
    assert summary["mIoU"] == 1.0 and summary["mAcc"] == 1.0 and summary["aAcc"] == 1.0

    constant = SegmentationMeter(3, 255, torch.device("cpu"))
    constant.update(torch.full_like(label, 2), label)  # everything "2"; 7 labelled pixels, 3 of class 2
    summary = constant.summary()
    # class 2: intersection 3, union 7 -> 3/7; classes 0 and 1: IoU 0 -> mean 1/7
    assert summary["IoU"] == pytest.approx([0.0, 0.0, 3 / 7])
    assert summary["mIoU"] == pytest.approx(1 / 7)
    assert summary["mAcc"] == pytest.approx(1 / 3) and summary["aAcc"] == pytest.approx(3 / 7)


def test_ignored_pixels_and_reduce_zero_label():
    raw = np.array([[0, 1, 2, 150, 255]], np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 1, 149, 255]]
    counts = area_counts(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 255, 1, 255]), 2)
    assert counts.tolist() == [[1, 1], [1, 1], [1, 1], [1, 1]]  # the two ignored pixels count nowhere
    loss = SegmentationLoss()({"out": torch.zeros(1, 2, 1, 2, requires_grad=True)}, torch.full((1, 1, 2), 255))
    assert loss.item() == 0.0  # no labelled pixel: 0, not NaN


# ----------------------------------------------------------------------------- resize and pipeline
@pytest.mark.parametrize("size", [(512, 683), (375, 500), (1000, 333), (97, 131), (2048, 512)])
def test_align_resize_gives_multiples_of_32_and_keeps_the_ratio(size):
    height, width = size
    h, w = aligned_resize_size(height, width, (2048, 512), 32)
    assert h % 32 == 0 and w % 32 == 0
    rh, rw = rescale_size(height, width, (2048, 512))
    assert max(rh, rw) <= 2048 and min(rh, rw) <= 512 and (max(rh, rw) == 2048 or min(rh, rw) == 512)
    assert abs(rh / rw - height / width) < 0.01 * height / width + 1 / min(rh, rw)
    assert 0 <= h - rh < 32 and 0 <= w - rw < 32


def test_train_transform_crops_pads_and_limits_one_class():
    seg = tiny_config("SEG.CROP_SIZE", "[48, 48]", "SEG.CAT_MAX_RATIO", "0.75").SEG
    image = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    label = Image.fromarray(np.ones((30, 40), np.uint8))
    pixels, labels = train_transform(image, label, seg, np.random.default_rng(0))
    assert pixels.shape == (3, 48, 48) and labels.shape == (48, 48)
    assert (labels == 255).any() and set(labels.unique().tolist()) <= {1, 255}  # padded with ignore
    again = train_transform(image, label, seg, np.random.default_rng(0))
    assert torch.equal(again[0], pixels) and torch.equal(again[1], labels)  # one seed, one sample
    # a window with one class over 75 % is redrawn while a better one exists
    label_map = np.zeros((64, 64), np.uint8)
    label_map[:, 48:] = 1
    top, left = random_crop_box(label_map, (32, 32), 0.75, 255, np.random.default_rng(1))
    window = label_map[top:top + 32, left:left + 32]
    assert 0 < window.mean() < 0.75


# ----------------------------------------------------------------------------- aug-test
class PointwiseModel(nn.Module):
    """A 1x1 convolution: commutes with flips and (nearly) with resizing."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_aug_test_of_a_flip_symmetric_case_equals_single_scale():
    torch.manual_seed(0)
    config = tiny_config("SEG.IMG_SCALE", "[64, 64]", "SEG.TEST_RATIOS", "[1.0]")
    model, precision = PointwiseModel().eval(), Precision(config, torch.device("cpu"))
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    single = predict_probabilities(model, image, config, precision)
    flipped = predict_probabilities(model, image, config, precision, (1.0,), flip=True)
    torch.testing.assert_close(flipped, single)
    # every scale of a uniform image gives the same probabilities as single-scale
    uniform = torch.full((3, 50, 70), 90, dtype=torch.uint8)
    multi = predict_probabilities(model, uniform, config, precision, (0.5, 1.0, 1.75), flip=True)
    torch.testing.assert_close(multi, predict_probabilities(model, uniform, config, precision))


def test_poly_learning_rate_with_warmup():
    config = tiny_config("TRAIN.BASE_LR", "0.01", "SEG.MAX_ITERS", "100", "SEG.WARMUP_ITERS", "10",
                         "SEG.WARMUP_RATIO", "0.1", "SEG.POWER", "0.9", "SEG.MIN_LR", "0.0")
    assert poly_learning_rate(config, 0) == pytest.approx(0.001)  # warm-up starts at WARMUP_RATIO
    assert poly_learning_rate(config, 5) == pytest.approx(0.01 * 0.95 ** 0.9 * (1 - 0.5 * 0.9))
    assert poly_learning_rate(config, 50) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_learning_rate(config, 100) == 0.0


# ----------------------------------------------------------------------------- end to end
def final_weights(output: str) -> dict:
    run = os.path.join(output, "seg_demo_digits", "default")
    return torch.load(os.path.join(run, "ckpt_iter_4.pth"), weights_only=True)["model"]


def test_iteration_auto_resume_continues_exactly(tmp_path, capsys):
    data = write_ade(tmp_path / "ade")
    opts = ["SEG.MAX_ITERS", "4", "SEG.CHECKPOINT_INTERVAL", "2", "SEG.EVAL_INTERVAL", "4", "SEG.WARMUP_ITERS", "2",
            "MODEL.DROP_PATH_RATE", "0.1"]
    assert seg_train.run(train_args(data, str(tmp_path / "straight"), *opts)) == 0
    interrupted = str(tmp_path / "interrupted")
    assert seg_train.run(train_args(data, interrupted, *opts)) == 0
    run = os.path.join(interrupted, "seg_demo_digits", "default")
    os.remove(os.path.join(run, "ckpt_iter_4.pth"))  # as if killed after the checkpoint at 2
    capsys.readouterr()
    assert seg_train.run(train_args(data, interrupted, *opts)) == 0
    assert "resuming training at iteration 2" in capsys.readouterr().out
    straight, resumed = final_weights(str(tmp_path / "straight")), final_weights(interrupted)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_two_rank_gloo_evaluation_equals_one_rank(tmp_path, capsys):
    data = write_ade(tmp_path / "ade", images=5)
    output = str(tmp_path / "run")
    opts = ["SEG.MAX_ITERS", "2", "SEG.CHECKPOINT_INTERVAL", "2", "SEG.EVAL_INTERVAL", "2"]
    assert seg_train.run(train_args(data, output, *opts)) == 0
    checkpoint = os.path.join(output, "seg_demo_digits", "default", "ckpt_iter_2.pth")
    capsys.readouterr()
    args = ["--cfg", DEMO_CFG, "--data-path", data, "--output", str(tmp_path / "eval"), "--checkpoint", checkpoint,
            "--opts", *TINY, "DATA.DATASET", "ade20k"]
    assert seg_test.run(args + ["SEG.TEST_RATIOS", "[0.75, 1.0]"]) == 0
    one_rank = MIOU_LINE.findall(capsys.readouterr().out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "segmentation/test.py", *args, "SEG.TEST_RATIOS", "[0.75, 1.0]"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(one_rank) == 1 and MIOU_LINE.findall(result.stdout) == one_rank


def test_aug_test_flag_runs_every_scale(tmp_path, capsys):
    data = write_ade(tmp_path / "ade", images=2)
    output = str(tmp_path / "run")
    assert seg_train.run(train_args(data, output, "SEG.MAX_ITERS", "1", "SEG.EVAL_INTERVAL", "1",
                                    "SEG.CHECKPOINT_INTERVAL", "1")) == 0
    checkpoint = os.path.join(output, "seg_demo_digits", "default", "ckpt_iter_1.pth")
    capsys.readouterr()
    assert seg_test.run(["--cfg", DEMO_CFG, "--data-path", data, "--output", str(tmp_path / "e"), "--checkpoint",
                         checkpoint, "--aug-test", "--opts", *TINY, "DATA.DATASET", "ade20k"]) == 0
    out = capsys.readouterr().out
    assert "multi-scale evaluation" in out and len(MIOU_LINE.findall(out)) == 1
    # one image: the class colours blended over it, scaled up 16x (32 pixels high), a legend beside it
    image = os.path.join(data, "images", "validation", "0.jpg")
    png = str(tmp_path / "overlay.png")
    assert seg_predict.run(["--cfg", DEMO_CFG, "--checkpoint", checkpoint, "--image", image, "--out", png,
                            "--opts", *TINY]) == 0
    with Image.open(png) as drawn, Image.open(image) as original:
        assert drawn.height == 16 * original.height and drawn.width > 16 * original.width
    assert re.search(r"classes: class \d \d+%", capsys.readouterr().out)
    assert seg_predict.run(["--cfg", DEMO_CFG, "--checkpoint", checkpoint, "--image", str(tmp_path / "none.jpg"),
                            "--out", png, "--opts", *TINY]) == 2


def test_pretrained_backbone_weights_load_without_the_classifier(tmp_path):
    config = tiny_config()
    classifier = build_model(config)
    path = str(tmp_path / "imagenet.pth")
    torch.save({"model": classifier.state_dict()}, path)
    model = build_segmentation_model(config)
    load_backbone_weights(model.backbone, path)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key


# ----------------------------------------------------------------------------- bad input
def damage_names(root):
    os.rename(os.path.join(root, "annotations", "training", "1.png"), os.path.join(root, "annotations", "training", "x.png"))
    return "do not pair up by name"


def damage_label(root):
    Image.fromarray(np.full((32, 40), 9, np.uint8)).save(os.path.join(root, "annotations", "validation", "0.png"))
    return "holds label 9, above the 4 classes"


def damage_split(root):
    os.rename(os.path.join(root, "images", "validation"), os.path.join(root, "images", "val"))
    return "dataset split folder not found"


@pytest.mark.parametrize("damage", [damage_names, damage_label, damage_split])
def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys, damage):
    data = write_ade(tmp_path / "ade", images=2)
    expected = damage(data)
    code = seg_train.run(train_args(data, str(tmp_path / "out"), "SEG.MAX_ITERS", "1", "SEG.EVAL_INTERVAL", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err


def test_bad_head_and_missing_data_path_exit_2(tmp_path, capsys):
    assert seg_train.run(["--cfg", DEMO_CFG, "--data-path", str(tmp_path / "nowhere"), "--output", str(tmp_path),
                          "--opts", "DATA.DATASET", "ade20k"]) == 2
    assert "dataset folder not found" in capsys.readouterr().err
    data = write_ade(tmp_path / "ade", images=1)
    assert seg_train.run(train_args(data, str(tmp_path / "o"), "SEG.HEAD", "segformer")) == 2
    assert capsys.readouterr().err.strip() == "error: unknown SEG.HEAD 'segformer'; known heads: fpn, upernet"
