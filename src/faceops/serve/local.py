"""Local Triton: the server bundled in nvidia-pytriton, serving a faceops model repository.

That server has only the python backend, so :func:`materialise` copies the repository into a local
serving copy in which each ONNX model becomes a python-backend model running ONNX Runtime on the same
``model.onnx`` (same names, tensor names, shapes, dtypes, max_batch_size and dynamic batching);
ensembles are copied unchanged and ``tensorrt_plan`` models are left out (they need the cluster's
Triton and a GPU). Clients see the same models as on the cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from faceops.errors import FaceopsError
from faceops.export.triton_repo import CONFIG, MODEL_FILES, parse_config, to_text, versions
from faceops.storage import ObjectStore, open_store

log = logging.getLogger(__name__)

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


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


def _served_versions(store: ObjectStore, name: str, config: mc.ModelConfig) -> list[int]:
    found = versions(store, name)
    policy = config.version_policy
    if policy.HasField("specific"):
        return [v for v in found if v in set(policy.specific.versions)]
    if policy.HasField("all"):
        return found
    return found[-(policy.latest.num_versions or 1):]


def materialise(repo_uri: str, dest: str | Path, cfg: LocalServeConfig | None = None) -> list[str]:
    """Write the local serving copy of ``repo_uri`` to ``dest``; returns the model names served."""
    cfg = cfg or LocalServeConfig()
    store, dest = open_store(repo_uri), Path(dest)
    served = []
    for key in store.list():
        parts = key.split("/")
        if len(parts) != 2 or parts[1] != CONFIG:
            continue
        name = parts[0]
        config = parse_config(store.get_bytes(key).decode(), store.url(key))
        if config.platform == "tensorrt_plan":
            log.info("local serve: %s (tensorrt_plan) needs the cluster Triton with a GPU; not served", name)
            continue
        if config.platform not in ("onnxruntime_onnx", "ensemble"):
            raise ServerError(f"{store.url(key)}: platform {config.platform!r} cannot be served locally "
                              f"(supported: onnxruntime_onnx, ensemble)")
        for version in _served_versions(store, name, config):
            vdir = dest / name / str(version)
            vdir.mkdir(parents=True, exist_ok=True)
            if config.platform == "onnxruntime_onnx":
                store.get_file(f"{name}/{version}/{MODEL_FILES['onnxruntime_onnx']}", vdir / "model.onnx")
                shutil.copyfile(PYTHON_MODEL, vdir / "model.py")
        if config.platform == "onnxruntime_onnx":
            config = _as_python_backend(config, cfg)
        (dest / name / CONFIG).write_text(to_text(config))
        served.append(name)
    if not served:
        raise ServerError(f"{repo_uri} holds no servable model (expected <model>/{CONFIG}); run "
                          f"'faceops export' first")
    return sorted(served)


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


class LocalTriton:
    """Context manager: materialise ``repo_uri``, start tritonserver on loopback, wait until ready."""

    def __init__(self, repo_uri: str, cfg: LocalServeConfig | None = None, **overrides):
        self.repo_uri = repo_uri
        self.cfg = cfg or LocalServeConfig(**overrides)
        host = self.cfg.host
        self.grpc_port = self.cfg.grpc_port or free_port(host)
        self.http_port = self.cfg.http_port or free_port(host)
        self.metrics_port = self.cfg.metrics_port or free_port(host)
        self.models: list[str] = []
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
        self.models = materialise(self.repo_uri, work / "models", self.cfg)
        backends = _backend_dir(root, work / "backends")
        self.log_path = work / "tritonserver.log"
        h = self.cfg.host
        cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={work / 'models'}",
               f"--backend-directory={backends}", f"--grpc-address={h}", f"--grpc-port={self.grpc_port}",
               f"--http-address={h}", f"--http-port={self.http_port}", "--allow-metrics=true",
               f"--metrics-address={h}", f"--metrics-port={self.metrics_port}",
               "--disable-auto-complete-config", "--exit-on-error=true",
               f"--log-verbose={self.cfg.log_verbose}"]
        log_file = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self._proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env(root),
                                      start_new_session=True)
        log_file.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: gRPC %s, HTTP %s, metrics %s; models %s", self.grpc_url, self.http_url,
                 self.metrics_url, ", ".join(self.models))
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self._proc.returncode} while loading "
                                  f"{self.repo_uri}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.cfg.startup_timeout_s:.0f} s serving "
                          f"{self.repo_uri}:\n{self.log_tail()}")

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
