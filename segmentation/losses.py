"""The training loss: pixel-wise cross-entropy of the decode head plus SEG.AUX_WEIGHT times that
of the auxiliary head; pixels labelled SEG.IGNORE_INDEX count for nothing (a crop with no
labelled pixel gives loss 0, not NaN)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SegmentationLoss(nn.Module):
    def __init__(self, aux_weight: float = 0.0, ignore_index: int = 255):
        super().__init__()
        self.aux_weight, self.ignore_index = aux_weight, ignore_index

    def _cross_entropy(self, logits: Tensor, labels: Tensor) -> Tensor:
        labelled = (labels != self.ignore_index).sum().clamp(min=1)
        return F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index, reduction="sum") / labelled

    def forward(self, outputs: dict[str, Tensor], labels: Tensor) -> Tensor:
        """``outputs["out"]`` (and ``"aux"``): (B, classes, H, W) logits; ``labels``: (B, H, W)."""
        loss = self._cross_entropy(outputs["out"], labels)
        if "aux" in outputs and self.aux_weight > 0:
            loss = loss + self.aux_weight * self._cross_entropy(outputs["aux"], labels)
        return loss
