"""``evaluate``: recognizer (and DSR) models on a dataset split or LFW pairs -> metrics.json + report.

Settings evaluated (ARCHITECTURE.md, "Evaluation output"):

* top level: the recognizer on HR faces;
* per VLR size, under ``vlr.<size>``: ``hr`` (the same HR figures, for the table), ``bicubic`` (VLR
  upsampled bicubically, base recognizer), ``dsr`` (VLR -> DSR, base recognizer) and
  ``dsr_finetuned`` (VLR -> DSR -> fine-tuned recognizer). The SR settings also carry
  ``super_resolution``: PSNR/SSIM of the 112x112 image against HR, and the cosine between the
  setting's recognizer on it and the same recognizer on HR.

The verification threshold is never chosen on the pairs it scores: fold-wise when the pairs have
folds, else on the val split's pairs, else on seeded folds (see :mod:`.verification`).

Faces are prepared as the models' input contracts say (:mod:`faceops.models.contract`): ``--images``
needs no ingest config, one that contradicts the models is an error naming both values, and a dataset
ingested differently from how the models were trained is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faceops.config import check, from_dict
from faceops.data.degrade import DegradeConfig, parse_size, upsample_bicubic
from faceops.data.prepare import PrepareConfig
from faceops.errors import FaceopsError
from faceops.evaluate.data import EvalData, EvalSet, from_dataset, from_images
from faceops.evaluate.identification import identification_metrics
from faceops.evaluate.models import (
    Embedder,
    SuperResolver,
    load_embedder,
    require_sizes,
    super_resolvers_by_size,
)
from faceops.evaluate.report import Curve, write_report
from faceops.evaluate.sr_metrics import sr_metrics
from faceops.evaluate.verification import verification_metrics
from faceops.metrics import MetricsConfig, publish_evaluation, run_id_for
from faceops.models.contract import (
    DEGRADE_FIELDS,
    PREPARE_FIELDS,
    ContractConflictError,
    InputContract,
    assume,
    check_agrees,
    dataset_contract,
    explicit_fields,
    shared_preparation,
    shown,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
SETTINGS = ("hr", "bicubic", "dsr", "dsr_finetuned")


@dataclass
class EvalConfig:
    batch_size: int = 64  # faces per forward pass
    flip: bool = False  # flip-averaged embeddings (image + mirror)
    n_folds: int = 10  # seeded folds when the pairs have none and no val pairs exist (LFW uses 10)
    seed: int = 0  # folds and the gallery/probe split
    gallery_per_identity: int = 1  # gallery images per identity; the rest are probes
    grid_samples: int = 8  # faces in each VLR | bicubic | DSR | HR sample grid
    hist_bins: int = 50  # bins of the genuine/impostor score histograms
    device: str = "auto"  # torch device for checkpoints: auto | cpu | cuda[:N]
    skip_missing: bool = False  # --images mode: drop pairs whose image is missing instead of failing
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # faceops_eval_metric: Pushgateway / port

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {self.batch_size}")
        check(self.n_folds >= 2, f"evaluate.n_folds must be >= 2, got {self.n_folds}")
        check(self.gallery_per_identity >= 1, "evaluate.gallery_per_identity must be >= 1")
        check(self.grid_samples >= 1, "evaluate.grid_samples must be >= 1")
        check(self.hist_bins >= 2, "evaluate.hist_bins must be >= 2")


@dataclass
class Models:
    recognizer: Embedder
    dsr: dict[str, SuperResolver] = field(default_factory=dict)  # per VLR size
    finetuned: Embedder | None = None


def evaluate(model: str, out: str | Path, *, data: str | None = None, split: str = "test",
             images: str | None = None, pairs: str | None = None, dsr: Sequence[str] = (),
             finetuned: str | None = None, vlr: Sequence[str] = (), cfg: EvalConfig | None = None,
             prepare: PrepareConfig | Mapping[str, Any] | None = None,
             degrade: DegradeConfig | Mapping[str, Any] | None = None, run_id: str | None = None) -> dict:
    """Evaluate and write ``out/metrics.json`` and ``out/report.html``; returns the metrics dict.

    Exactly one of ``data`` (dataset URI) or ``images`` + ``pairs`` is given. ``images`` are prepared
    as the models' input contracts say; ``prepare``/``degrade`` (a config: every field; a mapping:
    the keys given) only state what the caller expects, and one that contradicts a model is an error
    (for a model without a contract they are what it is assumed to take). Without ``vlr`` the DSR
    models' own sizes are evaluated. Every figure is also set as ``faceops_eval_metric`` (label ``run_id``:
    ``run_id``, default :func:`~faceops.metrics.run_id_for` of ``out``) and pushed when a
    Pushgateway is configured (``cfg.metrics`` or ``FACEOPS_PUSHGATEWAY``).
    """
    cfg = cfg or EvalConfig()
    if (data is None) == (images is None and pairs is None):
        raise FaceopsError("give either a dataset (--data) or an image folder with a pairs file "
                           "(--images DIR --pairs FILE)")
    if data is None and (images is None or pairs is None):
        raise FaceopsError("--images and --pairs go together")
    if finetuned and not dsr:
        raise FaceopsError("--finetuned evaluates VLR -> DSR -> fine-tuned recognizer: it needs --dsr")
    models = _load_models(model, list(dsr), finetuned, cfg)
    sizes = list(vlr) or list(models.dsr)
    for s in sizes:
        parse_size(s)
    if dsr:
        require_sizes(models.dsr, sizes)
    explicit, option = explicit_fields(prepare, degrade), OPTION
    if data is not None and not _recorded(models):  # old models: the dataset's faces are what they get
        explicit, option = explicit_fields(dataset_contract(data).prepare_config()), f"dataset {data}"
    hr_contract, degrade_cfg = apply_contracts(models, explicit, sizes, option)
    if data is not None:
        check_dataset(data, models, hr_contract)
        eval_data = from_dataset(data, split, sizes)
    else:
        eval_data = from_images(images, pairs, hr_contract.prepare_config(), degrade_cfg, sizes,
                                cfg.skip_missing)
    log.info("evaluating %s: %d faces, %d pairs", eval_data.source, len(eval_data.test),
             len(eval_data.test.pairs))
    metrics, curves, grids = _run(eval_data, models, sizes, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    info = {"model": model, "data": eval_data.source, "faces": len(eval_data.test),
            "pairs": len(eval_data.test.pairs), "flip": cfg.flip, "dsr": list(dsr), "finetuned": finetuned,
            "input contract": hr_contract.describe(), "threshold protocol": _protocol(eval_data, cfg)}
    write_report(out, metrics, curves, grids, info, cfg.hist_bins)
    publish_evaluation(metrics, run_id or run_id_for(str(out)), models.recognizer.arch or models.recognizer.name,
                       cfg.metrics)
    return metrics


def _load_models(model: str, dsr: list[str], finetuned: str | None, cfg: EvalConfig) -> Models:
    rec = load_embedder(model, cfg.batch_size, cfg.flip, cfg.device)
    ft = load_embedder(finetuned, cfg.batch_size, cfg.flip, cfg.device) if finetuned else None
    by_size = super_resolvers_by_size(dsr, cfg.batch_size, cfg.device)
    return Models(rec, by_size, ft)


OPTION = "the given face preparation (--config ingest.prepare / ingest.degrade)"


def _recorded(models: Models) -> list:
    """The models that record an input contract."""
    candidates = [models.recognizer, models.finetuned, *models.dsr.values()]
    return [m for m in candidates if m is not None and m.contract is not None]


def apply_contracts(models: Models, explicit: Mapping[str, Any], sizes: list[str],
                    option: str = OPTION) -> tuple[InputContract, DegradeConfig]:
    """Set every model's ``input_contract`` from what it records; returns the HR preparation they
    share and the VLR degradation for ``--images`` (the DSR models', else ``explicit``'s, else
    ingest's defaults). Models that disagree, or an ``explicit`` value that contradicts one, fail."""
    embedders = [("--model", models.recognizer)] + ([("--finetuned", models.finetuned)] if models.finetuned else [])
    named = [(f"{flag} {e.name}", e.contract) for flag, e in embedders]
    named += [(f"--dsr {sr.name}", sr.contract) for sr in models.dsr.values()]
    shared = shared_preparation(named, explicit, option)
    for (_, e), contract in zip(embedders, shared, strict=False):
        e.input_contract = e.contract or contract
    hr = shared[0]
    degradation = _shared_degradation(models, {k: v for k, v in explicit.items() if k in DEGRADE_FIELDS}, option)
    for sr in models.dsr.values():
        sr.input_contract = sr.contract or assume(f"--dsr {sr.name}", degradation, option, base=hr,
                                                  vlr_size=sr.vlr_size)
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in degradation.items()}
    return hr, from_dict(DegradeConfig, {**given, "sizes": list(sizes)}, option)


