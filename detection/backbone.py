"""The CrossFormer backbone of a detector: the raw stage maps at strides 4-32 (as the authors'
detection backbone returns them: no norm) -> ``torchvision.ops.FeaturePyramidNetwork``;
``out_channels`` tells torchvision's detectors the width.

Any input size works: CrossFormer pads each block's map to its grouping and masks the padding.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from yacs.config import CfgNode

from crossformer import CrossFormer
from models import build_model


class RetinaNetExtraLevels(LastLevelP6P7):
    """P6 by a stride-2 3x3 conv on the last stage's map (C5), P7 by another on P6, with or without
    a ReLU between them: torchvision's LastLevelP6P7 applies one, mmdet's FPN
    (``add_extra_convs='on_input'``, ``relu_before_extra_convs=False``) does not."""

    def __init__(self, in_channels: int, out_channels: int, relu_before_p7: bool):
        super().__init__(in_channels, out_channels)
        self.relu_before_p7 = relu_before_p7

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        p6 = self.p6(c[-1])  # C5 even when its width equals out_channels (torchvision would take P5 then)
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return p + [p6, p7], names + ["p6", "p7"]


class CrossFormerFPN(nn.Module):
    """CrossFormer body (no classifier, no final norm) and an FPN over the stages in ``stages``.

    ``forward`` maps ``(B, 3, H, W)`` to an OrderedDict of ``(B, out_channels, h, w)`` maps, one per
    stage in ``stages`` (keys '0', '1', ...) plus those of ``extra`` (max-pool P6, or P6/P7).
    """

    def __init__(self, body: CrossFormer, stages: Sequence[int], out_channels: int, extra: ExtraFPNBlock):
        super().__init__()
        self.stages = body.prune_intermediate_layers(list(stages), prune_norm=True)
        self.body = body
        widths = [body.feature_info[i]["num_chs"] for i in self.stages]
        self.fpn = FeaturePyramidNetwork(widths, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body.forward_intermediates(x, indices=self.stages, intermediates_only=True)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_backbone(config: CfgNode) -> CrossFormerFPN:
    """The backbone of DET.TYPE: RetinaNet takes strides 8-32 and adds P6/P7 from the last stage
    (as mmdet's RetinaNet does); the R-CNNs take strides 4-32 and add a max-pooled P6."""
    body = build_model(config)
    channels = config.DET.FPN_CHANNELS
    if config.DET.TYPE == "retinanet":
        last = body.feature_info[-1]["num_chs"]
        return CrossFormerFPN(body, (1, 2, 3), channels, RetinaNetExtraLevels(last, channels, config.DET.P7_RELU))
    return CrossFormerFPN(body, (0, 1, 2, 3), channels, LastLevelMaxPool())
