"""The Triton model repository, written to any store (a cluster Triton reads it from MinIO).

Layout: ``<repo>/<model>/config.pbtxt`` + ``<repo>/<model>/<version>/model.onnx`` (or ``model.plan``).
Configs are built as Triton's own ``ModelConfig`` protobuf (shipped in tritonclient), written as text
and parsed back before upload, so a config Triton would reject never lands in the repository.
Each export adds a new version number per model. Publishing is two-phase (``publish``): every model
file goes into its new version folder first, where Triton ignores it (configs name the versions
they serve: ``version_policy: specific``); only then are the configs switched, leaf models before
the ensembles that pin them. An export that fails half-way leaves Triton serving what it served.

What a config asks of the server is resolved here, at export time, because the chart cannot edit model
configs: the instance kind follows the target Triton's GPUs (:func:`resolve_instance_kind`), GPU
instances of ONNX models carry ONNX Runtime's TensorRT accelerator (Triton builds the engines on its
own GPU), and every non-ensemble model a zero-input warm-up, so loading (and engine building) happens
before the model turns READY, never on the first request.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig
from faceops.models.contract import InputContract, set_triton_parameters
from faceops.storage import NotFoundError, ObjectStore

log = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
ENSEMBLE_MARKER = "ENSEMBLE"  # an ensemble's version folder holds no model file; this keeps it in S3

#: platform -> model file inside a version folder
MODEL_FILES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
#: GPUs of each pod of the Triton the export is for; the chart's ConfigMap (kfp.configMapName) sets it
#: from triton.gpu.count, so export.instance_kind=auto follows the deployed server.
TRITON_GPUS_ENV = "FACEOPS_TRITON_GPUS"
#: name of ONNX Runtime's TensorRT execution accelerator in Triton's onnxruntime backend
TENSORRT_ACCELERATOR = "tensorrt"
WARMUP_NAME = "zeros"
#: config.pbtxt parameters ``provenance.<version>.<key>``: where each served version came from
PROVENANCE_PREFIX = "provenance."
#: one publish at a time per repository: a file at its root, which Triton (it loads folders) ignores
LOCK = ".faceops-publish.lock"
LOCK_WAIT_S = 1200.0  # how long a publish waits for another to finish (longer than LOCK_STALE_S)
# A publish uploads a few ONNX files under the lock (seconds to a minute): a lock this old belongs to a
# publish that died, e.g. with the store unreachable so it could not release it; it is broken (warned)
LOCK_STALE_S = 900.0
LOCK_POLL_S = 2.0


class ModelConfigError(FaceopsError):
    """A config.pbtxt does not parse as Triton's ModelConfig or breaks the serving contract."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension (Triton adds it when max_batch_size > 0)


