"""detection/: the CrossFormer FPN backbone at odd sizes, a training step of each detector type,
the authors' mmdet recipes in the built models (losses, RoIAlign, RetinaNet's extra levels,
proposal counts, weight decay, drop path), the cascade (stage scores and masks averaged, the crop
policy), COCOeval of perfect and shuffled predictions, category ids <-> labels, parameter counts
of the paper configs, bad inputs, and end to end (subprocesses): auto-resume continues exactly,
2-rank gloo evaluation equals 1-rank, the cascade demo trains and evaluates from its checkpoint.

The data is a small copy of the bundled digits detection set (16 train, 8 val images).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from config import UserError, load_config
from conftest import (dense_fixture_input, dense_fixture_opts, explain, load_dense_fixture, read_flops_table,
                      run_script)
from detection import engine
from detection.backbone import build_backbone
from detection.coco import CategoryMap, CocoDetection, load_coco
from detection.coco_eval import coco_evaluate, to_coco_results
from detection.model import build_detector
from detection.transforms import RandomHorizontalFlip
from optimizer import build_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = "configs/detection/demo_digits.yaml"
CASCADE_DEMO_CFG = "configs/detection/demo_digits_cascade.yaml"
RUN_SUBDIR = os.path.join("mask_rcnn_demo_digits", "default")
EVAL_SUBDIR = RUN_SUBDIR + "-eval"  # evaluation runs write beside the training run, never into it
DETECTED_LINE = re.compile(r"detected (\d+) objects in (\d+) images")
# paper parameter counts (80 classes)
# pycocotools' mask decoding trips a NumPy 2 deprecation warning (not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
PAPER_PARAMS = {"retinanet_crossformer_s_fpn_1x_coco": 40.8e6, "retinanet_crossformer_b_fpn_1x_coco": 62.1e6,
                "mask_rcnn_crossformer_s_fpn_1x_coco": 50.2e6, "mask_rcnn_crossformer_b_fpn_1x_coco": 71.5e6,
                "cascade_mask_rcnn_crossformer_s_fpn_3x_coco": 88.0e6}


def demo_config(*opts, cfg: str = DEMO_CFG):
    return load_config(os.path.join(REPO, cfg), [str(o) for o in opts])


def paper_config(name: str):
    return load_config(os.path.join(REPO, "configs", "detection", f"{name}.yaml"))


def meta_detector(config):
    """The detector of ``config`` on the meta device: its structure without memory or arithmetic."""
    with torch.device("meta"):
        return build_detector(config)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("det_type", ["mask_rcnn", "retinanet"])
def test_backbone_gives_fpn_maps_at_an_odd_size(det_type):
    config = demo_config("DET.TYPE", det_type)
    backbone = build_backbone(config).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 333, 517))
    sizes = backbone.body.stage_sizes(333, 517)
    stages = [0, 1, 2, 3] if det_type == "mask_rcnn" else [1, 2, 3]
    expected = [sizes[i] for i in stages]
    last = expected[-1]
    expected.append(((last[0] + 1) // 2, (last[1] + 1) // 2))  # P6: stride 2 from the last map / C5
    if det_type == "retinanet":
        expected.append(((expected[-1][0] + 1) // 2, (expected[-1][1] + 1) // 2))  # P7
    assert [tuple(m.shape[-2:]) for m in maps.values()] == expected
    assert sizes[0] == (83, 129)  # 333x517 at stride 4 (the embedding convs round down)
    for feature in maps.values():
        assert feature.shape[:2] == (1, backbone.out_channels) and torch.isfinite(feature).all()


@pytest.mark.parametrize("family, case", [(family, case) for family in ("v1", "pp") for case in range(6)])
def test_the_fpn_gets_the_official_backbones_raw_stage_maps(family, case):
    """At non-square sizes (224x352, 256x320, 352x224; groups 7/8 and 14/16) the FPN receives the
    stage maps of the authors' detection backbone of the config's family (USE_ACL: the ICLR layout
    for CrossFormer, the ++ layout for CrossFormer++), unnormalised."""
    fixture = load_dense_fixture(family)
    case = fixture["cases"][case]
    backbone = build_backbone(demo_config(*dense_fixture_opts(fixture, case))).eval()
    backbone.body.load_state_dict(fixture["state_dict"])  # strict: neither head nor final norm is left
    received = []
    backbone.fpn.register_forward_pre_hook(lambda module, args: received.append(list(args[0].values())))
    with torch.no_grad():
        backbone(dense_fixture_input(case))
    assert len(received[0]) == 4
    for ours, official in zip(received[0], case["maps"]):
        torch.testing.assert_close(ours, official, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- training step
@pytest.mark.parametrize("det_type", ["mask_rcnn", "faster_rcnn", "retinanet", "cascade_mask_rcnn"])
def test_training_loss_falls_on_repeated_images(det_type, digits_root):
    torch.manual_seed(0)
    cascade = det_type == "cascade_mask_rcnn"
    config = demo_config("DET.TYPE", det_type, "DATA.DATA_PATH", digits_root,
                         cfg=CASCADE_DEMO_CFG if cascade else DEMO_CFG)
    dataset = CocoDetection(digits_root, "train", 10, det_type.endswith("mask_rcnn"))
    images, targets = zip(*[dataset[i] for i in range(2)])
    model = build_detector(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # RetinaNet spikes at 1e-3
    losses = []
    for _ in range(20):
        loss_terms = model(list(images), list(targets))
        box_term = {"retinanet": "bbox_regression", "cascade_mask_rcnn": "loss_box_reg_stage2"}.get(det_type,
                                                                                                 "loss_box_reg")
        assert box_term in loss_terms
        loss = sum(loss_terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("cfg", [DEMO_CFG, CASCADE_DEMO_CFG])
def test_an_image_without_objects_trains_as_a_negative(cfg):
    torch.manual_seed(0)
    model = build_detector(demo_config(cfg=cfg)).train()
    targets = [dict(boxes=torch.tensor([[10.0, 10.0, 40.0, 40.0]]), labels=torch.tensor([1]),
                    masks=torch.ones(1, 96, 96, dtype=torch.uint8)),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                    masks=torch.zeros(0, 96, 96, dtype=torch.uint8))]
    losses = model([torch.rand(3, 96, 96), torch.rand(3, 96, 96)], targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(value) for value in losses.values()) and len(losses) >= 5


# ----------------------------------------------------------------------------- mmdet's recipe
def test_mask_rcnn_computes_as_mmdet_with_the_authors_recipe():
    """RoIAlign aligned with adaptive sampling (box and mask pools), L1 box losses in the RPN and
    the RoI head, 1000 proposals after NMS in training and testing, one test image per process,
    weight decay 1e-4 on every parameter."""
    config = paper_config("mask_rcnn_crossformer_s_fpn_1x_coco")
    model = meta_detector(config)
    for pool, size in ((model.roi_heads.box_roi_pool, 7), (model.roi_heads.mask_roi_pool, 14)):
        assert pool.aligned is True and pool.sampling_ratio == 0 and pool.output_size == (size, size)
    assert model.rpn.box_loss == "l1" and model.roi_heads.box_loss == "l1"
    assert model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert config.DET.TEST_BATCH_SIZE == 1 and config.DATA.BATCH_SIZE == 2
    optimizer = build_optimizer(config, model)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4]
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("size, rate", [("s", 0.2), ("b", 0.3)])
def test_drop_path_of_the_authors_backbones(size, rate):
    """The backbone config's rate (S 0.2, B 0.3) survives the COCO schedule merged after it."""
    for name in (f"retinanet_crossformer_{size}_fpn_1x_coco", f"mask_rcnn_crossformer_{size}_fpn_3x_coco"):
        config = paper_config(name)
        assert config.MODEL.DROP_PATH_RATE == rate
    last_block = meta_detector(config).backbone.body.layers[-1].blocks[-1]
    assert last_block.drop_path.drop_prob == pytest.approx(rate)


