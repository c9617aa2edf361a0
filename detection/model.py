"""``build_detector(config)``: a detector of DET.TYPE on the CrossFormer FPN backbone, from
torchvision's parts, computing what the authors' mmdet 2 detectors computed (detection/rcnn.py
lists where torchvision differs and which DET keys choose).

Labels follow torchvision: 0 is background, object categories are 1..MODEL.NUM_CLASSES, so the
R-CNN classifiers have NUM_CLASSES + 1 outputs. RetinaNet (sigmoid classifier) gets the same label
range: one always-negative output more per anchor than mmdet's (0.05% of RetinaNet-S).
Heads match mmdet's: RetinaNet 4+4 convs without GroupNorm (torchvision's, L1 box loss, focal
loss); RPN one conv; box head DET.BOX_HEAD_CONVS convs and DET.BOX_HEAD_FCS FC layers with
class-specific regression; mask head DET.MASK_HEAD_CONVS convs, a deconvolution and the classifier.
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from yacs.config import CfgNode

from config import UserError
from detection.backbone import CrossFormerFPN, build_backbone
from detection.rcnn import BOX_LOSSES, RPN, MultiLevelRoIAlign, RCNNRoIHeads, RCNNStage

DETECTOR_TYPES = ("mask_rcnn", "faster_rcnn", "retinanet", "cascade_mask_rcnn")
MASK_TYPES = ("mask_rcnn", "cascade_mask_rcnn")
# torchvision's detectors normalise images themselves: ImageNet statistics on 0-1 inputs
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# mmdet's RPN and R-CNN settings that no config changes
RPN_IOU_THRESHOLDS = (0.7, 0.3)  # positive at or above, negative below
RPN_BATCH_SIZE_PER_IMAGE, RPN_POSITIVE_FRACTION, RPN_NMS_THRESH = 256, 0.5, 0.7
BOX_POSITIVE_FRACTION, BOX_NMS_THRESH = 0.25, 0.5
BOX_POOL_SIZE, MASK_POOL_SIZE = 7, 14


def has_masks(config: CfgNode) -> bool:
    """Whether DET.TYPE predicts instance masks."""
    return config.DET.TYPE in MASK_TYPES


def _anchors(config: CfgNode, octaves: bool, levels: int) -> AnchorGenerator:
    sizes = list(config.DET.ANCHOR_SIZES)
    if len(sizes) != levels:
        raise UserError(f"DET.ANCHOR_SIZES needs one size per pyramid level ({levels}), got {sizes}")
    scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)) if octaves else (1.0,)
    per_level = tuple(tuple(size * s for s in scales) for size in sizes)
    return AnchorGenerator(per_level, (tuple(config.DET.ASPECT_RATIOS),) * levels)


def _check_settings(config: CfgNode) -> int:
    """UserError for a DET value no detector can use; returns the number of R-CNN stages."""
    det = config.DET
    if det.TYPE not in DETECTOR_TYPES:
        raise UserError(f"unknown DET.TYPE {det.TYPE!r}; known types: {', '.join(DETECTOR_TYPES)}")
    if config.MODEL.NUM_CLASSES < 1:
        raise UserError(f"MODEL.NUM_CLASSES must count the object categories, got {config.MODEL.NUM_CLASSES}")
    for key in ("RPN_BOX_LOSS", "ROI_BOX_LOSS"):
        allowed = BOX_LOSSES if key == "ROI_BOX_LOSS" else BOX_LOSSES[:2]
        if det[key] not in allowed:
            raise UserError(f"unknown DET.{key} {det[key]!r}; known losses: {', '.join(allowed)}")
    stages = len(det.ROI_IOU_THRESHOLDS)
    if len(det.ROI_STAGE_WEIGHTS) != stages or len(det.ROI_TARGET_STDS) != stages:
        raise UserError(f"DET.ROI_IOU_THRESHOLDS, DET.ROI_STAGE_WEIGHTS and DET.ROI_TARGET_STDS need one entry per "
                        f"R-CNN stage each, got {stages}, {len(det.ROI_STAGE_WEIGHTS)} and {len(det.ROI_TARGET_STDS)}")
    if any(len(stds) != 4 for stds in det.ROI_TARGET_STDS):
        raise UserError(f"DET.ROI_TARGET_STDS: each stage needs 4 values (x, y, w, h), got {list(det.ROI_TARGET_STDS)}")
    cascade = det.TYPE == "cascade_mask_rcnn"
    if det.TYPE != "retinanet" and (stages < 2 if cascade else stages != 1):
        raise UserError(f"DET.ROI_IOU_THRESHOLDS has {stages} R-CNN stages; {det.TYPE} has "
                        + ("two or more" if cascade else "one (cascade_mask_rcnn has several)"))
    return stages


def _rcnn_stage(config: CfgNode, index: int, channels: int) -> RCNNStage:
    det, classes = config.DET, config.MODEL.NUM_CLASSES + 1
    norm = nn.BatchNorm2d if det.BOX_HEAD_CONVS else None
    box_head = FastRCNNConvFCHead((channels, BOX_POOL_SIZE, BOX_POOL_SIZE), [channels] * det.BOX_HEAD_CONVS,
                                  [det.BOX_HEAD_DIM] * det.BOX_HEAD_FCS, norm_layer=norm)
    box_input = det.BOX_HEAD_DIM if det.BOX_HEAD_FCS else channels * BOX_POOL_SIZE ** 2
    masks = {}
    if has_masks(config):
        masks = dict(mask_head=MaskRCNNHeads(channels, [channels] * det.MASK_HEAD_CONVS, 1),
                     mask_predictor=MaskRCNNPredictor(channels, channels, classes))
    return RCNNStage(box_head, FastRCNNPredictor(box_input, classes), det.ROI_TARGET_STDS[index],
                     det.ROI_IOU_THRESHOLDS[index], det.ROI_STAGE_WEIGHTS[index], **masks)


def _rcnn(config: CfgNode, backbone: CrossFormerFPN, transform: GeneralizedRCNNTransform,
          stages: int) -> GeneralizedRCNN:
    det, channels = config.DET, backbone.out_channels
    anchors = _anchors(config, False, 5)
    rpn = RPN(anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]), *RPN_IOU_THRESHOLDS,
              RPN_BATCH_SIZE_PER_IMAGE, RPN_POSITIVE_FRACTION,
              dict(training=det.RPN_PRE_NMS_TOP_N_TRAIN, testing=det.RPN_PRE_NMS_TOP_N_TEST),
              dict(training=det.RPN_POST_NMS_TOP_N_TRAIN, testing=det.RPN_POST_NMS_TOP_N_TEST),
              RPN_NMS_THRESH, box_loss=det.RPN_BOX_LOSS)
    names = [str(i) for i in range(len(backbone.stages))]
    strides = [backbone.body.feature_info[i]["reduction"] for i in backbone.stages]

    def pool(size: int) -> MultiLevelRoIAlign:
        return MultiLevelRoIAlign(names, strides, size, det.ROI_ALIGN_SAMPLING_RATIO, det.ROI_ALIGN_ALIGNED)

    roi_heads = RCNNRoIHeads(pool(BOX_POOL_SIZE), [_rcnn_stage(config, i, channels) for i in range(stages)],
                             det.BOX_BATCH_SIZE_PER_IMAGE, BOX_POSITIVE_FRACTION, det.ROI_BOX_LOSS,
                             det.ROI_BOX_LOSS_WEIGHT, det.SCORE_THRESH, BOX_NMS_THRESH, det.DETECTIONS_PER_IMG,
                             mask_roi_pool=pool(MASK_POOL_SIZE) if has_masks(config) else None)
    return GeneralizedRCNN(backbone, rpn, roi_heads, transform)


def build_detector(config: CfgNode) -> nn.Module:
    """The detector of DET.TYPE for MODEL.NUM_CLASSES categories; bad settings are a UserError."""
    stages = _check_settings(config)
    det = config.DET
    backbone = build_backbone(config)
    sizes = dict(min_size=tuple(det.MIN_SIZE), max_size=det.MAX_SIZE, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    if det.TYPE == "retinanet":
        return RetinaNet(backbone, config.MODEL.NUM_CLASSES + 1, anchor_generator=_anchors(config, True, 5),
                         score_thresh=det.SCORE_THRESH, detections_per_img=det.DETECTIONS_PER_IMG, **sizes)
    return _rcnn(config, backbone, GeneralizedRCNNTransform(**sizes), stages)
