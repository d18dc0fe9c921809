"""Running pipelines: locally through kfp's SubprocessRunner (the same component code as on a
cluster), compiled to KFP v2 YAML, or submitted to Kubeflow Pipelines."""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from faceops import config
from faceops.errors import FaceopsError
from faceops.pipelines import PIPELINES
from faceops.pipelines.platform import ClusterConfig
from faceops.stages import run_folder_uri

log = logging.getLogger(__name__)

LOCAL_CONFIG = {"vlr_face": "demo", "arcface_resnet34": "arcface_resnet34"}  # `faceops run` defaults
STAGE_LOGS = {  # KFP task name -> the stage log it writes (a per-size step: <log>_<size>.log)
    "ingest": "ingest", "train-recognizer": "train_recognizer", "train-dsr": "train_dsr",
    "finetune-edgeface": "finetune_edgeface", "finetune-bicubic": "finetune_bicubic", "evaluate": "evaluate",
    "evaluate-vlr": "evaluate", "export": "export", "export-vlr": "export", "deploy": "deploy",
}
KFP_LOG = "kfp.log"  # in <out>/logs: everything the local runner and its tasks print
EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception|Interrupt|Exit): ")  # a traceback's last line


class PipelineRunError(FaceopsError):
    """A step of a local run failed; the message names the step, the cause and the log."""


def pipeline_module(name: str):
    if name not in PIPELINES:
        raise FaceopsError(f"unknown pipeline {name!r} (available: {', '.join(PIPELINES)})")
    return importlib.import_module(PIPELINES[name])


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def typed_params(pipeline, params: dict[str, str], what: str = "--param") -> dict:
    """``KEY=VALUE`` strings -> values of the pipeline's own input types (KFP refuses the text "4"
    for an Integer input); an unknown name or a value of the wrong type is an error naming it."""
    inputs = pipeline.component_spec.inputs or {}
    out: dict = {}
    for key, text in params.items():
        if key not in inputs:
            raise config.ConfigError(f"{what} {key}={text}: the pipeline has no parameter {key!r} "
                                     f"(parameters: {', '.join(sorted(inputs))})")
        kind = inputs[key].type
        try:
            if kind == "Integer":
                out[key] = int(text)
            elif kind == "Double":
                out[key] = float(text)
            elif kind == "Boolean":
                if text.lower() not in _TRUE | _FALSE:
                    raise ValueError
                out[key] = text.lower() in _TRUE
            elif kind == "List":
                out[key] = _list(text)
            else:
                out[key] = text
        except ValueError:
            raise config.ConfigError(f"{what} {key}={text}: {key} is {kind.lower()}, {text!r} is not") from None
    return out


def _list(text: str) -> list:
    """A list parameter: a JSON list (``["32x32","14x16"]``) or comma-separated items (``32x32,14x16``)."""
    if text.strip().startswith("["):
        value = json.loads(text)
        if not isinstance(value, list):
            raise ValueError
        return value
    return [item.strip() for item in text.split(",") if item.strip()]


def loop_items(pipeline, arguments: dict) -> dict[str, list[str]]:
    """KFP task name -> the items its ``dsl.ParallelFor`` runs it for, in order (what `faceops run`
    labels each iteration's step with, e.g. ``train-dsr[14x16]``)."""
    spec = pipeline.pipeline_spec
    inputs = pipeline.component_spec.inputs or {}
    loops: dict[str, list[str]] = {}
    for task in spec.root.dag.tasks.values():
        if task.WhichOneof("iterator") != "parameter_iterator":
            continue
        source = task.parameter_iterator.items
        if source.WhichOneof("kind") == "raw":
            items = json.loads(source.raw)
        else:
            param = task.inputs.parameters[source.input_parameter].component_input_parameter
            items = arguments.get(param, inputs[param].default if param in inputs else None)
        for name in spec.components[task.component_ref.name].dag.tasks:
            loops[name] = [str(item) for item in items or []]
    return loops


