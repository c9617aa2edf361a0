"""The R-CNN parts that compute what mmdet 2 computed, built from torchvision's pieces.

torchvision's detectors differ from mmdet 2 (the authors' detection code) in a few places, each
made a choice here (the DET keys in config.py; their defaults are mmdet's):

- box regression losses: torchvision's RPN and RoI heads use smooth L1 with beta 1/9, mmdet's Mask
  R-CNN an L1 loss (``RPN``, ``RCNNRoIHeads``: ``l1``, ``smooth_l1``, or ``giou`` on decoded boxes
  for Swin's Cascade recipe);
- RoIAlign: torchvision's ``MultiScaleRoIAlign`` samples 2 points per bin side and has no
  ``aligned`` option; mmcv's RoIAlign samples adaptively (``sampling_ratio=0``) with the half-pixel
  offset (``aligned=True``) (``MultiLevelRoIAlign``);
- cascades: torchvision has none. ``RCNNRoIHeads`` runs one stage (mmdet's StandardRoIHead) or
  several (mmdet's CascadeRoIHead: each stage re-samples the refined boxes of the previous one at
  its own IoU threshold, with its own box-delta scaling and loss weight; inference averages the
  stages' class logits and mask probabilities).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops
from torchvision.ops import generalized_box_iou_loss, roi_align

BOX_LOSSES = ("l1", "smooth_l1", "giou")
SMOOTH_L1_BETA = 1 / 9  # torchvision's (and mmdet's RPN of Cascade R-CNN)
FINEST_SCALE = 56  # mmdet's SingleRoIExtractor: boxes below 2 * 56 pixels pool from the finest level


def delta_loss(kind: str, predicted: Tensor, target: Tensor) -> Tensor:
    """Summed L1 or smooth L1 (beta 1/9) loss between box deltas."""
    if kind == "l1":
        return F.l1_loss(predicted, target, reduction="sum")
    return F.smooth_l1_loss(predicted, target, beta=SMOOTH_L1_BETA, reduction="sum")


class RPN(RegionProposalNetwork):
    """torchvision's region proposal network with the box loss ``box_loss`` (``l1`` or ``smooth_l1``),
    summed over the positive anchors and divided by the number of sampled anchors, as both libraries
    normalise it."""

    def __init__(self, *args, box_loss: str = "l1", **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss = box_loss

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        positive, negative = (torch.cat(masks) for masks in self.fg_bg_sampler(labels))
        sampled = torch.where(positive | negative)[0]
        positive = torch.where(positive)[0]
        box_loss = delta_loss(self.box_loss, pred_bbox_deltas[positive], torch.cat(regression_targets)[positive])
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], torch.cat(labels)[sampled])
        return objectness_loss, box_loss / sampled.numel()


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign from FPN levels, as mmdet's SingleRoIExtractor: a box of scale ``s = sqrt(w * h)``
    pools from level ``floor(log2(s / 56))`` (clamped to the levels; torchvision's MultiScaleRoIAlign
    picks the same level), with mmcv's ``aligned`` and ``sampling_ratio`` options, which torchvision's
    pooler does not pass on to ``roi_align``."""

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int, aligned: bool):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.strides = list(strides)
        self.output_size = (output_size, output_size)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """``(sum of boxes, channels, size, size)`` features of every image's boxes (x1y1x2y2 pixels)."""
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
        levels = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, len(self.strides) - 1)
        maps = [features[name] for name in self.featmap_names]
        pooled = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == level)[0]
            pooled[index] = roi_align(feature, rois[index], self.output_size, 1 / stride, self.sampling_ratio,
                                      self.aligned).to(pooled.dtype)
        return pooled


