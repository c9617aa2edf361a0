"""Segmentation model: the CrossFormer backbone's stage maps, a decode head, an auxiliary head.

The heads have the structure of mmseg's (whose configs the paper used): Semantic FPN is an FPN
neck (``SEG.NECK_CHANNELS``) plus a head that brings every level to stride 4 with 3x3 conv-BN-ReLU
blocks (``SEG.CHANNELS``) and sums them; UPerNet pools the last stage at ``SEG.POOL_SCALES``,
runs a top-down FPN over all stages and fuses the four levels; the auxiliary FCN head reads
stage 3. The heads take the raw stage maps, as the authors' segmentation backbone returns them (no
norm). Logits come back at the input size (``{"out": ..., "aux": ...}``, torchvision's convention).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork
from yacs.config import CfgNode

from config import UserError
from crossformer import CrossFormer
from models import build_model

HEADS = ("fpn", "upernet")


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of an NCHW map (align_corners False, as mmseg)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size)


class Classifier(nn.Sequential):
    """Dropout and the 1x1 convolution to class scores."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))


class SemanticFPNHead(nn.Module):
    """FPN neck plus the Semantic FPN head: stage maps -> logits at stride 4."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, neck_channels: int = 256,
                 channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.neck = FeaturePyramidNetwork(list(in_channels), neck_channels)
        self.scale_heads = nn.ModuleList()
        for level in range(len(in_channels)):
            layers: list[nn.Module] = []
            for k in range(max(1, level)):  # stride 4 and 8: one block; 16: two; 32: three
                layers.append(conv_bn_relu(neck_channels if k == 0 else channels, channels, 3))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[Tensor]) -> Tensor:
        levels = list(self.neck(OrderedDict(enumerate(features))).values())
        size = levels[0].shape[-2:]
        fused = self.scale_heads[0](levels[0])
        for head, level in zip(self.scale_heads[1:], levels[1:]):
            fused = fused + resize(head(level), size)  # odd sizes: x2 steps can miss by a pixel
        return self.classifier(fused)


class PyramidPooling(nn.Module):
    """Average-pool to each scale, 1x1 conv-BN-ReLU, resize back; concatenated with the input."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(in_channels, channels, 1)) for scale in scales)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x] + [resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class UPerHead(nn.Module):
    """UPerNet: pyramid pooling on the last stage, a top-down FPN, fusion of all levels."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, features: list[Tensor]) -> Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, features)]
        laterals.append(self.ppm_bottleneck(self.ppm(features[-1])))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        fused = torch.cat([outputs[0]] + [resize(x, size) for x in outputs[1:]], dim=1)
        return self.classifier(self.fpn_bottleneck(fused))


class FCNHead(nn.Sequential):
    """The auxiliary head: one 3x3 conv-BN-ReLU and the classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__(conv_bn_relu(in_channels, channels, 3), Classifier(channels, num_classes, dropout))


class SegmentationModel(nn.Module):
    """Backbone (its raw stage maps) + decode head (+ auxiliary head on stage 3 when training)."""

    def __init__(self, backbone: CrossFormer, decode_head: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``(B, 3, H, W)`` -> ``{"out": (B, classes, H, W)}`` logits, plus ``"aux"`` in training."""
        features = self.backbone.forward_intermediates(images, intermediates_only=True)
        size = images.shape[-2:]
        result = {"out": resize(self.decode_head(features), size)}
        if self.training and self.aux_head is not None:
            result["aux"] = resize(self.aux_head(features[2]), size)
        return result


def build_segmentation_model(config: CfgNode) -> SegmentationModel:
    """The model of ``config``: MODEL.CROS backbone, SEG.HEAD decode head, MODEL.NUM_CLASSES classes."""
    seg = config.SEG
    if seg.HEAD not in HEADS:
        raise UserError(f"unknown SEG.HEAD {seg.HEAD!r}; known heads: {', '.join(HEADS)}")
    backbone = build_model(config)
    backbone.prune_intermediate_layers(len(backbone.feature_info), prune_norm=True)  # no classifier, no final norm
    dims = [info["num_chs"] for info in backbone.feature_info]
    classes = config.MODEL.NUM_CLASSES
    if seg.HEAD == "fpn":
        head: nn.Module = SemanticFPNHead(dims, classes, seg.NECK_CHANNELS, seg.CHANNELS, seg.DROPOUT)
    else:
        head = UPerHead(dims, classes, seg.CHANNELS, seg.POOL_SCALES, seg.DROPOUT)
    aux = FCNHead(dims[2], classes, seg.AUX_CHANNELS, seg.DROPOUT) if seg.AUX_WEIGHT > 0 else None
    return SegmentationModel(backbone, head, aux)
