"""Face augmentations applied to a whole batch at once (vectorised torch ops, seeded).

:class:`Augment` transforms every view of a sample with the same parameters (bilinear resampling),
so views fed together stay aligned; noise goes to the network input only. :class:`SRPairAugment`
makes DSR training pairs instead: resampling blurs a face (issue 11, measured on LFW with the DSR
recipe: -30% of the HR target's and -48% of the VLR input's high-frequency energy) into one
evaluation never shows the model, so it augments the HR face alone, losslessly where it can, and
degrades the result into the VLR input exactly as ingest made the stored VLR view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faceops.config import ConfigError, check
from faceops.data.degrade import DegradeConfig, degrade_batch
from faceops.data.tensors import MEAN, STD, to_input

GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights


@dataclass
class AugmentConfig:
    enabled: bool = True
    flip_p: float = 0.5  # horizontal flip probability
    rotate_p: float = 0.65  # probability of a rotation (DSR recipe 0.65)
    rotate_deg: float = 6.0  # max |angle| (seed 000: 10 for recognizers, 003: 6 for DSR)
    translate: float = 0.05  # max shift as a fraction of the size (seed 000: 0.05)
    jitter_p: float = 0.3  # colour-jitter probability (DSR recipe 0.3)
    brightness: float = 0.07  # factor drawn from [1-b, 1+b] (DSR recipe 0.93-1.07)
    contrast: float = 0.07
    saturation: float = 0.04
    noise_std: float = 0.01  # Gaussian noise on the [-1,1] input (seed 000: 0.005 on [0,1])

    def __post_init__(self) -> None:
        for name in ("flip_p", "rotate_p", "jitter_p"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"augment.{name} must be a probability in [0, 1], got {v}")
        check(0 <= self.rotate_deg <= 45, f"augment.rotate_deg must be within 0..45, got {self.rotate_deg}")
        check(0 <= self.translate <= 0.3, f"augment.translate must be within 0..0.3, got {self.translate}")


@dataclass
class Draws:
    """One batch's augmentation parameters, a row per sample (normalised shift: 2 = the image)."""

    flip: torch.Tensor  # bool [n]
    angle: torch.Tensor  # radians [n]
    shift: torch.Tensor  # [n, 2] (x, y) in grid units
    bright: torch.Tensor  # [n] colour factors, 1 where no jitter
    contr: torch.Tensor
    sat: torch.Tensor


def draw(cfg: AugmentConfig, gen: torch.Generator, n: int, start: int, total: int) -> Draws:
    """Draw for a global batch of ``total`` samples and keep rows ``start:start+n``, so DDP ranks
    holding slices of one global batch augment exactly as one process would."""
    rows = slice(start, start + n)

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(total, generator=gen, device=gen.device)[rows] * (hi - lo) + lo

    flip = u(0, 1) < cfg.flip_p
    rot = u(0, 1) < cfg.rotate_p
    angle = u(-cfg.rotate_deg, cfg.rotate_deg) * rot * math.pi / 180
    shift = torch.stack([u(-cfg.translate, cfg.translate), u(-cfg.translate, cfg.translate)], 1) * 2
    jit = (u(0, 1) < cfg.jitter_p).float()
    bright = 1 + u(-cfg.brightness, cfg.brightness) * jit
    contr = 1 + u(-cfg.contrast, cfg.contrast) * jit
    sat = 1 + u(-cfg.saturation, cfg.saturation) * jit
    return Draws(flip, angle, shift, bright, contr, sat)


