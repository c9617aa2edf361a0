"""mIoU, mAcc, aAcc and the per-class table, from per-class pixel counts summed over images and
ranks (so that the result does not depend on how images are split among ranks)."""
from __future__ import annotations

import torch
from torch import Tensor

from utils import all_reduce_sum


def area_counts(prediction: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """``(4, num_classes)`` float64 counts of one prediction: intersection, union, predicted
    area, labelled area; pixels labelled ``ignore_index`` are left out."""
    keep = label != ignore_index
    prediction, label = prediction[keep], label[keep]
    intersect = torch.bincount(label[prediction == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(prediction, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).double()


class SegmentationMeter:
    """Accumulates :func:`area_counts` over images; :meth:`summary` sums over ranks."""

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(4, num_classes, dtype=torch.float64, device=device)

    def update(self, prediction: Tensor, label: Tensor) -> None:
        self.counts += area_counts(prediction.flatten(), label.flatten().to(prediction.device),
                                   self.num_classes, self.ignore_index)

    def summary(self) -> dict[str, float | list[float]]:
        """aAcc, mIoU, mAcc and per-class IoU/Acc, as fractions (mmseg's rule: a class with no
        union has no IoU, one never labelled no Acc; the means leave those out)."""
        intersect, union, _, area_label = all_reduce_sum(self.counts).cpu()
        iou = torch.where(union > 0, intersect / union.clamp(min=1), torch.nan)
        acc = torch.where(area_label > 0, intersect / area_label.clamp(min=1), torch.nan)
        return {"aAcc": (intersect.sum() / area_label.sum().clamp(min=1)).item(),
                "mIoU": iou.nanmean().item(), "mAcc": acc.nanmean().item(),
                "IoU": iou.tolist(), "Acc": acc.tolist()}


def format_table(summary: dict) -> str:
    """The per-class IoU/Acc table (percent; nan: no such pixels) and the summary line, for the log."""
    lines = [f"{'Class':>5} {'IoU':>7} {'Acc':>7}"]
    for index, (iou, acc) in enumerate(zip(summary["IoU"], summary["Acc"])):
        lines.append(f"{index:>5} {100 * iou:7.2f} {100 * acc:7.2f}")
    lines.append(f" * mIoU {100 * summary['mIoU']:.2f} mAcc {100 * summary['mAcc']:.2f} aAcc {100 * summary['aAcc']:.2f}")
    return "\n".join(lines)
