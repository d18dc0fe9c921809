"""The Triton model repository, written to any store (a cluster Triton reads it from MinIO).

Layout: ``<repo>/<model>/config.pbtxt`` + ``<repo>/<model>/<version>/model.onnx`` (or ``model.plan``).
Configs are built as Triton's own ``ModelConfig`` protobuf (shipped in tritonclient), written as text
and parsed back before upload, so a config Triton would reject never lands in the repository.
Each export adds a new version number per model. Publishing is two-phase (``publish``): every model
file goes into its new version folder first, where Triton ignores it (configs name the versions
they serve: ``version_policy: specific``); only then are the configs switched, leaf models before
the ensembles that pin them. An export that fails half-way leaves Triton serving what it served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from faceops.errors import FaceopsError
from faceops.export.config import ExportConfig
from faceops.models.contract import InputContract, set_triton_parameters
from faceops.storage import ObjectStore

log = logging.getLogger(__name__)

CONFIG = "config.pbtxt"
ENSEMBLE_MARKER = "ENSEMBLE"  # an ensemble's version folder holds no model file; this keeps it in S3

#: platform -> model file inside a version folder
MODEL_FILES: dict[str, str] = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


class ModelConfigError(FaceopsError):
    """A config.pbtxt does not parse as Triton's ModelConfig or breaks the serving contract."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension (Triton adds it when max_batch_size > 0)


def model_config(name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 cfg: ExportConfig, instance_kind: str | None = None,
                 contract: InputContract | None = None) -> mc.ModelConfig:
    """A ModelConfig for one ONNX/TensorRT model with the export's batching and instance settings, and
    the model's input contract as ``parameters`` (what the client prepares faces by)."""
    c = mc.ModelConfig(name=name, platform=platform, max_batch_size=cfg.max_batch_size)
    if contract is not None:
        set_triton_parameters(c, contract)
    _add_tensors(c.input, inputs)
    _add_tensors(c.output, outputs)
    c.version_policy.latest.num_versions = cfg.num_versions
    c.dynamic_batching.preferred_batch_size.extend(cfg.preferred_batch_sizes)
    c.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us
    group = c.instance_group.add()
    group.kind = mc.ModelInstanceGroup.Kind.Value(instance_kind or cfg.instance_kind)
    group.count = cfg.instance_count
    return c


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


def next_version(store: ObjectStore, model: str) -> int:
    return (versions(store, model) or [0])[-1] + 1


def publish(store: ObjectStore, models: list[tuple[mc.ModelConfig, str | Path | None]],
            keep: int = 1) -> dict[str, int]:
    """Publish ``models`` as new versions, all or none; returns each model's new version.

    Phase 1 uploads every file into its (inert) new version folder and removes them again if one
    upload fails. Phase 2 rewrites the configs to serve the last ``keep`` versions, leaf models
    first and then the ensembles, each ensemble step pinned to the version written with it.
    """
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
    for config, _ in sorted(models, key=lambda m: m[0].platform == "ensemble"):
        name, version = config.name, plan[config.name]
        config.version_policy.ClearField("latest")
        config.version_policy.specific.versions[:] = [v for v in versions(store, name) if v <= version][-keep:]
        for step in config.ensemble_scheduling.step:
            step.model_version = plan.get(step.model_name, step.model_version)
        store.put_bytes(f"{name}/{CONFIG}", to_text(config).encode())
        log.info("Triton repository: %s version %d (%s)", store.url(name), version, config.platform)
    return plan


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
