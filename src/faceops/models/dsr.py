"""DSR: deep super-resolution of very-low-resolution (VLR) faces to the recognizer's HR size.

Architecture after EDSR (Lim et al., "Enhanced Deep Residual Networks for Single Image
Super-Resolution", CVPRW 2017, arXiv:1707.02921): a conv head, ``residual_blocks`` conv-ReLU-conv blocks
without BatchNorm (scaled residuals), pixel-shuffle up-sampling (Shi et al., CVPR 2016,
arXiv:1609.05158), a conv tail, plus a global residual over the bicubic-upsampled input so the network
only learns the missing detail. Defaults from seed 003 (base_channels 128, 16 blocks).

One model per VLR size: the up-sampling factor is the smallest 2^a * 3^b >= HR / min(W, H) (32x32 -> 4,
14x16 -> 8); a non-square or non-integer result (128x128, 112x128) is resized to exactly HR x HR.
Input and output are float [N, 3, H, W] in [-1, 1] (output clamped in eval mode; unclamped while
training so pixel losses can pull values back into range).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faceops.config import check
from faceops.data.degrade import parse_size
from faceops.errors import FaceopsError
from faceops.models.registry import Registry

SHUFFLE_FACTORS = (2, 3)  # pixel-shuffle steps the up-sampler is built from


@dataclass
class DSRConfig:
    """Super-resolution network; the VLR size is part of the model (stored with the checkpoint)."""

    name: str = "dsr"  # registered SR network
    vlr_size: str = "32x32"  # input WIDTHxHEIGHT (seed 003: 32x32; earlier 14x16)
    hr_size: int = 112  # output side, the recognizer's input size
    base_channels: int = 128  # feature channels (seed 003: 112 -> 128 for 32x32)
    residual_blocks: int = 16  # conv-ReLU-conv residual blocks at VLR resolution
    residual_scale: float = 0.1  # EDSR residual scaling: keeps deep no-BN stacks stable

    def __post_init__(self) -> None:
        parse_size(self.vlr_size)
        check(self.name in SR_NETWORKS, f"dsr.name: unknown SR network {self.name!r}; "
                                        f"choose one of {SR_NETWORKS.names()}")
        check(self.hr_size > 0, f"dsr.hr_size must be > 0, got {self.hr_size}")
        check(self.base_channels > 0, f"dsr.base_channels must be > 0, got {self.base_channels}")
        check(self.residual_blocks >= 0, f"dsr.residual_blocks must be >= 0, got {self.residual_blocks}")
        w, h = parse_size(self.vlr_size)
        check(max(w, h) < self.hr_size,
              f"dsr.vlr_size {self.vlr_size} must be smaller than hr_size {self.hr_size}")


SR_NETWORKS: Registry[Callable[[DSRConfig], nn.Module]] = Registry("SR network")


def shuffle_steps(factor_needed: float) -> list[int]:
    """Smallest product of SHUFFLE_FACTORS >= ``factor_needed``, as its steps (e.g. 3.5 -> [2, 2])."""
    best: list[int] | None = None
    max_twos = max(1, math.ceil(math.log2(max(factor_needed, 1.0))))
    for threes in range(max_twos + 1):
        for twos in range(max_twos + 1):
            product = 2**twos * 3**threes
            if product >= factor_needed and (best is None or product < math.prod(best)):
                best = [3] * threes + [2] * twos
    return best or [2]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.scale


class DSRNet(nn.Module):
    """VLR [N, 3, h, w] -> HR [N, 3, hr_size, hr_size], both in [-1, 1]."""

    def __init__(self, cfg: DSRConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vlr_size = cfg.vlr_size
        self.vlr_width, self.vlr_height = parse_size(cfg.vlr_size)
        self.hr_size = cfg.hr_size
        c = cfg.base_channels
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(c, cfg.residual_scale) for _ in range(cfg.residual_blocks)],
                                  nn.Conv2d(c, c, 3, padding=1))
        self.steps = shuffle_steps(cfg.hr_size / min(self.vlr_width, self.vlr_height))
        up: list[nn.Module] = []
        for r in self.steps:
            up += [nn.Conv2d(c, c * r * r, 3, padding=1), nn.PixelShuffle(r), nn.ReLU(inplace=True)]
        self.upsample = nn.Sequential(*up)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as plain bicubic: the global residual carries the image
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (w, h) != (self.vlr_width, self.vlr_height):
            raise FaceopsError(f"DSR model for {self.vlr_size} (WxH) got input {w}x{h}; "
                               "use the DSR checkpoint trained for this VLR size")
        hr = (self.hr_size, self.hr_size)
        base = F.interpolate(x, size=hr, mode="bicubic", align_corners=False)
        feat = self.head(x)
        feat = self.upsample(feat + self.body(feat))
        detail = self.tail(feat)
        if detail.shape[-2:] != hr:
            detail = F.interpolate(detail, size=hr, mode="bilinear", align_corners=False)
        out = base + detail
        return out if self.training else out.clamp(-1.0, 1.0)


@SR_NETWORKS.register
def dsr(cfg: DSRConfig) -> DSRNet:
    return DSRNet(cfg)


def create_dsr(cfg: DSRConfig | None = None) -> nn.Module:
    """Build the SR network ``cfg`` names; it carries ``vlr_size`` ("WxH") and ``config``."""
    cfg = cfg or DSRConfig()
    return SR_NETWORKS.get(cfg.name)(cfg)