def target_gpus(environ: Mapping[str, str] | None = None) -> int | None:
    """GPUs per pod of the Triton the export is for (``FACEOPS_TRITON_GPUS``); None when not told."""
    raw = (os.environ if environ is None else environ).get(TRITON_GPUS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise FaceopsError(f"{TRITON_GPUS_ENV}={raw!r}: expected the target Triton's GPU count (0, 1, ...); "
                           "the chart sets it from triton.gpu.count")
    return int(raw)


def resolve_instance_kind(cfg: ExportConfig, environ: Mapping[str, str] | None = None) -> str:
    """The instance_group kind to write: ``export.instance_kind``, with ``auto`` resolved from the
    target Triton's GPU count. KIND_GPU for a Triton without GPUs is refused: it would never load."""
    gpus = target_gpus(environ)
    if cfg.instance_kind == "auto":
        if gpus is None:  # e.g. a local run: the bundled Triton serves on CPU anyway
            log.info("export.instance_kind=auto and %s is not set: KIND_CPU instances, which every Triton "
                     "loads (on the cluster the chart's ConfigMap sets it from triton.gpu.count)", TRITON_GPUS_ENV)
        return "KIND_GPU" if gpus else "KIND_CPU"
    if cfg.instance_kind == "KIND_GPU" and gpus == 0:
        raise FaceopsError(f"export.instance_kind = KIND_GPU, but the target Triton has no GPU "
                           f"({TRITON_GPUS_ENV}=0, the chart's triton.gpu.count): it cannot load KIND_GPU "
                           "models; use export.instance_kind=auto (or KIND_CPU), or give Triton a GPU")
    return cfg.instance_kind


def model_config(name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 cfg: ExportConfig, instance_kind: str, contract: InputContract | None = None, *,
                 precision: str | None = None) -> mc.ModelConfig:
    """A ModelConfig for one ONNX/TensorRT model with the export's batching, instance, accelerator and
    warm-up settings, and the model's input contract as ``parameters`` (what the client prepares faces by).

    ``instance_kind`` is resolved already (:func:`resolve_instance_kind`); ``precision`` is the TensorRT
    precision of Triton's accelerator (default: FP16 when ``cfg.trt_fp16``; INT8 for a QDQ model)."""
    c = mc.ModelConfig(name=name, platform=platform, max_batch_size=cfg.max_batch_size)
    if contract is not None:
        set_triton_parameters(c, contract)
    _add_tensors(c.input, inputs)
    _add_tensors(c.output, outputs)
    c.version_policy.latest.num_versions = cfg.num_versions
    c.dynamic_batching.preferred_batch_size.extend(cfg.preferred_batch_sizes)
    c.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = c.instance_group.add()
    group.kind = mc.ModelInstanceGroup.Kind.Value(instance_kind)
    group.count = cfg.instance_count
    if (platform == "onnxruntime_onnx" and instance_kind == "KIND_GPU"
            and cfg.gpu_accelerator == TENSORRT_ACCELERATOR):
        _add_tensorrt_accelerator(c, inputs, cfg, precision or ("FP16" if cfg.trt_fp16 else "FP32"))
    if cfg.warmup:
        _add_warmup(c, inputs)
    return c


def _add_tensorrt_accelerator(c: mc.ModelConfig, inputs: list[TensorSpec], cfg: ExportConfig,
                              precision: str) -> None:
    """ONNX Runtime's TensorRT execution provider (keys of Triton's onnxruntime backend README; an
    unknown key fails the model load). One optimisation profile spans batch 1..max_batch_size, so the
    engine built at warm-up serves every batch the dynamic batcher forms without a rebuild."""
    opt = max(cfg.preferred_batch_sizes or [cfg.max_batch_size])
    params = {"precision_mode": precision,
              "max_workspace_size_bytes": str(cfg.trt_workspace_mb << 20),
              "trt_profile_min_shapes": _profile(inputs, 1),
              "trt_profile_opt_shapes": _profile(inputs, opt),
              "trt_profile_max_shapes": _profile(inputs, cfg.max_batch_size)}
    if cfg.trt_engine_cache:
        params["trt_engine_cache_enable"] = "true"
        params["trt_engine_cache_path"] = cfg.trt_engine_cache_path
    accelerator = c.optimization.execution_accelerators.gpu_execution_accelerator.add(name=TENSORRT_ACCELERATOR)
    accelerator.parameters.update(params)


def _profile(inputs: list[TensorSpec], batch: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in inputs)


def _add_warmup(c: mc.ModelConfig, inputs: list[TensorSpec]) -> None:
    """One zero batch of one face per input: Triton runs it while loading each version."""
    sample = c.model_warmup.add(name=WARMUP_NAME, batch_size=1)
    for spec in inputs:
        sample.inputs[spec.name].data_type = mc.TYPE_FP32
        sample.inputs[spec.name].dims.extend(spec.dims)
        sample.inputs[spec.name].zero_data = True


def accelerator_precision(config: mc.ModelConfig) -> str | None:
    """The TensorRT precision Triton serves ``config`` in ("FP16", "INT8", "FP32"), None without the
    TensorRT accelerator: what a check of the served outputs must allow for."""
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        if accelerator.name == TENSORRT_ACCELERATOR:
            return accelerator.parameters.get("precision_mode", "FP32")
    return None


def ensemble_config(name: str, dsr: str, recognizer: str, vlr_dims: tuple[int, int, int],
                    cfg: ExportConfig, embedding_dim: int, contract: InputContract | None = None) -> mc.ModelConfig:
    """``name``: VLR ``input`` -> ``dsr`` -> ``recognizer`` -> ``embedding`` [embedding_dim] (latest
    versions; the width is the recognizer's, which the caller takes from the model); ``contract`` is
    its input's, the DSR model's."""
    c = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=cfg.max_batch_size)
    if contract is not None:
        set_triton_parameters(c, contract)
    _add_tensors(c.input, [TensorSpec("input", vlr_dims)])
    _add_tensors(c.output, [TensorSpec("embedding", (embedding_dim,))])
    c.version_policy.latest.num_versions = cfg.num_versions
    first = c.ensemble_scheduling.step.add(model_name=dsr, model_version=-1)
    first.input_map["input"] = "input"
    first.output_map["output"] = "hr_face"
    second = c.ensemble_scheduling.step.add(model_name=recognizer, model_version=-1)
    second.input_map["input"] = "hr_face"
    second.output_map["embedding"] = "embedding"
    return c


