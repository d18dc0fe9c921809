"""The one reading of a ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``), for training and
evaluation alike.

A CUDA device asked for on a machine without it is an error, never a silent fall-back to the CPU:
a job sized for a GPU would run for days instead of failing in a second.
"""

from __future__ import annotations

import os

import torch

from faceops.config import ConfigError


class DeviceError(ConfigError):
    """A device setting names a device this machine does not have (or no device at all)."""


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """``auto``: the GPU when CUDA is available, else the CPU; anything else as torch reads it, checked
    against this machine. Errors name ``setting`` (e.g. ``engine.device``) and what to use instead."""
    if name == "auto":
        return _this_rank(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{setting}={name!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{setting}={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{setting}={name!r} but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1}); use one of them, 'auto' or 'cpu'")
    return _this_rank(device)


def _this_rank(device: torch.device) -> torch.device:
    """Under torchrun (``WORLD_SIZE > 1``) an unnumbered ``cuda`` is this rank's GPU (``LOCAL_RANK``),
    made the current device so that everything built before DDP (frozen networks, CUDA contexts)
    lands there, as torchvision's ``init_distributed_mode`` does."""
    if device.type != "cuda" or device.index is not None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
