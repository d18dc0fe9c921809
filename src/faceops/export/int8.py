"""INT8 post-training quantization (ONNX Runtime, static, QDQ) and its accuracy gate.

Calibrated on real validation faces; the verification accuracy of the INT8 model is measured at the
FP32 model's threshold (the one a deployment uses) and the drop is gated by
``ExportConfig.int8_max_accuracy_drop``. Faces are normalised as the FP32 file's input contract says,
and the INT8 file carries the same contract.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig
from faceops.export.onnx_export import ort_session, run_onnx
from faceops.models.contract import InputContract, onnx_file_contract, write_onnx_contract
from faceops.models.embed import embed_faces

log = logging.getLogger(__name__)

Pair = tuple[int, int, bool]


class Int8AccuracyError(FaceopsError):
    """The INT8 model loses more verification accuracy than the configured threshold allows."""


@dataclass(frozen=True)
class Int8Report:
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_change: float  # int8 - fp32 (negative = loss)
    threshold: float  # the FP32 best-accuracy threshold both are scored at
    pairs: int
    calib_images: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 NHWC faces, in small batches."""

    def __init__(self, input_name: str, images: np.ndarray, contract: InputContract, batch: int = 8):
        self.input_name, self.images, self.batch, self.pos = input_name, images, batch, 0
        self.contract = contract

    def get_next(self):
        if self.pos >= len(self.images):
            return None
        chunk = self.images[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return {self.input_name: self.contract.to_input(chunk)}

    def rewind(self) -> None:
        self.pos = 0


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calib_images: np.ndarray,
                  cfg: ExportConfig) -> Path:
    """Static QDQ INT8 (per-channel int8 weights, int8 activations) calibrated on ``calib_images``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calib_images.ndim != 4 or calib_images.dtype != np.uint8:
        raise FaceopsError(f"INT8 calibration needs uint8 NHWC faces, got {calib_images.dtype} "
                           f"{calib_images.shape}")
    images = calib_images[: cfg.int8_calib_images]
    name = ort_session(fp32_path).get_inputs()[0].name
    contract = onnx_file_contract(fp32_path)
    quantize_static(
        str(fp32_path), str(int8_path), _Calibration(name, images, contract or InputContract()),
        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        per_channel=True, calibrate_method=CalibrationMethod.MinMax,
    )
    if contract is not None:
        write_onnx_contract(int8_path, contract)
    log.info("INT8 model -> %s (calibrated on %d images)", int8_path, len(images))
    return Path(int8_path)


def pair_scores(embeddings: np.ndarray, pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and genuine flags of ``pairs`` (embeddings need not be normalised)."""
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    idx = np.asarray([(a, b) for a, b, _ in pairs], dtype=np.int64)
    same = np.asarray([g for _, _, g in pairs], dtype=bool)
    return np.sum(e[idx[:, 0]] * e[idx[:, 1]], axis=1), same


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of ``score >= threshold`` == same."""
    candidates = np.concatenate([np.unique(scores), [np.inf]])
    accs = np.array([np.mean((scores >= t) == same) for t in candidates])
    i = int(np.argmax(accs))
    return float(candidates[i]), float(accs[i])


def embed_onnx(path: str | Path, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Embeddings of uint8 faces, normalised as the file's input contract says."""
    sess = ort_session(path)
    return embed_faces(lambda x: run_onnx(sess, x), images, onnx_file_contract(path), batch_size=batch)


def int8_accuracy_change(fp32_path: str | Path, int8_path: str | Path, images: np.ndarray,
                         pairs: list[Pair], calib_images: int, cfg: ExportConfig) -> Int8Report:
    """Verification accuracy of both models on ``pairs``; raise past the configured drop."""
    if not pairs:
        raise FaceopsError("INT8 accuracy check needs verification pairs (the dataset's val split has none)")
    s32, same = pair_scores(embed_onnx(fp32_path, images), pairs)
    s8, _ = pair_scores(embed_onnx(int8_path, images), pairs)
    threshold, acc32 = best_threshold(s32, same)
    acc8 = float(np.mean((s8 >= threshold) == same))
    report = Int8Report(acc32, acc8, acc8 - acc32, threshold, len(pairs), calib_images)
    log.info("INT8 verification accuracy %.4f vs FP32 %.4f (change %+.4f) on %d pairs",
             acc8, acc32, acc8 - acc32, len(pairs))
    if acc32 - acc8 > cfg.int8_max_accuracy_drop:
        raise Int8AccuracyError(
            f"INT8 model {int8_path} loses {acc32 - acc8:.4f} verification accuracy ({acc32:.4f} -> "
            f"{acc8:.4f} on {len(pairs)} pairs), more than export.int8_max_accuracy_drop = "
            f"{cfg.int8_max_accuracy_drop}; calibrate on more images or serve FP32"
        )
    return report