def _add_tensors(field, specs: list[TensorSpec]) -> None:
    for spec in specs:
        field.add(name=spec.name, data_type=mc.TYPE_FP32, dims=list(spec.dims))


def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str, source: str = CONFIG) -> mc.ModelConfig:
    """Parse config.pbtxt text with Triton's ModelConfig protobuf; errors name the source."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{source} is not a valid Triton model config: {exc}") from None
    if not config.name:
        raise ModelConfigError(f"{source}: model config has no name")
    if not (config.platform or config.backend):
        raise ModelConfigError(f"{source}: model config '{config.name}' names no platform or backend")
    return config


def versions(store: ObjectStore, model: str) -> list[int]:
    """Version numbers present for ``model`` in the repository (sorted)."""
    found = set()
    for key in store.list(f"{model}/"):
        parts = key.split("/")
        if len(parts) >= 3 and parts[1].isdigit():
            found.add(int(parts[1]))
    return sorted(found)


def served_versions(store: ObjectStore, name: str, config: mc.ModelConfig) -> list[int]:
    """The versions of ``name`` that Triton serves from ``store`` under ``config.version_policy``."""
    found = versions(store, name)
    policy = config.version_policy
    if policy.HasField("specific"):
        return [v for v in found if v in set(policy.specific.versions)]
    if policy.HasField("all"):
        return found
    return found[-(policy.latest.num_versions or 1):]


def next_version(store: ObjectStore, model: str) -> int:
    return (versions(store, model) or [0])[-1] + 1


@contextmanager
def repository_lock(store: ObjectStore, holder: str, wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S,
                    poll_s: float = LOCK_POLL_S) -> Iterator[None]:
    """Hold the repository's publish lock (an object created only if absent): two publishes would pick
    the same version numbers and overwrite each other's files and configs."""
    token = uuid.uuid4().hex
    mine = json.dumps({"holder": holder, "token": token, "since": time.time(), "host": socket.gethostname(),
                       "pid": os.getpid()}).encode()
    deadline = time.monotonic() + wait_s
    while not store.create(LOCK, mine):
        try:
            held = json.loads(store.get_bytes(LOCK))
        except NotFoundError:  # released meanwhile
            continue
        except ValueError:
            held = {}
        age = time.time() - float(held.get("since", 0))
        dead = _holder_is_gone(held)
        if age > stale_s or dead:
            log.warning("breaking the publish lock %s of %s, held for %.0f s (%s)", store.url(LOCK),
                        held.get("holder", "?"), age, dead or f"> {stale_s:.0f} s: its publish died")
            store.delete(LOCK)
            continue
        if time.monotonic() > deadline:
            raise FaceopsError(f"{store.url(LOCK)}: another publish ({held.get('holder', '?')}) has held the "
                               f"repository for {age:.0f} s; retry when it ends, or delete the lock if that "
                               "run is gone")
        time.sleep(poll_s)
    _HELD.add(token)
    try:
        yield
    finally:
        _HELD.discard(token)
        try:
            if store.get_bytes(LOCK) == mine:
                store.delete(LOCK)
        except FaceopsError as exc:
            log.warning("could not release the publish lock %s (%s): the next publish breaks it once it sees its "
                        "holder gone (or after %.0f s)", store.url(LOCK), exc, LOCK_STALE_S)


_HELD: set[str] = set()  # tokens of the locks this process holds now