def l1_and_smooth_l1(difference: float) -> dict[str, float]:
    return {"l1": difference, "smooth_l1": difference - 0.5 / 9 if difference >= 1 / 9 else 4.5 * difference ** 2}


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "giou"])
def test_rcnn_box_losses(kind):
    """Two sampled RoIs, one positive: its predicted x delta is 0.5 off (0.05 box widths after the
    1/0.1 scaling); the loss is the positive's, divided by both RoIs, times ROI_BOX_LOSS_WEIGHT."""
    config = demo_config("DET.ROI_BOX_LOSS", kind, "DET.ROI_BOX_LOSS_WEIGHT", 2.0)
    heads = build_detector(config).roi_heads
    stage = heads.stages[0]
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    samples = [dict(boxes=boxes, labels=torch.tensor([3, 0]), matched=torch.tensor([0, 0]))]
    targets = [dict(boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]), labels=torch.tensor([3]))]
    deltas = torch.zeros(2, 11, 4)
    deltas[0, 3, 0] = 0.5
    deltas[1] = 7.0  # a negative RoI: no box loss
    loss = heads.box_regression_loss(stage, deltas.reshape(2, -1), samples, targets).item()
    if kind == "giou":  # predicted box [0.5, 0, 10.5, 10]: IoU 95/105, enclosing box = union
        expected = 1 - 95 / 105
    else:
        expected = l1_and_smooth_l1(0.5)[kind]
    assert loss == pytest.approx(2.0 * expected / 2)


