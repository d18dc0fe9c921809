"""Embedders and super-resolvers behind one interface, whatever the model's file format.

Evaluation never branches on the format: a faceops checkpoint (rebuilt by
:func:`faceops.train.checkpoint.load_model`) and its ONNX export (ONNX Runtime, tensor names from the
serving contract: recognizer ``input`` -> ``embedding``, DSR ``input`` -> ``output``) give the same
numbers. Images go in as stored uint8 NHWC and are converted as each model's input contract says
(:mod:`faceops.models.contract`: recorded in checkpoints and ONNX metadata); a model without one is
assumed to take ingest's defaults, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceops.data.tensors import to_uint8
from faceops.devices import resolve_device
from faceops.errors import FaceopsError
from faceops.models.contract import InputContract, from_checkpoint, onnx_contract, vlr_size_of
from faceops.models.embed import Forward, embed_faces, module_forward

log = logging.getLogger(__name__)

ONNX_INPUT = "input"
ONNX_EMBEDDING = "embedding"
ONNX_SR_OUTPUT = "output"

DEVICE_SETTING = "evaluate.device"


class ModelError(FaceopsError):
    """A model file cannot be loaded or is not the kind of model asked for."""


# -- backends ------------------------------------------------------------------------------------
def torch_forward(module: nn.Module, device: str = "auto") -> Forward:
    """``module`` in eval mode on ``device`` (``evaluate.device``), full fp32: figures must match the
    ONNX export within 1e-4. Also the forward of a DSR model (SR images NCHW out)."""
    dev = resolve_device(device, DEVICE_SETTING)
    return module_forward(module.to(dev).eval(), dev)


def _onnx_bytes(uri: str) -> bytes:
    if "://" in uri and not uri.startswith("file://"):
        from faceops.storage import split_uri

        store, key = split_uri(uri)
        return store.get_bytes(key)
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ModelError(f"ONNX model not found: {uri}")
    return path.read_bytes()


def onnx_session(uri: str):
    import onnxruntime as ort

    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(_onnx_bytes(uri), providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
        raise ModelError(f"{uri}: not a loadable ONNX model ({exc})") from exc


def session_contract(session, uri: str) -> InputContract | None:
    """The input contract in an ONNX Runtime session's model metadata (None when it has none)."""
    return onnx_contract(session.get_modelmeta().custom_metadata_map, uri)


def onnx_forward(session, output: str) -> Forward:
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    if ONNX_INPUT not in names_in or output not in names_out:
        raise ModelError(f"ONNX model has inputs {names_in} and outputs {names_out}; expected input "
                         f"'{ONNX_INPUT}' and output '{output}' (export it with `faceops export`)")
    return lambda x: session.run([output], {ONNX_INPUT: x.astype(np.float32, copy=False)})[0]


def is_onnx(uri: str) -> bool:
    return uri.lower().endswith(".onnx")


def _load_checkpoint(uri: str, kind: str) -> tuple[nn.Module, dict]:
    from faceops.train.checkpoint import load_model

    module, meta = load_model(uri)
    if meta.get("kind") != kind:
        raise ModelError(f"{uri} is a {meta.get('kind')!r} checkpoint, expected a {kind!r} model here")
    return module, meta


# -- embedder ------------------------------------------------------------------------------------
@dataclass
class Embedder:
    """uint8 faces [N, H, W, 3] -> L2-normalised float32 embeddings [N, D], batched
    (:func:`~faceops.models.embed.embed_faces`).

    With ``flip`` the embedding is the sum of the image's and its mirror's raw embeddings, then
    L2-normalised (insightface's flip test: a confident view weighs more than a doubtful one).
    """

    forward: Forward
    name: str = "recognizer"
    batch_size: int = 64
    flip: bool = False
    arch: str = ""  # the architecture (checkpoint's model_config.name), the `model` label of its metrics
    contract: InputContract | None = None  # as recorded in the model; None: it records none
    input_contract: InputContract = InputContract()  # what inputs are prepared by (see faceops.models.contract)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return embed_faces(self.forward, images, self.input_contract, batch_size=self.batch_size, flip=self.flip,
                           normalise=True, model=self.name)


