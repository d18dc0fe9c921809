"""PyTorch -> ONNX with the serving contract's tensor names, a dynamic batch axis and a parity gate.

The parity gate runs ONNX Runtime and PyTorch on the same real batch and refuses an export whose
outputs drift (max abs difference, min per-row cosine), so a broken graph never reaches Triton.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig

log = logging.getLogger(__name__)

HR_SIZE = 112

#: Triton/ONNX tensor names per model kind (ARCHITECTURE.md, "Serving").
TENSOR_NAMES: dict[str, tuple[str, str]] = {
    "recognizer": ("input", "embedding"),
    "dsr": ("input", "output"),
    "vlr_fused": ("input", "embedding"),
}


class ParityError(FaceopsError):
    """ONNX Runtime and PyTorch disagree beyond the configured tolerance."""


@dataclass(frozen=True)
class ParityReport:
    model: str
    max_abs: float
    min_cosine: float
    batch: int
    backend: str  # "onnxruntime" or "tensorrt"

    def as_dict(self) -> dict:
        return asdict(self)


class FusedVLR(nn.Module):
    """DSR -> resize to the recognizer's 112x112 -> recognizer, as one graph (one ONNX file)."""

    def __init__(self, dsr: nn.Module, recognizer: nn.Module, mode: str = "bilinear"):
        super().__init__()
        self.dsr, self.recognizer, self.mode = dsr, recognizer, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hr = self.dsr(x)
        if hr.shape[-2:] != (HR_SIZE, HR_SIZE):
            hr = F.interpolate(hr, size=(HR_SIZE, HR_SIZE), mode=self.mode, align_corners=False)
        return self.recognizer(hr)


def embedding_dim(recognizer: nn.Module, example: torch.Tensor) -> int:
    """The recognizer's output width, taken from the model (``recognizer.embedding_dim`` is
    configurable), never assumed: its ``embedding_dim`` attribute, checked against one forward pass."""
    with torch.no_grad():
        width = int(recognizer.eval().cpu()(example[:1].cpu()).shape[-1])
    declared = getattr(recognizer, "embedding_dim", None)
    if declared is not None and int(declared) != width:
        raise FaceopsError(f"the recognizer declares embedding_dim={declared} but outputs {width} values")
    return width


def export_onnx(module: nn.Module, path: str | Path, example: torch.Tensor, kind: str,
                cfg: ExportConfig) -> Path:
    """Export ``module`` (eval mode, CPU) with the contract names of ``kind``; check the graph."""
    if kind not in TENSOR_NAMES:
        raise FaceopsError(f"unknown model kind {kind!r} (known: {', '.join(TENSOR_NAMES)})")
    in_name, out_name = TENSOR_NAMES[kind]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval().cpu()
    with torch.no_grad():
        torch.onnx.export(
            module, (example.cpu(),), str(path), input_names=[in_name], output_names=[out_name],
            dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}}, opset_version=cfg.opset,
            do_constant_folding=True, dynamo=False,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    if cfg.simplify:
        model = _simplify(model, path)
    log.info("exported %s -> %s (opset %d)", kind, path, cfg.opset)
    return path


def _simplify(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        import onnxsim
    except ImportError:
        log.warning("export.simplify: onnxsim is not installed (pip install onnxsim); graph left as exported")
        return model
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        log.warning("onnxsim could not validate the simplified graph of %s; keeping the original", path)
        return model
    onnx.save(simplified, str(path))
    return simplified


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None,
                allow_spinning: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=providers or ["CPUExecutionProvider"])


def run_onnx(path_or_session, x: np.ndarray) -> np.ndarray:
    sess = ort_session(path_or_session) if isinstance(path_or_session, str | Path) else path_or_session
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min per-row cosine) between two output batches."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    max_abs = float(np.max(np.abs(ref - cand)))
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = np.sum(ref * cand, axis=1) / np.maximum(denom, 1e-12)
    return max_abs, float(np.min(cosine))


def gate(name: str, reference: np.ndarray, candidate: np.ndarray, cfg: ExportConfig,
         backend: str = "onnxruntime", max_abs_tol: float | None = None,
         min_cos_tol: float | None = None) -> ParityReport:
    """Compare and raise :class:`ParityError` naming the model and figures past tolerance."""
    if reference.shape != candidate.shape:
        raise ParityError(f"parity gate for {name} ({backend}): output shape {candidate.shape} "
                          f"differs from PyTorch's {reference.shape}")
    max_abs, min_cos = compare(reference, candidate)
    tol_abs = cfg.parity_max_abs if max_abs_tol is None else max_abs_tol
    tol_cos = cfg.parity_min_cosine if min_cos_tol is None else min_cos_tol
    report = ParityReport(name, max_abs, min_cos, len(reference), backend)
    if not (max_abs <= tol_abs and min_cos >= tol_cos):
        raise ParityError(
            f"parity gate failed for {name} ({backend} vs PyTorch on {len(reference)} images): "
            f"max abs diff {max_abs:.3g} (tolerance {tol_abs:g}), min cosine {min_cos:.6f} "
            f"(tolerance {tol_cos:g}); the exported graph does not reproduce the model — do not serve it"
        )
    log.info("parity %s (%s): max abs %.2e, min cosine %.7f", name, backend, max_abs, min_cos)
    return report


def check_parity(name: str, onnx_path: str | Path, module: nn.Module, batch: torch.Tensor,
                 cfg: ExportConfig) -> ParityReport:
    """ONNX Runtime vs PyTorch on ``batch`` (float NCHW, already normalised)."""
    with torch.no_grad():
        reference = module.eval().cpu()(batch.cpu()).numpy()
    candidate = run_onnx(onnx_path, batch.numpy())
    return gate(name, reference, candidate, cfg)
