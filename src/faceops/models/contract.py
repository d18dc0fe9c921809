"""A model's input contract: how the faces it takes were prepared (ARCHITECTURE.md).

A recognizer fed faces cropped differently from its training faces raises no error; it just scores
lower (issue 11: 0.64 against 0.83 verification accuracy on LFW, only the crop differed). So the
preparation travels with the model and nobody downstream guesses it:

* training records it in the checkpoint (``input_contract``), taken from the training dataset's
  manifest (its ingest config's ``prepare`` and ``degrade`` sections);
* export writes it into every ONNX file (``metadata_props``) and every Triton ``config.pbtxt``
  (``parameters``), as the same ``faceops_input_*`` string pairs;
* evaluation, export, the Triton client and galleries read it back (:func:`resolve`): an explicit
  option that contradicts it is an error naming both values, and a model saved before contracts
  existed is assumed to take ingest's defaults, with a warning saying so.

:class:`InputContract` is the one definition of the fields and of the three encodings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from faceops import config
from faceops.config import ConfigError, check
from faceops.data.degrade import DegradeConfig, parse_size
from faceops.data.prepare import PrepareConfig
from faceops.data.tensors import MEAN, STD, to_input
from faceops.errors import FaceopsError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "input_contract"  # key of the contract in a checkpoint (a plain dict)
PREFIX = "faceops_input_"  # ONNX metadata_props / Triton parameter keys: PREFIX + field name
VERSION_KEY = f"{PREFIX}contract"  # present (value VERSION) on every model that carries a contract
VERSION = "1"
PREPARE_FIELDS = ("hr_size", "center_crop")  # what ingest.prepare decides
DEGRADE_FIELDS = ("blur_sigma", "noise_std", "jpeg_quality")  # what ingest.degrade decides (VLR input)
HR_FIELDS = (*PREPARE_FIELDS, "channel_order", "mean", "std")  # the HR face every model of a chain shares


class ContractError(FaceopsError):
    """A recorded input contract cannot be read (malformed metadata or parameters)."""


class ContractConflictError(ContractError, ConfigError):
    """An explicit option, a dataset or another model contradicts a model's input contract."""


