"""``export_model``: checkpoints -> ONNX (+INT8, +TensorRT) -> parity gates -> Triton repository.

Triton names (ARCHITECTURE.md): ``recognizer``, ``dsr``, ensemble ``vlr_face`` (dsr -> recognizer).
Extras beside the contract, each with the recognizer's tensor names and shapes:
``vlr_fused`` (DSR -> resize -> recognizer as one ONNX graph), ``recognizer_int8`` (QDQ INT8),
``recognizer_trt`` / ``recognizer_trt_int8`` (offline tensorrt_plan engines, ``trt=True`` on a GPU node
with TensorRT; anywhere else that is an error).
With several DSR models (one per VLR size) the size-specific ones are ``dsr_<WxH>``,
``vlr_face_<WxH>`` and ``vlr_fused_<WxH>``; with one they take the plain contract names. A size given
its own recognizer (fine-tuned on that size's DSR outputs: ``finetuned``) serves it as
``recognizer_<WxH>``, which that size's ensemble and fused model use; ``recognizer`` stays the given
(HR) recognizer, and the size-specific names are used even for one size.

Every model carries its input contract (:mod:`faceops.models.contract`) in its ONNX metadata and its
``config.pbtxt`` parameters: the recognizer's (HR faces) on the recognizer-like models, the DSR
model's (VLR faces) on ``dsr``, ``vlr_fused`` and ``vlr_face``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceops.data import degrade
from faceops.errors import FaceopsError
from faceops.export import int8 as int8_mod
from faceops.export import tensorrt as trt_mod
from faceops.export.config import ExportConfig
from faceops.export.onnx_export import (
    HR_SIZE,
    FusedVLR,
    check_parity,
    embedding_dim,
    export_onnx,
)
from faceops.export.triton_repo import (
    TensorSpec,
    ensemble_config,
    model_config,
    publish,
    resolve_instance_kind,
    target_gpus,
    validate_repository,
)
from faceops.models.contract import (
    InputContract,
    assume,
    check_agrees,
    dataset_contract,
    explicit_fields,
    from_checkpoint,
    shared_preparation,
    vlr_size_of,
    write_onnx_contract,
)
from faceops.storage import open_store

log = logging.getLogger(__name__)

FORMATS = ("onnx",)
HR_DIMS = (3, HR_SIZE, HR_SIZE)
IN_SPEC = [TensorSpec("input", HR_DIMS)]


def embedding_spec(dim: int) -> list[TensorSpec]:
    """The ``embedding`` output of every recognizer-like model, as wide as the recognizer's."""
    return [TensorSpec("embedding", (dim,))]


@dataclass
class CalibData:
    """Real validation faces: parity batches, INT8 calibration and the INT8 accuracy pairs."""

    hr: np.ndarray  # uint8 [N,112,112,3]
    vlr: dict[str, np.ndarray] = field(default_factory=dict)  # "WxH" -> uint8 [N,h,w,3]
    pairs: list[tuple[int, int, bool]] = field(default_factory=list)

    @classmethod
    def from_dataset(cls, dataset_uri: str, split: str = "val") -> CalibData:
        from faceops.data.reader import load_split

        data = load_split(dataset_uri, split)
        return cls(hr=data.hr, vlr=dict(data.vlr), pairs=list(data.pairs))


def _batch(images: np.ndarray | None, dims: tuple[int, int, int], n: int, what: str,
           contract: InputContract) -> torch.Tensor:
    if images is not None and len(images):
        return torch.from_numpy(contract.to_input(images[:n]))
    log.warning("parity for %s runs on a seeded random batch: pass a dataset for real faces", what)
    gen = torch.Generator().manual_seed(0)
    return torch.rand((n, *dims), generator=gen) * 2 - 1


@dataclass(frozen=True)
class VLRNames:
    """The Triton names of one VLR size's models."""

    dsr: str
    ensemble: str
    fused: str
    recognizer: str = "recognizer"  # what the ensemble and the fused model embed with


def _names(sizes: list[str], tuned: frozenset[str] = frozenset(), hr: str = "recognizer") -> dict[str, VLRNames]:
    """VLR size -> its Triton names; plain contract names when there is one size and it has no
    recognizer of its own (``tuned``: the sizes that have one, ``recognizer_<size>``); ``hr``: the HR
    recognizer's name (``export.name``)."""
    if len(sizes) == 1 and not tuned:
        return {sizes[0]: VLRNames("dsr", "vlr_face", "vlr_fused", hr)}
    return {s: VLRNames(f"dsr_{s}", f"vlr_face_{s}", f"vlr_fused_{s}",
                        f"recognizer_{s}" if s in tuned else hr) for s in sizes}