@pytest.mark.parametrize("kind", ["l1", "smooth_l1"])
def test_rpn_box_loss(kind):
    """Over the positive anchors, divided by the sampled ones (here all three)."""
    rpn = build_detector(demo_config("DET.RPN_BOX_LOSS", kind)).rpn
    labels = [torch.tensor([1.0, 0.0, 0.0])]
    targets = [torch.zeros(3, 4)]
    predicted = torch.zeros(3, 4)
    predicted[0, 1] = 0.05  # below smooth L1's beta
    predicted[1] = 3.0  # a negative anchor: no box loss
    _, box_loss = rpn.compute_loss(torch.zeros(3), predicted, labels, targets)
    assert box_loss.item() == pytest.approx(l1_and_smooth_l1(0.05)[kind] / 3)


def test_multi_level_roi_align_picks_torchvision_s_levels_and_aligns_as_mmcv():
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    from detection.rcnn import MultiLevelRoIAlign
    torch.manual_seed(0)
    features = {str(i): torch.randn(1, 2, 256 // 2 ** i, 256 // 2 ** i) for i in range(4)}
    xy = torch.rand(40, 2) * 500
    side = 2 ** (torch.rand(40, 1) * 8 + 2)  # 4-1024 pixels: every level
    boxes = [torch.cat([xy, xy + side], dim=1)]
    shapes = [(1024, 1024)]
    ours = MultiLevelRoIAlign(list(features), [4, 8, 16, 32], 7, 2, aligned=False)(features, boxes, shapes)
    torchvision_pool = MultiScaleRoIAlign(list(features), 7, 2)(features, boxes, shapes)
    torch.testing.assert_close(ours, torchvision_pool)
    aligned = MultiLevelRoIAlign(list(features), [4, 8, 16, 32], 7, 0, aligned=True)
    box = torch.tensor([[10.0, 20.0, 150.0, 170.0]])  # scale 145: level 1 (stride 8)
    expected = roi_align(features["1"], [box], 7, 1 / 8, 0, aligned=True)
    torch.testing.assert_close(aligned(features, [box], shapes), expected)
    assert not torch.allclose(expected, roi_align(features["1"], [box], 7, 1 / 8, 0, aligned=False))


@pytest.mark.parametrize("relu", [False, True])
def test_retinanet_p6_comes_from_c5_and_p7_from_p6(relu):
    torch.manual_seed(0)
    backbone = build_detector(demo_config("DET.TYPE", "retinanet", "DET.P7_RELU", relu)).backbone.eval()
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        maps = backbone(image)
        c5 = backbone.body.forward_intermediates(image, indices=[3], intermediates_only=True)[0]
        extra = backbone.fpn.extra_blocks
        p6 = extra.p6(c5)
        p7 = extra.p7(torch.relu(p6) if relu else p6)
    assert list(maps) == ["0", "1", "2", "p6", "p7"]
    torch.testing.assert_close(maps["p6"], p6)
    torch.testing.assert_close(maps["p7"], p7)


@pytest.mark.parametrize("name", ["mask_rcnn_crossformer_pp_s_fpn_1x_coco", "retinanet_crossformer_pp_s_fpn_1x_coco"])
def test_crossformer_pp_configs_and_their_adaptive_interval(name):
    """The authors' CrossFormer++-S detection configs: groups 7 and intervals [8, 4, 2, 1] in the ++
    layout, adaptive interval off; MODEL.CROS.ADAPT_INTER turns it on: an LDA block then takes the
    interval ceil(max(H, W) / G) of the map it gets."""
    config = paper_config(name)
    assert (list(config.MODEL.CROS.GROUP_SIZE), list(config.MODEL.CROS.INTERVAL)) == ([7] * 4, [8, 4, 2, 1])
    assert config.MODEL.CROS.USE_ACL and not config.MODEL.CROS.ADAPT_INTER and config.MODEL.DROP_PATH_RATE == 0.2
    for adaptive in (False, True):
        path = os.path.join(REPO, "configs", "detection", f"{name}.yaml")
        body = meta_detector(load_config(path, ["MODEL.CROS.ADAPT_INTER", str(adaptive)])).backbone.body
        lda = body.layers[0].blocks[1]
        assert lda.layout(200, 334).interval == (math.ceil(334 / 7) if adaptive else 8)


# ----------------------------------------------------------------------------- cascade
def test_cascade_config_is_swin_s_3x_recipe():
    config = paper_config("cascade_mask_rcnn_crossformer_s_fpn_3x_coco")
    det = config.DET
    assert (list(det.ROI_IOU_THRESHOLDS), list(det.ROI_STAGE_WEIGHTS)) == ([0.5, 0.6, 0.7], [1.0, 0.5, 0.25])
    assert (det.ROI_BOX_LOSS, det.ROI_BOX_LOSS_WEIGHT, det.RPN_BOX_LOSS) == ("giou", 10.0, "smooth_l1")
    assert det.RPN_POST_NMS_TOP_N_TRAIN == 2000 and det.CROP_PROB == 0.5 and min(det.MIN_SIZE) == 480
    assert config.TRAIN.EPOCHS == 36 and list(det.LR_STEPS) == [27, 33] and config.TRAIN.WEIGHT_DECAY == 0.05
    model = meta_detector(config)
    stages = model.roi_heads.stages
    assert len(stages) == 3 and all(stage.mask_head is not None for stage in stages)
    convs = [m for m in stages[0].box_head.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stages[0].box_head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    fcs = [m for m in stages[0].box_head.modules() if isinstance(m, torch.nn.Linear)]
    assert [c.out_channels for c in convs] == [256] * 4 and len(norms) == 4 and [f.out_features for f in fcs] == [1024]
    assert stages[2].box_coder.weights == pytest.approx((1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067))
    optimizer = build_optimizer(config, model)
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}
    assert free == {n for n in names.values() if "norm" in n}  # the box heads' BatchNorms are '...0.1.weight'


class ConstantPredictor(torch.nn.Module):
    """A box predictor whose class logits are ``logits`` for every RoI, with zero box deltas."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        return self.logits.expand(len(x), -1), torch.zeros(len(x), 4 * len(self.logits))


class ConstantMasks(torch.nn.Module):
    def __init__(self, logit: float):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((len(x), 3, 28, 28), self.logit)


def test_cascade_inference_averages_the_stages_logits_and_mask_probabilities():
    """As mmdet: the softmax of the stages' mean class logits, the mean of their mask sigmoids."""
    from detection.rcnn import MultiLevelRoIAlign, RCNNRoIHeads, RCNNStage
    stage_logits = ([0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 4.0])
    mask_logits = (0.0, 2.0, -1.0)
    stages = [RCNNStage(torch.nn.Flatten(), ConstantPredictor(logits), (0.1, 0.1, 0.2, 0.2), 0.5, 1.0,
                        torch.nn.Identity(), ConstantMasks(mask)) for logits, mask in zip(stage_logits, mask_logits)]
    pool = MultiLevelRoIAlign(["0"], [4], 7, 0, True)
    heads = RCNNRoIHeads(pool, stages, 512, 0.25, "l1", 1.0, 0.0, 0.5, 10,
                         mask_roi_pool=MultiLevelRoIAlign(["0"], [4], 14, 0, True)).eval()
    features = {"0": torch.randn(1, 2, 16, 16)}
    proposal = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    result = heads(features, [proposal], [(64, 64)])[0][0]
    scores = torch.tensor(stage_logits).mean(0).softmax(0)
    assert result["labels"].tolist() == [2, 1] and result["scores"].tolist() == pytest.approx(scores[[2, 1]].tolist())
    torch.testing.assert_close(result["boxes"], proposal.expand(2, -1))
    expected_mask = torch.tensor(mask_logits).sigmoid().mean()
    assert result["masks"].shape == (2, 1, 28, 28)
    torch.testing.assert_close(result["masks"], torch.full((2, 1, 28, 28), expected_mask.item()))


def test_crop_policy_resizes_crops_and_drops_cut_objects():
    from detection.transforms import RandomResizeCrop
    image = torch.rand(3, 200, 300)
    masks = torch.zeros(2, 200, 300, dtype=torch.uint8)
    masks[0, 10:50, 10:60] = 1
    masks[1, 150:190, 240:290] = 1
    target = dict(boxes=torch.tensor([[10.0, 10.0, 60.0, 50.0], [240.0, 150.0, 290.0, 190.0]]),
                  labels=torch.tensor([4, 7]), masks=masks, image_id=1)
    crop = RandomResizeCrop(1.0, [100], [40, 60], 1333)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        cropped, out = crop(image, target)
        height, width = cropped.shape[-2:]
        assert 40 <= height <= 60 and 40 <= width <= 60  # the resized image is 100x150
        assert out["masks"].shape == (len(out["boxes"]), height, width) and len(out["labels"]) == len(out["boxes"])
        assert ((out["boxes"][:, 2:] > out["boxes"][:, :2]).all() and (out["boxes"] >= 0).all()
                and (out["boxes"][:, 2] <= width).all() and (out["boxes"][:, 3] <= height).all())
        for box, mask in zip(out["boxes"], out["masks"]):  # each mask stays inside its box
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert rows.min() >= int(box[1]) and cols.max() < box[2] + 1
        seen.add(tuple(out["labels"].tolist()))
    assert {(4,), (7,), ()} <= seen  # objects are cut away, crops without objects kept
    # one seed, one crop
    torch.manual_seed(3)
    first = crop(image, target)
    torch.manual_seed(3)
    second = crop(image, target)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1]["boxes"], second[1]["boxes"])
    assert RandomResizeCrop(0.0, [100], [40, 60], 1333)(image, target)[0] is image


