"""Serving with a REAL local Triton (the one bundled in nvidia-pytriton): client, ensemble, batching,
errors, gallery and the CLI."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from faceops.data.degrade import DegradeConfig
from faceops.data.prepare import prepare_face
from faceops.data.tensors import to_input, to_input_numpy
from faceops.errors import FaceopsError
from faceops.export import ExportConfig, export_modules, parse_config, run_onnx
from faceops.export.onnx_export import FusedVLR
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.models.contract import ContractConflictError, InputContract
from faceops.serve import (
    FaceClient,
    Gallery,
    InvalidInputError,
    LocalTriton,
    ModelNotFoundError,
    ServerError,
    ServerUnavailableError,
    build_gallery,
    materialise,
)
from faceops.serve.local import free_port
from faceops.storage import LocalStore

pytest.importorskip("pytriton", reason="the local Triton needs nvidia-pytriton: pip install 'faceops[serve]'")
torch.set_num_threads(1)
#: the served models were "trained" on 80 px centre crops (ORL faces are 92x112: far from the default)
CONTRACT = InputContract(center_crop=80)
DSR_CONTRACT = CONTRACT.for_vlr("32x32", DegradeConfig(sizes=["32x32"]))


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    """Synthetic faces (8 people x 4 images, 128 px so the contract's crop matters): serving
    numerics need faces, not real ones, so these tests never skip for want of data."""
    from faceops.data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("faces"), identities=8, images_per_identity=4, seed=3, size=128,
                      progress=False)


def face(root: Path, person: int, k: int) -> Path:
    """Image ``k`` (1-based) of person ``person`` (1-based)."""
    return root / f"id_{person - 1:04d}" / f"{k - 1:04d}.png"


def face_batch(root: Path, people: int, per_person: int) -> tuple[np.ndarray, list[str], list[str]]:
    faces, names, ids = [], [], []
    for p in range(1, people + 1):
        for k in range(1, per_person + 1):
            with Image.open(face(root, p, k)) as img:
                faces.append(prepare_face(img, CONTRACT.prepare_config()))
            names.append(f"s{p}")
            ids.append(f"s{p}/{k}")
    return np.stack(faces), names, ids


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    recognizer = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()
    dsr = create_dsr(DSRConfig(vlr_size="32x32", base_channels=16, residual_blocks=2)).eval()
    return recognizer, dsr


@pytest.fixture(scope="module")
def repo(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "repo"
    cfg = ExportConfig(max_batch_size=32, preferred_batch_sizes=[8, 16, 32], max_queue_delay_us=5000)
    export_modules(models[0], str(path), {"32x32": models[1]}, cfg, contract=CONTRACT,
                   dsr_contracts={"32x32": DSR_CONTRACT})
    return path


@pytest.fixture(scope="module")
def server(repo):
    with LocalTriton(str(repo)) as triton:
        yield triton


@pytest.fixture
def client(server) -> FaceClient:
    return FaceClient(server.grpc_url, timeout=30.0)


def counters(server: LocalTriton, model: str) -> tuple[float, float]:
    """(nv_inference_count, nv_inference_exec_count) of ``model`` from Triton's own metrics."""
    text = server.metrics()

    def value(metric: str) -> float:
        found = re.search(rf'^{metric}{{model="{model}",version="\d+"}} (\S+)$', text, re.M)
        assert found, f"{metric} for {model} missing from {server.metrics_url}"
        return float(found.group(1))

    return value("nv_inference_count"), value("nv_inference_exec_count")


def settled_counters(server: LocalTriton, model: str, timeout_s: float = 15.0) -> tuple[float, float]:
    """Counters once Triton has published every finished request (its metrics refresh every ~2 s)."""
    deadline = time.monotonic() + timeout_s
    last = counters(server, model)
    while time.monotonic() < deadline:
        time.sleep(2.1)
        now = counters(server, model)
        if now == last:
            return now
        last = now
    return last


# -- numerics -------------------------------------------------------------------------------------
def test_grpc_embeddings_equal_ort_in_process_and_pytorch(client, models, repo, faces_root):
    faces, _, _ = face_batch(faces_root, people=3, per_person=3)
    served = client.embed(faces, prepared=True)
    x = to_input_numpy(faces)
    in_process = run_onnx(repo / "recognizer" / "1" / "model.onnx", x)
    with torch.no_grad():
        eager = models[0](torch.from_numpy(x)).numpy()
    assert served.shape == (9, 512) and served.dtype == np.float32
    np.testing.assert_allclose(served, in_process, atol=1e-5, rtol=0)
    np.testing.assert_allclose(served, eager, atol=1e-4, rtol=0)


def test_image_paths_are_prepared_per_the_served_contract_and_http_matches_grpc(server, client, faces_root):
    """The client reads the input contract from the server's model config and crops as it says."""
    assert client.contract() == CONTRACT and client.contract("vlr_face") == DSR_CONTRACT
    paths = [face(faces_root, 1, 1), face(faces_root, 2, 1)]
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        prepared = np.stack([prepare_face(a, CONTRACT.prepare_config()), prepare_face(b, CONTRACT.prepare_config())])
    from_paths = client.embed(paths)  # ORL is 92x112: HR (only images below 112 on both sides are VLR)
    np.testing.assert_allclose(from_paths, client.infer("recognizer", to_input_numpy(prepared)), atol=1e-6)
    over_http = FaceClient(server.http_url, protocol="http")
    assert over_http.contract() == CONTRACT
    np.testing.assert_allclose(over_http.embed(paths), from_paths, atol=1e-6)


def test_a_client_option_contradicting_the_served_contract_names_both(server, client, faces_root, tiny_dataset,
                                                                      capsys):
    from faceops.cli import main

    told = FaceClient(server.grpc_url, prepare={"center_crop": 90})
    with pytest.raises(ContractConflictError, match=r"center_crop = 90.*center_crop = 80"):
        told.embed([face(faces_root, 1, 1)])
    agreeing = FaceClient(server.grpc_url, prepare={"center_crop": 80})
    np.testing.assert_allclose(agreeing.embed([face(faces_root, 1, 1)]), client.embed([face(faces_root, 1, 1)]))
    capsys.readouterr()  # --dataset states the dataset's preparation: the synthetic one has no crop
    assert main(["embed", str(face(faces_root, 1, 1)), "--url", server.grpc_url, "--dataset", tiny_dataset]) == 2
    err = capsys.readouterr().err
    assert "center_crop = null" in err and "center_crop = 80" in err, err
    with pytest.raises(ContractConflictError, match=r"prepare\.center_crop = null.*center_crop = 80"):
        build_gallery(client, tiny_dataset)


def test_vlr_face_equals_dsr_then_recognizer(client, models, faces_root):
    faces, _, _ = face_batch(faces_root, people=2, per_person=2)
    vlr = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.Resampling.BICUBIC)) for f in faces])
    assert client.vlr_size() == (32, 32)
    ensemble = client.embed(vlr)  # 32x32 images are routed to vlr_face
    direct = client.infer("vlr_face", to_input_numpy(vlr))
    hr = client.infer("dsr", to_input_numpy(vlr), output_name="output")
    chained = client.infer("recognizer", hr)
    np.testing.assert_allclose(ensemble, direct, atol=1e-6)
    np.testing.assert_allclose(ensemble, chained, atol=1e-5)
    with torch.no_grad():
        eager = FusedVLR(*reversed(models))(to_input(vlr)).numpy()
    np.testing.assert_allclose(ensemble, eager, atol=1e-4)
    forced = client.embed(faces, vlr=True, prepared=True)  # HR faces degraded like ingest (bicubic to 32x32)
    np.testing.assert_allclose(forced, ensemble, atol=1e-5)


