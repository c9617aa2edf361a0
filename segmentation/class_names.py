"""Class names for the pictures of segmentation/predict.py."""
from __future__ import annotations

from yacs.config import CfgNode

# ADE20K's 150 SceneParsing classes in label order, after reduce-zero-label (label 1, "wall", is 0)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
# the demo's digit scenes (segmentation/digit_scenes.py), after reduce-zero-label
DIGIT_SCENE_CLASSES = ("background", *(str(digit) for digit in range(10)))


def class_names(config: CfgNode) -> list[str]:
    """One name per class of the model: the demo's for its digit scenes, ADE20K's for 150 classes,
    else "class N"."""
    count = config.MODEL.NUM_CLASSES
    if config.DATA.DATASET == "digit_scenes" and count == len(DIGIT_SCENE_CLASSES):
        return list(DIGIT_SCENE_CLASSES)
    if count == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"class {index}" for index in range(count)]
