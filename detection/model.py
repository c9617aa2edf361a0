"""``build_detector(config)``: a torchvision detector (DET.TYPE) on the CrossFormer FPN backbone.

Labels follow torchvision: 0 is background, object categories are 1..MODEL.NUM_CLASSES, so the
R-CNN classifiers have NUM_CLASSES + 1 outputs. RetinaNet (sigmoid classifier) gets the same label
range: one always-negative output more per anchor than mmdet's (0.05% of RetinaNet-S).
Heads are torchvision's defaults, which match mmdet's: RetinaNet 4+4 convs without GroupNorm;
RPN one conv; box head two 1024-wide FC layers with class-specific regression; mask head 4 convs.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from yacs.config import CfgNode

from config import UserError
from detection.backbone import build_backbone

DETECTOR_TYPES = ("mask_rcnn", "faster_rcnn", "retinanet")
# torchvision's detectors normalise images themselves: ImageNet statistics on 0-1 inputs
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def _anchors(config: CfgNode, octaves: bool, levels: int) -> AnchorGenerator:
    sizes = list(config.DET.ANCHOR_SIZES)
    if len(sizes) != levels:
        raise UserError(f"DET.ANCHOR_SIZES needs one size per pyramid level ({levels}), got {sizes}")
    scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if octaves else (1.0,)
    per_level = tuple(tuple(size * s for s in scales) for size in sizes)
    return AnchorGenerator(per_level, (tuple(config.DET.ASPECT_RATIOS),) * levels)


def build_detector(config: CfgNode) -> nn.Module:
    """The detector of DET.TYPE for MODEL.NUM_CLASSES categories; bad settings are a UserError."""
    det = config.DET
    if det.TYPE not in DETECTOR_TYPES:
        raise UserError(f"unknown DET.TYPE {det.TYPE!r}; known types: {', '.join(DETECTOR_TYPES)}")
    if config.MODEL.NUM_CLASSES < 1:
        raise UserError(f"MODEL.NUM_CLASSES must count the object categories, got {config.MODEL.NUM_CLASSES}")
    backbone = build_backbone(config)
    sizes = dict(min_size=tuple(det.MIN_SIZE), max_size=det.MAX_SIZE, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    classes = config.MODEL.NUM_CLASSES + 1
    if det.TYPE == "retinanet":
        return RetinaNet(backbone, classes, anchor_generator=_anchors(config, True, 5),
                         score_thresh=det.SCORE_THRESH, detections_per_img=det.DETECTIONS_PER_IMG, **sizes)
    channels = backbone.out_channels
    rcnn = dict(rpn_anchor_generator=_anchors(config, False, 5),
                rpn_pre_nms_top_n_train=det.RPN_PRE_NMS_TOP_N_TRAIN,
                rpn_pre_nms_top_n_test=det.RPN_PRE_NMS_TOP_N_TEST,
                rpn_post_nms_top_n_train=det.RPN_POST_NMS_TOP_N_TRAIN,
                rpn_post_nms_top_n_test=det.RPN_POST_NMS_TOP_N_TEST,
                box_head=TwoMLPHead(channels * 7 * 7, det.BOX_HEAD_DIM),
                box_predictor=FastRCNNPredictor(det.BOX_HEAD_DIM, classes),
                box_batch_size_per_image=det.BOX_BATCH_SIZE_PER_IMAGE,
                box_score_thresh=det.SCORE_THRESH, box_detections_per_img=det.DETECTIONS_PER_IMG, **sizes)
    if det.TYPE == "faster_rcnn":
        return FasterRCNN(backbone, None, **rcnn)
    mask_head = MaskRCNNHeads(channels, [channels] * det.MASK_HEAD_CONVS, 1)
    return MaskRCNN(backbone, None, mask_head=mask_head, mask_predictor=MaskRCNNPredictor(channels, channels, classes),
                    **rcnn)