def load_embedder(uri: str, batch_size: int = 64, flip: bool = False, device: str = "auto") -> Embedder:
    """A recognizer from a faceops checkpoint or an ``.onnx`` file."""
    if is_onnx(uri):
        session = onnx_session(uri)
        forward, arch, contract = onnx_forward(session, ONNX_EMBEDDING), Path(uri).stem, session_contract(session, uri)
    else:
        module, meta = _load_checkpoint(uri, "recognizer")
        forward, arch = torch_forward(module, device), (meta.get("model_config") or {}).get("name", "")
        contract = from_checkpoint(meta, uri)
    if contract is not None and contract.vlr_size is not None:
        raise ModelError(f"{uri} takes {contract.vlr_size} VLR faces (its input contract), not HR faces: "
                         "it is not a recognizer")
    return Embedder(forward, name=Path(uri).name, batch_size=batch_size, flip=flip, arch=arch, contract=contract,
                    input_contract=contract or InputContract())


# -- super-resolver ------------------------------------------------------------------------------
@dataclass
class SuperResolver:
    """uint8 VLR faces [N, h, w, 3] -> uint8 SR faces [N, 112, 112, 3], batched."""

    forward: Forward
    vlr_size: str  # "WxH" of the input it was trained for
    name: str = "dsr"
    batch_size: int = 64
    contract: InputContract | None = None  # as recorded in the model; None: it records none
    input_contract: InputContract | None = None  # what inputs are prepared by; None: ingest's defaults

    def __post_init__(self) -> None:
        if self.input_contract is None:
            self.input_contract = InputContract(vlr_size=self.vlr_size)

    def upscale(self, vlr: np.ndarray) -> np.ndarray:
        if len(vlr) == 0:
            raise ValueError("no images to super-resolve")
        out = []
        for i in range(0, len(vlr), self.batch_size):
            y = self.forward(self.input_contract.to_input(vlr[i : i + self.batch_size]))
            if not np.isfinite(y).all():
                raise ModelError(f"{self.name} produced NaN/Inf images (a diverged checkpoint?)")
            out.append(to_uint8(torch.from_numpy(y)))
        return np.concatenate(out)


def _onnx_vlr_size(session, uri: str) -> str:
    shape = next(i.shape for i in session.get_inputs() if i.name == ONNX_INPUT)
    h, w = shape[-2:]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise ModelError(f"{uri}: DSR input '{ONNX_INPUT}' has no fixed spatial size ({shape}); cannot tell "
                         "which VLR size it serves")
    return f"{w}x{h}"


def load_super_resolver(uri: str, batch_size: int = 64, device: str = "auto") -> SuperResolver:
    """A DSR model from a faceops checkpoint (``vlr_size`` in its metadata) or an ``.onnx`` file (the
    VLR size read from its input shape)."""
    if is_onnx(uri):
        session = onnx_session(uri)
        forward, size, contract = (onnx_forward(session, ONNX_SR_OUTPUT), _onnx_vlr_size(session, uri),
                                   session_contract(session, uri))
    else:
        module, meta = _load_checkpoint(uri, "dsr")
        size = vlr_size_of(meta)
        if size is None:
            raise ModelError(f"{uri}: DSR checkpoint does not record its vlr_size")
        forward, contract = torch_forward(module, device), from_checkpoint(meta, uri)
    if contract is not None and contract.vlr_size != str(size):
        raise ModelError(f"{uri}: its input contract says {contract.vlr_size} VLR faces but the model takes "
                         f"{size}")
    return SuperResolver(forward, str(size), name=Path(uri).name, batch_size=batch_size, contract=contract,
                         input_contract=contract)


def super_resolvers_by_size(uris: list[str], batch_size: int = 64,
                            device: str = "auto") -> dict[str, SuperResolver]:
    """Load DSR models keyed by the VLR size each one declares; two for one size is an error."""
    by_size: dict[str, SuperResolver] = {}
    for uri in uris:
        sr = load_super_resolver(uri, batch_size, device)
        if sr.vlr_size in by_size:
            raise ModelError(f"two DSR models serve {sr.vlr_size}: {by_size[sr.vlr_size].name} and {uri}")
        by_size[sr.vlr_size] = sr
    return by_size


def require_sizes(by_size: dict[str, SuperResolver], sizes: list[str]) -> None:
    """Every requested VLR size needs its DSR model."""
    missing = [s for s in sizes if s not in by_size]
    if missing:
        have = ", ".join(f"{s} ({m.name})" for s, m in by_size.items()) or "none"
        raise ModelError(f"no DSR model for VLR size(s) {', '.join(missing)}; "
                         f"the given DSR models serve: {have}")