# -- concurrency and dynamic batching -------------------------------------------------------------
@pytest.mark.slow
def test_16_threads_x_200_requests_all_succeed_and_triton_batches_them(server, client, record_property):
    """0 failures under load; requests/s and p50/p99 latency are figures (printed, recorded), never
    asserted: they depend on the machine."""
    threads_n, per_thread = 16, 200
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (threads_n, 1, 3, 112, 112)).astype(np.float32)
    reference = client.infer("recognizer", x[:, 0])
    before = settled_counters(server, "recognizer")
    failures: list[str] = []
    mismatches = [0]
    latencies: list[list[float]] = [[] for _ in range(threads_n)]

    def worker(t: int) -> None:
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                out = client.infer("recognizer", x[t])
            except Exception as exc:  # collected: the assertion below names the first failure
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies[t].append(time.perf_counter() - t0)
            if not np.allclose(out[0], reference[t], atol=1e-5):
                mismatches[0] += 1

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    started = time.perf_counter()
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    wall = time.perf_counter() - started
    assert not failures, f"{len(failures)} requests failed, first: {failures[0]}"
    assert mismatches[0] == 0
    after = settled_counters(server, "recognizer")
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == threads_n * per_thread
    assert executions < inferences, f"no dynamic batching: {executions} executions for {inferences} requests"
    ms = np.concatenate([np.asarray(v) for v in latencies]) * 1e3
    figures = {"requests": int(inferences), "failures": 0, "seconds": round(wall, 2),
               "requests_per_s": round(inferences / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
               "p99_ms": round(float(np.percentile(ms, 99)), 1),
               "mean_batch": round(inferences / max(executions, 1), 2)}
    record_property("load_figures", figures)
    print(f"\nTriton load, 16 threads x 200 requests over gRPC: {figures}")


# -- errors ---------------------------------------------------------------------------------------
def test_wrong_shape_dtype_and_unknown_model_are_clear_errors_and_server_keeps_serving(client, server):
    good = np.zeros((1, 3, 112, 112), np.float32)
    with pytest.raises(InvalidInputError, match=r"recognizer.*\[1, 3, 64, 64\].*(shape|dims)"):
        client.infer("recognizer", np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InvalidInputError, match=r"FP64"):
        client.infer("recognizer", good.astype(np.float64))
    with pytest.raises(ModelNotFoundError, match=r"'no_such_model' is not served"):
        client.infer("no_such_model", good)
    with pytest.raises(InvalidInputError, match="uint8"):
        client.embed([np.zeros((112, 112, 3), np.float32)])
    assert server.running()
    assert client.infer("recognizer", good).shape == (1, 512)


def test_server_down_names_the_url():
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=re.escape(url)):
        down = FaceClient(url, retries=1, retry_backoff_s=0.05, timeout=2)
        down.infer("recognizer", np.zeros((1, 3, 112, 112), np.float32))
    assert time.monotonic() - started < 15
    with pytest.raises(ServerUnavailableError, match="faceops serve"):
        FaceClient(url, protocol="http", retries=0, timeout=2).ready()


