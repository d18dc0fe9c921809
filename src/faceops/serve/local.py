"""Local Triton: the server bundled in nvidia-pytriton, serving a faceops model repository.

That server has only the python backend, so :func:`materialise` copies the repository into a local
serving copy in which each ONNX model becomes a python-backend model running ONNX Runtime on the same
``model.onnx`` (same names, tensor names, shapes, dtypes, max_batch_size and dynamic batching);
ensembles are copied unchanged and ``tensorrt_plan`` models are left out (they need the cluster's
Triton and a GPU). Clients see the same models as on the cluster.

One broken model does not take the others down, here as on the cluster: the server runs with
``--exit-on-error=false --strict-readiness=false`` and readiness is per model (see :class:`LocalTriton`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from faceops.errors import FaceopsError
from faceops.export.triton_repo import CONFIG, MODEL_FILES, ModelConfigError, parse_config, served_versions, to_text
from faceops.retry import poll
from faceops.storage import IntegrityError, LocalStore, NotFoundError, ObjectStore, open_store

log = logging.getLogger(__name__)

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
#: tritonserver flags that keep the healthy models serving when one fails to load (the default exits),
#: and make /v2/health/ready mean "the server answers"; the chart's Triton passes the same
RESILIENCE_FLAGS = ("--exit-on-error=false", "--strict-readiness=false")
POLL_INTERVAL_S = 0.25  # how often startup asks the server whether it (and every model) is ready


class ServerError(FaceopsError):
    """The local Triton server could not start or stopped unexpectedly."""


@dataclass
class LocalServeConfig:
    host: str = "127.0.0.1"  # bind address of all three endpoints; loopback unless told otherwise
    grpc_port: int | None = None  # None = a free port
    http_port: int | None = None
    metrics_port: int | None = None
    ort_threads: int = 1  # ONNX Runtime intra-op threads per model instance
    ort_allow_spinning: bool = False  # busy-waiting ORT threads steal CPU from gRPC on small machines
    instance_count: int = 1  # CPU instances per model (the cluster config's GPU count does not apply)
    startup_timeout_s: float = 120.0  # model loading budget before giving up
    stop_timeout_s: float = 30.0  # graceful shutdown budget before SIGKILL
    log_verbose: int = 0  # tritonserver --log-verbose


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("the local Triton needs nvidia-pytriton: pip install 'faceops[serve]'") from None
    return Path(pytriton.__file__).parent / "tritonserver"


def materialise(repo_uri: str, dest: str | Path, cfg: LocalServeConfig | None = None,
                failed: dict[str, str] | None = None) -> list[str]:
    """Write the local serving copy of ``repo_uri`` to ``dest``; returns the model names served.

    A model whose config does not parse or whose file cannot be fetched intact is left out and
    recorded in ``failed`` (name -> reason), like Triton leaves out a model that fails to load.
    """
    cfg = cfg or LocalServeConfig()
    store, dest = open_store(repo_uri), Path(dest)
    if isinstance(store, LocalStore) and not store.root.is_dir():
        raise ServerError(f"model repository {repo_uri} does not exist: pass the --repo that "
                          f"'faceops export' wrote (or export into {repo_uri} first)")
    served = []
    for key in store.list():
        parts = key.split("/")
        if len(parts) != 2 or parts[1] != CONFIG:
            continue
        name = parts[0]
        try:
            if _materialise_model(store, name, key, dest, cfg):
                served.append(name)
        except (ModelConfigError, ServerError, IntegrityError, NotFoundError) as exc:
            log.warning("local serve: model %s left out: %s", name, exc)
            shutil.rmtree(dest / name, ignore_errors=True)
            if failed is not None:
                failed[name] = str(exc)
    if not served:
        why = f"; left out: {failed}" if failed else ""
        raise ServerError(f"{repo_uri} holds no servable model (expected <model>/{CONFIG}){why}; run "
                          f"'faceops export' first")
    return sorted(served)


def _materialise_model(store: ObjectStore, name: str, key: str, dest: Path, cfg: LocalServeConfig) -> bool:
    config = parse_config(store.get_bytes(key).decode(), store.url(key))
    if config.platform == "tensorrt_plan":
        log.info("local serve: %s (tensorrt_plan) needs the cluster Triton with a GPU; not served", name)
        return False
    if config.platform not in ("onnxruntime_onnx", "ensemble"):
        raise ServerError(f"{store.url(key)}: platform {config.platform!r} cannot be served locally "
                          f"(supported: onnxruntime_onnx, ensemble)")
    for version in served_versions(store, name, config):
        vdir = dest / name / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        if config.platform == "onnxruntime_onnx":
            store.get_file(f"{name}/{version}/{MODEL_FILES['onnxruntime_onnx']}", vdir / "model.onnx")
            shutil.copyfile(PYTHON_MODEL, vdir / "model.py")
    if config.platform == "onnxruntime_onnx":
        config = _as_python_backend(config, cfg)
    (dest / name / CONFIG).write_text(to_text(config))
    return True


def _as_python_backend(config: mc.ModelConfig, cfg: LocalServeConfig) -> mc.ModelConfig:
    local = mc.ModelConfig()
    local.CopyFrom(config)
    local.ClearField("platform")
    local.backend = "python"
    del local.instance_group[:]
    local.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=cfg.instance_count)
    local.parameters["ort_intra_op_threads"].string_value = str(cfg.ort_threads)
    local.parameters["ort_allow_spinning"].string_value = "1" if cfg.ort_allow_spinning else "0"
    return local


def _backend_dir(root: Path, dest: Path) -> Path:
    """backends/python from the package plus the stub built for this Python version."""
    python = dest / "python"
    shutil.copytree(root / "backends" / "python", python)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return dest


def _server_env(root: Path) -> dict[str, str]:
    """The environment the python backend stub needs to see this venv's packages (ENVIRONMENT.md)."""
    site = Path(sysconfig.get_paths()["purelib"])
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(site / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PYTHONPATH"] = ":".join(p for p in [str(site), env.get("PYTHONPATH", "")] if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix
    return env


def _states(index: list[dict]) -> dict[str, str]:
    states: dict[str, str] = {}
    for entry in index:
        name, state = entry.get("name", ""), entry.get("state") or "UNKNOWN"
        if states.get(name) != "READY":
            states[name] = state
    return states


class LocalTriton:
    """Context manager: materialise ``repo_uri``, start tritonserver on loopback, wait until ready.

    Readiness, the same as the chart's Triton should report it:

    * A model that fails to load (corrupt ``model.onnx``, bad config, an ensemble whose step failed)
      is UNAVAILABLE; the others load and serve (``--exit-on-error=false``).
    * ``start()`` returns once every model has settled (none LOADING): ``models`` are the ones that
      serve, ``failed_models`` maps each one that does not to its reason (Triton's or the store's);
      each failure is logged as a warning. It raises :class:`ServerError` only when none serves.
    * Per-model readiness is the truth: ``GET /v2/models/<name>/ready`` is 200 for a serving model
      and 400 for a failed one; ``model_states()`` reads Triton's repository index.
    * ``GET /v2/health/ready`` means "the server answers requests" (``--strict-readiness=false``),
      not "every model loaded": with Triton's strict default one broken extra model (say
      ``recognizer_int8``) would mark the whole server unready and, on Kubernetes, take the healthy
      ``recognizer`` out of the Service too. A probe for traffic checks the model the traffic
      needs (``/v2/models/recognizer/ready``); ``ready()`` checks every model in ``models``.
    """

    def __init__(self, repo_uri: str, cfg: LocalServeConfig | None = None, **overrides):
        self.repo_uri = repo_uri
        self.cfg = cfg or LocalServeConfig(**overrides)
        host = self.cfg.host
        self.grpc_port = self.cfg.grpc_port or free_port(host)
        self.http_port = self.cfg.http_port or free_port(host)
        self.metrics_port = self.cfg.metrics_port or free_port(host)
        self.models: list[str] = []  # serving (READY)
        self.failed_models: dict[str, str] = {}  # name -> why it does not serve
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.cfg.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.cfg.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.cfg.host}:{self.metrics_port}/metrics"

    def start(self) -> LocalTriton:
        root = _pytriton_root()
        self._tmp = tempfile.TemporaryDirectory(prefix="faceops-triton-")
        work = Path(self._tmp.name)
        self.failed_models = {}
        self._models_dir = work / "models"
        materialised = materialise(self.repo_uri, self._models_dir, self.cfg, self.failed_models)
        backends = _backend_dir(root, work / "backends")
        self.log_path = work / "tritonserver.log"
        h = self.cfg.host
        cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={work / 'models'}",
               f"--backend-directory={backends}", f"--grpc-address={h}", f"--grpc-port={self.grpc_port}",
               f"--http-address={h}", f"--http-port={self.http_port}", "--allow-metrics=true",
               f"--metrics-address={h}", f"--metrics-port={self.metrics_port}",
               "--disable-auto-complete-config", *RESILIENCE_FLAGS, f"--log-verbose={self.cfg.log_verbose}"]
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env(root),
                                      start_new_session=True)
        log_file.close()
        try:
            self._wait_ready()
            self._settle(materialised)
        except BaseException:
            self.stop()
            raise
        for name, reason in sorted(self.failed_models.items()):
            log.warning("Triton: model %s is not served (%s): re-export it with 'faceops export' or remove "
                        "it from %s; the other models are served", name, reason, self.repo_uri)
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s; models %s", self.grpc_url, self.http_url,
                 self.metrics_url, ", ".join(self.models))
        return self

    def _wait_ready(self) -> None:
        if not poll(self._answers, timeout_s=self.cfg.startup_timeout_s, interval_s=POLL_INTERVAL_S):
            raise ServerError(f"tritonserver not ready after {self.cfg.startup_timeout_s:.0f} s serving "
                              f"{self.repo_uri}:\n{self.log_tail()}")

    def _answers(self) -> bool:
        """``/v2/health/ready`` is 200; a server process that exited is an error, not a wait."""
        if self._proc.poll() is not None:
            raise ServerError(f"tritonserver exited with code {self._proc.returncode} while loading "
                              f"{self.repo_uri}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _settle(self, materialised: list[str]) -> None:
        """Wait until no model is LOADING; split them into ``models`` and ``failed_models``."""
        index = poll(self._index, lambda entries: "LOADING" not in _states(entries).values(),
                     timeout_s=self.cfg.startup_timeout_s, interval_s=POLL_INTERVAL_S)
        states = _states(index)
        reasons = {e["name"]: e.get("reason", "") for e in index if e.get("state") != "READY"}
        self.models = sorted(n for n in materialised if states.get(n) == "READY")
        for name in materialised:
            if states.get(name) != "READY":
                why = " ".join((reasons.get(name) or self._unloaded_reason(name, states)).split())
                why = why.split(" At: ")[0].replace(str(self._models_dir), self.repo_uri.rstrip("/"))
                self.failed_models[name] = why[:500]  # Triton's reason without its traceback
        if not self.models:
            raise ServerError(f"no model of {self.repo_uri} loaded: {self.failed_models}\n{self.log_tail()}")

    def _unloaded_reason(self, name: str, states: dict[str, str]) -> str:
        """Why Triton did not even try ``name``: an ensemble whose step models do not serve."""
        config = parse_config((self._models_dir / name / CONFIG).read_text())
        missing = sorted({s.model_name for s in config.ensemble_scheduling.step} - {
            n for n, state in states.items() if state == "READY"})
        if missing:
            return f"ensemble step model(s) {', '.join(missing)} not served"
        return f"state {states.get(name, 'not in the repository index')}"

    def _index(self) -> list[dict]:
        """Triton's repository index: one entry per model version with its state and reason."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}",
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read() or b"[]")

    def model_states(self) -> dict[str, str]:
        """Model name -> READY / UNAVAILABLE / LOADING … now (READY if any version is)."""
        return _states(self._index())

    def ready(self) -> bool:
        """The server answers and every model in ``models`` is READY (failed ones are not counted)."""
        try:
            states = self.model_states()
        except OSError:
            return False
        return self.running() and all(states.get(m) == "READY" for m in self.models)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return "<no server log>"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def wait(self) -> int:
        """Block until the server exits (for ``faceops serve``)."""
        return self._proc.wait() if self._proc else 0

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests and unloads models), SIGKILL past the budget."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=self.cfg.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s; killing it", self.cfg.stop_timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
