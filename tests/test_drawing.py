"""The pictures of detection/predict.py and segmentation/predict.py: scaled up when small, a colour
per detection or class, class names, and a legend beside the image that shows each colour."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from config import UserError, load_config
from detection.predict import category_names, draw_detections
from drawing import MIN_SIDE, distinct_colours, text_colour, upscale_factor
from segmentation.class_names import ADE20K_CLASSES, class_names
from segmentation.predict import BACKGROUND, draw_classes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECTION_CFG = os.path.join(REPO, "configs", "detection", "demo_digits.yaml")
SEGMENTATION_CFG = os.path.join(REPO, "configs", "segmentation", "demo_digits.yaml")
DIGITS = [str(d) for d in range(10)]


def legend_colours(picture: Image.Image, image_width: int) -> set:
    return {tuple(p) for p in np.asarray(picture)[:, image_width:].reshape(-1, 3).tolist()}


@pytest.mark.parametrize("size,factor", [((96, 96), 6), ((64, 48), 11), ((600, 480), 2), ((1333, 800), 1)])
def test_small_images_are_scaled_up_by_a_whole_factor(size, factor):
    assert upscale_factor(*size) == factor
    assert min(size) * factor >= MIN_SIDE


@pytest.mark.parametrize("count", [1, 3, 10, 11, 20, 21, 150])
def test_colours_are_distinct_and_text_on_them_contrasts(count):
    colours = distinct_colours(count)
    assert len(set(colours)) == count
    assert count > 20 or colours[:10] == distinct_colours(20)[:min(count, 10)]  # up to 20: tab10's first
    assert text_colour((31, 119, 180)) == (255, 255, 255) and text_colour((255, 127, 14)) == (0, 0, 0)


def test_detections_get_a_colour_each_names_scores_and_a_legend():
    image = torch.full((3, 96, 96), 200, dtype=torch.uint8)
    boxes = torch.tensor([[10., 10, 40, 40], [50, 20, 90, 70], [5, 60, 45, 92], [60, 75, 80, 90]])
    masks = torch.zeros(4, 1, 96, 96)
    for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
        mask[0, y1 + 3:y2 - 3, x1 + 3:x2 - 3] = 0.9
    # two instances of class 3 (label 4), one of class 7, one under the score threshold
    output = {"boxes": boxes, "scores": torch.tensor([0.97, 0.60, 0.80, 0.30]), "labels": torch.tensor([4, 8, 4, 2]),
              "masks": masks}
    picture, legend = draw_detections(image, output, DIGITS, score=0.5)
    assert [text for text, _ in legend] == ["3 0.97", "3 0.80", "7 0.60"]  # best first
    colours = [colour for _, colour in legend]
    assert len(set(colours)) == 3  # the two 3s apart too
    factor = 6
    assert picture.height == 96 * factor and picture.width > 96 * factor
    pixels = np.asarray(picture)
    for index, colour in zip((0, 2, 1), colours):
        x2, y2 = (boxes[index, 2:] * factor).int().tolist()
        assert tuple(pixels[y2, x2]) == colour  # the box outline
        centre_y, centre_x = (int(boxes[index, 1::2].mean() * factor), int(boxes[index, 0::2].mean() * factor))
        assert tuple(pixels[centre_y, centre_x]) != (200, 200, 200)  # the mask, tinted
    x2, y2 = (boxes[3, 2:] * factor).int().tolist()
    assert tuple(pixels[y2, x2]) == (200, 200, 200)  # the detection under the threshold is not drawn
    assert set(colours) <= legend_colours(picture, 96 * factor)

    picture, legend = draw_detections(image, output, DIGITS, score=0.99)
    assert legend == [] and picture.height == 96 * factor
    assert np.all(np.asarray(picture)[:, :96 * factor] == 200)


def test_segmentation_classes_get_names_colours_and_a_legend():
    image = np.full((64, 64, 3), 180, dtype=np.uint8)
    classes = np.zeros((64, 64), dtype=np.int64)
    classes[8:24, 8:40] = 4  # digit 3: 512 pixels
    classes[40:56, 30:46] = 8  # digit 7: 256 pixels
    classes[60, 60] = 2  # digit 1: one pixel
    names = class_names(load_config(SEGMENTATION_CFG))
    picture, legend = draw_classes(image, classes, names, alpha=0.5)
    assert legend == [("background 81%", BACKGROUND), ("3 12%", distinct_colours(11)[4]),
                      ("7 6%", distinct_colours(11)[8]), ("1 <1%", distinct_colours(11)[2])]
    factor = 8
    assert picture.height == 64 * factor and picture.width > 64 * factor
    pixels = np.asarray(picture).astype(int)
    assert tuple(pixels[0, 0]) == (180, 180, 180)  # background: left as it is
    for (y, x), (_, colour) in zip([(10, 10), (45, 35), (60, 60)], legend[1:]):
        expected = tuple(round(180 * 0.5 + c * 0.5) for c in colour)
        block = pixels[y * factor:(y + 1) * factor, x * factor:(x + 1) * factor].reshape(-1, 3)
        assert {tuple(p) for p in block.tolist()} == {expected}  # the whole upscaled pixel, one colour
    assert {colour for _, colour in legend} <= legend_colours(picture, 64 * factor)


def test_class_names_for_ade20k_the_demo_and_other_models():
    assert class_names(load_config(SEGMENTATION_CFG)) == ["background", *DIGITS]
    ade = class_names(load_config(SEGMENTATION_CFG, ["DATA.DATASET", "ade20k", "MODEL.NUM_CLASSES", "150"]))
    assert len(set(ade)) == 150 and ade == list(ADE20K_CLASSES)
    assert (ade[0], ade[12], ade[44], ade[149]) == ("wall", "person", "chest of drawers", "flag")
    assert class_names(load_config(SEGMENTATION_CFG, ["MODEL.NUM_CLASSES", "4"])) == [f"class {i}" for i in range(4)]

    coco = category_names(load_config(DETECTION_CFG, ["DATA.DATASET", "coco", "MODEL.NUM_CLASSES", "80"]))
    assert len(coco) == 80 and (coco[0], coco[11], coco[79]) == ("person", "stop sign", "toothbrush")
    other = category_names(load_config(DETECTION_CFG, ["DATA.DATASET", "coco", "MODEL.NUM_CLASSES", "3"]))
    assert other == ["class 1", "class 2", "class 3"]


def test_detection_names_come_from_the_annotation_file_in_label_order(tmp_path):
    (tmp_path / "annotations").mkdir()
    categories = [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]  # labels follow the ids: cat 1, dog 2
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": categories}))
    coco = ["DATA.DATASET", "coco", "DATA.DATA_PATH", str(tmp_path)]
    assert category_names(load_config(DETECTION_CFG, coco + ["MODEL.NUM_CLASSES", "2"])) == ["cat", "dog"]
    with pytest.raises(UserError, match="instances_val2017.json has 2 categories, the model 3"):
        category_names(load_config(DETECTION_CFG, coco + ["MODEL.NUM_CLASSES", "3"]))
