"""Export knobs: parity tolerances, ONNX opset, Triton batching/instances/acceleration and the INT8 gate.

One dataclass so a pipeline config (section ``export``) and the CLI's ``--set`` reach every knob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from faceops.config import check


@dataclass
class ExportConfig:
    # the HR recognizer's Triton name ("recognizer", the serving contract's) and the stem of its variants
    # (<name>_int8, <name>_trt): a pipeline that serves its own model names it (arcface_resnet34), so
    # its promotions never replace what another pipeline serves
    name: str = "recognizer"
    opset: int = 17  # ONNX opset; 17 has LayerNorm and runs on every Triton ORT backend we target
    simplify: bool = False  # run onnxsim on the graph when it is installed (skipped with a note if not)
    parity_max_abs: float = 1e-4  # parity gate: max |onnx - torch| over the batch
    parity_min_cosine: float = 0.9999  # parity gate: min per-row cosine(onnx, torch)
    parity_batch: int = 8  # images in the parity batch (real validation images when a dataset is given)
    max_batch_size: int = 32  # Triton max_batch_size (also the largest batch a client sends)
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])  # dynamic batcher targets
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    # instance_group kind. "auto": KIND_GPU when the target Triton has GPUs (FACEOPS_TRITON_GPUS, which
    # the chart's ConfigMap sets from triton.gpu.count), else KIND_CPU; a CPU Triton cannot load KIND_GPU.
    instance_kind: Literal["auto", "KIND_GPU", "KIND_CPU"] = "auto"
    instance_count: int = 1  # model instances per GPU (or CPU instances)
    num_versions: int = 1  # how many recent exports Triton serves (version_policy specific{...})
    warmup: bool = True  # model_warmup with a zero batch: the first request never pays for loading
    # GPU instances of ONNX models: "tensorrt" lets Triton's ONNX Runtime build TensorRT engines on the
    # serving GPU (trt_fp16, trt_workspace_mb, the engine cache below); "none" runs plain CUDA.
    gpu_accelerator: Literal["tensorrt", "none"] = "tensorrt"
    trt_engine_cache: bool = True  # keep built engines, so a reload of the same model does not rebuild
    trt_engine_cache_path: str = "/tmp/faceops-trt-cache"  # inside Triton's pod (the chart's writable /tmp)
    int8_calib_images: int = 64  # validation images fed to the INT8 calibrator
    int8_max_accuracy_drop: float = 0.02  # INT8 gate: FP32 verification accuracy minus INT8's, at most
    trt_fp16: bool = True  # TensorRT in FP16 (offline engines and Triton's accelerator), else FP32
    trt_workspace_mb: int = 1024  # TensorRT builder workspace
    trt_parity_max_abs: float = 5e-3  # parity gate for FP16/INT8 engines (reduced precision needs slack)
    trt_parity_min_cosine: float = 0.999  # min per-row cosine of engine vs PyTorch
    vlr_resize_mode: Literal["bilinear", "bicubic"] = "bilinear"  # fused VLR model: DSR out -> 112 resize

    def __post_init__(self) -> None:
        check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) is not None,
              f"export.name = {self.name!r}: a Triton model name (letters, digits, '_', '-', '.')")
        check(self.opset >= 13, f"export.opset = {self.opset}: use 13 or newer (17 recommended)")
        check(self.parity_max_abs > 0, f"export.parity_max_abs = {self.parity_max_abs}: must be > 0")
        check(0 < self.parity_min_cosine <= 1,
              f"export.parity_min_cosine = {self.parity_min_cosine}: must be in (0, 1]")
        check(self.parity_batch >= 1, f"export.parity_batch = {self.parity_batch}: must be >= 1")
        check(self.max_batch_size >= 1, f"export.max_batch_size = {self.max_batch_size}: must be >= 1")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        check(not bad, f"export.preferred_batch_sizes {bad} must lie in 1..max_batch_size "
                       f"({self.max_batch_size})")
        check(self.max_queue_delay_us >= 0, "export.max_queue_delay_us must be >= 0")
        check(self.instance_count >= 1, f"export.instance_count = {self.instance_count}: must be >= 1")
        check(self.num_versions >= 1, f"export.num_versions = {self.num_versions}: must be >= 1")
        check(self.trt_workspace_mb >= 1, f"export.trt_workspace_mb = {self.trt_workspace_mb}: must be >= 1")
        check(self.trt_engine_cache_path.startswith("/"),
              f"export.trt_engine_cache_path = {self.trt_engine_cache_path!r}: must be an absolute path "
              "inside the Triton container")
        check(self.int8_calib_images >= 1, "export.int8_calib_images must be >= 1")
        check(self.int8_max_accuracy_drop >= 0, "export.int8_max_accuracy_drop must be >= 0")
