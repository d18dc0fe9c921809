"""Checkpoints: one file with everything needed to resume exactly or to serve the model.

Contract (ARCHITECTURE.md): model, head, optimizer, scheduler, scaler, RNG states, step/epoch,
config and the dataset manifest hash, written atomically into the store. A state holding a NaN or
Inf is refused, so a diverged run can never overwrite the last good checkpoint. Loading always uses
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from faceops import config
from faceops.errors import FaceopsError
from faceops.storage import NotFoundError, split_uri

FORMAT = 1


class CheckpointError(FaceopsError):
    pass


class NonFiniteCheckpointError(CheckpointError):
    pass


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def first_non_finite(state: dict) -> str | None:
    """Name of the first floating tensor holding NaN/Inf, or None."""
    for name, t in _tensors(state):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def save_checkpoint(uri: str, state: dict) -> str:
    """Write ``state`` to ``uri`` (``…/last.pt``) atomically; refuse non-finite values."""
    bad = first_non_finite({k: v for k, v in state.items() if k != "rng"})
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to write {uri}: '{bad}' holds NaN/Inf")
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    store, key = split_uri(uri)
    store.put_bytes(key, buf.getvalue())
    return uri


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (local path or store URI), verifying its checksum, weights only."""
    store, key = split_uri(uri)
    try:
        data = store.get_bytes(key)
    except NotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for foreign/corrupt files
        raise CheckpointError(f"{uri} is not a faceops checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "kind" not in ckpt:
        raise CheckpointError(f"{uri} is not a faceops checkpoint (format {FORMAT}); for third-party "
                              "weights use the model's `pretrained` option")
    return ckpt


def build_model(kind: str, model_cfg: dict) -> nn.Module:
    """Rebuild the architecture a checkpoint's config describes."""
    if kind == "recognizer":
        from faceops.models import RecognizerConfig, create_recognizer

        return create_recognizer(config.from_dict(RecognizerConfig, model_cfg, "checkpoint config"))
    if kind == "dsr":
        from faceops.models import DSRConfig, create_dsr

        return create_dsr(config.from_dict(DSRConfig, model_cfg, "checkpoint config"))
    raise CheckpointError(f"unknown checkpoint kind {kind!r} (expected recognizer or dsr)")


def load_model(uri: str, prefer_ema: bool = True) -> tuple[nn.Module, dict]:
    """The model of a checkpoint in eval mode, and its metadata (kind, config, vlr_size, …)."""
    ckpt = load_checkpoint(uri)
    model = build_model(ckpt["kind"], ckpt["model_config"])
    weights = ckpt.get("ema") if prefer_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(weights)
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "head", "optimizer", "scheduler",
                                                        "scaler", "ema", "rng")}
    return model, meta
