"""Kubeflow Model Registry entries for promoted Triton versions (config section ``registry``, off by default).

The Triton repository is what is served; the registry is its catalogue. Every promoted version
becomes one registry entry: registered model = Triton model name, version name = the Triton version
number, one model artifact whose URI is ``<repo>/<model>/<version>/``, and the promotion's
provenance (run id, dataset content hash, headline metrics) as the version's metadata. A user finds
which run produced what is served, and picks a version to roll back to (:func:`registry_versions`).

Promotion into Triton is atomic and happens first; registration comes after it and may fail on its
own (registry down, token refused). It then raises :class:`RegistryError` naming the address, the
config key and the versions still unregistered; the promotion step should fail loudly, and the user
re-registers with the same call. That call is idempotent: a version already registered with the same
provenance and URI is left as it is (one an earlier call left without its artifact is completed),
while one registered with different provenance is a conflict, an error naming model and version.

The token never comes from the config: ``FACEOPS_MODEL_REGISTRY_TOKEN``, else the pod's service-account
token file (``$KF_PIPELINES_SA_TOKEN_PATH`` or the Kubernetes default path). It is never logged, and
scrubbed from every error message. The ``model-registry`` client (extra ``kfp``) is imported only when
the registry is enabled: its import configures root logging when nothing else has.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from faceops.config import check
from faceops.errors import FaceopsError

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_ENV = "FACEOPS_MODEL_REGISTRY_TOKEN"  # the token itself (a Kubernetes Secret mounted as env)
KFP_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # path of a projected service-account token (KFP pods)
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # the pod's own service account
DEFAULT_PORTS = {"http": 8080, "https": 443}  # the Model Registry REST port in-cluster; TLS behind a gateway
#: Triton platform -> (model_format_name, model_format_version), the names KServe serving runtimes use
FORMATS: dict[str, tuple[str, str]] = {
    "onnxruntime_onnx": ("onnx", "1"),
    "tensorrt_plan": ("tensorrt", "1"),
    "ensemble": ("ensemble", "1"),
}
Metadata = bool | int | float | str  # what a Model Registry custom property can hold


class RegistryError(FaceopsError):
    """The Model Registry cannot be reached, refused us, or holds a conflicting version."""


@dataclass
class RegistryConfig:
    enabled: bool = False  # register promoted versions; off by default (a local run has no registry)
    # REST address with its scheme, e.g. http://model-registry-service.kubeflow.svc.cluster.local
    server_address: str = ""
    port: int | None = None  # None: from the address, else 8080 for http://, 443 for https://
    is_secure: bool | None = None  # TLS and a token required; None: true for https://, false for http://
    custom_ca: str | None = None  # path of a PEM bundle when the registry's certificate has a private CA
    author: str = "faceops"  # author of each version and owner of each registered model
    storage_key: str | None = None  # name of the data-connection Secret a deployer reads the URIs with
    timeout_s: float = 30.0  # per registry call; an address that swallows packets fails after this

    def __post_init__(self) -> None:
        scheme = urlparse(self.server_address).scheme
        check(not self.enabled or bool(self.server_address),
              "registry.server_address must be set when registry.enabled is true, e.g. "
              "http://model-registry-service.kubeflow.svc.cluster.local")
        check(not self.server_address or scheme in DEFAULT_PORTS,
              f"registry.server_address = {self.server_address!r}: give the scheme, http:// or https://")
        check(self.port is None or 1 <= self.port <= 65535, f"registry.port = {self.port}: must be in 1..65535")
        check(not (scheme == "http" and self.is_secure),
              f"registry.is_secure is true but registry.server_address = {self.server_address!r} is http://")
        check(bool(self.author.strip()), "registry.author must not be empty")
        check(self.timeout_s > 0, f"registry.timeout_s = {self.timeout_s}: must be > 0")


@dataclass(frozen=True)
class RegistryVersion:
    """One registered Triton version and what produced it."""

    model: str  # Triton model name (= registered model name)
    version: int  # Triton version number (= version name)
    uri: str | None  # <repo>/<model>/<version>/; None when an interrupted registration left no artifact
    provenance: dict[str, Metadata]  # flattened: {"run_id": ..., "metrics.verification.accuracy": ...}
    author: str | None = None
    state: str = "LIVE"  # LIVE or ARCHIVED (archived in the registry UI)
    created_ms: int | None = None  # server create time, ms since the epoch


# -- public API ------------------------------------------------------------------------------------
def register_promoted(cfg: RegistryConfig, versions: Mapping[str, int], repo_uri: str,
                      provenance: Mapping[str, Any], platforms: Mapping[str, str] | None = None
                      ) -> list[RegistryVersion]:
    """Register each promoted ``{triton model: version}``; returns the entries ([] when disabled).

    ``provenance`` (nested mappings flatten to dotted keys) becomes every version's metadata;
    ``platforms`` maps a model to its Triton platform (default ``onnxruntime_onnx``), which sets
    the artifact's format. Idempotent for the same provenance, so a failed call is simply re-run.
    """
    if not cfg.enabled:
        log.debug("Model Registry disabled (registry.enabled: false): %d version(s) not registered", len(versions))
        return []
    if not versions:
        return []
    metadata = flatten_provenance(provenance)
    formats = {m: _format(m, (platforms or {}).get(m, "onnxruntime_onnx")) for m in versions}
    models = sorted(versions)
    client, token = _connected(cfg, models)
    done: list[RegistryVersion] = []
    for i, model in enumerate(models):
        version = versions[model]
        with _calls(cfg, token, f"registering {model} version {version}", models[i:]):
            uri = artifact_uri(repo_uri, model, version)
            done.append(_register_one(client, cfg, model, version, uri, metadata, formats[model]))
    return done


def registry_versions(cfg: RegistryConfig, model: str) -> list[RegistryVersion]:
    """Every registered version of Triton model ``model`` with its provenance, oldest first."""
    client, token = _connected(cfg)
    with _calls(cfg, token, f"listing the versions of {model}"):
        _require_model(client, cfg, model)
        out = [_entry(client, model, mv) for mv in client.get_model_versions(model) if mv.name.isdigit()]
    return sorted(out, key=lambda v: v.version)


def registry_version(cfg: RegistryConfig, model: str, version: int) -> RegistryVersion:
    """One registered version (to roll back to): its URI and provenance; an error when absent."""
    client, token = _connected(cfg)
    with _calls(cfg, token, f"reading {model} version {version}"):
        _require_model(client, cfg, model)
        mv = client.get_model_version(model, str(version))
        if mv is None:
            raise RegistryError(f"{model} version {version} is not registered in the Model Registry at "
                                f"{_address(cfg)}; list the registered ones with registry_versions")
        return _entry(client, model, mv)


def _connected(cfg: RegistryConfig, pending: list[str] | None = None) -> tuple[Any, str | None]:
    """A client of an enabled registry, and the token it sends (kept for scrubbing error texts);
    ``pending``: the models a failure leaves unregistered (named in its message)."""
    _require_enabled(cfg)
    token = _token()
    with _calls(cfg, token, "connecting", pending):
        return _connect(cfg, token), token


def artifact_uri(repo_uri: str, model: str, version: int) -> str:
    """``<repo>/<model>/<version>/``; a plain local path becomes a ``file://`` URI."""
    base = repo_uri if urlparse(repo_uri).scheme else Path(repo_uri).resolve().as_uri()
    return f"{base.rstrip('/')}/{model}/{version}/"


