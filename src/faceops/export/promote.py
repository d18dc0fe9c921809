"""Promotion: a run's exports are served only when its evaluation meets the config's thresholds.

The export step writes a complete Triton repository into the run's staging folder
(:func:`staging_uri`), where no server looks. The gate (:func:`gate`) compares the evaluation's
figures with the config's ``promote`` section; only a run that passes is promoted
(:func:`promote`): its staged models are published into the served repository as new versions, all
or none (:func:`faceops.export.triton_repo.publish`), and each model's config records where each
served version came from (run id, dataset content hash, headline metrics) as
``provenance.<version>.<key>`` parameters.

A run publishes only the models it exported, and every ensemble pins the versions it was published
with, so promoting one pipeline (``arcface_resnet34``'s ``recognizer``) never changes what another
pipeline's ensembles (``vlr_face_<size>`` -> ``recognizer_<size>``) answer.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from faceops.config import check
from faceops.errors import FaceopsError
from faceops.export.triton_repo import (
    ENSEMBLE_MARKER,
    MODEL_FILES,
    publish,
    validate_repository,
    versions,
)
from faceops.storage import open_store

log = logging.getLogger(__name__)

STAGING = "staging"  # <run_root>/staging: the run's exported repository, before promotion
SIZED_MODEL = re.compile(r"^(?P<role>.+)_(?P<size>\d+x\d+)$")  # dsr_14x16, recognizer_14x16, vlr_face_14x16
HEADLINE = ("verification.accuracy", "verification.accuracy_se", "verification.tar_at_far.1e-3",
            "identification.rank1")


@dataclass
class PromoteConfig:
    """Thresholds a run's evaluation must meet before its models are served (config ``promote:``).

    Keys are metrics.json figures, flattened with dots as the KFP Metrics artifact and ``faceops
    evaluate`` name them (``verification.accuracy``, ``vlr.14x16.dsr_finetuned.verification.accuracy``,
    ``verification.eer``). The default only keeps a broken model (chance level, NaN) from being served.
    """

    min: dict[str, float] = field(default_factory=lambda: {"verification.accuracy": 0.6})  # figure >= bound
    max: dict[str, float] = field(default_factory=dict)  # figure <= bound (e.g. verification.eer)

    def __post_init__(self) -> None:
        for kind, bounds in (("min", self.min), ("max", self.max)):
            for key, bound in bounds.items():
                check(isinstance(bound, int | float) and math.isfinite(bound),
                      f"promote.{kind}.{key} = {bound!r}: must be a finite number")


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    op: str  # ">=" or "<="
    bound: float

    @property
    def ok(self) -> bool:  # a NaN figure never passes
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILS"
        return f"{self.metric} {self.value:.4f} {self.op} {self.bound:g}: {verdict}"


@dataclass(frozen=True)
class GateDecision:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def describe(self) -> str:
        if not self.checks:
            return "promote: no thresholds configured (promote.min / promote.max): promoted"
        head = "promoted" if self.passed else "NOT promoted (the served repository is left as it is)"
        return f"{head}: " + "; ".join(map(str, self.checks))


def gate(metrics: Mapping[str, float], cfg: PromoteConfig) -> GateDecision:
    """Compare the flattened evaluation figures with the thresholds. A threshold naming a figure the
    evaluation does not have is a config error (a typo must not promote by default)."""
    checks = []
    for kind, op, bounds in (("min", ">=", cfg.min), ("max", "<=", cfg.max)):
        for key, bound in bounds.items():
            if key not in metrics:
                close = difflib.get_close_matches(key, list(metrics), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise FaceopsError(f"promote.{kind}.{key}: the evaluation has no figure {key!r}{hint} "
                                   "(keys are metrics.json paths joined with dots)")
            checks.append(Check(key, float(metrics[key]), op, float(bound)))
    return GateDecision(tuple(checks))


def staging_uri(run_root: str) -> str:
    """Where a run's export is staged: inside the run, never where a Triton server polls."""
    return f"{run_root.rstrip('/')}/{STAGING}"


def headline(model: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """The figures that describe one served model: a size's models its DSR(+fine-tune) row, the rest HR."""
    m = SIZED_MODEL.match(model)
    if m:
        setting = "dsr" if m["role"] == "dsr" else "dsr_finetuned"
        prefix = f"vlr.{m['size']}.{setting}."
        keys = [*HEADLINE, "super_resolution.psnr"] if setting == "dsr" else list(HEADLINE)
        return {f"{prefix}{k}": metrics[f"{prefix}{k}"] for k in keys if f"{prefix}{k}" in metrics}
    return {k: metrics[k] for k in HEADLINE if k in metrics}


def provenance(models: list[str], run_id: str, dataset_hash: str,
               metrics: Mapping[str, float]) -> dict[str, dict[str, str]]:
    """``{model: {key: text}}`` for :func:`faceops.export.triton_repo.publish` (Triton parameters are text)."""
    return {name: {"run_id": run_id, "dataset_content_hash": dataset_hash,
                   **{k: f"{v:.6g}" for k, v in headline(name, metrics).items()}} for name in models}


def clear(uri: str) -> None:
    """Empty a staging folder, so a retried export stages exactly one version of each model."""
    store = open_store(uri)
    for key in list(store.list()):
        store.delete(key)


def promote(staged_uri: str, repo_uri: str, *, run_id: str, dataset_hash: str,
            metrics: Mapping[str, float], keep: int = 1) -> dict[str, int]:
    """Publish every model of the staged repository into ``repo_uri`` as a new version (all or none),
    with its provenance; returns each model's served version."""
    staged = open_store(staged_uri)
    configs = validate_repository(staged)
    records = provenance(sorted(configs), run_id, dataset_hash, metrics)
    with tempfile.TemporaryDirectory(prefix="faceops-promote-") as tmp:
        models = []
        for name, config in configs.items():
            version = versions(staged, name)[-1]
            if config.platform == "ensemble":
                models.append((config, None))
                continue
            file = MODEL_FILES.get(config.platform)
            if file is None or not staged.exists(f"{name}/{version}/{file}"):
                raise FaceopsError(f"{staged.url(f'{name}/{version}')}: no {file or config.platform} model "
                                   f"file to promote (only {ENSEMBLE_MARKER} folders may hold none)")
            models.append((config, staged.get_file(f"{name}/{version}/{file}", Path(tmp) / name / file)))
        plan = publish(open_store(repo_uri), models, keep, provenance=records, holder=f"run {run_id}")
    log.info("promoted run %s into %s: %s", run_id, repo_uri,
             ", ".join(f"{n} v{v}" for n, v in sorted(plan.items())))
    return plan
