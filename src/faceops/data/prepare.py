"""Face preparation to the HR size: the one function used at ingest, evaluation and serving.

A model trained on faces prepared with a :class:`PrepareConfig` records it as its input contract
(:mod:`faceops.models.contract`), so evaluation and serving prepare faces the same way without
being told.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from faceops.config import check


@dataclass
class PrepareConfig:
    hr_size: int = 112  # side of the square HR face the recognizers take
    center_crop: int | None = None  # centre crop (px) before resizing; LFW deep-funneled: ~100-150 of 250

    def __post_init__(self) -> None:
        check(self.hr_size >= 16, f"prepare.hr_size must be >= 16, got {self.hr_size}")
        check(self.center_crop is None or self.center_crop >= 8,
              f"prepare.center_crop must be >= 8 or null, got {self.center_crop}")


def prepare_face(img: Image.Image, cfg: PrepareConfig) -> np.ndarray:
    """RGB (greyscale converted), centre-cropped, resized to uint8 [hr, hr, 3]."""
    img = img.convert("RGB")
    if cfg.center_crop:
        w, h = img.size
        c = min(cfg.center_crop, w, h)
        left, top = (w - c) // 2, (h - c) // 2
        img = img.crop((left, top, left + c, top + c))
    else:  # non-square sources (ORL is 92x112): centre square keeps the aspect ratio
        w, h = img.size
        c = min(w, h)
        if w != h:
            left, top = (w - c) // 2, (h - c) // 2
            img = img.crop((left, top, left + c, top + c))
    if img.size != (cfg.hr_size, cfg.hr_size):
        img = img.resize((cfg.hr_size, cfg.hr_size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