def _shared_degradation(models: Models, explicit: dict[str, Any], option: str) -> dict[str, Any]:
    """The degradation fields every DSR model records (they must agree, and with ``explicit``);
    ``explicit`` when none records one."""
    recorded = [(f"--dsr {sr.name}", sr.contract) for sr in models.dsr.values() if sr.contract is not None]
    for label, contract in recorded:
        check_agrees(contract, explicit, label, option)
    for (label, a), (other, b) in zip(recorded, recorded[1:], strict=False):
        diff = a.differences(b, DEGRADE_FIELDS)
        if diff:
            name, x, y = diff[0]
            raise ContractConflictError(f"{label} was trained on VLR faces with {name} = {shown(x)} but {other} "
                                        f"with {name} = {shown(y)}: evaluate them in separate runs")
    return {f: getattr(recorded[0][1], f) for f in DEGRADE_FIELDS} if recorded else explicit


def check_dataset(dataset_uri: str, models: Models, hr: InputContract) -> None:
    """A dataset's faces were prepared at ingest: refuse one prepared unlike the models were trained."""
    from faceops.data.manifest import load_manifest

    recorded = _recorded(models)
    if not recorded:
        return
    manifest = load_manifest(dataset_uri)
    ingested = InputContract.from_manifest(manifest, source=f"{dataset_uri} manifest")
    diff = ingested.differences(hr, PREPARE_FIELDS)
    if diff:
        name, got, want = diff[0]
        raise ContractConflictError(
            f"dataset {dataset_uri} was ingested with prepare.{name} = {shown(got)}, but {recorded[0].name} was "
            f"trained with {name} = {shown(want)} (its input contract): evaluate on a dataset ingested with "
            f"ingest.prepare.{name}={shown(want)}, or on the images with --images DIR --pairs FILE")
    for sr in (sr for sr in models.dsr.values() if sr.contract is not None):
        ingested_vlr = InputContract.from_manifest(manifest, sr.vlr_size, f"{dataset_uri} manifest")
        for name, got, want in ingested_vlr.differences(sr.contract, DEGRADE_FIELDS):
            log.warning("dataset %s degraded its VLR faces with %s = %s, but %s was trained on %s = %s",
                        dataset_uri, name, got, sr.name, name, want)