def test_one_model_failing_to_load_leaves_the_others_serving(repo, tmp_path):
    """A corrupt model.onnx (checksum fine: what a bad export writes) fails in Triton; a tampered one
    (checksum mismatch) is left out before Triton starts; the ensemble that needs it fails with it.
    The recognizer keeps serving, and per-model readiness says which ones do not."""
    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    store = LocalStore(broken)
    store.put_bytes("vlr_fused/1/model.onnx", b"not an onnx graph")
    (broken / "dsr" / "1" / "model.onnx").write_bytes(b"tampered")  # its sidecar keeps the old sha256
    with LocalTriton(str(broken)) as triton:
        assert triton.models == ["recognizer"]
        assert sorted(triton.failed_models) == ["dsr", "vlr_face", "vlr_fused"]
        assert "checksum mismatch" in triton.failed_models["dsr"]
        assert "INVALID_PROTOBUF" in triton.failed_models["vlr_fused"]
        assert f"{broken}/vlr_fused/1/model.onnx" in triton.failed_models["vlr_fused"]  # the repo, not a tmp copy
        assert "dsr" in triton.failed_models["vlr_face"]
        assert triton.ready() and triton.model_states()["vlr_fused"] == "UNAVAILABLE"

        def status(path: str) -> int:
            try:
                with urllib.request.urlopen(f"http://{triton.http_url}{path}", timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/v2/health/ready") == 200  # the server takes traffic ...
        assert status("/v2/models/recognizer/ready") == 200  # ... for the models that serve
        assert status("/v2/models/vlr_fused/ready") == 400
        face = FaceClient(triton.grpc_url, timeout=30.0)
        assert face.infer("recognizer", np.zeros((2, 3, 112, 112), np.float32)).shape == (2, 512)
        with pytest.raises(ModelNotFoundError, match="vlr_fused"):
            face.infer("vlr_fused", np.zeros((1, 3, 32, 32), np.float32))
        assert triton.running()


def test_no_servable_model_is_an_error_naming_each_failure(repo, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(repo / "recognizer", broken / "recognizer")
    LocalStore(broken).put_bytes("recognizer/1/model.onnx", b"not an onnx graph")
    with pytest.raises(ServerError, match=r"no model of .* loaded.*recognizer.*INVALID_PROTOBUF"):
        LocalTriton(str(broken)).start()


# -- verify / identify / gallery ------------------------------------------------------------------
def test_verify_and_identify_against_a_stored_gallery(client, faces_root, tmp_path):
    faces, names, ids = face_batch(faces_root, people=4, per_person=3)
    embeddings = client.embed(faces, prepared=True)
    labels = np.array([sorted(set(names)).index(n) for n in names])
    uri = Gallery(embeddings, labels, sorted(set(names)), ids, CONTRACT).save(str(tmp_path / "gallery.npz"))
    gallery = Gallery.load(uri)
    assert gallery.contract == CONTRACT
    matches = client.identify(face(faces_root, 3, 2), gallery, top_k=3)  # an enrolled image: itself ranks first
    assert [m.identity for m in matches][0] == "s3" and matches[0].image_id == "s3/2"
    assert matches[0].score == pytest.approx(1.0, abs=1e-5) and len(matches) == 3
    assert len({m.identity for m in matches}) == 3  # one entry per identity
    same = client.verify(face(faces_root, 1, 1), face(faces_root, 1, 1), threshold=0.99)
    assert same.same and same.score == pytest.approx(1.0, abs=1e-5)
    other = Gallery(embeddings, labels, sorted(set(names)), ids, InputContract())  # built from uncropped faces
    with pytest.raises(ContractConflictError, match="gallery was built from faces with center_crop = null"):
        client.identify(face(faces_root, 3, 2), other)


# -- local serving copy and the CLI ---------------------------------------------------------------
def test_materialised_copy_serves_onnx_through_python_backend(repo, tmp_path):
    (repo / "recognizer_trt" / "1").mkdir(parents=True)  # an engine model the local server must skip
    text = (repo / "recognizer" / "config.pbtxt").read_text().replace('"recognizer"', '"recognizer_trt"')
    (repo / "recognizer_trt" / "config.pbtxt").write_text(text.replace("onnxruntime_onnx", "tensorrt_plan"))
    (repo / "recognizer_trt" / "1" / "model.plan").write_bytes(b"engine")
    try:
        served = materialise(str(repo), tmp_path / "local")
    finally:
        for p in sorted((repo / "recognizer_trt").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (repo / "recognizer_trt").rmdir()
    assert served == ["dsr", "recognizer", "vlr_face", "vlr_fused"]
    local = parse_config((tmp_path / "local" / "recognizer" / "config.pbtxt").read_text())
    cluster = parse_config((repo / "recognizer" / "config.pbtxt").read_text())
    assert local.backend == "python" and not local.platform
    assert local.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (local.input, local.output, local.max_batch_size, local.dynamic_batching) == (
        cluster.input, cluster.output, cluster.max_batch_size, cluster.dynamic_batching)
    assert (tmp_path / "local" / "recognizer" / "1" / "model.py").is_file()
    assert parse_config((tmp_path / "local" / "vlr_face" / "config.pbtxt").read_text()) == parse_config(
        (repo / "vlr_face" / "config.pbtxt").read_text())


def test_cli_serve_starts_prints_endpoints_and_stops_on_sigterm(repo, faces_root, tmp_path, capsys):
    ports = [free_port() for _ in range(3)]
    entry = "import sys; from faceops.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", entry, "serve", "--repo", str(repo), "--grpc-port", str(ports[0]),
           "--http-port", str(ports[1]), "--metrics-port", str(ports[2])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "stops the server" in line:
                break
        assert any(f"127.0.0.1:{ports[0]}" in ln for ln in lines), "".join(lines)
        from faceops.cli import main

        metrics = tmp_path / "metrics.json"
        metrics.write_text('{"verification": {"threshold": 0.999}}')
        url = f"127.0.0.1:{ports[0]}"
        capsys.readouterr()
        assert main(["verify", str(face(faces_root, 1, 1)), str(face(faces_root, 1, 1)), "--url", url,
                     "--metrics", str(metrics)]) == 0
        assert capsys.readouterr().out.startswith("same person: score 1.0000 >= threshold 0.9990")
        assert main(["verify", str(face(faces_root, 1, 1)), str(face(faces_root, 2, 1)), "--url", url,
                     "--metrics", str(metrics)]) == 0
        assert capsys.readouterr().out.startswith("different people: score")
        assert main(["verify", str(face(faces_root, 1, 1)), str(face(faces_root, 2, 1)), "--url", url]) == 1
        assert "--metrics" in capsys.readouterr().err
        assert main(["embed", str(face(faces_root, 1, 1)), "--url", url, "--out", str(tmp_path / "e.npy")]) == 0
        assert np.load(tmp_path / "e.npy").shape == (1, 512)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "server stopped" in out


def test_serves_a_repository_read_from_s3(models, s3_bucket):
    repo = f"{s3_bucket}/models"
    export_modules(models[0], repo, {"32x32": models[1]},
                   ExportConfig(max_batch_size=8, preferred_batch_sizes=[8]))
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with LocalTriton(repo) as triton:
        served = FaceClient(triton.grpc_url).infer("recognizer", x)
    with torch.no_grad():
        np.testing.assert_allclose(served, models[0](torch.from_numpy(x)).numpy(), atol=1e-4)


def test_cli_gallery_build_and_identify_on_an_ingested_dataset(server, faces_root, tmp_path, capsys):
    from faceops.cli import main
    from faceops.config import from_dict
    from faceops.data.ingest import IngestConfig, ingest

    source = tmp_path / "people"  # eight people, linked into a source folder
    source.mkdir()
    for p in range(1, 9):
        (source / f"s{p}").symlink_to(faces_root / f"id_{p - 1:04d}")
    cfg = from_dict(IngestConfig, {"degrade": {"sizes": ["32x32"]}, "pairs_per_split": 10, "workers": 1,
                                   "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
                                   "prepare": {"center_crop": CONTRACT.center_crop}})
    dataset = ingest(str(source), "people8", str(tmp_path / "store"), cfg, progress=False).uri
    gallery_uri = f"{dataset.rsplit('/datasets/', 1)[0]}/galleries/people8-test.npz"
    url = server.grpc_url
    assert main(["gallery", "build", dataset, "--out", gallery_uri, "--url", url, "--dataset", dataset]) == 0
    gallery = Gallery.load(gallery_uri)
    assert gallery.embeddings.shape == (len(gallery.labels), 512) and len(gallery.identities) >= 2
    assert gallery.contract == CONTRACT
    enrolled = gallery.image_ids[0]  # an enrolled test image ("s3/1.pgm"): it must come back first
    identity = gallery.identities[gallery.labels[0]]
    capsys.readouterr()
    assert main(["identify", str(source / enrolled), "--gallery", gallery_uri, "--url", url, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"1. {identity} ") and "score 1.0000" in lines[0]


def test_deploy_check_waits_for_the_newest_published_version(models, tmp_path):
    """On a cluster Triton loads a new version at its next poll: the deploy check waits for that
    version (not whatever was served before), and says which ones never came."""
    from faceops.serve.deploy import check_server

    repo = tmp_path / "repo"
    cfg = ExportConfig(max_batch_size=8, preferred_batch_sizes=[8])
    export_modules(models[0], str(repo), cfg=cfg, contract=CONTRACT)
    faces = np.random.default_rng(0).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
    with LocalTriton(str(repo)) as triton:  # serves a copy of v1; never sees later versions
        assert check_server(triton.grpc_url, str(repo), faces)["recognizer_version"] == 1
        export_modules(models[0], str(repo), cfg=cfg, contract=CONTRACT)  # v2 published after start
        with pytest.raises(FaceopsError, match=r"does not serve \['recognizer v2'\] .* after 3 s"):
            check_server(triton.grpc_url, str(repo), faces, timeout_s=3)


@pytest.mark.parametrize(("served", "chosen"), [
    (["recognizer", "dsr", "vlr_face", "vlr_fused"], "vlr_face"),
    (["recognizer", "recognizer_14x16", "dsr_14x16", "vlr_face_14x16", "vlr_fused_14x16"], "vlr_face_14x16"),
    (["recognizer", "vlr_face_14x16", "vlr_face_32x32"], None)])
def test_the_vlr_ensemble_is_the_servers_only_one_or_asked_for(monkeypatch, served, chosen):
    """Triton's repository index (the gRPC JSON form: {"models": [{"name": ...}]}) decides the VLR model
    when none is given; with several sizes served the client asks which, naming them."""
    from faceops.serve.client import ClientError

    class Index:
        def get_model_repository_index(self, as_json=False):
            return {"models": [{"name": n, "state": "READY"} for n in served]}

    client = FaceClient("127.0.0.1:1", retries=0)
    monkeypatch.setattr(client, "_client", lambda: Index())
    if chosen is None:
        with pytest.raises(ClientError, match=r"several VLR ensembles \(vlr_face_14x16, vlr_face_32x32\).*--vlr-model"):
            _ = client.vlr_model
    else:
        assert client.vlr_model == chosen
    assert FaceClient("127.0.0.1:1", vlr_model="vlr_face_32x32").vlr_model == "vlr_face_32x32"
