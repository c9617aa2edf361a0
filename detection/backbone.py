"""The CrossFormer backbone of a detector: stage maps at strides 4-32 -> per-stage LayerNorm ->
``torchvision.ops.FeaturePyramidNetwork``; ``out_channels`` tells torchvision's detectors the width.

Any input size works: CrossFormer pads each stage to its group size and masks the padding.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from yacs.config import CfgNode

from crossformer import CrossFormer
from models import build_model


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def stage_width(body: CrossFormer, stage: int) -> int:
    """Channels of stage ``stage``'s map (each stage doubles the width)."""
    return body.num_features // 2 ** (len(body.layers) - 1 - stage)


class CrossFormerFPN(nn.Module):
    """CrossFormer body (no classifier, no final norm) and an FPN over the stages in ``stages``.

    ``forward`` maps ``(B, 3, H, W)`` to an OrderedDict of ``(B, out_channels, h, w)`` maps, one per
    stage in ``stages`` (keys '0', '1', ...) plus those of ``extra`` (max-pool P6, or P6/P7).
    """

    def __init__(self, body: CrossFormer, stages: Sequence[int], out_channels: int, extra: ExtraFPNBlock):
        super().__init__()
        body.reset_classifier(0)
        body.norm = nn.Identity()  # each used stage gets its own norm below instead
        self.body = body
        self.stages = tuple(stages)
        widths = [stage_width(body, i) for i in self.stages]
        self.norms = nn.ModuleList(ChannelLayerNorm(width) for width in widths)
        self.fpn = FeaturePyramidNetwork(widths, out_channels, extra_blocks=extra)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body.forward_intermediates(x, indices=list(self.stages), intermediates_only=True)
        return self.fpn(OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps))))


def build_backbone(config: CfgNode) -> CrossFormerFPN:
    """The backbone of DET.TYPE: RetinaNet takes strides 8-32 and adds P6/P7 from the last stage
    (as mmdet's RetinaNet does); the R-CNNs take strides 4-32 and add a max-pooled P6."""
    body = build_model(config)
    channels = config.DET.FPN_CHANNELS
    if config.DET.TYPE == "retinanet":
        return CrossFormerFPN(body, (1, 2, 3), channels, LastLevelP6P7(stage_width(body, 3), channels))
    return CrossFormerFPN(body, (0, 1, 2, 3), channels, LastLevelMaxPool())