# ----------------------------------------------------------------------------- COCO evaluation
def _as_results(coco, annotations_of) -> list[dict]:
    results = []
    for image_id in sorted(coco.imgs):
        for ann in annotations_of(image_id):
            segmentation = ann["segmentation"]
            results.append({"image_id": image_id, "category_id": ann["category_id"], "bbox": list(ann["bbox"]),
                            "score": 1.0, "segmentation": segmentation})
    return results


def test_coco_eval_of_perfect_predictions_is_1_and_of_shuffled_ones_much_less(digits_root, caplog):
    coco = load_coco(os.path.join(digits_root, "annotations", "instances_val2017.json"))
    # not under "crossformer": a run's create_logger stops that tree from propagating to caplog
    logger = logging.getLogger("detection_test")
    caplog.set_level(logging.INFO, logger="detection_test")
    perfect = coco_evaluate(coco, _as_results(coco, lambda i: coco.imgToAnns[i]), ("bbox", "segm"), logger)
    assert perfect["bbox_AP"] == pytest.approx(1.0) and perfect["segm_AP"] == pytest.approx(1.0)
    assert perfect["bbox_AP50"] == pytest.approx(1.0)
    ids = sorted(coco.imgs)
    shifted = {image_id: ids[(k + 1) % len(ids)] for k, image_id in enumerate(ids)}  # another image's objects
    shuffled = _as_results(coco, lambda i: coco.imgToAnns[shifted[i]])
    wrong = coco_evaluate(coco, shuffled, ("bbox", "segm"), logger)
    assert wrong["bbox_AP"] < 0.2 and wrong["segm_AP"] < 0.2
    assert any("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in r.message
               for r in caplog.records)