def config_yaml(name: str, config_file: str | None, overrides: list[str] | None = None,
                default: str | None = None) -> str:
    """The run's config as YAML text: a file (or the packaged default) plus ``--set`` overrides, every
    section checked here, so a typo fails before any step starts."""
    path = Path(config_file) if config_file else config.packaged_config(default or LOCAL_CONFIG[name])
    return yaml.safe_dump(config.read_document(path, overrides), sort_keys=False)


def is_remote(uri: str) -> bool:
    """A store URI that is not a folder on this machine (``s3://…``)."""
    return "://" in uri and not uri.startswith("file://")


@dataclass
class LocalRun:
    """Where a finished local run left things: store URIs (a path for the local store, ``s3://…``
    when ``store_uri`` names a bucket), so the summary never points at a folder that does not exist."""

    out: Path
    run_root: str  # the run's outputs in the store: checkpoints, evaluation
    repo: str  # the Triton model repository
    logs: Path
    seconds: float
    promoted: bool = True  # the evaluation met the promote thresholds, so the repository serves this run
    report_copy: Path | None = None  # a local copy of a remote evaluation folder (report, images, metrics)
    copy_error: str = ""  # why a remote report could not be copied

    @property
    def evaluation(self) -> str:
        return f"{self.run_root}/evaluation"

    @property
    def report(self) -> str:
        return f"{self.evaluation}/report.html"

    @property
    def metrics(self) -> str:
        return f"{self.evaluation}/metrics.json"

    def local_metrics(self) -> Path | None:
        """metrics.json on this machine (the store's, or the local copy of a remote one), if any."""
        if self.report_copy:
            path = self.report_copy / "metrics.json"
        elif is_remote(self.metrics):
            return None
        else:
            path = Path(self.metrics.removeprefix("file://"))
        return path if path.is_file() else None

    def summary(self) -> str:
        rows: list[tuple[str, object]] = [("report", self.report)]
        if self.report_copy:
            rows.append(("report (local)", self.report_copy / "report.html"))
        elif self.copy_error:
            rows.append(("report (local)", f"not copied: {self.copy_error}"))
        repo = self.repo if self.promoted else (
            f"{self.repo}  (unchanged: the evaluation missed the promote thresholds, see {self.logs / 'gate.log'}; "
            f"this run's export is staged in {self.run_root}/staging)")
        rows += [("metrics", self.metrics), ("model repository", repo), ("checkpoints", self.run_root),
                 ("logs", self._logs()), ("time", f"{self.seconds / 60:.1f} min")]
        return "\n".join(f"  {k:<17} {v}" for k, v in rows)

    def _logs(self) -> str:
        return f"{self.logs}  ({KFP_LOG}: the runner's whole output; <step>.log: each step's own log)"


def copy_report(evaluation_uri: str, dest: Path) -> Path:
    """Copy an evaluation folder in the store (report.html, its images, metrics.json) to ``dest``, so a
    person can open the report of a run whose store is a bucket."""
    from faceops.storage import open_store

    store = open_store(evaluation_uri)
    for key in store.list(""):
        store.get_file(key, dest / key)
    if not (dest / "report.html").is_file():
        raise FaceopsError(f"{evaluation_uri} holds no report.html")
    return dest


