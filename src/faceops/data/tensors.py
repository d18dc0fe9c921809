"""The one conversion from stored uint8 faces to network input, shared by training, evaluation,
export parity checks and the serving client (so preprocessing never drifts between them)."""

from __future__ import annotations

import numpy as np
import torch

MEAN = 0.5
STD = 0.5


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or HWC) RGB -> float32 NCHW normalised to [-1, 1]."""
    t = torch.as_tensor(images)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {t.dtype}")
    return t.permute(0, 3, 1, 2).float().div_(255.0).sub_(MEAN).div_(STD)  # in place: one float copy, not three


def to_input_numpy(images: np.ndarray) -> np.ndarray:
    """Same as :func:`to_input` for numpy callers (ONNX Runtime, Triton client)."""
    return to_input(images).numpy()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_input` (for SR outputs and sample grids): NCHW [-1,1] -> uint8 NHWC."""
    y = (x.detach().float().clamp(-1, 1) * STD + MEAN).mul(255.0).round()
    return y.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