def test_detections_map_labels_back_to_category_ids():
    categories = CategoryMap([90, 1, 17, 5])
    assert [categories.label(c) for c in (1, 5, 17, 90)] == [1, 2, 3, 4]
    assert [categories.category_id(categories.label(c)) for c in (90, 1, 17, 5)] == [90, 1, 17, 5]
    mask = torch.zeros(2, 1, 6, 8)
    mask[0, 0, 1:3, 2:5] = 0.9
    output = {"boxes": torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 8.0, 6.0]]), "labels": torch.tensor([4, 2]),
              "scores": torch.tensor([0.9, 0.3]), "masks": mask}
    records = to_coco_results(7, output, categories)
    assert [r["category_id"] for r in records] == [90, 5]
    assert records[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and records[0]["image_id"] == 7
    assert mask_utils.area(records[0]["segmentation"]) == 6 and mask_utils.area(records[1]["segmentation"]) == 0


def _write_coco(folder, annotations: list, categories=({"id": 3, "name": "a"}, {"id": 8, "name": "b"})) -> str:
    """A COCO-layout folder with two 20x30 images (image 2 has no objects); returns the root."""
    os.makedirs(folder / "annotations")
    os.makedirs(folder / "val2017")
    from PIL import Image
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20)).save(folder / "val2017" / name)
    images = [{"id": 1, "file_name": "a.png", "height": 20, "width": 30},
              {"id": 2, "file_name": "b.png", "height": 20, "width": 30}]
    with open(folder / "annotations" / "instances_val2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": list(categories)}, f)
    return str(folder)