def run_local(name: str, *, config_file: str | None = None, overrides: list[str] | None = None,
              data: str | None = None, pairs: str | None = None, out: str | None = None,
              params: dict | None = None, verbose: bool = False) -> LocalRun:
    """Run pipeline ``name`` end to end on this machine (kfp.local; the store is a local folder unless
    ``store_uri`` says otherwise). The console shows one line per step; the runner's whole output goes to
    ``<out>/logs/kfp.log`` (``verbose``: to the console as well)."""
    from kfp import local

    from faceops.console import watch_run
    from faceops.storage import StoreError

    text = config_yaml(name, config_file, overrides)  # checked before anything is written
    # locally a failure is reported at once, and per-size steps run one after another (2 cores)
    pipeline = pipeline_module(name).build(ClusterConfig(retries=0, size_parallelism=1), text)
    typed = typed_params(pipeline, params or {})
    if data and not data.startswith("s3://") and not Path(data).is_dir():
        raise FaceopsError(f"--data {data}: not a folder of <identity>/<image> files")
    out_dir = Path(out or f"faceops-runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(text)
    logs = out_dir / "logs"
    args = {"config_yaml": text, "source": data or "synth://",
            "dataset_name": Path(data).name if data else "synthetic", "store_uri": str(out_dir / "store"),
            "model_repo_uri": str(out_dir / "store" / "triton"),
            "run_id": f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",  # a new run; --param run_id=... resumes one
            "pairs_file": str(Path(pairs).resolve()) if pairs else "",
            "gpus_per_node": 0, "nodes": 1, "log_dir": str(logs), **typed}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out_dir / "kfp"),
               raise_on_error=True)
    print(f"faceops run {name}: run id {args['run_id']} (--param run_id=... resumes a run), output in {out_dir}"
          f"\n  runner log: {logs / KFP_LOG}", flush=True)
    t0 = time.time()
    failure = None
    with watch_run(logs / KFP_LOG, out_dir / "kfp", verbose=verbose, loops=loop_items(pipeline, args)):
        try:
            pipeline(**args)
        except RuntimeError as exc:
            failure = str(exc)
    if failure is not None:
        raise PipelineRunError(_failure_message(failure, out_dir))
    store = str(args["store_uri"]).rstrip("/")
    result = LocalRun(out_dir, run_folder_uri(store, str(args["run_id"])), str(args["model_repo_uri"]), logs,
                      time.time() - t0, promoted=_wrote_since(logs / "promote.log", t0))
    if is_remote(result.evaluation):
        try:
            result.report_copy = copy_report(result.evaluation, out_dir / "report")
        except (StoreError, FaceopsError) as exc:  # the run itself succeeded: say why there is no copy
            result.copy_error = str(exc)
    return result


def _wrote_since(path: Path, t: float) -> bool:
    """``path`` was written by this run (an ``--out`` used before holds older logs)."""
    return path.is_file() and path.stat().st_mtime >= t


def _failure_message(text: str, out_dir: Path) -> str:
    """``step 'NAME' failed: CAUSE (log: FILE)``: the cause is the step's last ERROR line, or the last
    exception in the runner's log when the step failed before it could log one (an import error)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # kfp colours task names
    m = re.search(r"(?:[Tt]ask|failed:) '([\w-]+)'", text)
    task = m.group(1) if m else "?"
    stage_log = _stage_log(out_dir / "logs", STAGE_LOGS.get(task, task.replace("-", "_")))
    cause = ""
    if stage_log.is_file():
        errors = [ln for ln in stage_log.read_text().splitlines() if " ERROR " in ln]
        cause = errors[-1].split(": ", 1)[-1] if errors else ""
    kfp_log = out_dir / "logs" / KFP_LOG
    where = stage_log if stage_log.is_file() else kfp_log
    if not cause and kfp_log.is_file():
        raised = [ln.strip() for ln in _task_output(kfp_log.read_text(), task) if EXCEPTION_LINE.match(ln.strip())]
        if raised:
            cause, where = raised[-1], kfp_log
    return f"step '{task}' failed{': ' + cause if cause else ''} (log: {where})"


def _stage_log(logs: Path, stage: str) -> Path:
    """``<stage>.log``, or the newest ``<stage>_<size>.log`` of a per-size step."""
    sized = [p for p in logs.glob(f"{stage}_*.log") if re.fullmatch(rf"{re.escape(stage)}_\d+x\d+\.log", p.name)]
    plain = logs / f"{stage}.log"
    if plain.is_file() or not sized:
        return plain
    return max(sized, key=lambda p: p.stat().st_mtime)


def _task_output(log_text: str, task: str) -> list[str]:
    """The lines of the runner's log from the last start of ``task`` on."""
    lines = log_text.splitlines()
    starts = [i for i, ln in enumerate(lines) if f"Executing task '{task}'" in ln]
    return lines[starts[-1]:] if starts else lines


def compile_pipeline(name: str, output: str, cluster_file: str | None = None) -> Path:
    """Compile to KFP v2 IR YAML with the cluster settings of ``cluster_file`` (section ``cluster``)."""
    from kfp import compiler

    cluster = config.load(ClusterConfig, cluster_file, section="cluster")
    compiler.Compiler().compile(pipeline_module(name).build(cluster), package_path=output)
    return Path(output)
