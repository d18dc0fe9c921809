"""IResNet: the face ResNet of insightface's ArcFace models, for 112x112 faces.

Paper: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019 (arXiv:1801.07698): its "improved residual" (IR) unit and output block. Layout
as in insightface ``recognition/arcface_torch/backbones/iresnet.py`` (MIT licence), reimplemented here
(no code copied); block-level module names are insightface's, so its checkpoints load through
:meth:`IResNetTrunk.remap_state_dict`.

- stem: conv3x3(3->64, stride 1) - BN - PReLU, no max-pool (a face crop is already small);
- 4 stages of :class:`IBasicBlock` at 64/128/256/512 channels, each striding by 2: 56/28/14/7 px;
- block: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut (conv1x1(stride) - BN
  where the shape changes); no activation after the sum (pre-activation style);
- output: BN on the 7x7 map and Flatten here (``feature_dim`` = 512*7*7, so position is kept rather
  than pooled away), then the ``linear_bn`` embedding head: Dropout - FC - BatchNorm1d, whose scale
  insightface fixes at 1 (:meth:`IResNetTrunk.adapt_head` does the same).

Depths: iresnet34 [3, 4, 6, 3], iresnet50 [3, 4, 14, 3], iresnet100 [3, 13, 30, 3].

Fresh weights differ from insightface's N(0, 0.1) convs on purpose: evaluated before its BatchNorm
statistics have moved (validation after a few steps, an export smoke test), such a network's activations
grow up to ~7x per conv (0.1 * sqrt(9 * 512)) and an untrained iresnet100 returns NaN. Here convs get He
init (fan-out, as torchvision's and timm's ResNets) and each block's last BN scale starts at 0 (timm's
``zero_init_last``; Goyal et al. 2017, arXiv:1706.02677), so every block starts as its shortcut and eval
outputs stay finite.
"""

from __future__ import annotations

import torch
from torch import nn

from faceops.errors import FaceopsError
from faceops.models.heads import LinearBNHead
from faceops.models.recognizer import (
    INPUT_SIZE,
    RecognizerConfig,
    StagedTrunk,
    register_backbone,
    reject_timm_options,
)
from faceops.models.resnet import init_conv_bn

STEM_CHANNELS = 64
STAGE_CHANNELS = (64, 128, 256, 512)
MAP_SIZE = INPUT_SIZE // 2 ** len(STAGE_CHANNELS)  # 7: the last stage's map, read whole by the FC
BN_EPS = 1e-5

#: insightface top-level names -> ours (block internals keep their names under ``stages.N.``)
INSIGHTFACE_NAMES = (("conv1.", "backbone.stem.0."), ("bn1.", "backbone.stem.1."), ("prelu.", "backbone.stem.2."),
                     ("bn2.", "backbone.norm."), ("fc.", "embedding.fc."), ("features.", "embedding.bn."))


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN + shortcut; the stride sits on the second conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.conv1 = conv3x3(in_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=BN_EPS)
        self.prelu = nn.PReLU(out_chs)
        self.conv2 = conv3x3(out_chs, out_chs, stride)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs, eps=BN_EPS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


def _stage(in_chs: int, out_chs: int, depth: int) -> nn.Sequential:
    return nn.Sequential(IBasicBlock(in_chs, out_chs, stride=2),
                         *[IBasicBlock(out_chs, out_chs) for _ in range(depth - 1)])


class IResNetTrunk(StagedTrunk):
    """Stem -> 4 stages of IR blocks -> BN -> Flatten: [N, 3, 112, 112] -> [N, 512 * 7 * 7]."""

    def __init__(self, depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, STEM_CHANNELS), nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS),
                                  nn.PReLU(STEM_CHANNELS))
        in_chs, stages = STEM_CHANNELS, []
        for depth, out_chs in zip(depths, STAGE_CHANNELS, strict=True):
            stages.append(_stage(in_chs, out_chs, depth))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.depths = depths
        self.feature_dim = in_chs * MAP_SIZE * MAP_SIZE
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn(self)
        for block in self.modules():
            if isinstance(block, IBasicBlock):
                nn.init.zeros_(block.bn3.weight)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        # not while tracing (ONNX export): shapes are then tensors, and the traced graph's FC fixes the size
        if not torch.jit.is_tracing() and tuple(x.shape[-2:]) != (MAP_SIZE, MAP_SIZE):
            raise FaceopsError(f"IResNet takes {INPUT_SIZE}x{INPUT_SIZE} faces (its FC reads the "
                               f"{MAP_SIZE}x{MAP_SIZE} map); this input gives a {x.shape[-2]}x{x.shape[-1]} map")
        return torch.flatten(self.norm(x), 1)

    @staticmethod
    def adapt_head(head: nn.Module) -> None:
        """insightface fixes the embedding BatchNorm's scale at 1 (``features.weight.requires_grad =
        False``): only its shift learns, so the embedding's per-dimension scale stays the FC's."""
        if isinstance(head, LinearBNHead):
            nn.init.ones_(head.bn.weight)
            head.bn.weight.requires_grad_(False)

    @staticmethod
    def remap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """insightface names (``conv1.``, ``layer3.5.bn2.``, ``fc.``, ``features.``) -> ours; keys already
        in recognizer form, and keys it does not know, pass through (the load report lists the latter)."""
        return {_our_name(key): value for key, value in state_dict.items()}


def _our_name(key: str) -> str:
    if key.startswith(("backbone.", "embedding.")):
        return key
    for theirs, ours in INSIGHTFACE_NAMES:
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    layer, _, rest = key.partition(".")
    if layer.startswith("layer") and layer[5:].isdigit() and rest:
        return f"backbone.stages.{int(layer[5:]) - 1}.{rest}"
    return key


def _create_iresnet(depths: tuple[int, int, int, int], cfg: RecognizerConfig) -> IResNetTrunk:
    reject_timm_options(cfg)
    return IResNetTrunk(depths)


@register_backbone
def iresnet34(cfg: RecognizerConfig) -> IResNetTrunk:
    return _create_iresnet((3, 4, 6, 3), cfg)


@register_backbone
def iresnet50(cfg: RecognizerConfig) -> IResNetTrunk:
    return _create_iresnet((3, 4, 14, 3), cfg)


@register_backbone
def iresnet100(cfg: RecognizerConfig) -> IResNetTrunk:
    return _create_iresnet((3, 13, 30, 3), cfg)
