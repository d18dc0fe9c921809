"""Submitting a pipeline to Kubeflow Pipelines and following its run (`faceops submit [--wait]`,
`faceops follow`).

Everything goes through ``kfp.Client`` and the v2beta1 REST API it wraps: the run's state and its
``run_details.task_details`` come from ``GET /apis/v2beta1/runs/{id}``. That API gives a task's
output artifacts only as ML Metadata ids, not their values, so the final metrics are read from the
evaluation's ``metrics.json`` in the store (``<store_uri>/runs/<run_id>/evaluation``) where this
machine can read it (``FACEOPS_S3_*``); otherwise the URIs are printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from faceops import config
from faceops.errors import FaceopsError
from faceops.pipelines.platform import ClusterConfig
from faceops.retry import poll
from faceops.run import pipeline_module, typed_params
from faceops.stages import run_folder_uri

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELED", "SKIPPED")  # kfp's finish states, CANCELED included
REQUEST_TIMEOUT_S = (10, 60)  # (connect, read) per API call: a stalled server fails, it never hangs
POLL_FAILURES = 6  # consecutive failed polls before giving up (the run itself goes on)
ITERATION = re.compile(r"\((\d+)(?::([^)]*))?\)$")  # Argo's loop iteration node: "iteration-item(1:1)"
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"  # kfp.Client's own setting for the UI's address
TOKEN_ENV = "KF_PIPELINES_TOKEN"
HINTS = {401: f"pass --token or set {TOKEN_ENV}", 403: "check the token's rights (and --namespace)",
         404: "check --host: the KFP API (ml-pipeline, port 8888), or the UI's URL ending in /pipeline"}


class SubmitError(FaceopsError):
    """Talking to the KFP API failed; the message names the URL or run and what to check."""


class FollowTimeout(SubmitError):
    """The run had not finished within ``--timeout``; it goes on."""


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, so a message never shows a credential."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def run_link(host: str, run_id: str) -> str:
    """The run's page in the KFP UI, formed as kfp.Client forms it (``_get_url_prefix``: the UI host
    from ``KF_PIPELINES_UI_ENDPOINT``, else the API host)."""
    ui = os.environ.get(UI_ENV) or host
    if not ui.startswith(("http://", "https://")):
        ui = "http://" + ui
    return f"{safe_url(ui.rstrip('/'))}/#/runs/details/{run_id}"


def _api_error(exc: Exception, what: str, url: str) -> SubmitError:
    """A one-line error for a failed API call: the status and the server's message, never the
    request's headers (they hold the token) nor the response's (cookies)."""
    from kfp_server_api import ApiException

    if isinstance(exc, ApiException):
        detail = ""
        try:
            body = json.loads(exc.body or "{}")
            detail = body.get("message") or body.get("error") or ""
        except (ValueError, AttributeError):
            pass
        hint = HINTS.get(exc.status, "")
        return SubmitError(f"{what} at {url}: HTTP {exc.status} {exc.reason or ''}".rstrip()
                           + (f": {detail}" if detail else "") + (f"; {hint}" if hint else ""))
    reason = getattr(exc, "reason", None) or exc
    return SubmitError(f"{what}: cannot reach {url} ({type(reason).__name__}); check --host (scheme, name, port) "
                       "and that the KFP API is reachable from here (e.g. kubectl port-forward -n kubeflow "
                       "svc/ml-pipeline 8888:8888)")


def _check_reachable(host: str, token: str | None) -> None:
    """One ``GET /apis/v2beta1/healthz`` without retries, so a wrong ``--host`` fails at once with a
    clear message (kfp.Client's own check retries for half a minute, logging tracebacks)."""
    import kfp_server_api
    from urllib3.exceptions import HTTPError
    from urllib3.util import Retry

    cfg = kfp_server_api.Configuration(host=host)
    cfg.retries = Retry(total=3, connect=0, read=0)  # follow a redirect or two, retry nothing
    if token:
        cfg.api_key["authorization"], cfg.api_key_prefix["authorization"] = token, "Bearer"
    url = f"{safe_url(host)}/apis/v2beta1/healthz"
    try:
        with kfp_server_api.ApiClient(cfg) as api:
            answer = kfp_server_api.HealthzServiceApi(api).healthz_service_get_healthz(
                _request_timeout=REQUEST_TIMEOUT_S)
    except (kfp_server_api.ApiException, HTTPError, OSError) as exc:
        raise _api_error(exc, "KFP API health check", url) from None
    except ValueError:  # an answer that is not the API's JSON
        answer = None
    if not isinstance(answer, kfp_server_api.V2beta1GetHealthzResponse):
        raise SubmitError(f"{url} answered, but not as the KFP API (a login page?): check --host, and "
                          f"pass --token or set {TOKEN_ENV} when an auth proxy sits in front")


def check_host(host: str) -> str:
    """``--host`` as kfp.Client needs it: a URL with its scheme (kfp would guess https)."""
    if not host.startswith(("http://", "https://")):
        raise config.ConfigError(f"--host {safe_url(host)}: give the URL with its scheme, "
                                 "e.g. http://ml-pipeline.kubeflow:8888")
    return host.rstrip("/")


def connect(host: str, *, namespace: str | None = None, token: str | None = None):
    """A ``kfp.Client`` for ``host`` (a URL with its scheme), checked to answer as the KFP API.

    Auth: ``token`` (or ``KF_PIPELINES_TOKEN``), else kfp's in-cluster / kubeconfig credentials.
    """
    from kfp import Client

    host = check_host(host)
    token = token or os.environ.get(TOKEN_ENV) or None
    _check_reachable(host, token)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2+"
            return Client(host=host, namespace=namespace or "kubeflow", existing_token=token)
    except Exception as exc:  # kfp raises ApiException, urllib3 errors or TimeoutError here
        raise _api_error(exc, "connecting to the KFP API", safe_url(host)) from None


@dataclass
class Submitted:
    """A run that the KFP API accepted."""

    run_id: str
    link: str  # its page in the KFP UI
    client: object = field(repr=False)  # the kfp.Client, to follow the run with


def submit(name: str, host: str, *, namespace: str | None = None, experiment: str | None = None,
           run_name: str | None = None, params: dict | None = None, cluster_file: str | None = None,
           token: str | None = None) -> Submitted:
    """Compile pipeline ``name`` with the cluster settings of ``cluster_file`` and submit it.

    Parameters are checked against the pipeline (``typed_params``) before anything is sent. MinIO
    credentials are never parameters: the steps read them from the Kubernetes Secret.
    """
    cluster = config.load(ClusterConfig, cluster_file, section="cluster")
    pipeline = pipeline_module(name).build(cluster)
    run_name = run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # no run_id unless given: the pipeline's default is KFP's own run id, so neither two runs of one name
    # nor a clone of this run in the UI ever share (and resume) this run's folder
    arguments = typed_params(pipeline, params or {})
    client = connect(host, namespace=namespace, token=token)
    try:  # kfp prints its own experiment/run links; the caller prints ours
        with contextlib.redirect_stdout(io.StringIO()):
            result = client.create_run_from_pipeline_func(
                pipeline, arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace)
    except Exception as exc:
        raise _api_error(exc, f"submitting {name}", safe_url(host)) from None
    return Submitted(result.run_id, run_link(host, result.run_id), client)


# --- following a run ------------------------------------------------------------------------------

@dataclass
class PipelineShape:
    """What the run's pipeline spec says about its tasks: the user's steps (not drivers or DAGs) and,
    for a step inside a ``dsl.ParallelFor``, the items it runs for."""

    steps: set[str] | None  # None: the run carries no spec; every task is shown
    loops: dict[str, list[str]]

    @classmethod
    def of(cls, run) -> PipelineShape:
        spec = run.pipeline_spec or {}
        spec = spec.get("pipeline_spec", spec)  # {"pipeline_spec", "platform_spec"} with a platform spec
        if "root" not in spec:
            return cls(None, {})
        components = spec.get("components", {})
        dags = [spec["root"]["dag"], *(c["dag"] for c in components.values() if "dag" in c)]
        steps = {name for dag in dags for name, task in dag.get("tasks", {}).items()
                 if "dag" not in components.get(task.get("componentRef", {}).get("name", ""), {})}
        return cls(steps, _loops(spec, components, (run.runtime_config and run.runtime_config.parameters) or {}))


def _loops(spec: dict, components: dict, arguments: dict) -> dict[str, list[str]]:
    """Step name -> its loop's items, in order (``faceops.run.loop_items`` on the spec as JSON)."""
    defaults = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    loops: dict[str, list[str]] = {}
    for task in spec["root"]["dag"].get("tasks", {}).values():
        source = task.get("parameterIterator", {}).get("items", {})
        if "raw" in source:
            items = json.loads(source["raw"])
        elif "inputParameter" in source:
            param = task["inputs"]["parameters"][source["inputParameter"]].get("componentInputParameter", "")
            items = arguments.get(param, defaults.get(param, {}).get("defaultValue"))
        else:
            continue
        body = components.get(task["componentRef"]["name"], {}).get("dag", {})
        for name in body.get("tasks", {}):
            loops[name] = [str(item) for item in items or []]
    return loops


def _iteration(task, parents: dict[str, str], by_id: dict[str, object]) -> int | None:
    """The loop iteration index of ``task``: from the nearest ancestor named like Argo's iteration
    nodes (``iteration-item(1:1)``), found through ``parent_task_id`` / ``child_tasks``."""
    node, depth = _task_key(task), 0
    while node and depth < 32:
        m = ITERATION.search(getattr(by_id.get(node), "display_name", "") or "")
        if m:
            return int(m.group(1))
        node, depth = parents.get(node), depth + 1
    return None


def _task_key(task) -> str:
    return task.task_id or task.pod_name or str(task.execution_id or "")


def task_states(run, shape: PipelineShape) -> dict[str, tuple[str, str, object]]:
    """Task key -> (label, state, task) for the user's steps; a loop step's label carries its item
    (``train-dsr[14x16]``), or ``#k`` when the API does not say which iteration it is."""
    tasks = list((run.run_details and run.run_details.task_details) or [])
    by_id = {_task_key(t): t for t in tasks if _task_key(t)}
    parents: dict[str, str] = {}
    for t in tasks:
        if t.parent_task_id:
            parents[_task_key(t)] = t.parent_task_id
        for child in t.child_tasks or []:
            parents.setdefault(child.task_id or child.pod_name, _task_key(t))
    out: dict[str, tuple[str, str, object]] = {}
    seen: dict[str, int] = {}
    for t in sorted(tasks, key=lambda t: (t.create_time or t.start_time or 0, _task_key(t))):
        name = t.display_name or "?"
        if shape.steps is not None and name not in shape.steps:
            continue
        label = name
        if name in shape.loops:
            index = _iteration(t, parents, by_id)
            items = shape.loops[name]
            if index is None:
                seen[name] = seen.get(name, 0) + 1
                label = f"{name}[#{seen[name]}]"
            else:
                label = f"{name}[{items[index] if index < len(items) else index}]"
        out[_task_key(t) or label] = (label, t.state or "PENDING", t)
    return out


def follow(client, run_id: str, *, interval_s: float = 10.0, timeout_s: float | None = None,
           echo: Callable[[str], None] = print):
    """Poll the run until it ends; print the run's state and each step's state as they change.
    Returns the final ``V2beta1Run``. Raises ``FollowTimeout`` after ``timeout_s`` (the run goes on)."""
    from kfp_server_api import ApiException
    from urllib3.exceptions import HTTPError

    shown: dict[str, str] = {}
    seen = {"state": None, "failures": 0}

    def probe():
        """The run (its changes printed), or None when the API did not answer this time."""
        try:
            run = client.runs.run_service_get_run(run_id=run_id, _request_timeout=REQUEST_TIMEOUT_S)
        except (ApiException, HTTPError, OSError) as exc:
            seen["failures"] += 1
            if (isinstance(exc, ApiException) and exc.status in (401, 403, 404)) or seen["failures"] >= POLL_FAILURES:
                raise _api_error(exc, f"following run {run_id}", _host(client)) from None
            echo(f"  (the KFP API did not answer: {type(exc).__name__}; retrying)")
            return None
        seen["failures"] = 0
        ended = run.state in TERMINAL
        if run.state != seen["state"] and not ended:  # the end comes after the steps' last changes
            echo(f"run {run.state}")
        seen["state"] = run.state
        for key, (label, state, _) in task_states(run, PipelineShape.of(run)).items():
            if shown.get(key) != state:
                shown[key] = state
                echo(f"  {label}  {state}")
        if ended:
            echo(f"run {run.state}")
        return run

    run = poll(probe, lambda r: r is not None and r.state in TERMINAL, timeout_s=timeout_s or math.inf,
               interval_s=interval_s)
    if run is None or run.state not in TERMINAL:
        raise FollowTimeout(f"run {run_id} had not finished after {timeout_s:g} s (last state "
                            f"{seen['state'] or 'unknown'}); it goes on")
    return run


def _host(client) -> str:
    try:
        return safe_url(client._existing_config.host)
    except AttributeError:
        return "the KFP API"


# --- the end of a run -----------------------------------------------------------------------------

def run_outputs(run) -> str | None:
    """The run's evaluation folder in the store, from its ``store_uri`` and ``run_id`` parameters
    (as given, else the pipeline's defaults; an empty ``run_id`` is KFP's run id, as in the pipeline's
    ``run-root`` step); None when the pipeline has no ``store_uri``."""
    spec = run.pipeline_spec or {}
    spec = spec.get("pipeline_spec", spec)
    defaults = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    given = (run.runtime_config and run.runtime_config.parameters) or {}
    store_uri, run_id = (given.get(k, defaults.get(k, {}).get("defaultValue")) for k in ("store_uri", "run_id"))
    if not store_uri:
        return None
    return f"{run_folder_uri(str(store_uri), run_id or run.run_id)}/evaluation"


def promotion(run) -> str:
    """Whether the run served its models: its ``promote`` step ran, or the gate kept them staged."""
    states = {label: state for label, state, _ in task_states(run, PipelineShape.of(run)).values()}
    if "promote" in states:
        return "served: the evaluation met the promote thresholds (new versions in the model repository)"
    if "promotion-gate" in states:
        return ("NOT served: the evaluation missed the promote thresholds (see the promotion-gate step's log); "
                "the models stay staged in the run's folder")
    return ""


def _metrics_table(evaluation: str) -> str:
    """The evaluation's metrics as `faceops run` prints them; raises when the store cannot be read."""
    from faceops.evaluate.runner import summary_table
    from faceops.storage import open_store

    return summary_table(json.loads(open_store(evaluation).get_bytes("metrics.json")))


def finish(run, link: str, echo: Callable[[str], None] = print) -> int:
    """Print the run's end (state, failed steps with their errors, metrics or where they are);
    returns the exit code: 0 SUCCEEDED, 1 otherwise."""
    state = run.state or "unknown"
    took = ""
    if run.created_at and run.finished_at:
        took = f" after {(run.finished_at - run.created_at).total_seconds() / 60:.1f} min"
    echo(f"\nrun {run.run_id} {state}{took}\n  {link}")
    if state != "SUCCEEDED":
        failed = [(label, t) for label, s, t in task_states(run, PipelineShape.of(run)).values() if s == "FAILED"]
        for label, t in failed:
            message = (t.error and t.error.message) or "no message from the API: see the step's logs in the UI"
            echo(f"  failed step {label}: {message}")
        if run.error and run.error.message:
            echo(f"  run error: {run.error.message}")
        if not failed and not (run.error and run.error.message):
            echo("  the API names no failed step: see the run in the UI")
        return 1
    served = promotion(run)
    if served:
        echo(f"  {served}")
    evaluation = run_outputs(run)
    if evaluation:
        echo(f"  report           {evaluation}/report.html\n  metrics          {evaluation}/metrics.json")
        try:
            echo("\n" + _metrics_table(evaluation))
        except (FaceopsError, OSError, ValueError, KeyError, TypeError) as exc:
            echo(f"  metrics not read here ({exc}); the evaluate step's Metrics artifact shows them in the UI")
    return 0
