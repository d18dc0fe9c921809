"""Margin heads: class centres + an angular/cosine margin on the target logit.

- ``arcface``: cos(theta + m) (Deng et al., CVPR 2019, arXiv:1801.07698), in the insightface form
  (recognition/arcface_torch/losses.py, MIT): below ``th = cos(pi - m)`` the target logit falls back to
  ``cos - mm`` with ``mm = sin(pi - m) * m``, since cos(theta + m) stops decreasing once theta + m > pi.
  The cosine is clamped and the sine computed as sqrt(max(1 - cos^2, eps)), so logits and gradients
  stay finite at cos = +-1 (seed 000's NaNs came from sqrt(1 - cos^2) at |cos| = 1).
- ``cosface``: cos(theta) - m (Wang et al., CVPR 2018, arXiv:1801.09414).
- ``combined``: cos(m1 * theta + m2) - m3 (the ArcFace paper's combined margin, insightface's m1/m2/m3),
  falling back to ``cos - (1 + th) - m3`` past ``th = cos((pi - m2) / m1)``, which meets the margin curve
  at -1 - m3 and keeps the target logit decreasing in theta.

Every head returns ``(logits, labels)``: with ``sample_rate < 1`` (Partial FC, An et al., CVPR 2022,
arXiv:2203.15565) a training step scores only the batch's positive classes plus random negatives, so
the logits and their memory stay bounded for many identities, and the labels are remapped to the
sampled columns. The training engine computes cross-entropy (with label smoothing) on the pair.
Logits are computed in float32 even under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from faceops.config import check
from faceops.models.registry import Registry

CENTRE_INIT_STD = 0.01  # insightface's class-centre init


@dataclass
class MarginHeadConfig:
    """Margin head and its knobs (defaults: seed 004's stable ArcFace for ~500 identities)."""

    name: str = "arcface"  # registered margin head: arcface, cosface, combined
    s: float = 32.0  # logit scale (seed 004 went 64 -> 32 to stop NaNs; seed 002 used 30)
    m: float = 0.3  # arcface: additive angle in radians; cosface: subtracted from the cosine (0.35 typical)
    m1: float = 1.0  # combined: multiplicative angular margin (SphereFace); 1 = off
    m2: float = 0.3  # combined: additive angular margin (ArcFace); 0 = off
    m3: float = 0.0  # combined: additive cosine margin (CosFace); 0 = off
    easy_margin: bool = False  # arcface: margin only where cos > 0, no fallback (arcface_torch option)
    sample_rate: float = 1.0  # Partial FC: fraction of class centres scored per training step (1 = all)
    eps: float = 1e-6  # floor for 1 - cos^2 under the sqrt / distance of cos from +-1 before acos

    def __post_init__(self) -> None:
        check(self.name in MARGIN_HEADS, f"margin.name: unknown margin head {self.name!r}; "
                                         f"choose one of {MARGIN_HEADS.names()}")
        check(self.s > 0, f"margin.s must be > 0, got {self.s}")
        check(0.0 <= self.m < math.pi / 2, f"margin.m must be in [0, pi/2), got {self.m}")
        check(self.m1 >= 1.0, f"margin.m1 must be >= 1, got {self.m1}")
        check(0.0 <= self.m2 < math.pi / 2, f"margin.m2 must be in [0, pi/2), got {self.m2}")
        check(self.m3 >= 0.0, f"margin.m3 must be >= 0, got {self.m3}")
        check(0.0 < self.sample_rate <= 1.0, f"margin.sample_rate must be in (0, 1], got {self.sample_rate}")
        check(0.0 < self.eps < 1e-2, f"margin.eps must be in (0, 0.01), got {self.eps}")


MARGIN_HEADS: Registry = Registry("margin head")


class MarginHead(nn.Module):
    """Class centres ``weight`` [num_classes, embedding_dim]; subclasses define ``target_logit``."""

    def __init__(self, cfg: MarginHeadConfig, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=CENTRE_INIT_STD)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """Margin applied to the target-class cosine (unscaled)."""
        raise NotImplementedError

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial FC: (class centres to score, labels as column indices into them)."""
        num_sample = int(self.cfg.sample_rate * self.num_classes)
        if not self.training or num_sample >= self.num_classes:
            return self.weight, labels
        positive = torch.unique(labels)  # sorted
        if num_sample <= positive.numel():
            index = positive
        else:
            priority = torch.rand(self.num_classes, device=labels.device)
            priority[positive] = 2.0  # above any rand(): positives always kept
            index = torch.topk(priority, k=num_sample).indices.sort().values
        return self.weight[index], torch.searchsorted(index, labels)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings`` [N, D], ``labels`` [N] class ids -> (scaled logits [N, C'], labels into C')."""
        weight, labels = self.sample(labels)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.linear(F.normalize(embeddings.float(), dim=1), F.normalize(weight.float(), dim=1))
            cos = cos.clamp(-1.0, 1.0)
            index = labels.long().unsqueeze(1)
            target = self.target_logit(cos.gather(1, index))
            logits = cos.scatter(1, index, target) * self.cfg.s
        return logits, labels


@MARGIN_HEADS.register(name="arcface")
class ArcFace(MarginHead):
    def __init__(self, cfg: MarginHeadConfig, embedding_dim: int, num_classes: int) -> None:
        super().__init__(cfg, embedding_dim, num_classes)
        m = cfg.m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=self.cfg.eps))
        phi = cos * self.cos_m - sin * self.sin_m  # cos(theta + m)
        if self.cfg.easy_margin:
            return torch.where(cos > 0, phi, cos)
        return torch.where(cos > self.th, phi, cos - self.mm)


@MARGIN_HEADS.register(name="cosface")
class CosFace(MarginHead):
    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.cfg.m


@MARGIN_HEADS.register(name="combined")
class CombinedMargin(MarginHead):
    def __init__(self, cfg: MarginHeadConfig, embedding_dim: int, num_classes: int) -> None:
        super().__init__(cfg, embedding_dim, num_classes)
        self.th = math.cos((math.pi - cfg.m2) / cfg.m1)  # below it m1 * theta + m2 > pi

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        theta = torch.acos(cos.clamp(-1.0 + c.eps, 1.0 - c.eps))
        phi = torch.cos(c.m1 * theta + c.m2) - c.m3
        return torch.where(cos > self.th, phi, cos - (1.0 + self.th) - c.m3)


def create_margin_head(cfg: MarginHeadConfig, embedding_dim: int, num_classes: int) -> MarginHead:
    return MARGIN_HEADS.get(cfg.name)(cfg, embedding_dim, num_classes)