@dataclass(frozen=True)
class InputContract:
    """How a model's input faces are prepared; the defaults are ingest's defaults."""

    hr_size: int = 112  # side of the square HR face (ingest.prepare.hr_size)
    center_crop: int | None = None  # centre crop (source px) before resizing; None: the centre square
    channel_order: Literal["RGB", "BGR"] = "RGB"  # channel order of the network input
    mean: float = MEAN  # network input = (pixel / 255 - mean) / std, every channel
    std: float = STD
    vlr_size: str | None = None  # "WxH" when the model takes VLR faces (DSR, fused VLR); None: HR faces
    # the VLR degradation a VLR-input model was trained on (ingest.degrade); None on HR-input models
    blur_sigma: tuple[float, float] | None = None
    noise_std: tuple[float, float] | None = None
    jpeg_quality: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.prepare_config()  # the same checks as ingest's own config
        check(self.std > 0, f"input contract: std must be > 0, got {self.std}")
        if self.vlr_size is None:
            check(all(getattr(self, f) is None for f in DEGRADE_FIELDS),
                  "input contract: a degradation (blur_sigma, noise_std, jpeg_quality) needs a vlr_size")
            return
        parse_size(self.vlr_size)
        for name in ("blur_sigma", "noise_std"):  # a VLR input always states its degradation
            if getattr(self, name) is None:
                object.__setattr__(self, name, (0.0, 0.0))
        self.degrade_config()

    # -- views as ingest's configs
    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(hr_size=self.hr_size, center_crop=self.center_crop)

    def degrade_config(self, sizes: list[str] | None = None) -> DegradeConfig:
        """The degradation of a VLR-input model (ingest's defaults for an HR-input one)."""
        if self.vlr_size is None:
            return DegradeConfig(sizes=list(sizes or []))
        return DegradeConfig(sizes=list(sizes or [self.vlr_size]), blur_sigma=self.blur_sigma,
                             noise_std=self.noise_std, jpeg_quality=self.jpeg_quality)

    def hr_part(self) -> InputContract:
        """The HR-face part alone: what a recognizer downstream of this model must share."""
        return InputContract(**{f: getattr(self, f) for f in HR_FIELDS})

    def for_vlr(self, vlr_size: str, degrade: DegradeConfig) -> InputContract:
        """This HR preparation, degraded to ``vlr_size`` as ``degrade`` says (a DSR model's input)."""
        return dataclasses.replace(self, vlr_size=vlr_size, blur_sigma=tuple(degrade.blur_sigma),
                                   noise_std=tuple(degrade.noise_std),
                                   jpeg_quality=None if degrade.jpeg_quality is None
                                   else tuple(degrade.jpeg_quality))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], vlr_size: str | None = None,
                      source: str = "manifest") -> InputContract:
        """The preparation a dataset's faces got at ingest (its manifest's ``config``)."""
        ingest_cfg = manifest.get("config") or {}
        prep = ingest_cfg.get("prepare") or {"hr_size": manifest.get("hr_size", PrepareConfig.hr_size)}
        hr = cls(**config.to_dict(config.from_dict(PrepareConfig, prep, f"{source} config.prepare")))
        if vlr_size is None:
            return hr
        degrade = config.from_dict(DegradeConfig, ingest_cfg.get("degrade") or {}, f"{source} config.degrade")
        return hr.for_vlr(vlr_size, degrade)

    # -- the network input
    def to_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC RGB faces -> float32 NCHW network input, normalised as this contract says."""
        images = np.ascontiguousarray(images)
        if (self.mean, self.std) == (MEAN, STD):
            x = to_input(images)  # bit-identical to what training fed
        else:
            t = torch.as_tensor(images)
            t = t.unsqueeze(0) if t.ndim == 3 else t
            x = (t.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        if self.channel_order == "BGR":
            x = x.flip(1)
        return np.ascontiguousarray(x.numpy())

    # -- encodings
    def to_dict(self) -> dict[str, Any]:
        """The checkpoint form (plain types; tuples become lists)."""
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> InputContract:
        try:
            return config.from_dict(cls, dict(data), f"{source} {CHECKPOINT_KEY}")
        except ConfigError as exc:
            raise ContractError(f"unreadable input contract: {exc}") from None

    def to_properties(self) -> dict[str, str]:
        """String pairs for ONNX ``metadata_props`` and Triton ``parameters`` (one encoding for both)."""
        return {VERSION_KEY: VERSION, **{PREFIX + f.name: _encode(getattr(self, f.name))
                                         for f in dataclasses.fields(self)}}

    @classmethod
    def from_properties(cls, props: Mapping[str, str], source: str) -> InputContract | None:
        """The contract in ``props`` (ONNX metadata or Triton parameters); None when it has none."""
        if VERSION_KEY not in props:
            return None
        if props[VERSION_KEY] != VERSION:
            raise ContractError(f"{source}: input contract version {props[VERSION_KEY]!r}; this faceops reads "
                                f"version {VERSION} (upgrade faceops)")
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, text in props.items():
            name = key.removeprefix(PREFIX)
            if not key.startswith(PREFIX) or key == VERSION_KEY:
                continue
            if name not in names:
                raise ContractError(f"{source}: unknown input contract field {key!r}")
            values[name] = _decode(text, name)
        try:
            return config.from_dict(cls, values, source)
        except ConfigError as exc:
            raise ContractError(f"malformed input contract: {exc}") from None

    def describe(self) -> str:
        """One line for logs, errors and the report."""
        parts = [f"hr_size={self.hr_size}", f"center_crop={self.center_crop}", self.channel_order,
                 f"(x/255-{self.mean:g})/{self.std:g}"]
        if self.vlr_size:
            parts += [f"vlr_size={self.vlr_size}", *(f"{f}={getattr(self, f)}" for f in DEGRADE_FIELDS)]
        return ", ".join(parts)

    def differences(self, other: InputContract, fields: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
        return [(f, getattr(self, f), getattr(other, f)) for f in fields if getattr(self, f) != getattr(other, f)]


def _encode(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def _decode(text: str, name: str) -> Any:
    """A property string back to the plain value ``config.from_dict`` checks and types."""
    if text == "none":
        return None
    if name in DEGRADE_FIELDS:
        return [_number(v) for v in text.split(",")]
    if name in ("channel_order", "vlr_size"):
        return text
    return _number(text)


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # from_dict names the key and the bad value


# -- where a contract is recorded ---------------------------------------------------------------------
def from_checkpoint(meta: Mapping[str, Any], source: str) -> InputContract | None:
    """The contract of a checkpoint (its metadata from ``load_model``); None for an old one."""
    data = meta.get(CHECKPOINT_KEY)
    return None if data is None else InputContract.from_dict(data, source)


def vlr_size_of(meta: Mapping[str, Any]) -> str | None:
    """The VLR size (``"WxH"``) a checkpoint's model takes, from its metadata (``load_model``): the
    top-level ``vlr_size`` a training task records, else its ``model_config``'s; None when neither
    has one (a model that takes HR faces, or a DSR checkpoint saved without it)."""
    size = meta.get("vlr_size") or (meta.get("model_config") or {}).get("vlr_size")
    return str(size) if size else None


def dataset_contract(dataset_uri: str, vlr_size: str | None = None) -> InputContract:
    """What a model trained on ``dataset_uri`` takes (read from its manifest)."""
    from faceops.data.manifest import load_manifest

    return InputContract.from_manifest(load_manifest(dataset_uri), vlr_size, f"{dataset_uri} manifest")


def check_prepared_alike(dataset_uri: str, ingested: InputContract, model: InputContract, who: str,
                         remedy: str) -> None:
    """A dataset's faces were prepared at ingest and are used as they are: refuse a dataset prepared
    unlike ``model`` (``who`` names it), naming the field, both values and ``remedy`` (what to do,
    ``{name}``/``{want}`` filled in)."""
    diff = ingested.differences(model, PREPARE_FIELDS)
    if diff:
        name, got, want = diff[0]
        raise ContractConflictError(
            f"{dataset_uri} was ingested with prepare.{name} = {shown(got)}, but {who} was trained with {name} = "
            f"{shown(want)} (its input contract): " + remedy.format(name=name, want=shown(want)))


def checkpoint_entry(dataset_uri: str | None, vlr_size: str | None = None) -> dict[str, Any]:
    """``{"input_contract": ...}`` for a training task's ``checkpoint_meta`` ({} without a dataset)."""
    return {CHECKPOINT_KEY: dataset_contract(dataset_uri, vlr_size).to_dict()} if dataset_uri else {}


