"""Pipeline stages: what each KFP component runs, as plain functions of strings and numbers.

Components (``faceops.components``) only map KFP artifacts to these arguments; the CLI and tests
call the same functions. A stage takes the run's config as YAML text (it never holds secrets:
endpoints and credentials come from the environment / a Kubernetes Secret) and returns a dict of
URIs and figures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from faceops import config
from faceops.errors import FaceopsError
from faceops.storage import open_store, split_uri

log = logging.getLogger(__name__)

SYNTH_PREFIX = "synth://"
NON_FINITE = "non_finite"  # Metrics metadata: the figures that were NaN/inf, left off the artifact


def section(cls: type, config_yaml: str, name: str):
    """One typed section of the run's config, through the one loader (every section is checked)."""
    return config.load(cls, text=config_yaml or "", section=name, source="<pipeline config>")


@contextmanager
def stage_log(log_dir: str | None, stage: str):
    """Also write this stage's log to ``<log_dir>/<stage>.log`` (what `faceops run` points to)."""
    if not log_dir:
        yield None
        return
    path = Path(log_dir) / f"{stage}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield path
    except Exception as exc:
        log.error("stage %s failed: %s", stage, exc, exc_info=not isinstance(exc, FaceopsError))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _synth_source(config_yaml: str, tmp: str) -> str:
    """``synth://`` -> synthetic faces (the config's ``synth`` section)."""
    from faceops.data.synth import SynthConfig, synthesize

    cfg = section(SynthConfig, config_yaml, "synth")
    return str(synthesize(Path(tmp) / "synth", cfg.identities, cfg.images_per_identity, cfg.seed, cfg.size,
                          progress=False, style=cfg.style))


def ingest_stage(source: str, name: str, store_uri: str, config_yaml: str = "", pairs_file: str = "",
                 log_dir: str = "") -> dict:
    from faceops.data.ingest import IngestConfig, format_summary, ingest

    with stage_log(log_dir, "ingest"), tempfile.TemporaryDirectory(prefix="faceops-src-") as tmp:
        cfg = section(IngestConfig, config_yaml, "ingest")
        if source.startswith(SYNTH_PREFIX):
            source = _synth_source(config_yaml, tmp)
        result = ingest(source, name, store_uri, cfg, pairs_file=pairs_file or None)
        log.info("ingest summary:\n%s", format_summary(result))
        print(format_summary(result), flush=True)
        return {"uri": result.uri, "content_hash": result.content_hash, "summary": result.summary}


def train_result(out_uri: str) -> dict:
    """What a training run left in ``<out>/result.json`` (written by `faceops train`)."""
    store, key = split_uri(f"{out_uri.rstrip('/')}/result.json")
    if not store.exists(key):
        raise FaceopsError(f"training wrote no result.json in {out_uri}: did it finish?")
    return json.loads(store.get_bytes(key))


def train_stage(task: str, dataset_uri: str, out_uri: str, config_yaml: str = "",
                extra: list[str] | None = None, gpus_per_node: int = 0, nodes: int = 1, resume: bool = True,
                log_dir: str = "", stage: str = "") -> dict:
    """Train ``task`` (recognizer | dsr | finetune); in-process, torchrun, or a Kubeflow TrainJob. ``stage``
    names the log (default: the task's own stage)."""
    from faceops.train.launch import launch_training
    from faceops.train.registry import get_task

    stage = stage or get_task(task).stage
    with stage_log(log_dir, stage):
        sets = [f"data={dataset_uri}", f"out={out_uri}", *(extra or [])]
        rc = launch_training(task, config_yaml, sets, gpus_per_node=gpus_per_node, nodes=nodes, resume=resume)
        if rc != 0:
            raise FaceopsError(f"{stage} exited with code {rc}")
        return train_result(out_uri)


