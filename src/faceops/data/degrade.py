"""VLR degradation: HR face -> very-low-resolution view (bicubic, optional blur, noise, JPEG).

:func:`degrade` (Pillow, one face) makes a dataset's VLR views at ingest, seeded per image so a
dataset is reproducible and content-addressed. :func:`degrade_batch` is the same degradation on a
batch of tensors on any device, in Pillow's own integer arithmetic, so DSR training can degrade its
augmented HR faces on the fly into exactly the kind of VLR face ingest stored and evaluation feeds.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from faceops.config import ConfigError, check


def parse_size(size: str) -> tuple[int, int]:
    """``"14x16"`` -> (width 14, height 16); arrays of that view are [16, 14, 3]."""
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise ConfigError(f"size {size!r} must look like WxH, e.g. 32x32 or 14x16") from None
    if w < 4 or h < 4:
        raise ConfigError(f"size {size!r} is too small (min 4x4)")
    return w, h


@dataclass
class DegradeConfig:
    # VLR views to produce, "WxH" (seeds: 32x32 and 14x16)
    sizes: list[str] = field(default_factory=lambda: ["32x32", "14x16"])
    blur_sigma: tuple[float, float] = (0.0, 0.0)  # Gaussian blur sigma range before down-sampling
    noise_std: tuple[float, float] = (0.0, 0.0)  # additive Gaussian noise range (0-255 scale)
    jpeg_quality: tuple[int, int] | None = None  # JPEG round-trip quality range; None = off

    def __post_init__(self) -> None:
        for s in self.sizes:
            try:
                parse_size(s)
            except ValueError as exc:
                check(False, f"degrade.sizes: {exc}")
        check(0 <= self.blur_sigma[0] <= self.blur_sigma[1], "degrade.blur_sigma must be [lo, hi], 0<=lo<=hi")
        check(0 <= self.noise_std[0] <= self.noise_std[1], "degrade.noise_std must be [lo, hi], 0<=lo<=hi")
        if self.jpeg_quality is not None:
            lo, hi = self.jpeg_quality
            check(1 <= lo <= hi <= 100, "degrade.jpeg_quality must be [lo, hi] within 1..100")


def degrade(hr: np.ndarray, size: str, cfg: DegradeConfig, seed: int) -> np.ndarray:
    """uint8 [H, W, 3] HR face -> uint8 [h, w, 3] VLR view."""
    rng = np.random.default_rng(seed)
    w, h = parse_size(size)
    img = Image.fromarray(hr)
    sigma = rng.uniform(*cfg.blur_sigma)
    if sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(float(sigma)))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    std = rng.uniform(*cfg.noise_std)
    if std > 0:
        out = out + rng.normal(0.0, std, out.shape)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if cfg.jpeg_quality is not None:
        out = jpeg_round_trip(out, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return out


def jpeg_round_trip(face: np.ndarray, quality: int) -> np.ndarray:
    """uint8 [h, w, 3] -> the same face saved as a JPEG of ``quality`` (Pillow's defaults) and decoded."""
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)


def upsample_bicubic(vlr: np.ndarray, hr_size: int) -> np.ndarray:
    """The bicubic baseline: VLR uint8 [N, h, w, 3] -> [N, hr, hr, 3]."""
    return np.stack([np.asarray(Image.fromarray(x).resize((hr_size, hr_size), Image.Resampling.BICUBIC))
                     for x in vlr])


# -- the same degradation on a batch of tensors ------------------------------------------------------
# Pillow's arithmetic, so that a deterministic degradation reproduces ingest's bytes (tests compare).
RESAMPLE_BITS = 22  # Resample.c PRECISION_BITS: fractional bits of the 8-bit resampling weights
BLUR_BITS = 24  # BoxBlur.c: fractional bits of the box-blur weights
BLUR_PASSES = 3  # ImageFilter.GaussianBlur: three box blurs per axis approximate the Gaussian
BICUBIC_A = -0.5  # Resample.c bicubic_filter (Keys' a; torch's bicubic uses -0.75)