def test_dataset_targets_polygons_rle_crowd_and_empty_images(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 5), np.uint8), ((10, 6), (20, 5)))))
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 8, "bbox": [2, 3, 10, 8], "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 10, 5, 4], "iscrowd": 0,
         "segmentation": {"size": [20, 30], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 20], "iscrowd": 1,
         "segmentation": {"size": [20, 30], "counts": [0, 600]}},
    ]
    dataset = CocoDetection(_write_coco(tmp_path, annotations), "val", 2, with_masks=True)
    image, target = dataset[0]
    assert image.shape == (3, 20, 30)
    assert target["labels"].tolist() == [2, 1]  # category 8 -> label 2, 3 -> 1; the crowd region is left out
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [20, 10, 25, 14]]
    assert target["masks"].shape == (2, 20, 30) and target["masks"][1].sum() == 20
    assert target["masks"][0, 5, 5] == 1 and target["masks"][0, 0, 0] == 0
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 20, 30)
    flipped_image, flipped = RandomHorizontalFlip(1.0)(image, target)
    assert flipped["boxes"][0].tolist() == [18, 3, 28, 11]
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))


@pytest.mark.parametrize("annotation, culprit", [
    ({"id": 4, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]}, "annotation 4 has bbox [1, 2, 3]"),
    ({"id": 5, "image_id": 1, "category_id": 42, "bbox": [1, 2, 3, 4]}, "annotation 5 has category_id 42"),
    ({"id": 6, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4]}, "annotation 6 refers to image_id 9"),
    ({"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3, 4], "segmentation": [[1, 2, 3]]}, "annotation 7 has a polygon"),
])
def test_malformed_annotations_are_one_line_errors(tmp_path, annotation, culprit):
    root = _write_coco(tmp_path, [annotation])
    with pytest.raises(UserError) as err:
        CocoDetection(root, "val", 2, with_masks=True)
    assert culprit in str(err.value) and "instances_val2017.json" in str(err.value)
    assert "\n" not in str(err.value)


def test_class_count_and_missing_images_are_errors(tmp_path):
    root = _write_coco(tmp_path, [])
    with pytest.raises(UserError, match="has 2 categories, but MODEL.NUM_CLASSES is 80"):
        CocoDetection(root, "val", 80, with_masks=False)
    os.remove(os.path.join(root, "val2017", "b.png"))
    with pytest.raises(UserError, match=r"1 images of .* are missing from .*val2017, e.g. b.png"):
        CocoDetection(root, "val", 2, with_masks=False)


def test_pretrained_classification_weights_load_into_the_backbone(tmp_path):
    """The classification demo model has the detection demo's backbone: its checkpoint loads, head
    and final norm left out."""
    from models import build_model
    from training import load_backbone_weights
    classifier = build_model(load_config(os.path.join(REPO, "configs", "demo", "digits.yaml")))
    path = tmp_path / "classifier.pth"
    torch.save({"model": classifier.state_dict(), "epoch": 3}, path)
    model = build_detector(demo_config())
    load_backbone_weights(model.backbone.body, str(path))
    body = model.backbone.body.state_dict()
    loaded = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("head.", "norm."))}
    assert loaded and set(loaded) <= set(body)
    assert all(torch.equal(body[k], v) for k, v in loaded.items())
    torch.save({"model": {"layers.0.weight": torch.zeros(3)}}, path)
    with pytest.raises(UserError, match="does not fit this model"):
        load_backbone_weights(model.backbone.body, str(path))


# ----------------------------------------------------------------------------- paper configs
@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_configs_match_the_paper_parameter_counts(name):
    config = paper_config(name)
    schedule = (12, [8, 11]) if "_1x_" in name else (36, [27, 33])
    assert config.MODEL.NUM_CLASSES == 80 and (config.TRAIN.EPOCHS, list(config.DET.LR_STEPS)) == schedule
    params = sum(p.numel() for p in meta_detector(config).parameters())
    assert abs(params / PAPER_PARAMS[name] - 1) < 0.01, params


def test_3x_configs_train_multi_scale_for_36_epochs():
    for size in ("s", "b"):
        config = load_config(os.path.join(REPO, "configs", "detection", f"mask_rcnn_crossformer_{size}_fpn_3x_coco.yaml"))
        assert config.TRAIN.EPOCHS == 36 and min(config.DET.MIN_SIZE) == 480 and config.DET.MIN_SIZE[-1] == 800
        assert config.DET.MAX_SIZE == 1333 and config.MODEL.DROP_PATH_RATE == {"s": 0.2, "b": 0.3}[size]