def onnx_contract(metadata: Mapping[str, str], source: str) -> InputContract | None:
    """The contract of an ONNX model from its metadata (``onnx`` metadata_props as a dict, or ONNX
    Runtime's ``get_modelmeta().custom_metadata_map``)."""
    return InputContract.from_properties(metadata, f"{source} metadata_props")


def write_onnx_contract(path, contract: InputContract) -> None:
    """Record ``contract`` in the ONNX file at ``path`` (other metadata kept, ours replaced)."""
    import onnx

    model = onnx.load(str(path))
    props = contract.to_properties()
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def onnx_file_contract(path) -> InputContract | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return onnx_contract({p.key: p.value for p in model.metadata_props}, str(path))


def set_triton_parameters(model_config, contract: InputContract) -> None:
    """Record ``contract`` in a Triton ``ModelConfig`` protobuf's ``parameters``."""
    for key, value in contract.to_properties().items():
        model_config.parameters[key].string_value = value


def triton_contract(parameters: Mapping[str, Any], source: str) -> InputContract | None:
    """The contract in Triton parameters: a ModelConfig's ``parameters`` map, or its JSON form
    (``{"key": {"string_value": "..."}}``) as the client's ``get_model_config`` returns it."""
    flat = {k: v["string_value"] if isinstance(v, Mapping) else getattr(v, "string_value", v)
            for k, v in parameters.items()}
    return InputContract.from_properties(flat, f"{source} parameters")


