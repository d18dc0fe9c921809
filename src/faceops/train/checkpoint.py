"""Checkpoints: one file with everything needed to resume exactly or to serve the model.

Contract (ARCHITECTURE.md): model, head, optimizer, scheduler, scaler, RNG states, step/epoch,
config and the dataset manifest hash, written atomically into the store. A state holding a NaN or
Inf is refused, so a diverged run can never overwrite the last good checkpoint. Loading always uses
``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from faceops import config
from faceops.errors import FaceopsError
from faceops.storage import NotFoundError, StoreError, split_uri

FORMAT = 1


class CheckpointError(FaceopsError):
    pass


class NonFiniteCheckpointError(CheckpointError):
    pass


class CheckpointNotFoundError(CheckpointError):
    pass


def named_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state (dicts, lists, tuples) with its dotted path."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from named_tensors(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{path}[{i}]")


def first_non_finite(state: dict) -> str | None:
    """Name of the first floating tensor holding NaN/Inf, or None."""
    for name, t in named_tensors(state):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


def save_checkpoint(uri: str, state: dict, copies: tuple[str, ...] = ()) -> str:
    """Write ``state`` to ``uri`` (``…/last.pt``) atomically, first to each of ``copies`` (the
    history that resume falls back on); refuse non-finite values."""
    bad = first_non_finite({k: v for k, v in state.items() if k != "rng"})
    if bad is not None:
        raise NonFiniteCheckpointError(f"refusing to write {uri}: '{bad}' holds NaN/Inf")
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    for target in (*copies, uri):
        store, key = split_uri(target)
        store.put_bytes(key, data)
    return uri


HISTORY = "checkpoints"  # <out>/checkpoints/step-00000123.pt: the last K good states


def history_uri(out_uri: str, step: int) -> str:
    return f"{out_uri.rstrip('/')}/{HISTORY}/step-{step:08d}.pt"


def history(out_uri: str) -> list[str]:
    """URIs of the kept checkpoints below ``out_uri``, newest first."""
    out_uri = out_uri.rstrip("/")
    store, key = split_uri(f"{out_uri}/{HISTORY}/")
    names = sorted((k.rsplit("/", 1)[-1] for k in store.list(key)
                    if re.fullmatch(r"step-\d{8}\.pt", k.rsplit("/", 1)[-1])), reverse=True)
    return [f"{out_uri}/{HISTORY}/{n}" for n in names]


def prune_history(out_uri: str, keep: int) -> None:
    for uri in history(out_uri)[keep:]:
        store, key = split_uri(uri)
        store.delete(key)


def load_newest_good(out_uri: str, map_location: str | torch.device = "cpu",
                     on_bad: Callable[[str, str], None] | None = None) -> tuple[str, dict] | None:
    """The newest readable checkpoint of a run: ``last.pt``, else the kept history, newest first.

    None only when there is no checkpoint at all (a fresh run). A corrupt or unreadable file is
    reported through ``on_bad(uri, reason)`` and skipped; when every file is bad this raises, naming
    them: training never silently restarts over a run's checkpoints.
    """
    bad: list[tuple[str, str]] = []
    for uri in [f"{out_uri.rstrip('/')}/last.pt", *history(out_uri)]:
        try:
            return uri, load_checkpoint(uri, map_location=map_location)
        except CheckpointNotFoundError:
            continue
        except CheckpointError as exc:
            bad.append((uri, str(exc)))
            if on_bad:
                on_bad(uri, str(exc))
    if bad:
        files = "; ".join(reason for _, reason in bad)
        raise CheckpointError(f"no readable checkpoint in {out_uri} ({files}): move these files away to start "
                              "from scratch, or restore one from a backup")
    return None


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (local path or store URI), verifying its checksum, weights only."""
    store, key = split_uri(uri)
    try:
        data = store.get_bytes(key)
    except NotFoundError:
        raise CheckpointNotFoundError(f"checkpoint not found: {uri}") from None
    except StoreError as exc:  # e.g. its sha256 sidecar does not match: a torn or modified file
        raise CheckpointError(f"{uri} is unreadable ({exc})") from None
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
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:  # e.g. an EdgeFace gamma checkpoint from before heads were factorised
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(f"{uri}: its weights do not fit the {ckpt['model_config'].get('name', ckpt['kind'])} "
                              f"that this faceops builds ({first}); it was written by an older faceops: "
                              "retrain, or use the faceops version that wrote it") from None
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model", "head", "optimizer", "scheduler",
                                                        "scaler", "ema", "rng")}
    return model, meta
