"""ResNet-34 for 112x112 faces, from torchvision's ``BasicBlock``.

Paper: K. He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385);
blocks from torchvision (BSD-3-Clause). The seed recipe (seed 002: BasicBlocks [3, 4, 6, 3], 512-d
feature, Linear embedding, L2 norm, ArcFace s=30 m=0.35) with the insightface iresnet stem for small
faces: a 3x3 stride-1 conv and no max-pool, the first stage then strides by 2, so stages run at
56/28/14/7 px (the ImageNet 7x7/2 conv + max-pool would leave 3x3 px at the last stage).

This is the seed's own network, kept selectable for comparison; the face ResNet proper (pre-activation
IR blocks, PReLU, FC on the 7x7 map) is insightface's IResNet in :mod:`faceops.models.iresnet`.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from faceops.models.recognizer import RecognizerConfig, StagedTrunk, register_backbone, reject_timm_options

STEM_CHANNELS = 64


def _stage(in_chs: int, out_chs: int, depth: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_chs))
    blocks = [BasicBlock(in_chs, out_chs, stride=stride, downsample=downsample)]
    blocks += [BasicBlock(out_chs, out_chs) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)



def init_conv_bn(module: nn.Module) -> None:
    """He-normal convolutions, unit-scale zero-shift batch norms (torchvision's / timm's ResNet init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

class ResNetTrunk(StagedTrunk):
    """Stem -> 4 stages of BasicBlocks (each strides by 2) -> global average pool -> [N, dims[-1]]."""

    def __init__(self, depths: tuple[int, ...] = (3, 4, 6, 3),
                 dims: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        in_chs = STEM_CHANNELS
        stages = []
        for depth, out_chs in zip(depths, dims, strict=True):
            stages.append(_stage(in_chs, out_chs, depth, stride=2))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.feature_dim = dims[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn(self)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x)


@register_backbone
def resnet34(cfg: RecognizerConfig) -> ResNetTrunk:
    reject_timm_options(cfg)
    return ResNetTrunk((3, 4, 6, 3))
