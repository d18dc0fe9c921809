"""Fault and load figures: ingest through a TCP fault proxy in front of a real S3 server, and the local
Triton under 16 client threads x 200 requests.

Ingest of synthetic faces into S3 (moto's server on 127.0.0.1) through ``tests/faultproxy.py`` in each
fault mode: connections reset for 1.5 s, a 2 s stall, the manifest PUT cut mid-body twice, and the
endpoint dead for good at the manifest. Figures: seconds to complete (or to a clear error) and whether
a manifest was published. Triton: failures, requests/s, p50/p99 latency. Behaviour is asserted by
tests/test_faults.py and tests/test_serve.py; this only measures. Run: ``python -m bench.faults``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest
from faceops.data.synth import synthesize
from faceops.errors import FaceopsError
from faceops.export import ExportConfig, export_modules
from faceops.models import RecognizerConfig, create_recognizer
from faceops.serve import FaceClient, LocalTriton
from faceops.storage import open_store
from faceops.storage.s3 import S3Store

from ._runner import save_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faultproxy import FaultProxy, moto_with_auth  # noqa: E402  (test tool, shared with the tests)

FAULTS = {  # name -> (mode, seconds, count, armed at the manifest PUT)
    "reset_1.5s": ("reset", 1.5, None, False),
    "stall_2s": ("stall", 2.0, None, False),
    "manifest_put_cut_x2": ("cut_request", None, 2, True),
    "dead_at_manifest": ("reset", None, None, True),
}


def ingest_under_faults(faces: Path) -> dict:
    out = {}
    with moto_with_auth() as env:
        os.environ.update(env)
        for i, (name, (mode, seconds, count, at_manifest)) in enumerate(FAULTS.items()):
            bucket = f"s3://faults-{i}"
            S3Store.from_uri(bucket, create_bucket=True).exists("-")  # the bucket, made directly
            with FaultProxy(env["FACEOPS_S3_ENDPOINT"]) as proxy:
                os.environ.update({"FACEOPS_S3_ENDPOINT": proxy.endpoint, "FACEOPS_S3_READ_TIMEOUT": "1",
                                   "FACEOPS_S3_CONNECT_TIMEOUT": "1", "FACEOPS_S3_ATTEMPTS": "3"})
                if at_manifest:
                    proxy.arm(b"/manifest.json", mode, seconds=seconds, count=count)
                else:
                    proxy.set(mode, seconds=seconds, count=count)
                t0 = time.monotonic()
                try:
                    cfg = IngestConfig(train_classes=TrainClassConfig(rule="all"))
                    ingest(str(faces), "faults", bucket, cfg, progress=False)
                    outcome = "completed"
                except FaceopsError as exc:
                    outcome = f"error: {str(exc)[:90]}"
                seconds_taken = round(time.monotonic() - t0, 2)
            os.environ["FACEOPS_S3_ENDPOINT"] = env["FACEOPS_S3_ENDPOINT"]
            published = open_store(f"{bucket}/datasets/faults").exists("manifest.json")
            out[name] = {"outcome": outcome, "seconds": seconds_taken, "manifest_published": published}
            print(f"ingest {name}: {out[name]}", flush=True)
    return out


def triton_load(threads_n: int = 16, per_thread: int = 200) -> dict:
    torch.manual_seed(0)
    model = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()
    with tempfile.TemporaryDirectory(prefix="faceops-bench-faults-") as tmp:
        export_modules(model, f"{tmp}/repo", cfg=ExportConfig(max_batch_size=32, instance_kind="KIND_CPU"))
        with LocalTriton(f"{tmp}/repo") as server:
            client = FaceClient(server.grpc_url, timeout=60)
            x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32)
            client.infer("recognizer", x)
            lat: list[float] = []
            failures = [0]
            lock = threading.Lock()

            def worker() -> None:
                mine, bad = [], 0
                for _ in range(per_thread):
                    t0 = time.perf_counter()
                    try:
                        client.infer("recognizer", x)
                        mine.append(time.perf_counter() - t0)
                    except FaceopsError:
                        bad += 1
                with lock:
                    lat.extend(mine)
                    failures[0] += bad

            pool = [threading.Thread(target=worker) for _ in range(threads_n)]
            t0 = time.perf_counter()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"requests": threads_n * per_thread, "failures": failures[0], "requests_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="faceops-bench-faults-") as tmp:
        faces = synthesize(Path(tmp) / "faces", identities=12, images_per_identity=6, seed=0, progress=False)
        figures = {"ingest_s3": ingest_under_faults(faces)}
    figures["triton_16x200"] = triton_load()
    save_result("faults", figures, notes="moto S3 server + tests/faultproxy.py on 127.0.0.1 (1 s timeouts, "
                "3 attempts); Triton = nvidia-pytriton's server, edgeface_xxs recognizer, batch-1 requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