PAPER_FLOPS_WITHIN = 0.015  # the paper's 1x figures; its 3x and Cascade figures are reported beside ours


def test_flops_table_lists_every_detection_config():
    """One row per config of configs/detection/ (the demos and the schedule bases aside)."""
    configs = {name[:-5] for name in os.listdir(os.path.join(REPO, "configs", "detection"))}
    configs -= {"coco_1x", "coco_3x", "cascade_3x", "demo_digits", "demo_digits_cascade"}
    assert sorted(row["config"] for row in read_flops_table("detection.md")) == sorted(configs)


@pytest.mark.parametrize("row", read_flops_table("detection.md"), ids=lambda row: row["config"])
def test_flops_table_rows_are_the_scripts_count(row):
    """docs/detection.md's table is what detection/get_flops.py counts at 1280x800, and the 1x
    configs are within 1.5% of the paper."""
    from detection.get_flops import count
    params, macs, _ = count(paper_config(row["config"]), 800, 1280)
    assert (row["parameters"], row["gflops"]) == (f"{params / 1e6:.2f}M", f"{macs / 1e9:.1f}")
    if row["paper_gflops"] != "—":
        paper = float(row["paper_gflops"])
        assert row["difference"] == f"{round(100 * (float(row['gflops']) / paper - 1), 1) + 0.0:+.1f}%"
        if "_1x_" in row["config"]:
            assert abs(macs / 1e9 / paper - 1) < PAPER_FLOPS_WITHIN



# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def detection_run(digits_root, tmp_path_factory):
    """Two epochs of the detection demo on the small set (4 steps each), a checkpoint per epoch."""
    output = tmp_path_factory.mktemp("train")
    result = run_script("detection/train.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--output", output,
                        "--batch-size", 4, "--epochs", 2, "--opts", "SAVE_FREQ", 1, "DET.WARMUP_ITERS", 2, "PRINT_FREQ", 1)
    assert result.returncode == 0, explain(result)
    return output


def test_training_writes_checkpoints_and_coco_metrics(detection_run):
    run_dir = detection_run / RUN_SUBDIR
    for name in ("config.yaml", "log_rank0.txt", "ckpt_epoch_0.pth", "ckpt_epoch_1.pth"):
        assert (run_dir / name).is_file(), sorted(os.listdir(run_dir))
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "train_loss", "train_loss_mask", "lr"} <= set(records[0])
    log = (run_dir / "log_rank0.txt").read_text()
    assert "Evaluate annotation type *segm*" in log and "Train: [1/2][3/4]" in log


