"""COCO evaluation with pycocotools: detector outputs -> COCO results (category ids, xywh boxes,
RLE masks), gathered from every rank, scored by ``COCOeval`` on rank 0 (bbox and segm)."""
from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from detection.coco import CategoryMap

# the 12 numbers of COCOeval.summarize(), in order
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_THRESHOLD = 0.5


def to_coco_results(image_id: int, output: dict[str, Tensor], categories: CategoryMap) -> list[dict]:
    """One image's detections (torchvision format, boxes x1y1x2y2 in original pixels, masks as
    (N, 1, H, W) probabilities) as COCO result records."""
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    records = [{"image_id": image_id, "category_id": categories.category_id(int(label)),
                "bbox": [round(float(v), 3) for v in box], "score": float(score)}
               for box, label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist())]
    if "masks" in output:
        binary = (output["masks"][:, 0] > MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        for record, mask in zip(records, binary):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            record["segmentation"] = rle
    return records


def gather_results(results: list[dict]) -> list[dict]:
    """Every rank's records, concatenated on rank 0 (other ranks get an empty list)."""
    if not (dist.is_available() and dist.is_initialized()):
        return results
    parts: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(results, parts, dst=0)
    return [record for part in parts for record in part] if parts else []


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_types: tuple[str, ...],
                  logger: logging.Logger) -> dict[str, float]:
    """COCOeval of ``results`` for each IoU type (``bbox``, ``segm``) over every image of
    ``coco_gt``; the standard summary lines are logged; returns ``{'bbox_AP': ..., ...}``."""
    metrics = {}
    for iou_type in iou_types:
        if results:
            # one field per type, as loadRes takes the object areas (small/medium/large) from the box
            # when a record has one; copies, as loadRes adds fields to them
            other = "segmentation" if iou_type == "bbox" else "bbox"
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != other} for r in results])
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = sorted(coco_gt.getImgIds())
            summary = io.StringIO()
            with contextlib.redirect_stdout(summary):
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            logger.info(f"Evaluate annotation type *{iou_type}*")
            for line in summary.getvalue().splitlines():
                if line.startswith(" Average"):
                    logger.info(line)
            stats = [float(v) for v in evaluator.stats]  # -1: no objects of that size
        else:
            logger.info(f"no detections: {iou_type} metrics are 0")
            stats = [0.0] * len(STAT_NAMES)
        metrics.update({f"{iou_type}_{name}": value for name, value in zip(STAT_NAMES, stats)})
    return metrics


def broadcast_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's metrics on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]
