"""The one way faces become embeddings, whatever runs the network.

Evaluation, the INT8 accuracy gate, the Triton client (and so galleries and the deploy check) and
training's validation compare embeddings with each other; they all call :func:`embed_faces`, so the
input preparation (the model's input contract), batching, insightface's flip test and normalisation
are written once and cannot drift apart. The backend is a :data:`Forward`: a torch module
(:func:`module_forward`), an ONNX Runtime session or a Triton request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from faceops.errors import FaceopsError
from faceops.models.contract import InputContract

#: one batch through the network: float32 NCHW input (as the contract prepares it) -> float outputs
#: (embeddings [n, D]; a DSR network's SR images)
Forward = Callable[[np.ndarray], np.ndarray]


class EmbeddingError(FaceopsError):
    """A model produced embeddings that cannot be compared (NaN or Inf)."""


def embed_faces(forward: Forward, faces: np.ndarray, contract: InputContract | None = None, *,
                batch_size: int = 64, flip: bool = False, normalise: bool = False,
                model: str = "recognizer") -> np.ndarray:
    """uint8 RGB faces [N, H, W, 3] -> float32 embeddings [N, D], ``batch_size`` faces per ``forward``.

    Faces become network input as ``contract`` says (ingest's defaults when None). ``flip`` adds the
    raw embedding of each face's mirror image (insightface's flip test: summed before normalising, so
    a confident view weighs more than a doubtful one). ``normalise`` L2-normalises in float64; a
    NaN/Inf embedding is then an error naming ``model``. Without it the outputs come back as the
    backend gave them (a served recognizer normalises itself; training's validation has its own NaN
    guard).
    """
    if len(faces) == 0:
        raise ValueError("no images to embed")
    contract = contract or InputContract()
    return np.concatenate([_embed_batch(forward, contract.to_input(faces[i:i + batch_size]), flip, normalise, model)
                           for i in range(0, len(faces), batch_size)])


def _embed_batch(forward: Forward, x: np.ndarray, flip: bool, normalise: bool, model: str) -> np.ndarray:
    emb = forward(x)
    if flip:
        emb = emb.astype(np.float64) + forward(np.ascontiguousarray(x[..., ::-1])).astype(np.float64)
    if not normalise:
        return emb.astype(np.float32, copy=False)
    emb = emb.astype(np.float64, copy=False)
    if not np.isfinite(emb).all():
        raise EmbeddingError(f"{model} produced NaN/Inf embeddings (a diverged checkpoint?)")
    return (emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def module_forward(module: nn.Module, device: torch.device, *,
                   input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   exact_fp32: bool = True) -> Forward:
    """``module`` as a :data:`Forward` on ``device``; where it lives and its train/eval mode stay the
    caller's. ``input_fn`` maps the network input first (a DSR network in front of the recognizer).
    ``exact_fp32`` turns TF32 convolutions off on GPUs so figures match the ONNX export within 1e-4; training's
    validation passes False to keep the engine's own precision settings."""

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        flags = torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if exact_fp32 else contextlib.nullcontext()
        with flags:
            t = torch.from_numpy(x).to(device)
            return module(t if input_fn is None else input_fn(t)).float().cpu().numpy()

    return run