def _holder_is_gone(held: dict) -> str:
    """Why a lock's holder is known to be dead ("" when it may still run): a process of this host that
    no longer exists, or this very process, which no longer holds it (its release failed)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return ""
    if held["pid"] == os.getpid():
        return "" if held.get("token") in _HELD else "this process's earlier publish, which could not release it"
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return f"its process {held['pid']} on this host has exited"
    except PermissionError:
        pass
    return ""


def published_before(store: ObjectStore, names: list[str], run_id: str) -> dict[str, int] | None:
    """Each model's served version that run ``run_id`` published, if it published them all (a retried
    promotion finds its own work done), else None."""
    found = {}
    for name in names:
        key = f"{name}/{CONFIG}"
        if not store.exists(key):
            return None
        config = parse_config(store.get_bytes(key).decode(), store.url(key))
        mine = [v for v in served_versions(store, name, config)
                if version_provenance(config, v).get("run_id") == run_id]
        if not mine:
            return None
        found[name] = mine[-1]
    return found


def publish(store: ObjectStore, models: list[tuple[mc.ModelConfig, str | Path | None]],
            keep: int = 1, provenance: Mapping[str, Mapping[str, str]] | None = None,
            holder: str = "faceops export") -> dict[str, int]:
    """Publish ``models`` as new versions, all or none; returns each model's new version.

    Phase 1 uploads every file into its (inert) new version folder and removes them again if one
    upload fails. Phase 2 rewrites the configs to serve the last ``keep`` versions, leaf models
    first and then the ensembles, each ensemble step pinned to the version written with it. A version
    that another ensemble of the repository pins stays served: publishing one pipeline's models never
    changes what another pipeline's ensembles answer.
    ``provenance`` (``{model: {key: text}}``) becomes the new version's ``provenance.<version>.<key>``
    parameters; those of the older versions still served are kept from the current config. A publish
    whose ``run_id`` (in ``provenance``) already serves every one of ``models`` returns those versions:
    a retried step publishes nothing twice. One publish at a time (:func:`repository_lock`).
    """
    run_ids = {record.get("run_id") for record in (provenance or {}).values()}
    with repository_lock(store, holder):
        run_id = run_ids.pop() if len(run_ids) == 1 else None
        done = published_before(store, [c.name for c, _ in models], run_id) if run_id else None
        if done:
            log.info("run %s already serves %s from %s: nothing to publish", run_id,
                     ", ".join(f"{n} v{v}" for n, v in sorted(done.items())), store.uri)
            return done
        return _publish(store, models, keep, provenance or {})


def _publish(store: ObjectStore, models: list[tuple[mc.ModelConfig, str | Path | None]], keep: int,
             provenance: Mapping[str, Mapping[str, str]]) -> dict[str, int]:
    plan = {config.name: next_version(store, config.name) for config, _ in models}
    written: list[str] = []
    try:
        for config, model_file in models:
            name, version = config.name, plan[config.name]
            parse_config(to_text(config), f"{store.url(name)}/{CONFIG}")
            if config.platform == "ensemble":
                key = f"{name}/{version}/{ENSEMBLE_MARKER}"
                store.put_bytes(key, b"ensemble: no model file\n")
            else:
                if model_file is None:
                    raise FaceopsError(f"model {name} ({config.platform}) needs a model file")
                key = f"{name}/{version}/{MODEL_FILES[config.platform]}"
                store.put_file(key, model_file)
            written.append(key)
    except BaseException:
        for key in written:  # inert anyway; tidy up while the store still answers
            try:
                store.delete(key)
            except FaceopsError:
                break
        raise
    for config, _ in models:
        for step in config.ensemble_scheduling.step:
            step.model_version = plan.get(step.model_name, step.model_version)
    leaves = [c for c, _ in models if c.platform != "ensemble"]
    ensembles = [c for c, _ in models if c.platform == "ensemble"]
    # Leaves first, still serving every version an ensemble pins now (those being replaced included), so
    # a Triton poll between two writes never finds an ensemble pinning an unloaded version; then the
    # ensembles; then the leaves again, without the versions only the replaced ensembles pinned.
    for batch in (leaves, ensembles, leaves):
        pinned = pinned_versions(store)
        for config in batch:
            _write_config(store, config, plan[config.name], keep, pinned, provenance.get(config.name, {}))
    for config in leaves + ensembles:
        log.info("Triton repository: %s version %d (%s)", store.url(config.name), plan[config.name],
                 config.platform)
    return plan


def _write_config(store: ObjectStore, config: mc.ModelConfig, version: int, keep: int,
                  pinned: Mapping[str, set[int]], record: Mapping[str, str]) -> None:
    """``config`` serving its last ``keep`` versions up to ``version`` and every version an ensemble pins."""
    name = config.name
    config.version_policy.ClearField("latest")
    recent = [v for v in versions(store, name) if v <= version][-keep:]
    config.version_policy.specific.versions[:] = sorted(set(recent) | pinned.get(name, set()))
    _record_provenance(store, config, version, record)
    store.put_bytes(f"{name}/{CONFIG}", to_text(config).encode())


def rollback(store: ObjectStore, model: str, version: int, holder: str = "faceops rollback") -> dict[str, str]:
    """Serve ``version`` of ``model`` (a version folder still in the repository) instead of its newest,
    under the publish lock; versions an ensemble pins stay served. Returns that version's provenance.
    An ensemble is not rolled back: its config pins the versions of its steps, which would stay."""
    key = f"{model}/{CONFIG}"
    with repository_lock(store, holder):
        if not store.exists(key):
            raise FaceopsError(f"{store.url(model)}: no such model in the repository")
        config = parse_config(store.get_bytes(key).decode(), store.url(key))
        if config.platform == "ensemble":
            raise FaceopsError(f"{model} is an ensemble: roll back the models it pins (its steps), or publish the "
                               "older export again")
        present = versions(store, model)
        if version not in present:
            raise FaceopsError(f"{model} has no version {version} in {store.uri} (it has {present})")
        newer = sorted(v for v in pinned_versions(store).get(model, set()) if v > version)
        if newer:  # Triton answers a request without a version from the newest it serves
            raise FaceopsError(f"an ensemble pins {model} version(s) {newer}, which stay served, so requests "
                               f"would still reach them: publish the older export again instead")
        config.version_policy.ClearField("latest")
        config.version_policy.specific.versions[:] = sorted({version} | pinned_versions(store).get(model, set()))
        store.put_bytes(key, to_text(config).encode())
    log.info("Triton repository: %s now serves version %d", store.url(model), version)
    return version_provenance(config, version)


def pinned_versions(store: ObjectStore) -> dict[str, set[int]]:
    """``{model: versions}`` that the repository's ensembles pin."""
    pinned: dict[str, set[int]] = {}
    for key in store.list():
        parts = key.split("/")
        if len(parts) != 2 or parts[1] != CONFIG:
            continue
        config = parse_config(store.get_bytes(key).decode(), store.url(key))
        for step in config.ensemble_scheduling.step:
            if step.model_version > 0:
                pinned.setdefault(step.model_name, set()).add(step.model_version)
    return pinned