def test_auto_resume_continues_exactly(detection_run, digits_root, tmp_path):
    """A run stopped after epoch 0 and restarted ends with the same weights as the straight run."""
    output = tmp_path / "out"
    shutil.copytree(detection_run, output)
    run_dir = output / RUN_SUBDIR
    os.remove(run_dir / "ckpt_epoch_1.pth")
    result = run_script("detection/train.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--output", output,
                        "--batch-size", 4, "--epochs", 2, "--opts", "SAVE_FREQ", 1, "DET.WARMUP_ITERS", 2, "PRINT_FREQ", 1)
    assert result.returncode == 0, explain(result)
    assert "resuming training at epoch 1" in result.stdout and "Train: [0/2]" not in result.stdout
    straight = torch.load(detection_run / RUN_SUBDIR / "ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    resumed = torch.load(run_dir / "ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert read_metrics(run_dir)[-1] == read_metrics(detection_run / RUN_SUBDIR)[-1]


def test_two_rank_gloo_evaluation_equals_one_rank(detection_run, digits_root, tmp_path):
    checkpoint = detection_run / RUN_SUBDIR / "ckpt_epoch_1.pth"
    common = ["--cfg", DEMO_CFG, "--data-path", digits_root, "--checkpoint", checkpoint, "--batch-size", 1,
              "--opts", "DET.SCORE_THRESH", 0.0]
    one = run_script("detection/test.py", *common, "--output", tmp_path / "one")
    assert one.returncode == 0, explain(one)
    two = run_script("detection/test.py", *common, "--output", tmp_path / "two",
                     launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert two.returncode == 0, explain(two)
    detected = DETECTED_LINE.findall(one.stdout)
    assert detected == DETECTED_LINE.findall(two.stdout) and int(detected[0][0]) > 0 and detected[0][1] == "8"
    first, second = read_metrics(tmp_path / "one" / EVAL_SUBDIR), read_metrics(tmp_path / "two" / EVAL_SUBDIR)
    assert len(first) == len(second) == 1 and first == second
    assert len([key for key in first[0] if key.startswith(("bbox_", "segm_"))]) == 24  # 12 COCOeval numbers each


def test_cascade_demo_trains_and_evaluates_from_its_checkpoint(digits_root, tmp_path):
    """One epoch of the cascade demo on the small set, then detection/test.py on its checkpoint:
    the same COCO numbers as the evaluation at the end of training."""
    train = run_script("detection/train.py", "--cfg", CASCADE_DEMO_CFG, "--data-path", digits_root, "--output",
                       tmp_path / "train", "--batch-size", 4, "--epochs", 1, "--opts", "DET.WARMUP_ITERS", 2)
    assert train.returncode == 0, explain(train)
    run_dir = tmp_path / "train" / "cascade_mask_rcnn_demo_digits" / "default"
    trained_record = read_metrics(run_dir)[-1]
    assert {"train_loss_box_reg_stage2", "train_loss_mask_stage0", "segm_AP"} <= set(trained_record)
    test = run_script("detection/test.py", "--cfg", CASCADE_DEMO_CFG, "--data-path", digits_root, "--output",
                      tmp_path / "eval", "--checkpoint", run_dir / "ckpt_epoch_0.pth")
    assert test.returncode == 0, explain(test)
    record = read_metrics(tmp_path / "eval" / "cascade_mask_rcnn_demo_digits" / "default-eval")[-1]
    assert record["eval"] is True
    for key in ("bbox_AP", "bbox_AP50", "segm_AP", "bbox_AR100"):
        assert record[key] == trained_record[key], key


def test_bad_inputs_give_one_line_and_exit_2(digits_root, tmp_path):
    missing = run_script("detection/train.py", "--cfg", "configs/detection/mask_rcnn_crossformer_s_fpn_1x_coco.yaml",
                         "--data-path", tmp_path / "nowhere", "--output", tmp_path)
    assert missing.returncode == 2, explain(missing)
    assert missing.stderr.strip().splitlines() == [
        f"error: annotation file not found: {tmp_path / 'nowhere' / 'annotations' / 'instances_val2017.json'}"]
    classes = run_script("detection/test.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--output", tmp_path,
                         "--checkpoint", tmp_path / "none.pth", "--opts", "MODEL.NUM_CLASSES", 5)
    assert classes.returncode == 2 and len(classes.stderr.strip().splitlines()) == 1, explain(classes)
    assert "has 10 categories, but MODEL.NUM_CLASSES is 5" in classes.stderr
    with pytest.raises(UserError, match="unknown DET.TYPE 'cascade_rcnn'"):
        build_detector(demo_config("DET.TYPE", "cascade_rcnn"))
    with pytest.raises(UserError, match="DET.ROI_IOU_THRESHOLDS has 1 R-CNN stages; cascade_mask_rcnn has two or more"):
        build_detector(demo_config("DET.TYPE", "cascade_mask_rcnn"))
    with pytest.raises(UserError, match="unknown DET.RPN_BOX_LOSS 'giou'; known losses: l1, smooth_l1"):
        build_detector(demo_config("DET.RPN_BOX_LOSS", "giou"))
    with pytest.raises(UserError, match="DET.ANCHOR_SIZES needs one size per pyramid level"):
        build_detector(demo_config("DET.ANCHOR_SIZES", "[16, 32]"))
    with pytest.raises(UserError, match="DATA.DATASET must be one of coco, digits"):
        engine.dataset_root(demo_config("DATA.DATASET", "imagenet"))


def test_predict_draws_detections_on_one_image(detection_run, digits_root, tmp_path):
    out = tmp_path / "drawn.png"
    image = os.path.join(digits_root, "val2017", "000001.png")
    result = run_script("detection/predict.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--checkpoint",
                        detection_run / RUN_SUBDIR / "ckpt_epoch_1.pth", "--image", image, "--out", out, "--score", 0.0)
    assert result.returncode == 0, explain(result)
    drawn_count = int(re.search(r"(\d+) detections drawn to ", result.stdout).group(1))
    from PIL import Image
    with Image.open(out) as drawn, Image.open(image) as original:  # 96x96: scaled up 6x, the legend beside it
        assert drawn.height == 6 * original.height and drawn.width > 6 * original.width
    legend = result.stdout.strip().split("): ", 1)[1].split(", ") if drawn_count else []
    assert len(legend) == drawn_count
    assert all(re.fullmatch(r"\d \d\.\d\d", entry) for entry in legend)  # the annotations' names, "0".."9"