class RCNNStage(nn.Module):
    """One R-CNN stage: box head and predictor (class-specific deltas, scaled by ``1 / target_stds``),
    the IoU at which its sampled RoIs count as positive, its loss weight, and an optional mask head
    and predictor."""

    def __init__(self, box_head: nn.Module, box_predictor: nn.Module, target_stds: Sequence[float],
                 iou_threshold: float, loss_weight: float, mask_head: nn.Module | None = None,
                 mask_predictor: nn.Module | None = None):
        super().__init__()
        self.box_head, self.box_predictor = box_head, box_predictor
        self.mask_head, self.mask_predictor = mask_head, mask_predictor
        self.box_coder = det_utils.BoxCoder(tuple(1 / s for s in target_stds))
        self.matcher = det_utils.Matcher(iou_threshold, iou_threshold, allow_low_quality_matches=False)
        self.loss_weight = loss_weight

    def boxes(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Class logits and class-specific box deltas of pooled RoI features."""
        return self.box_predictor(self.box_head(features))

    def masks(self, features: Tensor) -> Tensor:
        """Per-class mask logits of pooled RoI features."""
        return self.mask_predictor(self.mask_head(features))

    def refine(self, proposals: list[Tensor], deltas: Tensor, labels: Tensor,
               image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """The proposals moved by the deltas of ``labels`` (one class per box), clipped to each
        image; gradients do not flow into the next stage's boxes, as in mmdet."""
        chosen = deltas.detach().reshape(len(labels), -1, 4)[torch.arange(len(labels), device=labels.device), labels]
        boxes = self.box_coder.decode_single(chosen, torch.cat(proposals))
        return [box_ops.clip_boxes_to_image(b, shape)
                for b, shape in zip(boxes.split([len(p) for p in proposals]), image_shapes)]


class RCNNRoIHeads(RoIHeads):
    """mmdet 2's RoI heads on torchvision's parts: ``stages`` is one RCNNStage (Faster / Mask
    R-CNN) or several (Cascade R-CNN). Training samples ``batch_size_per_image`` RoIs per image
    and stage (ground-truth boxes added), with ``box_loss`` x ``box_loss_weight`` on the positives
    divided by all sampled RoIs; inference refines the proposals stage by stage by the predicted
    class, scores the last stage's boxes by the softmax of the stages' mean class logits (torchvision's
    post-processing: score threshold, per-class NMS, top detections) and averages the stages' mask
    probabilities. The loss names are torchvision's, with ``_stage{i}`` appended in a cascade."""

    def __init__(self, box_roi_pool: nn.Module, stages: Sequence[RCNNStage], batch_size_per_image: int,
                 positive_fraction: float, box_loss: str, box_loss_weight: float, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, mask_roi_pool: nn.Module | None = None):
        first = stages[0].matcher
        super().__init__(box_roi_pool, None, None, first.high_threshold, first.low_threshold, batch_size_per_image,
                         positive_fraction, None, score_thresh, nms_thresh, detections_per_img,
                         mask_roi_pool=mask_roi_pool)
        self.stages = nn.ModuleList(stages)
        self.box_coder = stages[-1].box_coder  # the one postprocess_detections decodes with
        self.box_loss, self.box_loss_weight = box_loss, box_loss_weight

    def has_mask(self) -> bool:
        return self.mask_roi_pool is not None

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            self.check_targets(targets)
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    # ------------------------------------------------------------------ training
    def sample(self, stage: RCNNStage, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[dict]:
        """Per image, the sampled RoIs of a stage (the image's ground-truth boxes added to its
        proposals): ``boxes``, ``labels`` (0: background), ``matched`` (ground-truth index) and
        ``is_gt`` (an added ground-truth box, which mmdet leaves out of the refined proposals)."""
        samples = []
        for boxes, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            boxes = torch.cat([boxes, gt_boxes])
            is_gt = torch.arange(len(boxes), device=boxes.device) >= len(boxes) - len(gt_boxes)
            if len(gt_boxes):
                matched = stage.matcher(box_ops.box_iou(gt_boxes, boxes))
                labels = gt_labels[matched.clamp(min=0)]
                labels[matched == det_utils.Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matched == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
            else:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            samples.append(dict(boxes=boxes, labels=labels, matched=matched.clamp(min=0), is_gt=is_gt))
        positives, negatives = self.fg_bg_sampler([s["labels"] for s in samples])
        return [{key: value[(pos | neg).bool()] for key, value in sample.items()}
                for sample, pos, neg in zip(samples, positives, negatives)]

    def box_regression_loss(self, stage: RCNNStage, deltas: Tensor, samples: list[dict],
                            targets: list[dict[str, Tensor]]) -> Tensor:
        """The box loss of the positive RoIs (their class's deltas) over all sampled RoIs."""
        labels = torch.cat([s["labels"] for s in samples])
        positive = torch.where(labels > 0)[0]
        predicted = deltas.reshape(len(labels), -1, 4)[positive, labels[positive]]
        proposals = torch.cat([s["boxes"] for s in samples])[positive]
        gt_boxes = torch.cat([t["boxes"][s["matched"]] if len(t["boxes"]) else torch.zeros_like(s["boxes"])
                              for s, t in zip(samples, targets)])[positive]
        if self.box_loss == "giou":
            loss = generalized_box_iou_loss(stage.box_coder.decode_single(predicted, proposals), gt_boxes,
                                            reduction="sum")
        else:
            loss = delta_loss(self.box_loss, predicted, stage.box_coder.encode_single(gt_boxes, proposals))
        return self.box_loss_weight * loss / max(len(labels), 1)

    def losses(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses = {}
        for index, stage in enumerate(self.stages):
            samples = self.sample(stage, proposals, targets)
            boxes = [s["boxes"] for s in samples]
            logits, deltas = stage.boxes(self.box_roi_pool(features, boxes, image_shapes))
            labels = torch.cat([s["labels"] for s in samples])
            stage_losses = {"loss_classifier": F.cross_entropy(logits, labels),
                            "loss_box_reg": self.box_regression_loss(stage, deltas, samples, targets)}
            if self.has_mask():
                positive = [s["labels"] > 0 for s in samples]
                mask_boxes = [b[p] for b, p in zip(boxes, positive)]
                mask_logits = stage.masks(self.mask_roi_pool(features, mask_boxes, image_shapes))
                stage_losses["loss_mask"] = maskrcnn_loss(
                    mask_logits, mask_boxes, [t["masks"] for t in targets], [t["labels"] for t in targets],
                    [s["matched"][p] for s, p in zip(samples, positive)])
            suffix = f"_stage{index}" if len(self.stages) > 1 else ""
            losses.update({name + suffix: stage.loss_weight * value for name, value in stage_losses.items()})
            if index < len(self.stages) - 1:
                # background RoIs move by the deltas of their best foreground class
                labels = torch.where(labels > 0, labels, logits[:, 1:].argmax(dim=1) + 1)
                refined = stage.refine(boxes, deltas, labels, image_shapes)
                proposals = [b[~s["is_gt"]] for b, s in zip(refined, samples)]
        return losses

    # ------------------------------------------------------------------ inference
    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        logits_sum = None
        for index, stage in enumerate(self.stages):
            logits, deltas = stage.boxes(self.box_roi_pool(features, proposals, image_shapes))
            logits_sum = logits if logits_sum is None else logits_sum + logits
            if index < len(self.stages) - 1:
                proposals = stage.refine(proposals, deltas, logits[:, 1:].argmax(dim=1) + 1, image_shapes)
        boxes, scores, labels = self.postprocess_detections(logits_sum / len(self.stages), deltas, proposals,
                                                            image_shapes)
        results = [dict(boxes=b, scores=s, labels=lab) for b, s, lab in zip(boxes, scores, labels)]
        if self.has_mask():
            pooled = self.mask_roi_pool(features, boxes, image_shapes)
            per_stage = [maskrcnn_inference(stage.masks(pooled), labels) for stage in self.stages]
            for i, result in enumerate(results):
                result["masks"] = sum(probabilities[i] for probabilities in per_stage) / len(self.stages)
        return results