def _contracts_for(recognizer: InputContract | None, dsrs: dict[str, InputContract | None],
                   tuned: dict[str, InputContract | None] | None = None) -> tuple[
        InputContract, dict[str, InputContract], dict[str, InputContract]]:
    """The contracts to export with: the recorded ones, which must agree on the HR face (the ensemble
    feeds the DSR output to the recognizer); a model recording none is assumed to take the others'.
    Returns the recognizer's, the DSR models' and the size recognizers' (``tuned``) contracts."""
    tuned = tuned or {}
    for size, c in dsrs.items():
        if c is not None and c.vlr_size != size:
            raise FaceopsError(f"the {size} DSR model's input contract says it takes {c.vlr_size} faces")
    named = [("the recognizer", recognizer), *((f"the {s} fine-tuned recognizer", c) for s, c in tuned.items()),
             *((f"the {s} DSR model", c) for s, c in dsrs.items())]
    shared = shared_preparation(named)
    hr = shared[0]
    return (hr, {s: c or assume(f"the {s} DSR model", base=hr, vlr_size=s) for s, c in dsrs.items()},
            dict(zip(tuned, shared[1:1 + len(tuned)], strict=True)))


def export_modules(recognizer: nn.Module, repo_uri: str, dsrs: dict[str, nn.Module] | None = None,
                   cfg: ExportConfig | None = None, calib: CalibData | None = None, int8: bool = False,
                   trt: bool = False, work_dir: str | Path | None = None, contract: InputContract | None = None,
                   dsr_contracts: dict[str, InputContract] | None = None,
                   finetuned: dict[str, nn.Module] | None = None,
                   finetuned_contracts: dict[str, InputContract | None] | None = None) -> dict:
    """Export in-memory models (see :func:`export_model`); returns paths, versions and parity figures.

    ``contract`` / ``dsr_contracts`` (per VLR size): the models' input contracts, written into every
    ONNX file and Triton config; a model given none is assumed to take ingest's defaults (warned).
    ``finetuned`` (per VLR size, each size with a DSR model): the recognizer that size's ensemble and
    fused model embed with, served as ``recognizer_<size>`` (contracts in ``finetuned_contracts``).
    ``trt`` where no engine can be built, or for a Triton without GPUs, fails before any work."""
    cfg = cfg or ExportConfig()
    kind = resolve_instance_kind(cfg)
    finetuned = finetuned or {}
    stray = sorted(set(finetuned) - set(dsrs or {}))
    if stray:
        raise FaceopsError(f"fine-tuned recognizers for VLR size(s) {stray} without a DSR model of that size "
                           f"(DSR sizes: {sorted(dsrs or {})})")
    if trt:
        _check_trt_target()
    contract, vlr_contracts, tuned_contracts = _contracts_for(
        contract, {s: (dsr_contracts or {}).get(s) for s in sorted(dsrs or {})},
        {s: (finetuned_contracts or {}).get(s) for s in sorted(finetuned)})
    store = open_store(repo_uri)
    tmp = tempfile.TemporaryDirectory(prefix="faceops-export-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    report: dict = {"repo": store.uri, "instance_kind": kind, "models": {}}
    pending: list = []  # models are staged and published only once every gate has passed
    try:
        hr_batch = _batch(calib.hr if calib else None, HR_DIMS, cfg.parity_batch, "recognizer", contract)
        emb = embedding_spec(embedding_dim(recognizer, hr_batch))
        rec_path = export_onnx(recognizer, work / "recognizer.onnx", hr_batch[:1], "recognizer", cfg)
        write_onnx_contract(rec_path, contract)
        parity = check_parity("recognizer", rec_path, recognizer, hr_batch, cfg)
        _publish(pending, model_config(cfg.name, "onnxruntime_onnx", IN_SPEC, emb, cfg, kind, contract),
                 rec_path, parity.as_dict())
        int8_path = (_export_int8(pending, report, rec_path, calib, cfg, work, emb, contract, kind)
                     if int8 else None)
        for size, names in _names(sorted(dsrs or {}), frozenset(finetuned), cfg.name).items():
            size_recognizer = recognizer
            if size in finetuned:
                size_recognizer = finetuned[size]
                _export_recognizer(pending, size_recognizer, names.recognizer, hr_batch, cfg, work, emb,
                                   tuned_contracts[size], kind)
            _export_vlr(pending, report, size_recognizer, dsrs[size], size, names, calib, cfg, work, emb,
                        vlr_contracts[size], kind)
        if trt:
            report["tensorrt"] = _export_trt(pending, report, recognizer, rec_path, int8_path, hr_batch, cfg,
                                             work, emb, contract)
        plan = publish(store, [(config, model_file) for config, model_file, _ in pending], cfg.num_versions)
        for config, _, parity in pending:
            version = plan[config.name]
            report["models"][config.name] = {"version": version, "platform": config.platform,
                                             "uri": store.url(f"{config.name}/{version}"), "parity": parity}
        validate_repository(store)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return report


def _check_trt_target() -> None:
    """Offline engines need TensorRT here and a GPU Triton there; refuse early, before any export work."""
    trt_mod.require_tensorrt()
    if target_gpus() == 0:
        raise trt_mod.TensorRTUnavailableError(
            "--trt publishes TensorRT engines (KIND_GPU only), but the target Triton has no GPU "
            "(FACEOPS_TRITON_GPUS=0, the chart's triton.gpu.count); drop --trt")


def _export_int8(pending, report: dict, rec_path: Path, calib: CalibData | None, cfg: ExportConfig,
                 work: Path, emb: list[TensorSpec], contract: InputContract, kind: str) -> Path:
    if calib is None:
        raise FaceopsError("--int8 needs calibration faces: pass the dataset (calib_dataset / --dataset) "
                           "whose val split calibrates and scores the INT8 model")
    int8_path = int8_mod.quantize_int8(rec_path, work / "recognizer_int8.onnx", calib.hr, cfg)
    n_cal = min(len(calib.hr), cfg.int8_calib_images)
    accuracy = int8_mod.int8_accuracy_change(rec_path, int8_path, calib.hr, calib.pairs, n_cal, cfg)
    report["int8"] = accuracy.as_dict()
    # a QDQ graph: Triton's TensorRT accelerator runs it in INT8 (explicit quantization)
    _publish(pending, model_config(f"{cfg.name}_int8", "onnxruntime_onnx", IN_SPEC, emb, cfg, kind, contract,
                                   precision="INT8"), int8_path, None)
    return int8_path


def _export_recognizer(pending, model: nn.Module, name: str, hr_batch: torch.Tensor, cfg: ExportConfig,
                       work: Path, emb: list[TensorSpec], contract: InputContract, kind: str) -> None:
    """A further recognizer (a VLR size's fine-tuned one) with the recognizer's tensors and parity gate."""
    dim = embedding_dim(model, hr_batch)
    if dim != emb[0].dims[0]:
        raise FaceopsError(f"{name} embeds into {dim} dimensions, the recognizer into {emb[0].dims[0]}")
    path = export_onnx(model, work / f"{name}.onnx", hr_batch[:1], "recognizer", cfg)
    write_onnx_contract(path, contract)
    parity = check_parity(name, path, model, hr_batch, cfg)
    _publish(pending, model_config(name, "onnxruntime_onnx", IN_SPEC, emb, cfg, kind, contract), path,
             parity.as_dict())


def _export_vlr(pending, report: dict, recognizer: nn.Module, dsr: nn.Module, size: str,
                names: VLRNames, calib: CalibData | None, cfg: ExportConfig, work: Path,
                emb: list[TensorSpec], contract: InputContract, kind: str) -> None:
    """DSR model, fused DSR->recognizer model and the ensemble for one VLR size (all take the DSR
    model's VLR faces: ``contract``); ``recognizer`` is the one served as ``names.recognizer``."""
    dsr_name, ens_name, fused_name = names.dsr, names.ensemble, names.fused
    w, h = degrade.parse_size(size)
    vlr_dims = (3, h, w)
    vlr_spec = [TensorSpec("input", vlr_dims)]
    vlr_batch = _batch(calib.vlr.get(size) if calib else None, vlr_dims, cfg.parity_batch, dsr_name, contract)
    dsr_path = export_onnx(dsr, work / f"{dsr_name}.onnx", vlr_batch[:1], "dsr", cfg)
    write_onnx_contract(dsr_path, contract)
    parity = check_parity(dsr_name, dsr_path, dsr, vlr_batch, cfg)
    _publish(pending, model_config(dsr_name, "onnxruntime_onnx", vlr_spec, [TensorSpec("output", HR_DIMS)], cfg,
                                   kind, contract), dsr_path, parity.as_dict())
    fused = FusedVLR(dsr, recognizer, cfg.vlr_resize_mode)
    fused_path = export_onnx(fused, work / f"{fused_name}.onnx", vlr_batch[:1], "vlr_fused", cfg)
    write_onnx_contract(fused_path, contract)
    parity = check_parity(fused_name, fused_path, fused, vlr_batch, cfg)
    _publish(pending, model_config(fused_name, "onnxruntime_onnx", vlr_spec, emb, cfg, kind, contract),
             fused_path, parity.as_dict())
    _publish(pending, ensemble_config(ens_name, dsr_name, names.recognizer, vlr_dims, cfg, emb[0].dims[0],
                                      contract=contract), None, None)


def _publish(pending: list, config, model_file, parity: dict | None) -> None:
    pending.append((config, model_file, parity))


def _export_trt(pending, report, recognizer, rec_path, int8_path, hr_batch, cfg: ExportConfig,
                work: Path, emb: list[TensorSpec], contract: InputContract) -> dict:
    """Offline engines (checked possible by :func:`_check_trt_target`), each parity-gated against
    PyTorch; engines run on GPUs only, so their instances are KIND_GPU whatever the ONNX models got."""
    with torch.no_grad():
        reference = recognizer.eval().cpu()(hr_batch).numpy()
    builds = [(f"{cfg.name}_trt", rec_path, False)]
    if int8_path is not None:
        builds.append((f"{cfg.name}_trt_int8", int8_path, True))
    for name, onnx_path, is_int8 in builds:
        engine = trt_mod.build_engine(onnx_path, work / f"{name}.plan", cfg, HR_DIMS, int8=is_int8)
        parity = trt_mod.check_engine_parity(name, engine, reference, hr_batch, cfg)
        _publish(pending, model_config(name, "tensorrt_plan", IN_SPEC, emb, cfg, "KIND_GPU", contract),
                 engine, parity.as_dict())
    return {"status": "built", "device": torch.cuda.get_device_name(0)}


def export_model(model_uri: str, repo_uri: str, formats: tuple[str, ...] | list[str] = FORMATS,
                 int8: bool = False, trt: bool = False, dsr_uri: str | list[str] | None = None,
                 calib_dataset: str | None = None, cfg: ExportConfig | None = None,
                 finetuned_uri: dict[str, str] | None = None) -> dict:
    """Export a recognizer checkpoint (and DSR checkpoints) into the Triton repository at ``repo_uri``.
    ``finetuned_uri``: ``{size: recognizer checkpoint}``, each VLR size's own recognizer (see
    :func:`export_modules`).

    Returns ``{"repo", "instance_kind", "models": {name: {version, platform, uri, parity}}, "int8"?,
    "tensorrt"?}``.
    Raises :class:`~faceops.export.onnx_export.ParityError` when a graph does not reproduce PyTorch.
    The input contracts come from the checkpoints; ``calib_dataset`` must have been prepared as they
    say (a contradiction is an error naming both), and is what an old checkpoint is assumed to take.
    """
    from faceops.train.checkpoint import load_model

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise FaceopsError(f"unknown export format(s) {unknown} (supported: {', '.join(FORMATS)}; "
                           f"INT8 and TensorRT are --int8 / --trt on top of onnx)")
    if trt:  # fails before checkpoints and calibration data are read
        _check_trt_target()
    recognizer, meta = load_model(model_uri)
    if meta.get("kind") != "recognizer":
        raise FaceopsError(f"{model_uri} is a {meta.get('kind')!r} checkpoint; --model needs a recognizer")
    dsrs: dict[str, nn.Module] = {}
    dsr_contracts: dict[str, InputContract | None] = {}
    for uri in [dsr_uri] if isinstance(dsr_uri, str) else list(dsr_uri or []):
        module, dmeta = load_model(uri)
        size = vlr_size_of(dmeta)
        if dmeta.get("kind") != "dsr" or size is None:
            raise FaceopsError(f"{uri} is not a DSR checkpoint with a vlr_size (kind {dmeta.get('kind')!r})")
        dsrs[size] = module
        dsr_contracts[size] = from_checkpoint(dmeta, uri)
    tuned: dict[str, nn.Module] = {}
    tuned_contracts: dict[str, InputContract | None] = {}
    for size, uri in sorted((finetuned_uri or {}).items()):
        module, fmeta = load_model(uri)
        if fmeta.get("kind") != "recognizer":
            raise FaceopsError(f"{uri} (the {size} fine-tuned recognizer) is a {fmeta.get('kind')!r} checkpoint")
        tuned[size], tuned_contracts[size] = module, from_checkpoint(fmeta, uri)
    contract = from_checkpoint(meta, model_uri)
    if calib_dataset:
        contract = _calibration_agrees(calib_dataset, model_uri, contract)
    calib = CalibData.from_dataset(calib_dataset) if calib_dataset else None
    report = export_modules(recognizer, repo_uri, dsrs, cfg, calib, int8=int8, trt=trt, contract=contract,
                            dsr_contracts=dsr_contracts, finetuned=tuned, finetuned_contracts=tuned_contracts)
    report["source"] = {"model": model_uri, "dsr": dsr_uri, "finetuned": finetuned_uri, "dataset": calib_dataset}
    return report


def _calibration_agrees(dataset_uri: str, model_uri: str, contract: InputContract | None) -> InputContract:
    """The calibration faces were prepared at ingest: they must be what the recognizer takes. For a
    checkpoint without a contract, the dataset's preparation is what it is assumed to take."""
    option = f"--dataset {dataset_uri} (its ingest preparation)"
    ingested = explicit_fields(dataset_contract(dataset_uri).prepare_config())
    if contract is None:
        return assume(model_uri, ingested, option)
    check_agrees(contract, ingested, model_uri, option)
    return contract