def _record_provenance(store: ObjectStore, config: mc.ModelConfig, version: int, record: Mapping[str, str]) -> None:
    """Config parameters saying where each version came from: the new version's ``record``, and the
    entries of the older versions still in the repository carried over from the config being replaced."""
    for name in [k for k in config.parameters if k.startswith(PROVENANCE_PREFIX)]:
        del config.parameters[name]
    present = {str(v) for v in versions(store, config.name)} - {str(version)}  # kept: a rollback may serve them
    key = f"{config.name}/{CONFIG}"
    if present and store.exists(key):
        current = parse_config(store.get_bytes(key).decode(), store.url(key))
        for name, value in current.parameters.items():
            if name.startswith(PROVENANCE_PREFIX) and name.split(".")[1] in present:
                config.parameters[name].string_value = value.string_value
    for name, value in record.items():
        config.parameters[f"{PROVENANCE_PREFIX}{version}.{name}"].string_value = str(value)


def version_provenance(config: mc.ModelConfig, version: int) -> dict[str, str]:
    """What a config records about where ``version`` came from (empty for an unrecorded one)."""
    prefix = f"{PROVENANCE_PREFIX}{version}."
    return {k.removeprefix(prefix): v.string_value for k, v in config.parameters.items() if k.startswith(prefix)}


def validate_repository(store: ObjectStore) -> dict[str, mc.ModelConfig]:
    """Parse every config.pbtxt; check each model has a version and each ensemble step exists."""
    configs = {}
    for key in store.list():
        parts = key.split("/")
        if len(parts) == 2 and parts[1] == CONFIG:
            configs[parts[0]] = parse_config(store.get_bytes(key).decode(), store.url(key))
    for name, config in configs.items():
        if config.name != name:
            raise ModelConfigError(f"{store.url(name)}/{CONFIG}: name '{config.name}' differs from its "
                                   f"folder '{name}'")
        if not versions(store, name):
            raise ModelConfigError(f"{store.url(name)}: no version folder (e.g. {name}/1/)")
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                raise ModelConfigError(f"ensemble {name} uses model '{step.model_name}', which the "
                                       f"repository {store.uri} does not hold")
    if not configs:
        raise ModelConfigError(f"{store.uri} holds no Triton model (no <model>/{CONFIG})")
    return configs
