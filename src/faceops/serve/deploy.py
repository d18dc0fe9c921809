"""The deploy step: prove the repository is served correctly, locally or on the cluster.

On a cluster Triton polls the model repository in MinIO, so deploying is publishing the repository
(the export step) and then checking the live server; locally the bundled Triton is started on the
repository for the check and stopped again. Either way the served embeddings must equal ONNX Runtime
on the same ``model.onnx`` — the same parity promise the export step makes against PyTorch.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import onnxruntime as ort

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig
from faceops.export.onnx_export import run_onnx
from faceops.export.triton_repo import accelerator_precision, served_versions, validate_repository
from faceops.models.embed import embed_faces
from faceops.retry import poll
from faceops.serve.client import RECOGNIZER, FaceClient
from faceops.storage import open_store

log = logging.getLogger(__name__)

SERVE_TOLERANCE = 1e-4  # max |gRPC - in-process ORT| on the embeddings, FP32 serving
# Served through ORT's TensorRT accelerator in reduced precision: the export parity gate's slack
REDUCED_PRECISION_TOLERANCE = ExportConfig().trt_parity_max_abs
SERVER_POLL_S = 1.0  # how often the check asks whether the server answers
MODEL_POLL_S = 2.0  # ... and whether it serves the newest versions (Triton polls its repository slowly)


def _sample_faces(dataset_uri: str | None, n: int) -> np.ndarray:
    if dataset_uri:
        from faceops.data.reader import load_split

        return load_split(dataset_uri, "test", views=["hr"]).hr[:n]
    return np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def check_server(url: str, repo_uri: str, faces: np.ndarray, timeout_s: float = 120.0) -> dict:
    """Every repository model READY on ``url``; recognizer embeddings equal ORT in-process."""
    store = open_store(repo_uri)
    configs = validate_repository(store)
    models = sorted(configs)
    client = FaceClient(url, timeout=30.0)
    deadline = time.monotonic() + timeout_s
    if not poll(client.ready, timeout_s=timeout_s, interval_s=SERVER_POLL_S):
        raise FaceopsError(f"Triton at {url} is not ready after {timeout_s:.0f} s")
    grpc = client._client()
    # Triton picks a new version up at its next repository poll (plus a TensorRT build): wait for the
    # newest published version of every model, not for whatever it served before.
    wanted = {m: str(served_versions(store, m, configs[m])[-1]) for m in models}
    not_ready = poll(lambda: [f"{m} v{v}" for m, v in wanted.items() if not grpc.is_model_ready(m, v)],
                     lambda left: not left, timeout_s=deadline - time.monotonic(), interval_s=MODEL_POLL_S)
    if not_ready:  # the server keeps serving the others (--exit-on-error=false)
        raise FaceopsError(f"Triton at {url} does not serve {not_ready} from {repo_uri} after "
                           f"{timeout_s:.0f} s (check the server's model-control mode and its log)")
    latest = int(wanted[RECOGNIZER])
    session = ort.InferenceSession(store.get_bytes(f"{RECOGNIZER}/{latest}/model.onnx"),
                                   providers=["CPUExecutionProvider"])
    # one request for the whole batch (its latency is reported); the same inputs both ways
    t0 = time.perf_counter()
    served = embed_faces(lambda x: client.infer(RECOGNIZER, x), faces, batch_size=len(faces))
    latency_ms = (time.perf_counter() - t0) * 1e3
    reference = embed_faces(lambda x: run_onnx(session, x), faces, batch_size=len(faces))
    diff = float(np.abs(served - reference).max())
    precision = accelerator_precision(configs[RECOGNIZER]) or "FP32"
    tolerance = SERVE_TOLERANCE if precision == "FP32" else REDUCED_PRECISION_TOLERANCE
    if diff > tolerance:
        raise FaceopsError(f"served embeddings differ from {RECOGNIZER} v{latest} in-process by {diff:.2e} "
                           f"(> {tolerance:g} for {precision} serving)")
    log.info("deploy check on %s: %d models ready, max |served - onnx| %.2e, batch %d in %.1f ms", url,
             len(models), diff, len(faces), latency_ms)
    return {"url": url, "models": models, "models_ready": len(models), "max_abs_diff": diff,
            "batch": len(faces), "latency_ms": latency_ms, "recognizer_version": latest}


def smoke_test(repo_uri: str, dataset_uri: str | None = None, triton_url: str | None = None,
               n: int = 8) -> dict:
    faces = _sample_faces(dataset_uri, n)
    if triton_url:
        return check_server(triton_url, repo_uri, faces)
    from faceops.serve.local import LocalTriton

    with LocalTriton(repo_uri) as server:
        if server.failed_models:  # the local server keeps serving the others; a deploy check does not pass
            raise FaceopsError(f"{repo_uri}: model(s) failed to load: " + "; ".join(
                f"{name}: {why}" for name, why in sorted(server.failed_models.items())) +
                " — re-export them with 'faceops export'")
        return {**check_server(server.grpc_url, repo_uri, faces), "url": "local (stopped after the check)"}