def flatten_provenance(provenance: Mapping[str, Any], prefix: str = "") -> dict[str, Metadata]:
    """Nested provenance -> flat registry metadata (``metrics.verification.accuracy``).

    The registry holds bool/int/float/str only: numpy numbers become Python ones, lists become JSON
    text, NaN/Inf become text (JSON has no NaN), None is dropped; anything else is a TypeError.
    """
    out: dict[str, Metadata] = {}
    for key, value in provenance.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_provenance(value, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, numbers.Integral):
            out[name] = int(value)
        elif isinstance(value, numbers.Real):
            out[name] = float(value) if math.isfinite(value) else str(float(value))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        else:
            raise TypeError(f"provenance {name!r} = {value!r} ({type(value).__name__}): the Model Registry "
                            "holds bool, int, float or str metadata")
    return out


# -- registration ----------------------------------------------------------------------------------
def _register_one(client: Any, cfg: RegistryConfig, model: str, version: int, uri: str,
                  metadata: dict[str, Metadata], fmt: tuple[str, str]) -> RegistryVersion:
    """Register one version, or accept (and complete) an identical earlier registration."""
    name = str(version)
    existing = client.get_model_version(model, name) if client.get_registered_model(model) else None
    if existing is None:
        client.register_model(model, uri, version=name, model_format_name=fmt[0], model_format_version=fmt[1],
                              author=cfg.author, owner=cfg.author, storage_key=cfg.storage_key,
                              version_description=_description(model, version, metadata), metadata=metadata)
        log.info("Model Registry: registered %s version %s (%s)", model, name, uri)
        return RegistryVersion(model, version, uri, dict(metadata), cfg.author)
    entry = _entry(client, model, existing)
    if entry.provenance != metadata or entry.uri not in (None, uri):
        raise RegistryError(
            f"{model} version {version} is already registered in the Model Registry at {_address(cfg)} with "
            f"other provenance (run {entry.provenance.get('run_id')!r}, uri {entry.uri}) than this promotion "
            f"(run {metadata.get('run_id')!r}, uri {uri}). Triton never reuses a version number, so this "
            "registry catalogues another repository: check registry.server_address and the repository URI")
    # An earlier call stopped between the version and its artifact: finish it. The public client has no
    # call for that (register_model refuses an existing version); this private one is tested against the pin.
    if entry.uri is None:
        client.async_runner(client._register_model_artifact(
            existing, model, uri, model_format_name=fmt[0], model_format_version=fmt[1],
            storage_key=cfg.storage_key))
        log.info("Model Registry: completed %s version %s with its artifact (%s)", model, name, uri)
        return RegistryVersion(model, version, uri, entry.provenance, entry.author, entry.state, entry.created_ms)
    log.info("Model Registry: %s version %s already registered with this provenance", model, name)
    return entry


