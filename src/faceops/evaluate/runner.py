"""``evaluate``: recognizer (and DSR) models on a dataset split or LFW pairs -> metrics.json + report.

Settings evaluated (ARCHITECTURE.md, "Evaluation output"):

* top level: the recognizer on HR faces;
* per VLR size, under ``vlr.<size>``: ``hr`` (the same HR figures, for the table), ``bicubic`` (VLR
  upsampled bicubically, base recognizer), ``bicubic_finetuned`` (bicubic, recognizer fine-tuned on
  bicubic faces), ``dsr`` (VLR -> DSR, base recognizer) and ``dsr_finetuned`` (VLR -> DSR ->
  recognizer fine-tuned on DSR outputs). ``bicubic_finetuned`` is the control for ``dsr_finetuned``
  (same fine-tune budget and recipe, no DSR): fine-tuning alone is extra training, and only the gap
  between the two is what DSR adds. Each size may have its own fine-tuned recognizers (a pipeline
  fine-tunes one pair per size). The upsampled settings also carry ``super_resolution``: PSNR/SSIM
  (RGB and Y) of the 112x112 image against HR, and the cosine between the setting's recognizer on it
  and the same recognizer on HR.

The verification threshold is never chosen on the pairs it scores: fold-wise on the pairs file's
folds when it has them, else on ``n_folds`` seeded balanced folds of the test pairs (the default:
every pair is scored once, and the folds give ``accuracy_se``), or with ``threshold: val`` on the
val split's pairs (see :mod:`.verification`).

Faces are prepared as the models' input contracts say (:mod:`faceops.models.contract`): ``--images``
needs no ingest config, one that contradicts the models is an error naming both values, and a dataset
ingested differently from how the models were trained is refused.

Beside them: ``roc.json``, every setting's ROC curve downsampled to at most ``ROC_POINTS`` points
(what the pipeline logs as KFP ClassificationMetrics), and :func:`headline_markdown`, the settings
table as Markdown (the pipeline's Markdown artifact).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from faceops.config import check, from_dict
from faceops.data.degrade import DegradeConfig, parse_size, upsample_bicubic
from faceops.data.manifest import load_manifest
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
from faceops.evaluate.report import Curve, plus_minus, sample_cosines, setting_rows, write_report
from faceops.evaluate.sr_metrics import sr_metrics
from faceops.evaluate.verification import roc_curve, verification_metrics
from faceops.metrics import MetricsConfig, publish_evaluation, run_id_for
from faceops.models.contract import (
    DEGRADE_FIELDS,
    ContractConflictError,
    InputContract,
    assume,
    check_agrees,
    check_prepared_alike,
    dataset_contract,
    explicit_fields,
    shared_preparation,
    shown,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
ROC_FILE = "roc.json"  # {"hr": points, "vlr": {size: {setting: points}}}; points: fpr, tpr, threshold
ROC_POINTS = 200  # at most this many operating points per curve in roc.json (KFP's ROC view)
SETTINGS = ("hr", "bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned")
FINETUNED = "_finetuned"  # a setting ``<images>_finetuned``: the images of ``<images>``, its own recognizer


@dataclass
class EvalConfig:
    batch_size: int = 64  # faces per forward pass
    flip: bool = False  # flip-averaged embeddings (image + mirror)
    threshold: Literal["folds", "val"] = "folds"  # accuracy threshold: cross-validated on the test pairs'
    #   folds, or chosen on the val split's pairs (which then are loaded and embedded too)
    n_folds: int = 10  # seeded folds of the test pairs when they have none of their own (LFW uses 10)
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
    finetuned: dict[str, Embedder] = field(default_factory=dict)  # per VLR size: fine-tuned on DSR outputs
    finetuned_bicubic: dict[str, Embedder] = field(default_factory=dict)  # per size: the control (bicubic)


def evaluate(model: str, out: str | Path, *, data: str | None = None, split: str = "test",
             images: str | None = None, pairs: str | None = None, dsr: Sequence[str] = (),
             finetuned: str | Mapping[str, str] | None = None,
             finetuned_bicubic: str | Mapping[str, str] | None = None, vlr: Sequence[str] = (),
             cfg: EvalConfig | None = None, prepare: PrepareConfig | Mapping[str, Any] | None = None,
             degrade: DegradeConfig | Mapping[str, Any] | None = None, run_id: str | None = None,
             config: Mapping[str, Any] | str | None = None) -> dict:
    """Evaluate and write ``out/metrics.json`` and ``out/report.html``; returns the metrics dict.

    Exactly one of ``data`` (dataset URI) or ``images`` + ``pairs`` is given. ``images`` are prepared
    as the models' input contracts say; ``prepare``/``degrade`` (a config: every field; a mapping:
    the keys given) only state what the caller expects, and one that contradicts a model is an error
    (for a model without a contract they are what it is assumed to take). Without ``vlr`` the DSR
    models' own sizes are evaluated. ``finetuned`` is the recognizer fine-tuned on DSR outputs,
    ``finetuned_bicubic`` its control fine-tuned on bicubic faces: one URI for every size, or a
    mapping ``{size: URI}`` (a size it does not name has no such setting). Every figure is also set as
    ``faceops_eval_metric`` (label ``run_id``: ``run_id``, default :func:`~faceops.metrics.run_id_for`
    of ``out``) and pushed when a Pushgateway is configured (``cfg.metrics`` or ``FACEOPS_PUSHGATEWAY``).
    ``config`` (the run's config, a mapping or its YAML text) goes into the report's provenance.
    """
    cfg = cfg or EvalConfig()
    if (data is None) == (images is None and pairs is None):
        raise FaceopsError("give either a dataset (--data) or an image folder with a pairs file "
                           "(--images DIR --pairs FILE)")
    if data is None and (images is None or pairs is None):
        raise FaceopsError("--images and --pairs go together")
    if finetuned and not dsr:
        raise FaceopsError("--finetuned evaluates VLR -> DSR -> fine-tuned recognizer: it needs --dsr")
    if finetuned_bicubic and not (vlr or dsr):
        raise FaceopsError("--finetuned-bicubic evaluates VLR -> bicubic -> fine-tuned recognizer: it needs the "
                           "VLR sizes (--vlr or --dsr)")
    if cfg.threshold == "val" and data is None:
        raise FaceopsError("evaluate.threshold=val needs a dataset's val split (--data); --images pairs use "
                           "their folds or seeded folds")
    by_size = super_resolvers_by_size(list(dsr), cfg.batch_size, cfg.device)
    sizes = list(vlr) or list(by_size)
    for s in sizes:
        parse_size(s)
    if dsr:
        require_sizes(by_size, sizes)
    models = _load_models(model, by_size, _per_size(finetuned, sizes, "finetuned"),
                          _per_size(finetuned_bicubic, sizes, "finetuned_bicubic"), cfg)
    explicit, option = explicit_fields(prepare, degrade), OPTION
    if data is not None and not _recorded(models):  # old models: the dataset's faces are what they get
        explicit, option = explicit_fields(dataset_contract(data).prepare_config()), f"dataset {data}"
    hr_contract, degrade_cfg = apply_contracts(models, explicit, sizes, option)
    if data is not None:
        check_dataset(data, models, hr_contract)
        eval_data = from_dataset(data, split, sizes, val_threshold=cfg.threshold == "val")
    else:
        eval_data = from_images(images, pairs, hr_contract.prepare_config(), degrade_cfg, sizes,
                                cfg.skip_missing)
    log.info("evaluating %s: %d faces, %d pairs", eval_data.source, len(eval_data.test),
             len(eval_data.test.pairs))
    metrics, curves, grids, grid_cosines = _run(eval_data, models, sizes, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / ROC_FILE).write_text(json.dumps(roc_document(curves)))
    info = {"model": model, "data": eval_data.source, "faces": len(eval_data.test),
            "pairs": len(eval_data.test.pairs), "flip": cfg.flip, "dsr": list(dsr), "finetuned": finetuned,
            "finetuned_bicubic": finetuned_bicubic, "input contract": hr_contract.describe(),
            "threshold protocol": _protocol(eval_data, metrics["verification"])}
    run_id = run_id or run_id_for(str(out))
    provenance = {"run_id": run_id, "config": config,
                  "dataset_hash": load_manifest(data).get("content_hash", "") if data is not None else "",
                  "models": {"recognizer": model, "finetuned": finetuned, "finetuned_bicubic": finetuned_bicubic,
                             "dsr": {size: uri for uri, size in zip(dsr, by_size, strict=False)} if dsr else {}}}
    write_report(out, metrics, curves, grids, info, cfg.hist_bins, provenance=provenance, grid_cosines=grid_cosines)
    publish_evaluation(metrics, run_id, models.recognizer.arch or models.recognizer.name, cfg.metrics)
    return metrics


def _per_size(uris: str | Mapping[str, str] | None, sizes: list[str], what: str) -> dict[str, str]:
    """``{size: URI}`` from one URI for every size or a mapping, whose sizes must be evaluated."""
    if not uris:
        return {}
    if isinstance(uris, str):
        return dict.fromkeys(sizes, uris)
    unknown = sorted(set(uris) - set(sizes))
    if unknown:
        raise FaceopsError(f"{what} models for VLR size(s) {unknown}, which are not evaluated (sizes: {sizes})")
    return dict(uris)


def _load_models(model: str, by_size: dict[str, SuperResolver], finetuned: dict[str, str],
                 finetuned_bicubic: dict[str, str], cfg: EvalConfig) -> Models:
    loaded: dict[str, Embedder] = {}  # one URI serving several sizes is loaded once

    def embedder(uri: str) -> Embedder:
        if uri not in loaded:
            loaded[uri] = load_embedder(uri, cfg.batch_size, cfg.flip, cfg.device)
        return loaded[uri]

    rec = load_embedder(model, cfg.batch_size, cfg.flip, cfg.device)
    return Models(rec, by_size, {s: embedder(u) for s, u in finetuned.items()},
                  {s: embedder(u) for s, u in finetuned_bicubic.items()})


OPTION = "the given face preparation (--config ingest.prepare / ingest.degrade)"


def _recorded(models: Models) -> list:
    """The models that record an input contract."""
    candidates = [models.recognizer, *_tuned(models), *models.dsr.values()]
    return [m for m in candidates if m.contract is not None]


def _tuned(models: Models) -> list[Embedder]:
    """The fine-tuned recognizers, each once (one may serve several sizes)."""
    seen: dict[int, Embedder] = {}
    for e in (*models.finetuned.values(), *models.finetuned_bicubic.values()):
        seen.setdefault(id(e), e)
    return list(seen.values())


def apply_contracts(models: Models, explicit: Mapping[str, Any], sizes: list[str],
                    option: str = OPTION) -> tuple[InputContract, DegradeConfig]:
    """Set every model's ``input_contract`` from what it records; returns the HR preparation they
    share and the VLR degradation for ``--images`` (the DSR models', else ``explicit``'s, else
    ingest's defaults). Models that disagree, or an ``explicit`` value that contradicts one, fail."""
    embedders = [("--model", models.recognizer)]
    for flag, group in (("--finetuned", models.finetuned), ("--finetuned-bicubic", models.finetuned_bicubic)):
        embedders += [(flag, e) for e in group.values() if all(e is not seen for _, seen in embedders)]
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
    recorded = _recorded(models)
    if not recorded:
        return
    manifest = load_manifest(dataset_uri)
    ingested = InputContract.from_manifest(manifest, source=f"{dataset_uri} manifest")
    check_prepared_alike(f"dataset {dataset_uri}", ingested, hr, recorded[0].name,
                         "evaluate on a dataset ingested with ingest.prepare.{name}={want}, or on the images "
                         "with --images DIR --pairs FILE")
    for sr in (sr for sr in models.dsr.values() if sr.contract is not None):
        ingested_vlr = InputContract.from_manifest(manifest, sr.vlr_size, f"{dataset_uri} manifest")
        for name, got, want in ingested_vlr.differences(sr.contract, DEGRADE_FIELDS):
            log.warning("dataset %s degraded its VLR faces with %s = %s, but %s was trained on %s = %s",
                        dataset_uri, name, got, sr.name, name, want)


def _protocol(data: EvalData, verification: dict) -> str:
    """How ``verification``'s accuracy was measured, in its own figures (pairs and folds)."""
    k, n = verification["folds"], verification["pairs"]
    if data.test.pairs.folds is not None:
        return f"{k}-fold (folds of the pairs file) on {n} pairs, threshold chosen on the other folds"
    if data.val is not None:
        return (f"threshold chosen on {len(data.val.pairs)} pairs of the val split, applied to {n} pairs "
                f"(standard error over {k} seeded folds)")
    return f"{k}-fold (seeded, balanced) on {n} pairs, threshold chosen on the other folds"


def _images_of(kind: str) -> str:
    """The images a setting embeds: ``dsr_finetuned`` those of ``dsr``, and so on."""
    return kind.removesuffix(FINETUNED)


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

    def recognizer(self, size: str | None, kind: str) -> Embedder:
        tuned = {"dsr_finetuned": self.models.finetuned, "bicubic_finetuned": self.models.finetuned_bicubic}
        return tuned.get(kind, {}).get(size or "") or self.models.recognizer

    def embed(self, s: EvalSet, size: str | None, kind: str) -> np.ndarray:
        key = (id(s), size or "", f"emb:{kind}")
        if key not in self._cache:
            self._cache[key] = self.recognizer(size, kind).embed(self.images(s, size, _images_of(kind)))
        return self._cache[key]

    def hr_embed(self, s: EvalSet, size: str | None, kind: str) -> np.ndarray:
        recognizer = self.recognizer(size, kind)
        key = (id(s), "", f"hremb:{id(recognizer)}")
        if key not in self._cache:
            self._cache[key] = recognizer.embed(s.hr)
        return self._cache[key]


def _blocks(data: EvalData, st: _Setting, size: str | None, kind: str, cfg: EvalConfig) -> tuple[dict, Curve]:
    test = data.test
    emb = st.embed(test, size, kind)
    scores = test.pairs.scores(emb)
    val_kw = {}
    if data.val is not None:  # only with threshold=val (evaluate.data.from_dataset)
        val_emb = st.embed(data.val, size, kind)
        val_kw = {"val_scores": data.val.pairs.scores(val_emb), "val_genuine": data.val.pairs.genuine}
    block = {
        "verification": verification_metrics(scores, test.pairs.genuine, folds=test.pairs.folds,
                                              n_folds=cfg.n_folds, seed=cfg.seed, **val_kw),
        "identification": identification_metrics(emb, test.labels, cfg.gallery_per_identity, cfg.seed),
    }
    if kind != "hr":
        block["super_resolution"] = sr_metrics(st.images(test, size, _images_of(kind)), test.hr, emb,
                                               st.hr_embed(test, size, kind))
    label = kind if size is None else f"{size} {kind}"
    return block, Curve(label, scores, test.pairs.genuine)


def _settings_for(models: Models, size: str) -> list[str]:
    """The settings the given models allow at ``size``, in :data:`SETTINGS` order."""
    given = {"bicubic_finetuned": size in models.finetuned_bicubic, "dsr": size in models.dsr,
             "dsr_finetuned": size in models.dsr and size in models.finetuned}
    return [kind for kind in SETTINGS if given.get(kind, True)]


def _run(data: EvalData, models: Models, sizes: list[str],
         cfg: EvalConfig) -> tuple[dict, list[Curve], dict, dict]:
    """Metrics, ROC curves, and per VLR size the sample grid's faces and their identity cosines."""
    st = _Setting(models, cfg)
    hr_block, hr_curve = _blocks(data, st, None, "hr", cfg)
    metrics: dict = {"verification": hr_block["verification"], "identification": hr_block["identification"]}
    curves = [hr_curve]
    grids: dict[str, dict[str, np.ndarray]] = {}
    grid_cosines: dict[str, dict[str, np.ndarray]] = {}
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
        shown = {"bicubic": "bicubic"}
        if size in models.dsr:
            grid["DSR"] = st.images(data.test, size, "dsr")[show]
            shown["DSR"] = "dsr"
        grid["HR"] = data.test.hr[show]
        grids[size] = grid
        grid_cosines[size] = {column: sample_cosines(st.embed(data.test, size, kind)[show],
                                                     st.hr_embed(data.test, size, kind)[show])
                              for column, kind in shown.items()}
    return metrics, curves, grids, grid_cosines


def roc_points(scores: np.ndarray, genuine: np.ndarray, max_points: int = ROC_POINTS) -> dict[str, list[float]]:
    """A ROC curve as at most ``max_points`` operating points, evenly spaced along the curve (both
    ends kept): ``fpr``, ``tpr`` and ``threshold`` (the reject-all point's is just above the top score,
    not infinity, so it is valid JSON)."""
    roc = roc_curve(scores, genuine)
    keep = np.unique(np.linspace(0, len(roc.far) - 1, min(max_points, len(roc.far))).round().astype(int))
    thresholds = roc.thresholds.copy()
    thresholds[0] = thresholds[1] + 1e-6 if len(thresholds) > 1 else 1.0
    return {"fpr": roc.far[keep].tolist(), "tpr": roc.tar[keep].tolist(), "threshold": thresholds[keep].tolist()}


def roc_document(curves: list[Curve]) -> dict:
    """``roc.json``: the HR curve under ``hr``, a VLR setting's under ``vlr.<size>.<setting>``."""
    doc: dict = {}
    for c in curves:
        size, _, kind = c.label.rpartition(" ")
        points = roc_points(c.scores, c.genuine)
        if size:
            doc.setdefault("vlr", {}).setdefault(size, {})[kind] = points
        else:
            doc[kind] = points
    return doc


def headline_markdown(metrics: dict) -> str:
    """The settings table as Markdown (KFP's Markdown view): accuracy and rank-1 with their standard
    errors, EER, TAR@FAR=1e-3 and, for upsampled faces, PSNR and identity cosine."""
    lines = ["| setting | accuracy ± SE | EER | TAR@1e-3 | rank-1 ± SE | PSNR | id-cos |",
             "|---|---|---|---|---|---|---|"]
    for name, b in setting_rows(metrics, repeat_hr=False):
        v, i, sr = b["verification"], b["identification"], b.get("super_resolution")
        tail = f"{sr['psnr']:.2f} | {sr['identity_cosine']:.3f}" if sr else "- | -"
        lines.append(f"| {name} | {plus_minus(v['accuracy'], v['accuracy_se'])} | {v['eer']:.4f} | "
                     f"{v['tar_at_far']['1e-3']:.4f} | {plus_minus(i['rank1'], i['rank1_se'])} | {tail} |")
    return "\n".join(lines) + "\n"


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
    """A fixed-width table of every evaluated setting (printed by the CLI); ± is the standard error."""
    head = (f"{'setting':<24} {'accuracy':>13} {'eer':>6} {'tar@1e-3':>8} {'rank-1':>13} {'psnr':>6} {'ssim':>6} "
            f"{'psnr-y':>6} {'ssim-y':>6} {'id-cos':>6}")
    lines = [head]  # no rule of dashes: `faceops run`'s clean view filters those out as the runner's noise
    for name, b in setting_rows(metrics, repeat_hr=False):
        v, i, sr = b["verification"], b["identification"], b.get("super_resolution")
        tail = (f" {sr['psnr']:>6.2f} {sr['ssim']:>6.3f} {sr['psnr_y']:>6.2f} {sr['ssim_y']:>6.3f} "
                f"{sr['identity_cosine']:>6.3f}" if sr else "".join(f" {'-':>6}" for _ in range(5)))
        lines.append(f"{name:<24} {plus_minus(v['accuracy'], v['accuracy_se']):>13} {v['eer']:>6.4f} "
                     f"{v['tar_at_far']['1e-3']:>8.4f} {plus_minus(i['rank1'], i['rank1_se']):>13}{tail}")
    return "\n".join(lines)