def _bicubic(x: float) -> float:
    x = abs(x)
    if x < 1.0:
        return ((BICUBIC_A + 2.0) * x - (BICUBIC_A + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    return 0.0


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's BICUBIC resize of one axis as an integer [out, in] weight matrix in its fixed point
    (Resample.c ``precompute_coeffs`` + ``normalize_coeffs_8bpc``, same double arithmetic and order),
    so ``floor((W @ x + 2**21) / 2**22)`` is Pillow's pass bit for bit. Cached (built once per size),
    hence read-only."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened to anti-alias when shrinking
    ss = 1.0 / filterscale
    w = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = [_bicubic((x - center + 0.5) * ss) for x in range(xmin, xmax)]
        total = 0.0
        for v in k:  # summed in Pillow's order: the normalised weights must round as its do
            total += v
        w[xx, xmin:xmax] = [v / total for v in k] if total != 0.0 else k
    one = float(1 << RESAMPLE_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one))
    fixed.setflags(write=False)
    return fixed


def _resize_pass(x: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """One Pillow resampling pass along the last axis of integer-valued float64 ``x``."""
    w = torch.tensor(weights, device=x.device)
    return (x @ w.T).add_(float(1 << (RESAMPLE_BITS - 1))).mul_(2.0 ** -RESAMPLE_BITS).floor_().clamp_(0, 255)


def _box_radius(sigma: torch.Tensor) -> torch.Tensor:
    """BoxBlur.c ``_gaussian_blur_radius`` in its float32/double mix: the (fractional) box radius
    whose three passes approximate a Gaussian of ``sigma`` (float32 in, float32 out)."""
    sigma2 = sigma * sigma / BLUR_PASSES
    big = torch.sqrt(12.0 * sigma2.double() + 1.0).float()
    lo = torch.floor((big.double() - 1.0) / 2.0).float()
    frac = (2 * lo + 1) * (lo * (lo + 1) - 3 * sigma2)
    frac = frac / (6 * (sigma2 - (lo + 1) * (lo + 1)))
    return lo + frac


def _box_kernels(sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """Per-sample integer box weights over offsets ``-reach..reach`` (Pillow's ``ww`` inside the box,
    ``fw`` on its two fractional edge pixels), float64 [N, K, 1, 1, 1]."""
    radius = _box_radius(sigma)
    whole = radius.long()
    ww = torch.trunc(float(1 << BLUR_BITS) / (radius * 2 + 1)).long()  # float32 division, as in C
    fw = ((1 << BLUR_BITS) - (whole * 2 + 1) * ww) // 2
    offset = torch.arange(-reach, reach + 1, device=sigma.device).abs().unsqueeze(0)
    inside, edge = offset <= whole.unsqueeze(1), offset == whole.unsqueeze(1) + 1
    weights = torch.where(inside, ww.unsqueeze(1), torch.where(edge, fw.unsqueeze(1), 0)).double()
    return weights.view(*weights.shape, 1, 1, 1)


def _box_pass(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """One Pillow box-blur pass along the last axis (edges repeated), rounded to 8-bit levels, for
    integer-valued float64 ``x`` [N, C, H, W]: a weighted sum of the K shifted images, every face
    with its own weights (exact: integers below 2**53; on CPUs several times faster than a grouped
    convolution, whose kernels are tiny)."""
    w = x.shape[3]
    reach = kernels.shape[1] // 2
    padded = torch.cat([x[..., :1].expand(-1, -1, -1, reach), x, x[..., -1:].expand(-1, -1, -1, reach)], 3)
    out = padded[..., :w] * kernels[:, 0]
    for k in range(1, kernels.shape[1]):
        out.addcmul_(padded[..., k:k + w], kernels[:, k])
    return out.add_(float(1 << (BLUR_BITS - 1))).mul_(2.0 ** -BLUR_BITS).floor_()  # 2**-24: exact scaling


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """``ImageFilter.GaussianBlur(sigma)`` per sample: three box passes across, then three down."""
    reach = int(_box_radius(torch.tensor([sigma_max], dtype=torch.float32)).item()) + 1
    kernels = _box_kernels(sigma, reach)
    for _ in range(BLUR_PASSES):
        x = _box_pass(x, kernels)
    x = x.transpose(2, 3)
    for _ in range(BLUR_PASSES):
        x = _box_pass(x, kernels)
    return x.transpose(2, 3)


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """:func:`jpeg_round_trip` of each face, on the CPU: the one per-image step (a JPEG codec has no
    batched exact form; at VLR sizes it costs tens of microseconds a face, and only when configured)."""
    faces = x.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.stack([jpeg_round_trip(np.ascontiguousarray(f), q) for f, q in zip(faces, quality.tolist(), strict=True)])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, torch.float64)


def degrade_batch(hr: torch.Tensor, size: str, cfg: DegradeConfig, gen: torch.Generator, start: int = 0,
                  total: int | None = None) -> torch.Tensor:
    """:func:`degrade` for a batch: uint8 [N, 3, H, W] HR faces -> uint8 [N, 3, h, w] VLR faces, on
    ``hr``'s device (``gen`` on the same device).

    Blur and resize are Pillow's integer arithmetic (three-pass box-blur Gaussian, 22-bit fixed-point
    bicubic, rounding between passes), so a deterministic ``cfg`` gives ingest's very bytes. The random
    parameters (blur sigma, noise, JPEG quality) are drawn from ``gen`` for a global batch of
    ``total`` rows of which rows ``start:start+N`` are used, as :class:`~faceops.data.augment.Augment`
    draws, so DDP ranks degrade exactly as one process would; they follow ingest's distributions, not
    its per-image seeds.
    """
    n = hr.shape[0]
    total = total or n
    rows = slice(start, start + n)
    dev = hr.device
    w, h = parse_size(size)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(total, generator=gen, device=dev)[rows] * (hi - lo) + lo

    x = hr.double()
    if cfg.blur_sigma[1] > 0:
        x = _gaussian_blur(x, uniform(*cfg.blur_sigma), cfg.blur_sigma[1])
    if x.shape[3] != w:  # Pillow resizes across first, then down; a same-size axis is left alone
        x = _resize_pass(x, resize_weights(x.shape[3], w))
    if x.shape[2] != h:
        x = _resize_pass(x.transpose(2, 3), resize_weights(x.shape[2], h)).transpose(2, 3)
    if cfg.noise_std[1] > 0:
        std = uniform(*cfg.noise_std).double().view(n, 1, 1, 1)
        noise = torch.randn(total, *x.shape[1:], generator=gen, device=dev)[rows]
        x = torch.round(x + noise.double() * std).clamp_(0, 255)  # round half to even, as np.rint
    if cfg.jpeg_quality is not None:
        lo, hi = cfg.jpeg_quality
        x = _jpeg(x, torch.randint(lo, hi + 1, (total,), generator=gen, device=dev)[rows])
    return x.to(torch.uint8)
