"""Load a user's recognizer weights (EdgeFace, ArcFace/iresnet, our own checkpoints) and say exactly
what did and did not load.

Accepted files: a state dict saved with ``torch.save`` (also wrapped as ``{'state_dict': ...}`` or
``{'model': ...}``), read with ``weights_only=True``; or a TorchScript archive (``torch.jit.save``),
whose parameters and buffers are taken. ``module.`` (DDP) and a given ``prefix`` are stripped, then the
model's own ``remap_state_dict`` (e.g. official EdgeFace names) is applied.

Strict by default: any missing, unexpected or shape-mismatched key is an error naming the keys. Seed
004 hit four EdgeFace-XXS keys (``...pos_embd.token_projection.{weight,bias}``) missing from the file
and trained on with whatever the constructor left there; ``init_missing=True`` makes that explicit:
missing weights get Xavier-uniform, biases zeros, norm scales ones, and the report lists them.
"""

from __future__ import annotations

import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from faceops.errors import FaceopsError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")  # where training checkpoints keep the weights
DDP_PREFIX = "module."


class PretrainedLoadError(FaceopsError):
    """The weights file cannot be read or does not fit the model."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did, key by key (model-side names)."""

    path: str
    loaded: list[str] = field(default_factory=list)  # copied from the file
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # "key: file shape -> model shape"; not loaded
    initialized: list[str] = field(default_factory=list)  # missing keys given a fresh init (init_missing)
    ignored: list[str] = field(default_factory=list)  # file keys outside the requested prefix

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{self.path}: loaded {len(self.loaded)} tensors"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape-mismatched", self.mismatched), ("initialised", self.initialized),
                            ("ignored (outside prefix)", self.ignored)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys)}")
        return "; ".join(parts)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedLoadError(
            f"{path}: not a state dict of tensors (nor one under {list(WRAPPER_KEYS)}); "
            "save weights with torch.save(model.state_dict(), path) or torch.jit.save")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state-dict or TorchScript file, on the CPU, keys as stored."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(f"weights file not found: {path}")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, but users still hold such files
            warnings.simplefilter("ignore", FutureWarning)  # FutureWarning in torch 2.14,
            warnings.simplefilter("ignore", DeprecationWarning)  # DeprecationWarning in torch 2.11
            module = torch.jit.load(str(path), map_location="cpu")
        return {**dict(module.named_parameters()), **dict(module.named_buffers())}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, non-tensor objects refused by weights_only
        raise PretrainedLoadError(f"{path}: cannot be read as weights ({type(exc).__name__}: {exc}); "
                                  "expected a torch.save state dict or a TorchScript file") from None
    return _unwrap(obj, path)


def _strip(state: dict[str, torch.Tensor], prefix: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        name = key.removeprefix(DDP_PREFIX)
        if prefix:
            if not name.startswith(prefix):
                ignored.append(key)
                continue
            name = name[len(prefix):]
        out[name] = value
    return out, ignored


def init_tensor_(name: str, tensor: torch.Tensor) -> bool:
    """Fresh init for a missing key: Xavier-uniform weights, zero biases, unit 1-d weights (norm scales).

    Returns False (tensor untouched) for anything else, e.g. BatchNorm running statistics."""
    leaf = name.rsplit(".", 1)[-1]
    with torch.no_grad():
        if leaf == "bias":
            nn.init.zeros_(tensor)
        elif leaf == "weight" and tensor.ndim >= 2:
            nn.init.xavier_uniform_(tensor)
        elif leaf == "weight":
            nn.init.ones_(tensor)
        else:
            return False
    return True


def _local_path(path: str | Path, tmp: str) -> Path:
    text = str(path)
    if "://" not in text or text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    from faceops.storage import split_uri

    store, key = split_uri(text)
    return store.get_file(key, Path(tmp) / Path(key).name)


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True, init_missing: bool = False,
                    prefix: str | None = None) -> LoadReport:
    """Copy the weights in ``path`` (a file path or store URI) into ``model``; see the module docstring.

    Raises :class:`PretrainedLoadError` naming the keys when ``strict`` and the file does not fit
    (missing keys are tolerated with ``init_missing``); the model is left unchanged in that case.
    """
    with tempfile.TemporaryDirectory(prefix="faceops-weights-") as tmp:
        state = read_state_dict(_local_path(path, tmp))
    state, ignored = _strip(state, prefix)
    remap = getattr(model, "remap_state_dict", None)
    if remap is not None:
        state = remap(state)

    target = model.state_dict()
    report = LoadReport(path=str(path), ignored=ignored)
    report.missing = [k for k in target if k not in state]
    report.unexpected = [k for k in state if k not in target]
    report.mismatched = [f"{k}: {tuple(state[k].shape)} -> {tuple(target[k].shape)}"
                         for k in state if k in target and state[k].shape != target[k].shape]
    loadable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}

    if strict and (report.unexpected or report.mismatched or (report.missing and not init_missing)):
        hint = "" if init_missing or not report.missing else "; init_missing=True initialises missing keys"
        raise PretrainedLoadError(f"weights do not fit {type(model).__name__}: {report.summary()}{hint}; "
                                  f"strict=False loads what fits")

    model.load_state_dict(loadable, strict=False)
    report.loaded = list(loadable)
    if init_missing:
        live = model.state_dict(keep_vars=True)
        report.initialized = [k for k in report.missing if init_tensor_(k, live[k].data)]
    return report
