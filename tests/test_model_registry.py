"""Model Registry entries for promoted versions, against a stand-in registry REST server.

The stand-in (an in-process ``http.server`` on 127.0.0.1) serves the routes the pinned
``model-registry`` client calls (``/api/model_registry/v1/...``). Request bodies are parsed with the
``mr_openapi`` *Create models and unknown fields are refused; responses are built from the
``mr_openapi`` models: a field the client renames or the server shape it expects fails here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

pytest.importorskip("model_registry", reason="needs the model-registry client (pip install -e .[kfp])")
from mr_openapi import (  # noqa: E402
    Artifact,
    Error,
    ModelArtifact,
    ModelVersion,
    ModelVersionCreate,
    ModelVersionList,
    RegisteredModel,
    RegisteredModelCreate,
    RegisteredModelList,
)

from faceops.config import ConfigError, from_dict  # noqa: E402
from faceops.export import model_registry as mreg  # noqa: E402
from faceops.export.model_registry import (  # noqa: E402
    RegistryConfig,
    RegistryError,
    artifact_uri,
    flatten_provenance,
    register_promoted,
    registry_version,
    registry_versions,
)

TOKEN = "faceops-test-registry-token-7f3a"  # distinctive, so leak checks can search for it
API = "/api/model_registry/v1"
REPO = "s3://faceops-models/triton"
PROMOTED = {"recognizer": 3, "dsr_14x16": 1, "recognizer_14x16": 1, "vlr_face_14x16": 1}
PLATFORMS = {"vlr_face_14x16": "ensemble"}
PROVENANCE = {
    "run_id": "run-42",
    "dataset_content_hash": "sha256:" + "ab" * 32,
    "epochs": 3,
    "metrics": {"verification": {"accuracy": 0.987, "tar_at_far": {"1e-3": 0.91}}, "identification": {"rank1": 0.95}},
}


# -- the stand-in Model Registry -------------------------------------------------------------------
def _fields(model: type) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


class BadRequest(Exception):
    pass


class FakeRegistry:
    """In-memory registry state plus knobs for failure paths."""

    page_size = 2  # small, so listing exercises the client's paging

    def __init__(self) -> None:
        self.models: dict[str, RegisteredModel] = {}
        self.versions: dict[str, ModelVersion] = {}
        self.artifacts: dict[str, tuple[str, ModelArtifact]] = {}  # id -> (version id, artifact)
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.require_token: str | None = None  # answer 401 unless the request carries this bearer token
        self.fail_artifact_posts = 0  # answer 500 to that many artifact POSTs (an interrupted registration)
        self.hide_versions = False  # version lookups find nothing (another writer races us)
        self.echo_auth = False  # answer 400 quoting the request's headers (a gateway that echoes them)
        self.lock = threading.Lock()
        self._ids = 0

    def new_id(self) -> str:
        self._ids += 1
        return str(self._ids)

    @staticmethod
    def now_ms() -> str:
        return str(int(time.time() * 1000))

    def posts(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "POST"]

    # routes: (status, mr_openapi model) -----------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: dict | None) -> tuple[int, object]:
        routes = [
            ("GET", rf"{API}/registered_models", self.list_models),
            ("POST", rf"{API}/registered_models", self.create_model),
            ("GET", rf"{API}/registered_model", self.find_model),
            ("GET", rf"{API}/registered_models/(\d+)/versions", self.list_versions),
            ("POST", rf"{API}/model_versions", self.create_version),
            ("GET", rf"{API}/model_version", self.find_version),
            ("POST", rf"{API}/model_versions/(\d+)/artifacts", self.create_artifact),
            ("GET", rf"{API}/model_artifact", self.find_artifact),
        ]
        for verb, pattern, fn in routes:
            if verb == method and (m := re.fullmatch(pattern, path)):
                return fn(*m.groups(), query=query, body=body)
        return 404, Error(code="404", message=f"no route {method} {path}")

    @staticmethod
    def parse(model: type, body: dict | None):
        unknown = set(body or {}) - _fields(model)
        if unknown:
            raise BadRequest(f"{model.__name__}: unknown fields {sorted(unknown)}")
        return model.from_dict(body)

    def page(self, items: list, query: dict[str, str]) -> dict:
        size = int(query.get("pageSize", self.page_size))
        start = int(query.get("nextPageToken") or 0)
        end = start + size
        return {"items": items[start:end], "size": len(items[start:end]), "page_size": size,
                "next_page_token": str(end) if end < len(items) else ""}

    def list_models(self, *, query, body):
        return 200, RegisteredModelList(**self.page(list(self.models.values()), query))

    def create_model(self, *, query, body):
        req = self.parse(RegisteredModelCreate, body)
        if any(rm.name == req.name for rm in self.models.values()):
            return 409, Error(code="409", message=f"registered model {req.name} exists")
        rm = RegisteredModel.from_dict({**req.to_dict(), "id": self.new_id(), "createTimeSinceEpoch": self.now_ms()})
        self.models[rm.id] = rm
        return 201, rm

    def find_model(self, *, query, body):
        rm = next((rm for rm in self.models.values() if rm.name == query.get("name")), None)
        return (200, rm) if rm else (404, Error(code="404", message="no such registered model"))

    def version_of(self, rm_id: str, name: str) -> ModelVersion | None:
        return next((v for v in self.versions.values() if v.registered_model_id == rm_id and v.name == name), None)

    def list_versions(self, rm_id, *, query, body):
        if rm_id not in self.models:
            return 404, Error(code="404", message=f"no registered model {rm_id}")
        items = [v for v in self.versions.values() if v.registered_model_id == rm_id]
        return 200, ModelVersionList(**self.page(items, query))

    def create_version(self, *, query, body):
        req = self.parse(ModelVersionCreate, body)
        if req.registered_model_id not in self.models:
            return 404, Error(code="404", message="no such registered model")
        if self.version_of(req.registered_model_id, req.name):
            return 409, Error(code="409", message=f"model version {req.name} exists")
        mv = ModelVersion.from_dict({**req.to_dict(), "id": self.new_id(), "createTimeSinceEpoch": self.now_ms()})
        self.versions[mv.id] = mv
        return 201, mv

    def find_version(self, *, query, body):
        mv = None if self.hide_versions else self.version_of(query.get("parentResourceId"), query.get("name"))
        return (200, mv) if mv else (404, Error(code="404", message="no such model version"))

    def create_artifact(self, mv_id, *, query, body):
        if self.fail_artifact_posts:
            self.fail_artifact_posts -= 1
            return 500, Error(code="500", message="database is restarting")
        if mv_id not in self.versions:
            return 404, Error(code="404", message="no such model version")
        req = self.parse(ModelArtifact, body)  # Artifact is oneOf; faceops only ever sends model artifacts
        art = ModelArtifact.from_dict({**req.to_dict(), "id": self.new_id(), "createTimeSinceEpoch": self.now_ms()})
        self.artifacts[art.id] = (mv_id, art)
        return 201, Artifact(art)

    def find_artifact(self, *, query, body):
        art = next((a for v, a in self.artifacts.values()
                    if v == query.get("parentResourceId") and a.name == query.get("name")), None)
        return (200, art) if art else (404, Error(code="404", message="no such model artifact"))

    # reading the state back in test terms -------------------------------------------------------
    def entry(self, model: str, version: str) -> tuple[ModelVersion, list[ModelArtifact]]:
        rm = next(rm for rm in self.models.values() if rm.name == model)
        mv = self.version_of(rm.id, version)
        assert mv is not None, f"{model} version {version} not in the stand-in"
        return mv, [a for v, a in self.artifacts.values() if v == mv.id]


def _metadata(mv: ModelVersion) -> dict:
    """Custom properties as plain values, read through the MetadataValue oneOf models."""
    readers = {"MetadataIntValue": lambda v: int(v.int_value), "MetadataDoubleValue": lambda v: v.double_value,
               "MetadataStringValue": lambda v: v.string_value, "MetadataBoolValue": lambda v: v.bool_value}
    return {key: readers[meta.actual_instance.metadata_type](meta.actual_instance)
            for key, meta in (mv.custom_properties or {}).items()}


def _handler(state: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization")
            with state.lock:
                state.requests.append((self.command, url.path, auth))
                if state.require_token and auth != f"Bearer {state.require_token}":
                    status, obj = 401, Error(code="401", message="unauthorized")
                elif state.echo_auth:
                    status, obj = 400, Error(code="400", message=f"bad request with headers {dict(self.headers)}")
                else:
                    try:
                        status, obj = state.handle(self.command, url.path, query, body)
                    except (BadRequest, ValueError) as exc:
                        status, obj = 400, Error(code="400", message=str(exc))
            data = json.dumps(obj.to_dict()).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, format: str, *args: object) -> None:  # no access log lines in the test output
            pass

    return Handler


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    state = FakeRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.address = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The token comes from the test alone; no proxy between the client and 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                 mreg.KFP_TOKEN_PATH_ENV, mreg.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mreg, "SA_TOKEN_PATH", str(tmp_path / "no-service-account-token"))
    monkeypatch.setenv(mreg.TOKEN_ENV, TOKEN)


def _cfg(registry: FakeRegistry, **kw) -> RegistryConfig:
    return RegistryConfig(enabled=True, server_address=registry.address, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- registration ----------------------------------------------------------------------------------
def test_disabled_registers_nothing(registry):
    cfg = RegistryConfig(enabled=False, server_address=registry.address)
    assert register_promoted(cfg, PROMOTED, REPO, PROVENANCE) == []
    assert registry.requests == []
    assert RegistryConfig().enabled is False  # off unless a config turns it on


def test_one_version_per_promoted_model_with_provenance(registry):
    out = register_promoted(_cfg(registry, storage_key="minio-connection"), PROMOTED, REPO, PROVENANCE, PLATFORMS)

    flat = flatten_provenance(PROVENANCE)
    assert flat["metrics.verification.tar_at_far.1e-3"] == 0.91 and flat["epochs"] == 3
    assert sorted(rm.name for rm in registry.models.values()) == sorted(PROMOTED)
    assert [(v.model, v.version) for v in out] == sorted(PROMOTED.items())
    for model, version in PROMOTED.items():
        mv, arts = registry.entry(model, str(version))
        assert _metadata(mv) == flat
        assert mv.author == "faceops" and "run-42" in mv.description
        assert len(arts) == 1
        assert arts[0].uri == f"{REPO}/{model}/{version}/"
        assert arts[0].model_format_name == ("ensemble" if model in PLATFORMS else "onnx")
        assert arts[0].storage_key == "minio-connection"
    assert {rm.owner for rm in registry.models.values()} == {"faceops"}
    assert {auth for _, _, auth in registry.requests} == {f"Bearer {TOKEN}"}

    listed = registry_versions(_cfg(registry), "recognizer")
    assert [(v.version, v.uri, v.state) for v in listed] == [(3, f"{REPO}/recognizer/3/", "LIVE")]
    assert listed[0].provenance == flat  # types survive the round trip (int stays int, float float)
    assert registry_version(_cfg(registry), "vlr_face_14x16", 1).provenance["run_id"] == "run-42"


def test_versions_list_oldest_first_across_pages(registry):
    cfg = _cfg(registry)
    for version, run in [(1, "run-1"), (2, "run-2"), (3, "run-3")]:
        register_promoted(cfg, {"recognizer": version}, REPO, {**PROVENANCE, "run_id": run})
    listed = registry_versions(cfg, "recognizer")
    assert [(v.version, v.provenance["run_id"]) for v in listed] == [(1, "run-1"), (2, "run-2"), (3, "run-3")]
    with pytest.raises(RegistryError, match=r"recognizer version 7 is not registered"):
        registry_version(cfg, "recognizer", 7)
    with pytest.raises(RegistryError, match=r"no model 'dsr' is registered"):
        registry_versions(cfg, "dsr")


def test_same_provenance_again_is_idempotent(registry):
    cfg = _cfg(registry)
    first = register_promoted(cfg, PROMOTED, REPO, PROVENANCE, PLATFORMS)
    posts = len(registry.posts())
    again = register_promoted(cfg, PROMOTED, REPO, PROVENANCE, PLATFORMS)
    assert len(registry.posts()) == posts  # nothing written the second time
    assert [(v.model, v.version, v.uri, v.provenance) for v in again] == \
        [(v.model, v.version, v.uri, v.provenance) for v in first]


def test_existing_version_with_other_provenance_is_a_conflict(registry):
    cfg = _cfg(registry)
    register_promoted(cfg, {"recognizer": 3}, REPO, {**PROVENANCE, "run_id": "run-1"})
    with pytest.raises(RegistryError) as info:
        register_promoted(cfg, {"recognizer": 3}, REPO, {**PROVENANCE, "run_id": "run-2"})
    msg = str(info.value)
    assert "recognizer version 3 is already registered" in msg
    assert "'run-1'" in msg and "'run-2'" in msg and registry.address in msg
    _, arts = registry.entry("recognizer", "3")
    assert len(arts) == 1  # the existing entry is untouched


def test_server_side_conflict_names_model_and_version(registry):
    cfg = _cfg(registry)
    register_promoted(cfg, {"recognizer": 3}, REPO, PROVENANCE)
    registry.hide_versions = True  # another writer registered it between our lookup and our write
    with pytest.raises(RegistryError, match=r"registering recognizer version 3: .*409"):
        register_promoted(cfg, {"recognizer": 3}, REPO, PROVENANCE)


def test_interrupted_registration_is_completed_by_rerunning(registry):
    cfg = _cfg(registry)
    registry.fail_artifact_posts = 1
    with pytest.raises(RegistryError) as info:
        register_promoted(cfg, PROMOTED, REPO, PROVENANCE, PLATFORMS)
    msg = str(info.value)
    assert "registering dsr_14x16 version 1" in msg and "500" in msg
    assert "not registered yet: dsr_14x16, recognizer, recognizer_14x16, vlr_face_14x16" in msg

    out = register_promoted(cfg, PROMOTED, REPO, PROVENANCE, PLATFORMS)
    assert [v.uri for v in out] == [f"{REPO}/{m}/{PROMOTED[m]}/" for m in sorted(PROMOTED)]
    for model, version in PROMOTED.items():
        assert len(registry.entry(model, str(version))[1]) == 1


def test_runs_from_inside_an_event_loop(registry):
    async def promote_stage() -> list:
        return register_promoted(_cfg(registry), {"recognizer": 1}, REPO, PROVENANCE)

    assert [v.version for v in asyncio.run(promote_stage())] == [1]


# -- failures: clear, and never the token ----------------------------------------------------------
def test_unreachable_server_names_address_and_key(caplog):
    address = f"http://127.0.0.1:{_free_port()}"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RegistryError) as info:
        register_promoted(RegistryConfig(enabled=True, server_address=address), PROMOTED, REPO, PROVENANCE)
    msg = str(info.value)
    assert address in msg and "registry.server_address" in msg and "cannot be reached" in msg
    assert "registry.enabled: false" in msg and "not registered yet: dsr_14x16" in msg
    assert TOKEN not in msg and TOKEN not in caplog.text


def test_silent_server_times_out():
    with socket.socket() as s:  # accepts connections (the kernel does) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        cfg = RegistryConfig(enabled=True, server_address=f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(RegistryError, match=r"no answer within registry.timeout_s = 0.5 s"):
            register_promoted(cfg, {"recognizer": 1}, REPO, PROVENANCE)
        assert time.monotonic() - started < 10


def test_refused_token_is_named_but_never_shown(registry, caplog, capsys):
    registry.require_token = "the-right-token"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RegistryError) as info:
        register_promoted(_cfg(registry), PROMOTED, REPO, PROVENANCE)
    msg = str(info.value)
    assert "refused the token (401" in msg and mreg.TOKEN_ENV in msg and registry.address in msg
    out = capsys.readouterr()
    assert all(TOKEN not in text for text in (msg, caplog.text, out.out, out.err))
    assert registry.requests and registry.requests[0][2] == f"Bearer {TOKEN}"  # it was sent, only not shown


def test_token_scrubbed_from_an_echoing_server(registry, caplog):
    registry.echo_auth = True
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RegistryError) as info:
        register_promoted(_cfg(registry), PROMOTED, REPO, PROVENANCE)
    msg = str(info.value)
    assert "answered 400" in msg and "Bearer ***" in msg
    assert TOKEN not in msg and TOKEN not in caplog.text


def test_token_kept_out_of_logs_on_success(registry, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    register_promoted(_cfg(registry), PROMOTED, REPO, PROVENANCE, PLATFORMS)
    registry_versions(_cfg(registry), "recognizer")
    out = capsys.readouterr()
    assert "registered recognizer version 3" in caplog.text
    assert all(TOKEN not in text for text in (caplog.text, out.out, out.err))


def test_tls_without_a_token_is_refused_before_connecting(monkeypatch):
    monkeypatch.delenv(mreg.TOKEN_ENV)
    cfg = RegistryConfig(enabled=True, server_address="https://registry.invalid")
    with pytest.raises(RegistryError, match=rf"https://registry.invalid:443 .*set {mreg.TOKEN_ENV}"):
        register_promoted(cfg, PROMOTED, REPO, PROVENANCE)


def test_token_from_service_account_file(registry, monkeypatch, tmp_path):
    monkeypatch.delenv(mreg.TOKEN_ENV)
    (tmp_path / "sa-token").write_text("sa-token-value\n")
    monkeypatch.setenv(mreg.KFP_TOKEN_PATH_ENV, str(tmp_path / "sa-token"))
    register_promoted(_cfg(registry), {"recognizer": 1}, REPO, PROVENANCE)
    assert {auth for _, _, auth in registry.requests} == {"Bearer sa-token-value"}

    monkeypatch.setenv(mreg.KFP_TOKEN_PATH_ENV, str(tmp_path / "missing"))
    with pytest.raises(RegistryError, match=rf"{mreg.KFP_TOKEN_PATH_ENV} names .*missing"):
        register_promoted(_cfg(registry), {"recognizer": 2}, REPO, PROVENANCE)


def test_reading_a_disabled_registry_says_how_to_enable():
    with pytest.raises(RegistryError, match=r"registry.enabled: false"):
        registry_versions(RegistryConfig(), "recognizer")


# -- config and helpers ----------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "error"), [
    ({"enabled": True}, r"registry.server_address must be set"),
    ({"server_address": "model-registry:8080"}, r"give the scheme"),
    ({"server_address": "http://mr", "port": 70000}, r"registry.port = 70000"),
    ({"server_address": "http://mr", "is_secure": True}, r"registry.is_secure is true but .* is http://"),
    ({"timeout_s": 0}, r"registry.timeout_s = 0"),
    ({"token": "s3cret"}, r"unknown key 'token'"),  # a token is never a config value
])
def test_config_errors(data, error):
    with pytest.raises(ConfigError, match=error):
        from_dict(RegistryConfig, data, "registry")


def test_config_ports_follow_the_scheme():
    def port(**kw) -> int:
        return mreg._port(RegistryConfig(**kw))

    assert port(server_address="http://mr") == 8080
    assert port(server_address="https://mr") == 443
    assert port(server_address="http://mr:9090") == 9090
    assert port(server_address="http://mr", port=8081) == 8081


def test_flatten_provenance_types():
    flat = flatten_provenance({"a": {"b": np.float32(0.5), "n": np.int64(7)}, "nan": float("nan"),
                               "sizes": ["14x16", "32x32"], "skip": None, "ok": True})
    assert flat == {"a.b": 0.5, "a.n": 7, "nan": "nan", "sizes": '["14x16", "32x32"]', "ok": True}
    assert type(flat["a.n"]) is int and type(flat["a.b"]) is float
    with pytest.raises(TypeError, match=r"provenance 'x'"):
        flatten_provenance({"x": object()})


def test_unknown_platform_is_an_error(registry):
    with pytest.raises(ValueError, match=r"recognizer: Triton platform 'pytorch_libtorch'"):
        register_promoted(_cfg(registry), {"recognizer": 1}, REPO, PROVENANCE, {"recognizer": "pytorch_libtorch"})
    assert registry.requests == []


def test_artifact_uri(tmp_path):
    assert artifact_uri("s3://b/triton/", "recognizer", 4) == "s3://b/triton/recognizer/4/"
    assert artifact_uri(str(tmp_path), "dsr", 1) == f"{tmp_path.as_uri()}/dsr/1/"


def test_the_promote_stage_registers_each_served_version_with_its_own_provenance(registry, tmp_path):
    """The pipeline's promote step: Triton serves the staged export, then the registry (on in the run's
    config) holds one entry per served version, its metadata the provenance written into config.pbtxt."""
    import torch
    import yaml

    from faceops.export import ExportConfig, export_modules
    from faceops.export.triton_repo import parse_config, version_provenance
    from faceops.models import RecognizerConfig, create_recognizer
    from faceops.models.contract import InputContract
    from faceops.stages import promote_stage

    torch.manual_seed(0)
    staged = tmp_path / "runs" / "r7" / "staging"
    export_modules(create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval(), str(staged),
                   cfg=ExportConfig(instance_kind="KIND_CPU", parity_batch=2), contract=InputContract())
    config = yaml.safe_dump({"registry": {"enabled": True, "server_address": registry.address}})
    live = tmp_path / "triton"
    result = promote_stage(str(staged), str(live), str(tmp_path / "runs" / "r7"), "hash-1",
                           {"verification.accuracy": 0.9}, config)
    assert result["models"] == {"recognizer": {"version": 1}} and result["registered"]
    served = version_provenance(parse_config((live / "recognizer" / "config.pbtxt").read_text()), 1)
    entry = registry_version(_cfg(registry), "recognizer", 1)
    assert entry.provenance == {"run_id": "r7", "dataset_content_hash": "hash-1", "verification.accuracy": "0.9"}
    assert entry.provenance == served and entry.uri.endswith("/triton/recognizer/1/")