def _description(model: str, version: int, metadata: Mapping[str, Metadata]) -> str:
    run = metadata.get("run_id", "an unnamed run")
    return f"Triton model {model} version {version}, promoted by faceops from run {run}"


def _format(model: str, platform: str) -> tuple[str, str]:
    if platform not in FORMATS:
        raise ValueError(f"model {model}: Triton platform {platform!r} has no registry format "
                         f"(known: {', '.join(sorted(FORMATS))})")
    return FORMATS[platform]


def _entry(client: Any, model: str, mv: Any) -> RegistryVersion:
    # one request; the public get_model_artifact(name, version) looks model and version up again first
    art = client.async_runner(client._api.get_model_artifact_by_params(model, mv.id))
    created = mv.create_time_since_epoch
    return RegistryVersion(model=model, version=int(mv.name), uri=art.uri if art else None,
                           provenance=dict(mv.custom_properties or {}), author=mv.author,
                           state=str(getattr(mv.state, "value", mv.state)),
                           created_ms=int(created) if created else None)


def _require_model(client: Any, cfg: RegistryConfig, model: str) -> None:
    if client.get_registered_model(model) is None:
        raise RegistryError(f"no model {model!r} is registered in the Model Registry at {_address(cfg)}; "
                            "promoted versions are registered under their Triton model names (e.g. recognizer)")


# -- connection ------------------------------------------------------------------------------------
def _require_enabled(cfg: RegistryConfig) -> None:
    if not cfg.enabled:
        raise RegistryError("the Model Registry is off (registry.enabled: false); set registry.enabled: true "
                            "and registry.server_address to read registered versions")