# -- reading it back ----------------------------------------------------------------------------------
def explicit_fields(prepare: PrepareConfig | Mapping[str, Any] | None = None,
                    degrade: DegradeConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a caller stated: every field of a config object, only the given keys of a mapping."""
    out: dict[str, Any] = {}
    for given, fields in ((prepare, PREPARE_FIELDS), (degrade, DEGRADE_FIELDS)):
        if given is None:
            continue
        items = given if isinstance(given, Mapping) else config.to_dict(given)
        out.update({k: _plain(v) for k, v in items.items() if k in fields})
    return out


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check_agrees(contract: InputContract, explicit: Mapping[str, Any], model: str, option: str) -> None:
    """Raise :class:`ContractConflictError` naming both values when ``explicit`` contradicts ``contract``."""
    for name, value in explicit.items():
        if name in DEGRADE_FIELDS and contract.vlr_size is None:
            continue  # an HR-input model has no degradation to contradict
        recorded = getattr(contract, name)
        if _plain(value) != recorded:
            raise ContractConflictError(
                f"{option} gives {name} = {shown(value)}, but {model} was trained with {name} = "
                f"{shown(recorded)} (its input contract: {contract.describe()}); leave the option out to "
                f"use the model's, or use a model trained with {name} = {shown(value)}")


def shown(value: Any) -> str:
    """A value as a config file writes it (``null``, ``[1.0, 3.0]``), for messages."""
    return "null" if value is None else str(list(value) if isinstance(value, tuple) else value)


def assume(model: str, explicit: Mapping[str, Any] | None = None, option: str = "",
           base: InputContract | None = None, vlr_size: str | None = None) -> InputContract:
    """The contract taken for a model that records none: the HR face of ``base`` (ingest's defaults
    without one), degraded to ``vlr_size`` for a VLR-input model, with ``explicit`` laid over it. The
    warning says exactly what is assumed."""
    values: dict[str, Any] = {f: getattr(base or InputContract(), f) for f in HR_FIELDS}
    given = {k: v for k, v in (explicit or {}).items() if vlr_size is not None or k not in DEGRADE_FIELDS}
    if vlr_size is not None:
        values["vlr_size"] = vlr_size
    values.update(given)
    contract = InputContract(**values)
    origin = "the faces of the models it is used with" if base else "ingest's defaults"
    if given and option:
        origin = f"{option} over {origin}"
    log.warning("%s records no input contract (saved before faceops recorded one): assuming %s (%s)", model,
                contract.describe(), origin)
    return contract


def resolve(contract: InputContract | None, model: str, explicit: Mapping[str, Any] | None = None,
            option: str = "") -> InputContract:
    """The contract to prepare inputs by: the model's own, checked against ``explicit``; for a model
    without one, what :func:`assume` takes."""
    if contract is None:
        return assume(model, explicit, option)
    check_agrees(contract, explicit or {}, model, option)
    return contract


def shared_preparation(models: list[tuple[str, InputContract | None]], explicit: Mapping[str, Any] | None = None,
                       option: str = "") -> list[InputContract]:
    """HR contracts of ``(label, recorded contract)`` models that see the same HR faces (a recognizer,
    its fine-tuned twin, DSR models whose output it embeds), in order: the recorded ones must agree on
    the HR face, ``explicit`` must agree with them, and a model without one is assumed to take the
    recorded faces (``explicit`` over ingest's defaults when none is recorded)."""
    known = [(label, c.hr_part()) for label, c in models if c is not None]
    reference = known[0] if known else None
    for label, c in known[1:]:
        diff = reference[1].differences(c, HR_FIELDS)
        if diff:
            name, a, b = diff[0]
            raise ContractConflictError(
                f"{reference[0]} was trained with {name} = {shown(a)} but {label} with {name} = {shown(b)}: "
                "models evaluated or served together must take the same faces")
    hr_explicit = {k: v for k, v in (explicit or {}).items() if k not in DEGRADE_FIELDS}
    if reference is not None:
        check_agrees(reference[1], hr_explicit, reference[0], option)
    base = reference[1] if reference else None
    return [c.hr_part() if c is not None else assume(label, None if base else hr_explicit, option, base=base)
            for label, c in models]


__all__ = [
    "CHECKPOINT_KEY", "ContractConflictError", "ContractError", "InputContract", "assume", "check_agrees",
    "checkpoint_entry", "dataset_contract", "explicit_fields", "from_checkpoint", "onnx_contract",
    "onnx_file_contract", "resolve", "set_triton_parameters", "shared_preparation", "shown", "triton_contract",
    "vlr_size_of", "write_onnx_contract",
]