def _protocol(data: EvalData, cfg: EvalConfig) -> str:
    folds = data.test.pairs.folds
    if folds is not None:
        return f"{len(np.unique(folds))}-fold, threshold chosen on the other folds (pairs file folds)"
    if data.val is not None:
        return "threshold chosen on the val split's pairs"
    return f"{cfg.n_folds}-fold (seeded, balanced), threshold chosen on the other folds"


class _Setting:
    """Images of one setting for one face set, and the recognizer that embeds them."""

    def __init__(self, models: Models, cfg: EvalConfig):
        self.models, self.cfg = models, cfg
        self._cache: dict[tuple[int, str, str], np.ndarray] = {}

    def images(self, s: EvalSet, size: str | None, kind: str) -> np.ndarray:
        key = (id(s), size or "", kind)
        if key not in self._cache:
            if kind == "hr":
                self._cache[key] = s.hr
            elif kind == "bicubic":
                self._cache[key] = upsample_bicubic(s.vlr[size], s.hr.shape[1])
            else:
                sr = self.models.dsr[size]
                self._cache[key] = sr.upscale(s.vlr[size])
                if self._cache[key].shape != s.hr.shape:
                    raise FaceopsError(f"DSR {sr.name} outputs {self._cache[key].shape[1:3]} images, the "
                                       f"recognizer takes {s.hr.shape[1:3]}")
        return self._cache[key]

    def recognizer(self, kind: str) -> Embedder:
        return self.models.finetuned if kind == "dsr_finetuned" else self.models.recognizer

    def embed(self, s: EvalSet, size: str | None, kind: str) -> np.ndarray:
        key = (id(s), size or "", f"emb:{kind}")
        if key not in self._cache:
            img_kind = "dsr" if kind == "dsr_finetuned" else kind
            self._cache[key] = self.recognizer(kind).embed(self.images(s, size, img_kind))
        return self._cache[key]

    def hr_embed(self, s: EvalSet, kind: str) -> np.ndarray:
        key = (id(s), "", f"hremb:{kind}")
        if key not in self._cache:
            self._cache[key] = self.recognizer(kind).embed(s.hr)
        return self._cache[key]


