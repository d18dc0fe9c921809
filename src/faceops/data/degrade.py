"""VLR degradation: HR face -> very-low-resolution view (bicubic, optional blur, noise, JPEG).

Seeded per image so a dataset is reproducible and content-addressed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
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
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0],
                                                                                cfg.jpeg_quality[1] + 1)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)
    return out


def upsample_bicubic(vlr: np.ndarray, hr_size: int) -> np.ndarray:
    """The bicubic baseline: VLR uint8 [N, h, w, 3] -> [N, hr, hr, 3]."""
    return np.stack([np.asarray(Image.fromarray(x).resize((hr_size, hr_size), Image.Resampling.BICUBIC))
                     for x in vlr])
