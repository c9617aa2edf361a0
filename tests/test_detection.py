"""detection/: the CrossFormer FPN backbone at odd sizes, a training step of each detector type,
COCOeval of perfect and shuffled predictions, category ids <-> labels, parameter counts of the
paper configs, bad inputs, and end to end (subprocesses): auto-resume continues exactly, and
2-rank gloo evaluation equals 1-rank.

The data is a small copy of the bundled digits detection set (16 train, 8 val images).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from config import UserError, load_config
from detection import engine
from detection.backbone import build_backbone
from detection.coco import CategoryMap, CocoDetection, load_coco
from detection.coco_eval import coco_evaluate, to_coco_results
from detection.model import build_detector
from detection.transforms import RandomHorizontalFlip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = "configs/detection/demo_digits.yaml"
RUN_SUBDIR = os.path.join("mask_rcnn_demo_digits", "default")
EVAL_SUBDIR = RUN_SUBDIR + "-eval"  # evaluation runs write beside the training run, never into it
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DETECTED_LINE = re.compile(r"detected (\d+) objects in (\d+) images")
# paper parameter counts (80 classes)
# pycocotools' mask decoding trips a NumPy 2 deprecation warning (not ours)
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]
PAPER_PARAMS = {"retinanet_crossformer_s_fpn_1x_coco": 40.8e6, "retinanet_crossformer_b_fpn_1x_coco": 62.1e6,
                "mask_rcnn_crossformer_s_fpn_1x_coco": 50.2e6, "mask_rcnn_crossformer_b_fpn_1x_coco": 71.5e6}


def demo_config(*opts):
    return load_config(os.path.join(REPO, DEMO_CFG), [str(o) for o in opts])


def run_script(script: str, *args, launcher: tuple = (), timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    command = [sys.executable, *launcher, script, *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"


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


# ----------------------------------------------------------------------------- training step
@pytest.mark.parametrize("det_type", ["mask_rcnn", "faster_rcnn", "retinanet"])
def test_training_loss_falls_on_repeated_images(det_type, digits_root):
    torch.manual_seed(0)
    config = demo_config("DET.TYPE", det_type, "DATA.DATA_PATH", digits_root)
    dataset = CocoDetection(digits_root, "train", 10, det_type == "mask_rcnn")
    images, targets = zip(*[dataset[i] for i in range(2)])
    model = build_detector(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # RetinaNet spikes at 1e-3
    losses = []
    for _ in range(20):
        loss_terms = model(list(images), list(targets))
        assert {"loss_box_reg" if det_type != "retinanet" else "bbox_regression"} <= set(loss_terms)
        loss = sum(loss_terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


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
    config = load_config(os.path.join(REPO, "configs", "detection", f"{name}.yaml"))
    assert config.MODEL.NUM_CLASSES == 80 and config.TRAIN.EPOCHS == 12 and list(config.DET.LR_STEPS) == [8, 11]
    params = sum(p.numel() for p in build_detector(config).parameters())
    assert abs(params / PAPER_PARAMS[name] - 1) < 0.01, params


def test_3x_configs_train_multi_scale_for_36_epochs():
    for size in ("s", "b"):
        config = load_config(os.path.join(REPO, "configs", "detection", f"mask_rcnn_crossformer_{size}_fpn_3x_coco.yaml"))
        assert config.TRAIN.EPOCHS == 36 and min(config.DET.MIN_SIZE) == 480 and config.DET.MIN_SIZE[-1] == 800
        assert config.DET.MAX_SIZE == 1333 and config.MODEL.DROP_PATH_RATE == 0.2


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory):
    """Two demo epochs on the small set (4 steps each), a checkpoint per epoch."""
    output = tmp_path_factory.mktemp("train")
    result = run_script("detection/train.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--output", output,
                        "--batch-size", 4, "--epochs", 2, "--opts", "SAVE_FREQ", 1, "DET.WARMUP_ITERS", 2, "PRINT_FREQ", 1)
    assert result.returncode == 0, explain(result)
    return output


def test_training_writes_checkpoints_and_coco_metrics(trained):
    run_dir = trained / RUN_SUBDIR
    for name in ("config.yaml", "log_rank0.txt", "ckpt_epoch_0.pth", "ckpt_epoch_1.pth"):
        assert (run_dir / name).is_file(), sorted(os.listdir(run_dir))
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert {"bbox_AP", "bbox_AP50", "segm_AP", "train_loss", "train_loss_mask", "lr"} <= set(records[0])
    log = (run_dir / "log_rank0.txt").read_text()
    assert "Evaluate annotation type *segm*" in log and "Train: [1/2][3/4]" in log


def test_auto_resume_continues_exactly(trained, digits_root, tmp_path):
    """A run stopped after epoch 0 and restarted ends with the same weights as the straight run."""
    output = tmp_path / "out"
    shutil.copytree(trained, output)
    run_dir = output / RUN_SUBDIR
    os.remove(run_dir / "ckpt_epoch_1.pth")
    result = run_script("detection/train.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--output", output,
                        "--batch-size", 4, "--epochs", 2, "--opts", "SAVE_FREQ", 1, "DET.WARMUP_ITERS", 2, "PRINT_FREQ", 1)
    assert result.returncode == 0, explain(result)
    assert "resuming training at epoch 1" in result.stdout and "Train: [0/2]" not in result.stdout
    straight = torch.load(trained / RUN_SUBDIR / "ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    resumed = torch.load(run_dir / "ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert read_metrics(run_dir)[-1] == read_metrics(trained / RUN_SUBDIR)[-1]


def test_two_rank_gloo_evaluation_equals_one_rank(trained, digits_root, tmp_path):
    checkpoint = trained / RUN_SUBDIR / "ckpt_epoch_1.pth"
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
    assert first[0]["bbox_AR100"] > 0


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
    with pytest.raises(UserError, match="unknown DET.TYPE 'cascade_mask_rcnn'"):
        build_detector(demo_config("DET.TYPE", "cascade_mask_rcnn"))
    with pytest.raises(UserError, match="DET.ANCHOR_SIZES needs one size per pyramid level"):
        build_detector(demo_config("DET.ANCHOR_SIZES", "[16, 32]"))
    with pytest.raises(UserError, match="DATA.DATASET must be one of coco, digits"):
        engine.dataset_root(demo_config("DATA.DATASET", "imagenet"))


def test_predict_draws_detections_on_one_image(trained, digits_root, tmp_path):
    out = tmp_path / "drawn.png"
    image = os.path.join(digits_root, "val2017", "000001.png")
    result = run_script("detection/predict.py", "--cfg", DEMO_CFG, "--data-path", digits_root, "--checkpoint",
                        trained / RUN_SUBDIR / "ckpt_epoch_1.pth", "--image", image, "--out", out, "--score", 0.0)
    assert result.returncode == 0, explain(result)
    drawn_count = int(re.search(r"(\d+) detections drawn to ", result.stdout).group(1))
    from PIL import Image
    with Image.open(out) as drawn, Image.open(image) as original:  # 96x96: scaled up 6x, the legend beside it
        assert drawn.height == 6 * original.height and drawn.width > 6 * original.width
    legend = result.stdout.strip().split("): ", 1)[1].split(", ") if drawn_count else []
    assert len(legend) == drawn_count
    assert all(re.fullmatch(r"\d \d\.\d\d", entry) for entry in legend)  # the annotations' names, "0".."9"
