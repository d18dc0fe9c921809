"""Export: ONNX with a parity gate, INT8, TensorRT, and the Triton model repository."""

from faceops.export.api import CalibData, export_model, export_modules
from faceops.export.config import ExportConfig
from faceops.export.int8 import Int8AccuracyError, Int8Report, int8_accuracy_change, quantize_int8
from faceops.export.onnx_export import (
    FusedVLR,
    ParityError,
    ParityReport,
    check_parity,
    compare,
    export_onnx,
    run_onnx,
)
from faceops.export.tensorrt import TensorRTUnavailableError
from faceops.export.triton_repo import (
    TRITON_GPUS_ENV,
    ModelConfigError,
    accelerator_precision,
    parse_config,
    publish,
    resolve_instance_kind,
    validate_repository,
    versions,
)

__all__ = [
    "TRITON_GPUS_ENV", "CalibData", "ExportConfig", "FusedVLR", "Int8AccuracyError", "Int8Report",
    "ModelConfigError", "ParityError", "ParityReport", "TensorRTUnavailableError", "accelerator_precision",
    "check_parity", "compare", "export_model", "export_modules", "export_onnx", "int8_accuracy_change",
    "parse_config", "publish", "quantize_int8", "resolve_instance_kind", "run_onnx", "validate_repository",
    "versions",
]