def _blocks(data: EvalData, st: _Setting, size: str | None, kind: str, cfg: EvalConfig) -> tuple[dict, Curve]:
    test = data.test
    emb = st.embed(test, size, kind)
    scores = test.pairs.scores(emb)
    val_kw = {}
    if data.val is not None and test.pairs.folds is None:
        val_emb = st.embed(data.val, size, kind)
        val_kw = {"val_scores": data.val.pairs.scores(val_emb), "val_genuine": data.val.pairs.genuine}
    block = {
        "verification": verification_metrics(scores, test.pairs.genuine, folds=test.pairs.folds,
                                              n_folds=cfg.n_folds, seed=cfg.seed, **val_kw),
        "identification": identification_metrics(emb, test.labels, cfg.gallery_per_identity, cfg.seed),
    }
    if kind != "hr":
        img_kind = "dsr" if kind == "dsr_finetuned" else kind
        block["super_resolution"] = sr_metrics(st.images(test, size, img_kind), test.hr, emb,
                                               st.hr_embed(test, kind))
    label = kind if size is None else f"{size} {kind}"
    return block, Curve(label, scores, test.pairs.genuine)


def _settings_for(models: Models, size: str) -> list[str]:
    kinds = ["hr", "bicubic"]
    if size in models.dsr:
        kinds.append("dsr")
        if models.finetuned is not None:
            kinds.append("dsr_finetuned")
    return kinds


def _run(data: EvalData, models: Models, sizes: list[str], cfg: EvalConfig) -> tuple[dict, list[Curve], dict]:
    st = _Setting(models, cfg)
    hr_block, hr_curve = _blocks(data, st, None, "hr", cfg)
    metrics: dict = {"verification": hr_block["verification"], "identification": hr_block["identification"]}
    curves = [hr_curve]
    grids: dict[str, dict[str, np.ndarray]] = {}
    if sizes:
        metrics["vlr"] = {}
    rng = np.random.default_rng(cfg.seed)
    show = np.sort(rng.choice(len(data.test), min(cfg.grid_samples, len(data.test)), replace=False))
    for size in sizes:
        per_size = {"hr": hr_block}
        for kind in _settings_for(models, size)[1:]:
            per_size[kind], curve = _blocks(data, st, size, kind, cfg)
            curves.append(curve)
        metrics["vlr"][size] = per_size
        grid = {"VLR": data.test.vlr[size][show], "bicubic": st.images(data.test, size, "bicubic")[show]}
        if size in models.dsr:
            grid["DSR"] = st.images(data.test, size, "dsr")[show]
        grid["HR"] = data.test.hr[show]
        grids[size] = grid
    return metrics, curves, grids


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> ``{"vlr.32x32.dsr.verification.eer": x, ...}`` (KFP Metrics, Prometheus)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        else:
            flat[name] = float(value)
    return flat


def summary_table(metrics: dict) -> str:
    """A short fixed-width table of every evaluated setting (printed by the CLI)."""
    rows = [("HR", metrics)]
    for size, per_size in metrics.get("vlr", {}).items():
        rows += [(f"{size} {kind}", block) for kind, block in per_size.items() if kind != "hr"]
    head = (f"{'setting':<22} {'acc':>7} {'eer':>7} {'auc':>7} {'tar@1e-3':>9} {'rank1':>7} {'rank5':>7} "
            f"{'psnr':>7} {'ssim':>6} {'id-cos':>7}")
    lines = [head, "-" * len(head)]
    for name, b in rows:
        v, i, sr = b["verification"], b["identification"], b.get("super_resolution")
        tail = (f" {sr['psnr']:>7.2f} {sr['ssim']:>6.3f} {sr['identity_cosine']:>7.3f}" if sr
                else f" {'-':>7} {'-':>6} {'-':>7}")
        lines.append(f"{name:<22} {v['accuracy']:>7.4f} {v['eer']:>7.4f} {v['auc']:>7.4f} "
                     f"{v['tar_at_far']['1e-3']:>9.4f} {i['rank1']:>7.4f} {i['rank5']:>7.4f}{tail}")
    return "\n".join(lines)