def _token() -> str | None:
    """The bearer token: FACEOPS_MODEL_REGISTRY_TOKEN, else a service-account token file, else None."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    path = os.environ.get(KFP_TOKEN_PATH_ENV) or SA_TOKEN_PATH
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        if os.environ.get(KFP_TOKEN_PATH_ENV):
            raise RegistryError(f"{KFP_TOKEN_PATH_ENV} names {path}, which cannot be read") from None
        return None


def _port(cfg: RegistryConfig) -> int:
    parsed = urlparse(cfg.server_address)
    return parsed.port or cfg.port or DEFAULT_PORTS[parsed.scheme]


def _address(cfg: RegistryConfig) -> str:
    return cfg.server_address if urlparse(cfg.server_address).port else f"{cfg.server_address}:{_port(cfg)}"


def _secure(cfg: RegistryConfig) -> bool:
    return cfg.is_secure if cfg.is_secure is not None else urlparse(cfg.server_address).scheme == "https"


def _connect(cfg: RegistryConfig, token: str | None) -> Any:
    """A ``model_registry.ModelRegistry`` (call inside :func:`_calls`); its constructor already asks the
    server for one registered model, so a wrong address or token fails here."""
    from model_registry import ModelRegistry

    secure = _secure(cfg)
    if secure and not token:
        raise RegistryError(f"the Model Registry at {_address(cfg)} uses TLS (registry.is_secure) and needs a "
                            f"token: set {TOKEN_ENV}, or run in a pod with a service-account token")
    if cfg.custom_ca and not Path(cfg.custom_ca).is_file():
        raise RegistryError(f"registry.custom_ca = {cfg.custom_ca!r}: no such file")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="User access token is missing")  # fine on plain http
        return ModelRegistry(cfg.server_address, _port(cfg), author=cfg.author, is_secure=secure,
                             user_token=token, custom_ca=cfg.custom_ca, async_runner=_runner(cfg.timeout_s))


def _runner(timeout_s: float) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs each client coroutine to completion with a deadline, in a fresh event loop: the client's
    default patches asyncio for the whole process (nest_asyncio) and has a 5-minute request timeout."""
    def run(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout_s)

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(bounded())
        with ThreadPoolExecutor(1) as pool:  # called from async code: its loop is busy, use another thread's
            return pool.submit(asyncio.run, bounded()).result()

    return run


@contextmanager
def _calls(cfg: RegistryConfig, token: str | None, what: str, pending: list[str] | None = None) -> Iterator[None]:
    """Client failures -> one RegistryError naming the address, the config key and what is left to do."""
    try:
        from aiohttp import ClientError
        from model_registry.exceptions import StoreError
        from mr_openapi.exceptions import ApiException, ForbiddenException, UnauthorizedException
    except ImportError:
        raise RegistryError("registry.enabled is true but the model-registry package is not installed "
                            "(pip install 'faceops[kfp]')") from None

    left = f"; not registered yet: {', '.join(pending)} (re-run the registration)" if pending else ""
    where = f"the Model Registry at {_address(cfg)}"
    try:
        yield
    except RegistryError as exc:
        raise RegistryError(_scrub(f"{exc}{left}", token)) from None
    except (TimeoutError, ClientError, OSError) as exc:
        reason = f"no answer within registry.timeout_s = {cfg.timeout_s:g} s" if isinstance(exc, TimeoutError) \
            else (str(exc) or type(exc).__name__)
        msg = (f"{what}: {where} (registry.server_address, registry.port) cannot be reached: {reason}. Check the "
               f"address, or set registry.enabled: false to promote without registering{left}")
        raise RegistryError(_scrub(msg, token)) from None
    except (UnauthorizedException, ForbiddenException) as exc:
        msg = (f"{what}: {where} refused the token ({exc.status} {exc.reason}); check {TOKEN_ENV} or the pod's "
               f"service account's access to the registry{left}")
        raise RegistryError(_scrub(msg, token)) from None
    except ApiException as exc:
        body = " ".join(str(exc.body or "").split())[:300]
        msg = f"{what}: {where} answered {exc.status} {exc.reason}: {body}{left}"
        raise RegistryError(_scrub(msg, token)) from None
    except StoreError as exc:
        raise RegistryError(_scrub(f"{what}: {where}: {exc}{left}", token)) from None


def _scrub(message: str, token: str | None) -> str:
    return message.replace(token, "***") if token else message