def evaluate_stage(model_uri: str, dataset_uri: str, out_uri: str, config_yaml: str = "",
                   dsr_uris: list[str] | None = None, finetuned_uri: str | dict[str, str] = "",
                   finetuned_bicubic_uri: str | dict[str, str] = "", vlr_sizes: list[str] | None = None,
                   log_dir: str = "") -> dict:
    """Evaluate into ``out_uri`` (a folder, or a store URI: written locally, then uploaded).
    ``finetuned_uri`` / ``finetuned_bicubic_uri``: one URI for every size, or ``{size: URI}``.
    The result carries ``report_dir``, the local folder holding metrics.json, roc.json and report.html.
    The figures are also pushed as ``faceops_eval_metric`` when ``FACEOPS_PUSHGATEWAY`` is set, with
    the run id of ``out_uri`` (not of the local temporary folder a remote output is written to)."""
    from faceops.evaluate.runner import EvalConfig, evaluate
    from faceops.metrics import run_id_for

    with stage_log(log_dir, "evaluate"):
        cfg = section(EvalConfig, config_yaml, "evaluate")
        remote = "://" in out_uri and not out_uri.startswith("file://")
        out_dir = tempfile.mkdtemp(prefix="faceops-eval-") if remote else out_uri.removeprefix("file://")
        result = evaluate(model_uri, out_dir, data=dataset_uri, dsr=dsr_uris or (),
                          finetuned=finetuned_uri or None, finetuned_bicubic=finetuned_bicubic_uri or None,
                          vlr=vlr_sizes or (), cfg=cfg, run_id=run_id_for(out_uri), config=config_yaml or None)
        if remote:
            store = open_store(out_uri)
            for f in sorted(Path(out_dir).iterdir()):
                store.put_file(f.name, f)
        return {**result, "report_dir": out_dir}


def run_root_stage(store_uri: str, run_id: str, job_id: str) -> str:
    """This run's folder in the store, ``<store>/runs/<run_id>``: the ``run_id`` parameter when given
    (to resume or continue a run on purpose), else the KFP run's own id (``job_id``), so two runs
    never share checkpoints and a retried step of one run resumes its own."""
    chosen = (run_id or job_id).strip()
    if not chosen or "/" in chosen or chosen in (".", ".."):
        raise FaceopsError(f"run_id {chosen!r}: expected a name without '/', or empty for KFP's run id")
    return run_folder_uri(store_uri, chosen)


def run_folder_uri(store_uri: str, run_id: str) -> str:
    """The layout of run folders (read back by :func:`faceops.metrics.run_id_for`)."""
    return f"{store_uri.rstrip('/')}/runs/{run_id}"


def export_stage(model_uri: str, repo_uri: str, config_yaml: str = "", dsr_uris: list[str] | None = None,
                 dataset_uri: str = "", int8: bool = False, trt: bool = False, log_dir: str = "",
                 finetuned_uris: dict[str, str] | None = None, staged: bool = False) -> dict:
    """Export into the Triton repository ``repo_uri``; ``finetuned_uris`` (``{size: URI}``): each VLR
    size's own recognizer, served as ``recognizer_<size>`` behind that size's ``vlr_face_<size>``.
    ``staged``: ``repo_uri`` is the run's staging folder, emptied first so a retried step stages one
    version of each model (:func:`promote_stage` serves them)."""
    from faceops.export.api import export_model
    from faceops.export.config import ExportConfig
    from faceops.export.promote import clear

    with stage_log(log_dir, "export"):
        cfg = section(ExportConfig, config_yaml, "export")
        if staged:
            clear(repo_uri)
        return export_model(model_uri, repo_uri, int8=int8, trt=trt, dsr_uri=dsr_uris or None,
                            calib_dataset=dataset_uri or None, cfg=cfg, finetuned_uri=finetuned_uris or None)


