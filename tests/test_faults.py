"""Fault injection on the S3 path: a real TCP fault proxy (tests/faultproxy.py) between the faceops S3
store and moto resets, cuts and stalls connections during ingest and export; 8 writers ingest the
same dataset at once. Whatever happens, a reader sees a complete dataset / model version or none."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faultproxy import FaultProxy

from faceops.data.ingest import MANIFEST, IngestConfig, IngestError, TrainClassConfig, ingest
from faceops.data.reader import load_split
from faceops.data.synth import synthesize
from faceops.storage import LocalStore, ObjectStore, StoreError, open_store
from faceops.storage.s3 import S3Settings, S3Store

torch.set_num_threads(1)
DATASET = "faces"
PREFIX = f"datasets/{DATASET}"
CFG = IngestConfig(train_classes=TrainClassConfig(rule="all"), pairs_per_split=10, workers=1)


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("faults") / "faces", identities=6, images_per_identity=4,
                      seed=7, progress=False)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote shards are cached by content hash: a shared cache would hide the GETs under test."""
    monkeypatch.setenv("FACEOPS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def proxy(moto_s3: dict[str, str]) -> Iterator[FaultProxy]:
    with FaultProxy(moto_s3["FACEOPS_S3_ENDPOINT"]) as p:
        yield p


def through(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, attempts: int = 5) -> None:
    """Point faceops at the proxy with short timeouts, so a stall costs a second, not 30."""
    monkeypatch.setenv("FACEOPS_S3_ENDPOINT", proxy.endpoint)
    monkeypatch.setenv("FACEOPS_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("FACEOPS_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("FACEOPS_S3_ATTEMPTS", str(attempts))


def direct(moto_s3: dict[str, str], uri: str) -> S3Store:
    """A reader that bypasses the proxy: what the rest of the world sees in the bucket."""
    return S3Store.from_uri(uri, settings=S3Settings.from_env(moto_s3))


def complete_dataset(store: ObjectStore) -> dict:
    """The published manifest, after checking every shard it names against its sha256."""
    manifest = json.loads(store.get_bytes(f"{PREFIX}/{MANIFEST}"))
    for split in manifest["shards"].values():
        for shard in split:
            for f in shard["files"].values():
                store.get_bytes(f"{PREFIX}/{f['key']}", sha256=f["sha256"])
    return manifest


class Watcher:
    """Polls the bucket (bypassing the proxy) while a stage runs: the moment a manifest is visible,
    everything it names must already be there and intact."""

    def __init__(self, store: ObjectStore):
        self.store, self.violations, self.seen = store, [], False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and not self.seen:
            try:
                if self.store.exists(f"{PREFIX}/{MANIFEST}"):
                    self.seen = True
                    complete_dataset(self.store)
            except Exception as exc:  # reported by the test
                self.violations.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.02)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(10)
        return self.violations


# -- ingest ---------------------------------------------------------------------------------------
def manifest_put(bucket_uri: str) -> bytes:
    """The request line of the manifest's PUT (path-style addressing): the publishing moment."""
    return f"PUT /{bucket_uri[len('s3://'):]}/{PREFIX}/{MANIFEST} ".encode()


INGEST_FAULTS = {  # id: (trigger, mode, seconds, count)
    "reset": (b"/shards/", "reset", 1.5, None),  # 1.5 s of resets from the first shard PUT on
    "stall": (b"/shards/", "stall", 2.0, None),  # 2 s of silence from the first shard PUT on
    "cut": (None, "cut_request", None, 2),  # the manifest PUT and its first retry cut mid-body
}


@pytest.mark.parametrize("fault", list(INGEST_FAULTS))
def test_ingest_completes_once_the_faults_end(fault, faces, proxy, moto_s3, s3_bucket, monkeypatch):
    trigger, mode, seconds, count = INGEST_FAULTS[fault]
    through(proxy, monkeypatch)
    watcher = Watcher(direct(moto_s3, s3_bucket))
    proxy.arm(trigger or manifest_put(s3_bucket), mode, seconds=seconds, count=count)
    started = time.monotonic()
    result = ingest(str(faces), DATASET, s3_bucket, CFG, progress=False)
    print(f"\ningest under {fault}: done in {time.monotonic() - started:.1f} s, proxy {dict(proxy.stats)}")
    assert watcher.stop() == [], "a reader saw a manifest before its shards"
    assert proxy.stats[mode] == count if count else proxy.stats[mode] >= 1, f"fault count: {proxy.stats}"
    assert not result.already_present
    manifest = complete_dataset(direct(moto_s3, s3_bucket))
    assert manifest["content_hash"] == result.content_hash
    assert len(load_split(result.uri, "train", views=["hr"])) == result.summary["splits"]["train"]["images"]


@pytest.mark.parametrize("mode", ["reset", "stall"])
def test_ingest_that_cannot_finish_fails_clearly_publishes_nothing_and_reruns(
        mode, faces, proxy, moto_s3, s3_bucket, monkeypatch):
    through(proxy, monkeypatch, attempts=3)
    proxy.arm(manifest_put(s3_bucket), mode)  # every shard is stored, then the endpoint dies for good
    started = time.monotonic()
    with pytest.raises(IngestError) as err:
        ingest(str(faces), DATASET, s3_bucket, CFG, progress=False)
    message = str(err.value)
    print(f"\ningest, endpoint {mode} for good: failed in {time.monotonic() - started:.1f} s, "
          f"proxy {dict(proxy.stats)}\n  {message}")
    assert f"{s3_bucket}/datasets/{DATASET}" in message and proxy.endpoint in message
    # a reset shows as a dropped connection, or as a refused one when the retry's connect is reset first
    expected = ("did not answer in time",) if mode == "stall" else ("dropped the connection", "cannot be reached")
    assert any(e in message for e in expected), message
    assert "after 3 attempts" in message and "Nothing was published" in message
    assert "re-run the same command" in message and "FACEOPS_S3_ENDPOINT" in message
    assert time.monotonic() - started < 30
    bucket = direct(moto_s3, s3_bucket)
    assert not bucket.exists(f"{PREFIX}/{MANIFEST}"), "a failed ingest published a manifest"
    assert list(bucket.list(f"{PREFIX}/shards/")), "the shards were stored before the manifest"

    proxy.set("pass")
    rerun = ingest(str(faces), DATASET, s3_bucket, CFG, progress=False)
    assert not rerun.already_present and complete_dataset(bucket)["content_hash"] == rerun.content_hash
    assert ingest(str(faces), DATASET, s3_bucket, CFG, progress=False).already_present


def test_reading_a_dataset_survives_answers_cut_mid_body(faces, proxy, moto_s3, s3_bucket, monkeypatch):
    """A GET that breaks mid-body is read again from the start, not reported as corrupt."""
    result = ingest(str(faces), DATASET, s3_bucket, CFG, progress=False)  # straight to moto
    through(proxy, monkeypatch)
    proxy.arm(b"/shards/", "cut_response", count=2)
    train = load_split(result.uri, "train")
    assert proxy.stats["cut_response"] == 2
    assert len(train) == result.summary["splits"]["train"]["images"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_eight_concurrent_ingests_of_one_dataset_publish_one_complete_manifest(
        backend, faces, tmp_path, request):
    store_uri = str(tmp_path / "store") if backend == "local" else request.getfixturevalue("s3_bucket")
    results, errors = [], []
    gate = threading.Barrier(8)

    def writer() -> None:
        gate.wait()
        try:
            results.append(ingest(str(faces), DATASET, store_uri, CFG, progress=False))
        except Exception as exc:  # reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len({r.content_hash for r in results}) == 1 and len(results) == 8
    store = open_store(store_uri)
    manifest = complete_dataset(store)
    assert manifest["content_hash"] == results[0].content_hash
    for key in store.list(PREFIX):  # every object matches its recorded sha256: none torn
        store.get_bytes(key)
    assert [k for k in store.list(PREFIX) if k.endswith(MANIFEST)] == [f"{PREFIX}/{MANIFEST}"]
    if isinstance(store, LocalStore):
        assert not list(store.root.rglob("*.tmp*")), "temp files left behind"


# -- export ---------------------------------------------------------------------------------------
MODELS = {"recognizer", "dsr", "vlr_face", "vlr_fused"}


@pytest.fixture(scope="module")
def nets():
    from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer

    torch.manual_seed(0)
    return (create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval(),
            create_dsr(DSRConfig(vlr_size="32x32", base_channels=16, residual_blocks=2)).eval())


def export(nets, repo_uri: str) -> dict:
    from faceops.export import ExportConfig, export_modules

    return export_modules(nets[0], repo_uri, {"32x32": nets[1]},
                          ExportConfig(max_batch_size=8, preferred_batch_sizes=[8]))


def served_versions(repo: ObjectStore) -> dict[str, set[int]]:
    """model -> the versions Triton would serve: models with a config.pbtxt, under its version_policy."""
    from faceops.export import parse_config
    from faceops.export.triton_repo import served_versions as policy_versions

    models = {k.split("/")[0] for k in repo.list() if k.count("/") == 1 and k.endswith("/config.pbtxt")}
    return {m: set(policy_versions(repo, m, parse_config(repo.get_bytes(f"{m}/config.pbtxt").decode())))
            for m in models}


def assert_served(repo: ObjectStore, expected: dict[str, set[int]]) -> None:
    """Triton would serve exactly ``expected`` (model -> versions), and every file it reads is intact."""
    from faceops.export import validate_repository

    seen = served_versions(repo)
    assert seen == expected, f"served {seen}, expected {expected}: a half-published export"
    if expected:
        validate_repository(repo)
        for key in repo.list():
            repo.get_bytes(key)


def exported(report: dict) -> dict[str, set[int]]:
    assert set(report["models"]) == MODELS
    return {m: {r["version"]} for m, r in report["models"].items()}


@pytest.mark.parametrize("mode", ["reset", "stall", "cut_request"])
def test_export_completes_once_the_faults_end(mode, nets, proxy, moto_s3, s3_bucket, monkeypatch):
    through(proxy, monkeypatch)
    proxy.arm(b"model.onnx", mode, seconds=None if mode == "cut_request" else 1.5,
              count=2 if mode == "cut_request" else None)
    started = time.monotonic()
    report = export(nets, f"{s3_bucket}/models")
    print(f"\nexport under {mode}: done in {time.monotonic() - started:.1f} s, proxy {dict(proxy.stats)}")
    assert proxy.stats[mode] >= 1
    assert exported(report) == dict.fromkeys(MODELS, {1})
    assert_served(direct(moto_s3, f"{s3_bucket}/models"), exported(report))


def test_failed_export_never_half_publishes_a_model_version(nets, proxy, moto_s3, s3_bucket, monkeypatch):
    """First export: the endpoint dies at the second model's upload. Then a good export. Then the
    next one dies the same way. After each failure Triton must serve exactly what it served before
    (nothing, then the good export's versions): never a lone model nor a mix of two exports."""
    repo = direct(moto_s3, f"{s3_bucket}/models")
    through(proxy, monkeypatch, attempts=3)
    proxy.arm(b"/dsr/", "reset")
    with pytest.raises(StoreError, match=rf"{s3_bucket}/models/dsr/.*FACEOPS_S3_ENDPOINT"):
        export(nets, f"{s3_bucket}/models")
    assert_served(repo, {})

    proxy.set("pass")
    good = exported(export(nets, f"{s3_bucket}/models"))
    assert_served(repo, good)

    proxy.arm(b"/dsr/", "reset")
    with pytest.raises(StoreError):
        export(nets, f"{s3_bucket}/models")
    assert_served(repo, good)
