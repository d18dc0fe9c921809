"""Face augmentations applied to a whole batch at once (vectorised torch ops, seeded).

:class:`Augment` transforms every view of a sample with the same parameters (bilinear resampling),
so views fed together stay aligned; noise goes to the network input only. :class:`SRPairAugment`
makes DSR training pairs instead: resampling blurs a face (issue 11, measured on LFW with the DSR
recipe: -30% of the HR target's and -48% of the VLR input's high-frequency energy) into one
evaluation never shows the model, so it augments the HR face alone, losslessly where it can, and
degrades the result into the VLR input exactly as ingest made the stored VLR view.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable
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


NOISE_BANK_SIZE = 1 << 20  # Gaussian values a sample's noise is a window of (4 MiB: stays in cache)
NOISE_BANK_SEED = 20_140_601  # fixed: the bank, hence every batch, is the same on every run and device
CPU_CHUNK = 8  # samples warped together on a CPU (measured best of 2..16: the working set stays in cache)
LEVEL_SCALE = (1 / (255 * STD), -MEAN / STD)  # uint8 level v -> network input: scale * v + shift
HUGE_PAGE = 2 << 20  # bytes in a transparent huge page (x86-64, arm64 with 4 KiB pages)
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux


class Augment:
    """Flip, rotation and shift (one bilinear ``grid_sample``, border padding), colour jitter and input
    noise, applied chunk by chunk straight into the output.

    Takes float NCHW in [-1, 1] or the reader's uint8 NHWC levels; the scaling of levels to [-1, 1],
    the colour jitter and the noise are one batched matmul per chunk. On a CPU the chunks' scratch is
    reused between batches, so a batch allocates only its output (a fresh large tensor costs page
    faults: as much time as the arithmetic), and the noise is a window of a fixed Gaussian bank at a
    drawn offset (drawing fresh Gaussian noise cost as much as all the rest). So one instance serves one
    caller at a time.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}  # DataLoader workers get the config, not the scratch and noise bank

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def __call__(self, batch: dict[str, torch.Tensor], gen: torch.Generator, start: int = 0,
                 total: int | None = None) -> dict[str, torch.Tensor]:
        """Augment ``batch`` (float NCHW in [-1, 1] or uint8 NHWC, on ``gen``'s device) into float NCHW
        input; rows ``start:start+n`` of a global batch of ``total`` (see :func:`draw`)."""
        cfg = self.cfg
        views = [k for k in ("hr", "vlr") if k in batch]
        if not cfg.enabled:
            return batch | {k: to_input(batch[k]) for k in views if batch[k].dtype == torch.uint8}
        n = batch[views[0]].shape[0]
        total = total or n
        d = draw(cfg, gen, n, start, total)
        theta = affine(d, d.shift)
        noisy = "vlr" if "vlr" in batch else "hr"
        offsets = None
        if cfg.noise_std > 0:
            size = 3 * math.prod(_size(batch[noisy]))
            starts = _bank_length(size) - size + 1
            offsets = torch.randint(0, starts, (total,), generator=gen, device=gen.device)[start:start + n]
        out = dict(batch)
        for k in views:
            out[k] = self._view(batch[k], theta, d, offsets if k == noisy else None)
        return out

    def _view(self, x: torch.Tensor, theta: torch.Tensor, d: Draws,
              offsets: torch.Tensor | None) -> torch.Tensor:
        """One view, warped, coloured and noised chunk by chunk into a new float NCHW tensor."""
        levels = x.dtype == torch.uint8
        n, (h, w) = x.shape[0], _size(x)
        out = _empty((n, 3, h, w), torch.float32 if levels else x.dtype, x.device)
        mat, base, contrast = _colour_terms(d, *(LEVEL_SCALE if levels else (1.0, 0.0)), out.dtype)
        terms = _grid_terms(theta.to(out.dtype), h, w)
        chunk = CPU_CHUNK if x.device.type == "cpu" else max(n, 1)
        for s in range(0, n, chunk):
            rows = slice(s, min(s + chunk, n))
            c = rows.stop - s
            src = x[rows]
            if levels:  # to float, still NHWC (a contiguous conversion; grid_sample reads channels-last)
                src = self._buffer("levels", (chunk, h, w, 3), out.dtype, x.device)[:c].copy_(src)
                src = src.permute(0, 3, 1, 2)
            grid = self._grid(terms, rows, chunk)
            warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
            warped = warped.view(c, 3, h * w)
            # contrast pulls towards the warped face's mean grey: the only term known per chunk
            grey = warped.mean(2) @ GREY.to(warped).view(3, 1)
            bias = torch.addcmul(base[rows], contrast[rows], grey).unsqueeze(2)
            if offsets is not None:
                bias = self._noise(offsets[rows], 3 * h * w, chunk, out.dtype).add_(bias)
            torch.baddbmm(bias, mat[rows], warped, out=out[rows].view(c, 3, h * w)).clamp_(-1, 1)
        return out

    def _grid(self, terms: tuple[torch.Tensor, torch.Tensor], rows: slice, chunk: int) -> torch.Tensor:
        """The ``grid_sample`` grid [c, h, w, 2] of samples ``rows``, from :func:`_grid_terms`, in
        reused memory."""
        lines, per_sample = terms[0], terms[1][rows]
        (c, _, w2), h = per_sample.shape, lines.shape[0]
        grid = self._buffer("grid", (chunk, h, w2 // 2, 2), per_sample.dtype, per_sample.device)[:c]
        torch.bmm(lines.expand(c, h, 2), per_sample, out=grid.view(c, h, w2))
        return grid

    def _bank(self, device: torch.device, size: int, dtype: torch.dtype) -> torch.Tensor:
        """Noise windows of ``size`` values, scaled to ``noise_std``: a view [starts, size] of the bank,
        drawn on the CPU (every device holds the same values) and at least 8 windows long."""
        length = _bank_length(size)
        key = ("bank", length, self.cfg.noise_std, dtype, str(device))
        if key not in self._buffers:
            gen = torch.Generator().manual_seed(NOISE_BANK_SEED)
            self._buffers[key] = (torch.randn(length, generator=gen) * self.cfg.noise_std).to(device, dtype)
        return self._buffers[key].unfold(0, size, 1)

    def _noise(self, offsets: torch.Tensor, size: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        """The noise [c, 3, size / 3] of the samples whose windows start at ``offsets``."""
        windows = self._bank(offsets.device, size, dtype)
        buf = self._buffer("noise", (chunk, size), dtype, offsets.device)[:offsets.shape[0]]
        return torch.index_select(windows, 0, offsets, out=buf).view(-1, 3, size // 3)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """Scratch memory, kept between batches on a CPU (where a fresh large tensor costs page faults);
        accelerators' caching allocators already reuse memory."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        key = (name, shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]

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


def _bank_length(size: int) -> int:
    """Values in the noise bank for windows of ``size``: :data:`NOISE_BANK_SIZE`, or 8 windows."""
    return max(NOISE_BANK_SIZE, 8 * size)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``; on a Linux CPU it asks for 2 MiB pages before the first write. A fresh batch
    (38 MB at 256 x 3 x 112 x 112) otherwise takes ~9,400 page faults: measured 17 ms, a quarter of
    the augmentation's time, against 4 ms on huge pages. Only a hint: where refused, nothing changes."""
    out = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise() if device.type == "cpu" else None
    start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE  # the whole huge pages inside the tensor
    end = (out.data_ptr() + out.numel() * out.element_size()) // HUGE_PAGE * HUGE_PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, MADV_HUGEPAGE)
    return out


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` (Linux only; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def _size(x: torch.Tensor) -> tuple[int, int]:
    """(h, w) of a view: uint8 levels come NHWC, float input NCHW."""
    return tuple(x.shape[1:3]) if x.dtype == torch.uint8 else tuple(x.shape[2:4])


def _grid_terms(theta: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.affine_grid(theta, align_corners=False)`` factored as [1, y] of each row [h, 2] times a
    [n, 2, w * 2] term per sample: the grid of a sample is one small matmul (``affine_grid``'s costs
    as much as ``grid_sample``)."""
    n, dt, dev = theta.shape[0], theta.dtype, theta.device
    xs = (torch.arange(w, dtype=dt, device=dev) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, dtype=dt, device=dev) * 2 + 1) / h - 1
    cols = xs.view(1, w, 1) * theta[:, None, :, 0] + theta[:, None, :, 2]  # [n, w, 2]: x * t0 + t2
    per_row = theta[:, None, :, 1].expand(n, w, 2)  # y * t1 is added by each row
    return torch.stack([torch.ones_like(ys), ys], 1), torch.stack([cols, per_row], 1).view(n, 2, w * 2)


def _colour_terms(d: Draws, scale: float, shift: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`Augment._colour` on input stored as s, with x = scale * s + shift in [-1, 1]:
    x' = mat @ s + base + contrast * (mean(s) @ GREY), as (mat [n, 3, 3], base [n, 3], contrast [n, 1])."""
    n = d.bright.shape[0]
    bright, contr, sat = (v.to(dtype).view(n, 1, 1) for v in (d.bright, d.contr, d.sat))
    w = GREY.to(bright)
    mat = contr * bright * (sat * torch.eye(3, dtype=dtype, device=w.device) + (1 - sat) * w)  # on (x + 1)
    contrast = 2 * (1 - contr) * bright  # x' = mat @ (x + 1) + contrast * mean_grey(v) - 1, v = (x + 1) / 2
    base = mat.sum(2) * (shift + 1) - 1 + contrast.view(n, 1) * (shift + 1) / 2 * w.sum()
    return mat * scale, base, contrast.view(n, 1) * scale / 2


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