def evaluation_figures(metadata: dict) -> dict[str, float]:
    """The figures of an evaluation's Metrics artifact, those it could not carry as NaN."""
    figures = {k: float(v) for k, v in metadata.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return figures | dict.fromkeys(metadata.get(NON_FINITE) or [], math.nan)


def gate_stage(metrics: dict, config_yaml: str = "", log_dir: str = "") -> dict:
    """Whether the evaluation's figures (its Metrics artifact's metadata) meet the config's ``promote``
    thresholds; a NaN figure never does."""
    from faceops.export.promote import PromoteConfig, gate

    with stage_log(log_dir, "gate"):
        decision = gate(evaluation_figures(metrics), section(PromoteConfig, config_yaml, "promote"))
        log.info("%s", decision.describe())
        print(decision.describe(), flush=True)
        return {"passed": decision.passed, "summary": decision.describe(),
                "checks": [{"metric": c.metric, "value": c.value, "op": c.op, "bound": c.bound, "ok": c.ok}
                           for c in decision.checks]}


def promote_stage(staged_uri: str, repo_uri: str, run_root: str, dataset_hash: str, metrics: dict[str, float],
                  config_yaml: str = "", log_dir: str = "") -> dict:
    """Serve a run's staged export: every staged model a new version in ``repo_uri``, with its provenance,
    and (config ``registry.enabled``) an entry per version in the Kubeflow Model Registry. The registry
    comes second: a registry failure fails the step after Triton serves the run, and re-running the step's
    registration (idempotent) completes it."""
    from faceops.export.config import ExportConfig
    from faceops.export.model_registry import RegistryConfig, register_promoted
    from faceops.export.promote import promote, provenance
    from faceops.export.triton_repo import validate_repository
    from faceops.metrics import run_id_for

    with stage_log(log_dir, "promote"):
        cfg = section(ExportConfig, config_yaml, "export")
        run_id = run_id_for(run_root)
        metrics = evaluation_figures(metrics)
        plan = promote(staged_uri, repo_uri, run_id=run_id, dataset_hash=dataset_hash, metrics=metrics,
                       keep=cfg.num_versions)
        registry = section(RegistryConfig, config_yaml, "registry")
        if registry.enabled:
            platforms = {n: c.platform for n, c in validate_repository(open_store(repo_uri)).items()}
            records = provenance(sorted(plan), run_id, dataset_hash, metrics)
            for name, version in sorted(plan.items()):
                register_promoted(registry, {name: version}, repo_uri, records[name], platforms)
        return {"repo": repo_uri, "models": {name: {"version": v} for name, v in sorted(plan.items())},
                "run_id": run_id, "registered": registry.enabled}


def deploy_stage(repo_uri: str, dataset_uri: str = "", triton_url: str = "", log_dir: str = "") -> dict:
    """Cluster: check the served models on ``triton_url`` (Triton polls the repository in MinIO;
    default ``FACEOPS_TRITON_URL``, the chart's ConfigMap). Local: start the bundled Triton on the
    repository, check every model is READY and that embeddings over gRPC match the repository's ONNX
    model, then stop it."""
    from faceops.serve.deploy import smoke_test

    with stage_log(log_dir, "deploy"):
        url = triton_url or os.environ.get("FACEOPS_TRITON_URL") or None
        return smoke_test(repo_uri, dataset_uri=dataset_uri or None, triton_url=url)


def sized(name: str, vlr_size: str) -> str:
    """A per-size name: a stage log (``train_dsr_32x32``) or an output folder under ``run_root``."""
    return f"{name}_{vlr_size}"


def dsr_args(recognizer_uri: str, vlr_size: str) -> list[str]:
    """``--set`` overrides wiring DSR training to this run's recognizer and VLR size: the config's
    ``dsr`` section applies to every size, ``dsr.vlr_size`` is the task's."""
    return [f"recognizer={recognizer_uri}", f"vlr_size={vlr_size}"]


def dsr_stage(dataset_uri: str, recognizer_uri: str, run_root: str, config_yaml: str, vlr_size: str,
              gpus_per_node: int = 0, nodes: int = 1, log_dir: str = "") -> dict:
    """Train the DSR model of one VLR size into ``<run_root>/dsr_<size>`` (log ``train_dsr_<size>``)."""
    from faceops.train.registry import get_task

    return train_stage("dsr", dataset_uri, f"{run_root}/{sized('dsr', vlr_size)}", config_yaml,
                       dsr_args(recognizer_uri, vlr_size), gpus_per_node=gpus_per_node, nodes=nodes,
                       log_dir=log_dir, stage=sized(get_task("dsr").stage, vlr_size))


FINETUNE_OUT = {"dsr": "recognizer_finetuned", "bicubic": "recognizer_finetuned_bicubic"}  # + _<size>


def finetune_stage(dataset_uri: str, recognizer_uri: str, run_root: str, config_yaml: str, vlr_size: str,
                   dsr_uri: str = "", gpus_per_node: int = 0, nodes: int = 1, log_dir: str = "") -> dict:
    """Fine-tune this run's recognizer (config section ``finetune``, with ``finetune.vlr_size`` the
    task's) on DSR outputs of the VLR faces or, without ``dsr_uri``, on their bicubic upsampling: the
    control with the same budget and recipe, so the evaluation can tell what DSR adds from what the
    extra training adds. Output ``<run_root>/recognizer_finetuned[_bicubic]_<size>``."""
    from faceops.train.finetune import STAGES

    upsample = "dsr" if dsr_uri else "bicubic"
    sets = [f"init_from={recognizer_uri}", f"vlr_size={vlr_size}", f"upsample={upsample}"]
    sets += [f"dsr={dsr_uri}"] if dsr_uri else []
    return train_stage("finetune", dataset_uri, f"{run_root}/{sized(FINETUNE_OUT[upsample], vlr_size)}",
                       config_yaml, sets, gpus_per_node=gpus_per_node, nodes=nodes, log_dir=log_dir,
                       stage=sized(STAGES[upsample], vlr_size))


def log_training(result: dict, model, metrics, kind: str) -> None:
    """Fill a component's Model/Metrics artifacts from a training result."""
    model.metadata.update({"uri": result["model"], "kind": kind, "steps": result["steps"]})
    if result.get("vlr_size"):
        model.metadata["vlr_size"] = result["vlr_size"]
    last = result["history"][-1] if result.get("history") else {}
    for k, v in last.items():
        if isinstance(v, float) and v == v:  # NaN-free floats only
            metrics.log_metric(k, v)
    metrics.log_metric("nan_events", float(sum(result["nan_events"].values())))
    with open(model.path, "w") as f:
        json.dump(result, f, indent=1)


def log_evaluation(result: dict, metrics, report, headline=None, roc_hr=None, curves=None) -> None:
    """What the KFP UI shows of an evaluation: every figure on a Metrics artifact, report.html (PNGs
    inlined) on an HTML artifact and, where given, the settings table on a Markdown artifact, the HR
    ROC curve on a ClassificationMetrics artifact and every curve (roc.json) on ``curves``, which
    :func:`log_vlr_rocs` reads for the VLR settings."""
    import shutil

    from faceops.evaluate.runner import ROC_FILE, flatten_metrics, headline_markdown

    figures = {k: v for k, v in result.items() if k != "report_dir"}
    non_finite = []
    for k, v in flatten_metrics(figures).items():
        if math.isfinite(v):
            metrics.log_metric(k, v)
        else:  # a NaN in the executor output's JSON would fail the step on a KFP backend
            non_finite.append(k)
    if non_finite:
        log.warning("evaluation figures that are not finite (left off the Metrics artifact): %s", non_finite)
        metrics.metadata[NON_FINITE] = non_finite
    report_dir = Path(result["report_dir"])
    Path(report.path).write_text(inline_images(report_dir / "report.html"))
    report.metadata["uri"] = result["report_dir"]
    if headline is not None:
        Path(headline.path).write_text(headline_markdown(figures))
    rocs = json.loads((report_dir / ROC_FILE).read_text())
    if roc_hr is not None:
        log_roc(roc_hr, rocs["hr"], "HR")
    if curves is not None:
        shutil.copyfile(report_dir / ROC_FILE, curves.path)


def log_roc(artifact, points: dict, setting: str) -> None:
    """One ROC curve (roc.json's points) on a KFP ClassificationMetrics artifact."""
    artifact.log_roc_curve(points["fpr"], points["tpr"], points["threshold"])
    artifact.metadata["setting"] = setting


def log_vlr_rocs(curves_path: str, vlr_size: str, outputs: dict) -> None:
    """The ROC curves of one VLR size's settings (``outputs``: setting -> ClassificationMetrics) from
    an evaluation's roc.json; a setting the evaluation did not have is an error naming the ones it had."""
    per_size = json.loads(Path(curves_path).read_text()).get("vlr", {}).get(vlr_size)
    if per_size is None:
        raise FaceopsError(f"the evaluation has no ROC curves for VLR size {vlr_size}")
    for setting, artifact in outputs.items():
        if setting not in per_size:
            raise FaceopsError(f"the evaluation has no {vlr_size} {setting} setting (it has {', '.join(per_size)})")
        log_roc(artifact, per_size[setting], f"{vlr_size} {setting}")


def log_export(result: dict, repo_uri: str, repo) -> None:
    repo.metadata.update({"uri": repo_uri, "models": sorted(result.get("models", {}))})
    with open(repo.path, "w") as f:
        json.dump(result, f, indent=1, default=str)


def inline_images(html_path: Path) -> str:
    """The report with its PNGs embedded, so it renders as one file (KFP's HTML visualisation)."""
    import base64
    import re

    html = html_path.read_text()

    def embed(m: re.Match) -> str:
        png = html_path.parent / m.group(1)
        if not png.is_file():
            return m.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"'

    return re.sub(r'src="([^"/:]+\.png)"', embed, html)