def affine(d: Draws, shift: torch.Tensor) -> torch.Tensor:
    """[n, 2, 3] ``affine_grid`` matrices: flip, rotation, then ``shift``."""
    n = d.angle.shape[0]
    cos, sin = torch.cos(d.angle), torch.sin(d.angle)
    sx = torch.where(d.flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=d.angle.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx, -sin, shift[:, 0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx, cos, shift[:, 1]
    return theta


class Augment:
    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, batch: dict[str, torch.Tensor], gen: torch.Generator, start: int = 0,
                 total: int | None = None) -> dict[str, torch.Tensor]:
        """Augment ``batch`` (float NCHW in [-1, 1], on ``gen``'s device); rows ``start:start+n`` of a
        global batch of ``total`` (see :func:`draw`)."""
        cfg = self.cfg
        if not cfg.enabled:
            return batch
        views = [k for k in ("hr", "vlr") if k in batch]
        n = batch[views[0]].shape[0]
        total = total or n
        d = draw(cfg, gen, n, start, total)
        theta = affine(d, d.shift)
        noisy = "vlr" if "vlr" in batch else "hr"
        out = dict(batch)
        for k in views:
            x = batch[k]
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            x = self._colour(x, d.bright, d.contr, d.sat)
            if k == noisy and cfg.noise_std > 0:
                noise = torch.randn(total, *x.shape[1:], generator=gen, device=gen.device)[start:start + n]
                x = x + noise * cfg.noise_std
            out[k] = x.clamp_(-1, 1)
        return out

    @staticmethod
    def _colour(x: torch.Tensor, bright: torch.Tensor, contr: torch.Tensor,
                sat: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast (about the mean grey) and saturation folded into one per-sample 3x3
        colour matrix and offset, applied in a single pass (the three steps in sequence cost 3x more).

        On v in [0, 1]: v' = c*b*(s*v + (1-s)*grey(v)) + (1-c)*b*mean(grey(v)); here x = 2v - 1."""
        n = x.shape[0]
        w = GREY.to(x)
        cb = (contr * bright).view(n, 1, 1)
        eye = torch.eye(3, device=x.device, dtype=x.dtype).expand(n, 3, 3)
        mat = cb * (sat.view(n, 1, 1) * eye + (1 - sat).view(n, 1, 1) * w.view(1, 1, 3).expand(n, 3, 3))
        mean_grey = ((x.mean(dim=(2, 3)) + 1) * 0.5) @ w  # [n]
        offset = (1 - contr) * bright * mean_grey  # in v units
        # x' = 2 v' - 1 = mat @ (x + 1) + 2 * offset - 1
        bias = mat.sum(2) + (2 * offset - 1).view(n, 1)
        return torch.baddbmm(bias.unsqueeze(2), mat, x.reshape(n, 3, -1)).view_as(x)


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Network input (float NCHW in [-1, 1]) -> uint8 NCHW on its device: a face as it is stored."""
    return (x.clamp(-1, 1) * STD + MEAN).mul(255.0).round().to(torch.uint8)


def from_levels(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> network input, through :func:`~faceops.data.tensors.to_input` (the same floats)."""
    return to_input(x.permute(0, 2, 3, 1))


class SRPairAugment:
    """DSR training pairs made on the training device: augment the HR face, then degrade it.

    Only the HR face is transformed. Flips and shifts move it by whole pixels (exact, where
    :class:`Augment`'s fractional shifts blur every face); rotations resample it bicubically. The
    result is rounded to 8-bit levels, as a stored face is, and is the target; the input is
    :func:`~faceops.data.degrade.degrade_batch` of it, the degradation ingest applied to make the VLR
    view. So a model trains on the VLR faces evaluation feeds it, and with geometry at identity a pair
    is the dataset's stored (HR, VLR) pair, byte for byte.
    """

    def __init__(self, cfg: AugmentConfig, vlr_size: str, degrade: DegradeConfig):
        if cfg.enabled and cfg.noise_std > 0:
            raise ConfigError(f"augment.noise_std is {cfg.noise_std}, but DSR inputs take only the dataset's "
                              f"degradation (its noise_std is {list(degrade.noise_std)}): set it to 0")
        self.cfg, self.vlr_size, self.degrade = cfg, vlr_size, degrade

    def __call__(self, batch: dict[str, torch.Tensor], gen: torch.Generator, start: int = 0,
                 total: int | None = None) -> dict[str, torch.Tensor]:
        """``batch['hr']`` (float NCHW in [-1, 1], on ``gen``'s device) -> the batch with the augmented
        ``hr`` target and its ``vlr`` input; rows ``start:start+n`` of a global batch of ``total``."""
        hr = batch["hr"]
        n = hr.shape[0]
        total = total or n
        if self.cfg.enabled:
            hr = self._augment(hr, gen, start, total)
        levels = to_levels(hr)
        vlr = degrade_batch(levels, self.vlr_size, self.degrade, gen, start, total)
        return {**batch, "hr": from_levels(levels), "vlr": from_levels(vlr)}

    def _augment(self, hr: torch.Tensor, gen: torch.Generator, start: int, total: int) -> torch.Tensor:
        d = draw(self.cfg, gen, hr.shape[0], start, total)
        h, w = hr.shape[2:]
        size = torch.tensor([w, h], device=hr.device, dtype=d.shift.dtype)
        whole = torch.round(d.shift * size / 2) * 2 / size  # the drawn shift, to whole pixels
        grid = F.affine_grid(affine(d, whole), list(hr.shape), align_corners=False)
        x = F.grid_sample(hr, grid, mode="bicubic", padding_mode="border", align_corners=False)
        return Augment._colour(x, d.bright, d.contr, d.sat).clamp_(-1, 1)
