"""Offline TensorRT engines (``tensorrt_plan``: FP16, optionally INT8 from the QDQ model), parity-gated.

The cluster does not need them: GPU configs carry ONNX Runtime's TensorRT accelerator, so Triton builds
engines on the GPU that serves them (``export.gpu_accelerator``). An offline engine is only worth it
where it can be checked: the build and the parity gate both run through the ``tensorrt`` Python package
on a CUDA device, and asking for one (``--trt``) anywhere else is an error, never a silent skip.
Engines are specific to the GPU and TensorRT version they are built with (the Triton image's).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig
from faceops.export.onnx_export import ParityReport, gate

log = logging.getLogger(__name__)


class TensorRTUnavailableError(FaceopsError):
    """``--trt`` was asked for where no engine can be built and parity-checked."""


def unavailable_reason() -> str | None:
    """Why no engine can be built and checked here (None when one can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed"
    return None


def require_tensorrt() -> None:
    """Raise :class:`TensorRTUnavailableError` (naming why and what to do) unless engines can be built."""
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailableError(
            f"--trt builds TensorRT engines here and gates them on parity, which needs a CUDA device and the "
            f"tensorrt Python package: {reason}. Drop --trt (trt=false) to export the ONNX models alone: "
            "on a GPU Triton they already run through TensorRT, built by the server "
            "(export.gpu_accelerator=tensorrt); or run the export on a GPU node with TensorRT installed")


def build_engine(onnx_path: str | Path, engine_path: str | Path, cfg: ExportConfig, input_shape: tuple,
                 int8: bool = False) -> Path:
    """Serialise an engine for ``onnx_path`` with a dynamic batch profile 1..max_batch_size.

    ``int8`` expects a QDQ-quantized ONNX (explicit quantization), see :mod:`faceops.export.int8`.
    """
    import tensorrt as trt

    engine_path = Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FaceopsError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.trt_workspace_mb << 20)
    if cfg.trt_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    opt = max(cfg.preferred_batch_sizes or [cfg.max_batch_size])
    profile.set_shape(name, (1, *input_shape), (opt, *input_shape), (cfg.max_batch_size, *input_shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FaceopsError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    log.info("TensorRT engine -> %s (fp16=%s int8=%s)", engine_path, cfg.trt_fp16, int8)
    return engine_path


class TrtRunner:
    """Runs a serialised engine on CUDA torch tensors (input ``input`` -> first output)."""

    def __init__(self, engine_path: str | Path):
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.cuda().float().contiguous()
        self.context.set_input_shape(self.input, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda")
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream()
        self.context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out


def check_engine_parity(name: str, engine_path: str | Path, reference: np.ndarray, batch: torch.Tensor,
                        cfg: ExportConfig) -> ParityReport:
    """Same gate as ONNX, with the reduced-precision tolerances ``trt_parity_*``."""
    out = TrtRunner(engine_path)(batch).cpu().numpy()
    return gate(name, reference, out, cfg, backend="tensorrt", max_abs_tol=cfg.trt_parity_max_abs,
                min_cos_tol=cfg.trt_parity_min_cosine)
