"""`faceops submit [--wait]` and `faceops follow` against a stand-in KFP API server.

The stand-in is an in-process ``http.server`` on 127.0.0.1 answering the REST paths kfp.Client
2.17 really calls for ``create_run_from_pipeline_func`` and ``get_run`` (kfp/client/client.py and
kfp_server_api/api/*.py):

    GET  /apis/v2beta1/healthz         Client.__init__ (no namespace in the kfp context) and our probe
    GET  /apis/v2beta1/experiments     create_experiment -> get_experiment(experiment_name=...)
    POST /apis/v2beta1/experiments     create_experiment, when none has the name
    POST /apis/v2beta1/runs            run_pipeline (the compiled spec inline: no pipeline upload)
    GET  /apis/v2beta1/runs/{run_id}   get_run, each poll

Bodies are kfp_server_api models (V2beta1Run, V2beta1PipelineTaskDetail, ...) serialised by the
client's own ``sanitize_for_serialization``, so a renamed field fails here, not on a cluster.
Any other path answers 404 and fails the test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

kfp_server_api = pytest.importorskip("kfp_server_api", reason="needs kfp (pip install 'faceops[kfp]')")
from kfp_server_api import models as m  # noqa: E402

from faceops.cli import main  # noqa: E402
from faceops.submit import safe_url  # noqa: E402

TOKEN = "kfp-test-token-3f9c1a"  # distinctive, so a leak check can search for it
S3_SECRET = "faceops-test-secret"
RUN_ID = "run-7"
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)
METRICS = {"verification": {"accuracy": 0.95, "accuracy_se": 0.01, "eer": 0.05, "auc": 0.98,
                            "tar_at_far": {"1e-2": 0.9, "1e-3": 0.8, "1e-4": 0.7}, "threshold": 0.3},
           "identification": {"rank1": 0.9, "rank1_se": 0.02, "rank5": 0.97}}


def _json(model) -> bytes:
    """A model as the real server's JSON: swagger field names (attribute_map), RFC 3339 times."""
    return json.dumps(kfp_server_api.ApiClient().sanitize_for_serialization(model)).encode()


def task(name: str, state: str, key: str, children: tuple[str, ...] = (), error: str | None = None,
         minute: int = 0):
    """A task detail as the API gives it for an Argo node: pod/node id, children by pod name."""
    return m.V2beta1PipelineTaskDetail(
        run_id=RUN_ID, task_id=key, display_name=name, state=state, pod_name=key,
        create_time=T0 + dt.timedelta(minutes=minute), start_time=T0 + dt.timedelta(minutes=minute),
        child_tasks=[m.PipelineTaskDetailChildTask(pod_name=c) for c in children] or None,
        error=m.GoogleRpcStatus(code=2, message=error) if error else None)


def loop_tasks(states: tuple[str, str], error: str | None = None) -> list:
    """Argo's nodes of one ``dsl.ParallelFor`` over two sizes: the loop DAG, an iteration node per
    item (``iteration-item(0:0)``), under each a driver and the step itself."""
    return [task("for-loop-1", "RUNNING", "n-loop", ("n-it0", "n-it1"), minute=2),
            task("iteration-item(0:0)", "RUNNING", "n-it0", ("n-drv0", "n-dsr0"), minute=2),
            task("iteration-item(1:1)", "RUNNING", "n-it1", ("n-drv1", "n-dsr1"), minute=2),
            task("train-dsr-driver", "SUCCEEDED", "n-drv0", minute=2),
            task("train-dsr-driver", "SUCCEEDED", "n-drv1", minute=2),
            task("train-dsr", states[0], "n-dsr0", minute=3),
            task("train-dsr", states[1], "n-dsr1", error=error, minute=3)]


def snapshot(state: str, tasks: list, error: str | None = None) -> dict:
    """What changes between two polls; the rest of the run comes from the create request."""
    return {"state": state, "tasks": tasks, "error": error}


SUCCESS = [
    snapshot("PENDING", []),
    snapshot("RUNNING", [task("root-driver", "SUCCEEDED", "n-root"), task("ingest", "RUNNING", "n-ingest")]),
    snapshot("RUNNING", [task("ingest", "SUCCEEDED", "n-ingest"),
                         task("train-recognizer", "RUNNING", "n-rec", minute=1)]),
    snapshot("RUNNING", [task("ingest", "SUCCEEDED", "n-ingest"),
                         task("train-recognizer", "SUCCEEDED", "n-rec", minute=1),
                         *loop_tasks(("RUNNING", "RUNNING"))]),
    snapshot("SUCCEEDED", [task("ingest", "SUCCEEDED", "n-ingest"),
                           task("train-recognizer", "SUCCEEDED", "n-rec", minute=1),
                           *loop_tasks(("SUCCEEDED", "SUCCEEDED")),
                           task("evaluate-vlr", "SUCCEEDED", "n-eval", minute=5),
                           task("promotion-gate", "SUCCEEDED", "n-gate", minute=6),
                           task("promote", "SUCCEEDED", "n-promote", minute=7)]),
]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
FAILURE = [
    snapshot("RUNNING", [task("ingest", "SUCCEEDED", "n-ingest"), *loop_tasks(("RUNNING", "RUNNING"))]),
    snapshot("FAILED", [task("ingest", "SUCCEEDED", "n-ingest"), *loop_tasks(("SUCCEEDED", "FAILED"), error=OOM)],
             error="1 step failed"),
]


class StandIn:
    """The KFP API server's part that kfp.Client uses; ``script``: the run as each poll sees it."""

    def __init__(self, script: list[dict], need_token: str | None = None):
        self.script, self.need_token = script, need_token
        self.calls: list[tuple[str, str]] = []
        self.auth: set[str] = set()
        self.created: dict | None = None
        self.polls = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def run(self) -> m.V2beta1Run:
        body = self.created or {}
        now = self.script[min(self.polls, len(self.script) - 1)]
        self.polls += 1
        done = now["state"] in ("SUCCEEDED", "FAILED")
        return m.V2beta1Run(
            run_id=RUN_ID, display_name=body.get("display_name"), experiment_id="exp-1",
            pipeline_spec=body.get("pipeline_spec"),
            runtime_config=m.V2beta1RuntimeConfig(parameters=body.get("runtime_config", {}).get("parameters")),
            created_at=T0, finished_at=T0 + dt.timedelta(minutes=12) if done else None, state=now["state"],
            error=m.GoogleRpcStatus(code=2, message=now["error"]) if now["error"] else None,
            run_details=m.V2beta1RunDetails(task_details=now["tasks"] or None))

    def answer(self, method: str, path: str, body: dict | None) -> tuple[int, object]:
        route = path.split("?")[0]
        if route == "/apis/v2beta1/healthz" and method == "GET":
            return 200, m.V2beta1GetHealthzResponse(multi_user=False, pipeline_store="database")
        if route == "/apis/v2beta1/experiments" and method == "GET":
            return 200, m.V2beta1ListExperimentsResponse(experiments=None, total_size=0)
        if route == "/apis/v2beta1/experiments" and method == "POST":
            return 200, m.V2beta1Experiment(experiment_id="exp-1", display_name=body["display_name"])
        if route == "/apis/v2beta1/runs" and method == "POST":
            self.created = body
            return 200, m.V2beta1Run(run_id=RUN_ID, display_name=body["display_name"], state="PENDING",
                                     experiment_id=body["experiment_id"])
        if route == f"/apis/v2beta1/runs/{RUN_ID}" and method == "GET":
            return 200, self.run()
        return 404, None

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                stand_in.calls.append((method, self.path.split("?")[0]))
                stand_in.auth.add(self.headers.get("Authorization", ""))
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size)) if size else None
                if stand_in.need_token and self.headers.get("Authorization") != f"Bearer {stand_in.need_token}":
                    status, payload = 401, json.dumps({"error": "unauthenticated", "code": 16,
                                                       "message": "missing or bad token"}).encode()
                else:
                    status, model = stand_in.answer(method, self.path, body)
                    payload = _json(model) if model is not None else b'{"code": 5, "message": "not found"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802 (http.server's names)
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def kfp_env(monkeypatch, tmp_path):
    """A clean kfp setting: no kfp context file, no UI endpoint; the token in the environment."""
    from kfp import Client

    monkeypatch.setattr(Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for name in ("KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    monkeypatch.setenv("FACEOPS_S3_SECRET_KEY", S3_SECRET)


def submit_args(url: str, store: Path, *extra: str) -> list[str]:
    return ["submit", "vlr_face", "--host", url, "--run-name", "faces-1", "--param", f"store_uri={store}",
            "--param", "vlr_sizes=32x32,14x16", "--param", "gpus_per_node=2", "--wait", "--interval", "0.01",
            *extra]


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and S3_SECRET not in text


def test_wait_follows_a_run_to_success(kfp_env, tmp_path, capsys, caplog):
    store = tmp_path / "store"
    (store / f"runs/{RUN_ID}/evaluation").mkdir(parents=True)  # no run_id parameter: the folder is KFP's run id
    (store / f"runs/{RUN_ID}/evaluation/metrics.json").write_text(json.dumps(METRICS))
    with StandIn(SUCCESS) as stand_in:
        code = main(submit_args(stand_in.url, store))
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    follow = lines[2:lines.index("")]  # up to the summary
    assert lines[:2] == ["submitted vlr_face: run id run-7", f"  {stand_in.url}/#/runs/details/run-7"]
    assert follow == [
        "run PENDING",
        "run RUNNING",
        "  ingest  RUNNING",  # root-driver is no step of the pipeline: not shown
        "  ingest  SUCCEEDED",
        "  train-recognizer  RUNNING",
        "  train-recognizer  SUCCEEDED",
        "  train-dsr[32x32]  RUNNING",  # the iteration index (Argo's "iteration-item(0:0)") -> the size
        "  train-dsr[14x16]  RUNNING",
        "  train-dsr[32x32]  SUCCEEDED",
        "  train-dsr[14x16]  SUCCEEDED",
        "  evaluate-vlr  SUCCEEDED",
        "  promotion-gate  SUCCEEDED",
        "  promote  SUCCEEDED",
        "run SUCCEEDED",
    ]
    evaluation = f"{store}/runs/{RUN_ID}/evaluation"
    assert "  served: the evaluation met the promote thresholds" in out
    assert "run run-7 SUCCEEDED after 12.0 min" in out
    assert f"  metrics          {evaluation}/metrics.json" in out
    assert any(ln.startswith("HR ") and "0.9500" in ln for ln in lines), out  # the metrics table
    # what the client sent: the calls kfp.Client makes, in order, typed arguments, the token
    assert stand_in.calls == [("GET", "/apis/v2beta1/healthz"), ("GET", "/apis/v2beta1/healthz"),
                              ("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"),
                              ("POST", "/apis/v2beta1/runs")] + [("GET", f"/apis/v2beta1/runs/{RUN_ID}")] * 5
    params = stand_in.created["runtime_config"]["parameters"]
    assert params["gpus_per_node"] == 2 and params["vlr_sizes"] == ["32x32", "14x16"]
    assert "run_id" not in params  # a new run: never another run's folder
    assert stand_in.auth == {f"Bearer {TOKEN}"}
    assert_no_secret(out, err, caplog.text)


def test_failed_run_exits_1_naming_the_step_and_its_error(kfp_env, tmp_path, capsys, caplog):
    with StandIn(FAILURE) as stand_in:
        code = main(submit_args(stand_in.url, tmp_path))
    out, err = capsys.readouterr()
    assert code == 1
    assert "  train-dsr[14x16]  FAILED" in out.splitlines()
    assert f"  failed step train-dsr[14x16]: {OOM}" in out
    assert "  run error: 1 step failed" in out and "run run-7 FAILED" in out
    assert "failed step train-dsr[32x32]" not in out and "metrics" not in out
    assert_no_secret(out, err, caplog.text)


def test_without_wait_prints_the_link_and_returns(kfp_env, tmp_path, capsys):
    with StandIn(SUCCESS) as stand_in:
        args = [a for a in submit_args(stand_in.url, tmp_path) if a not in ("--wait",)]
        code = main(args)
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines() == ["submitted vlr_face: run id run-7",
                                              f"  {stand_in.url}/#/runs/details/run-7"]
    assert ("GET", f"/apis/v2beta1/runs/{RUN_ID}") not in stand_in.calls


def test_ctrl_c_stops_following_not_the_run(kfp_env, tmp_path, capsys, monkeypatch):
    import faceops.submit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(faceops.submit, "follow", interrupted)
    with StandIn(SUCCESS) as stand_in:
        code = main(submit_args(stand_in.url, tmp_path))
    err = capsys.readouterr().err
    assert code == 130
    assert f"run {RUN_ID} goes on" in err and f"follow it again: faceops follow {RUN_ID} --host {stand_in.url}" in err
    assert not any(path.endswith(":terminate") for _, path in stand_in.calls)


def test_timeout_stops_following_with_124(kfp_env, tmp_path, capsys):
    with StandIn(SUCCESS[:2]) as stand_in:  # stays RUNNING
        code = main(submit_args(stand_in.url, tmp_path, "--timeout", "0.3"))
    err = capsys.readouterr().err
    assert code == 124 and "had not finished after 0.3 s (last state RUNNING)" in err and "faceops follow" in err


def test_follow_an_existing_run(kfp_env, capsys):
    with StandIn(SUCCESS) as stand_in:
        stand_in.created = {}  # a run submitted elsewhere: no spec known here, every task shown
        code = main(["follow", RUN_ID, "--host", stand_in.url, "--interval", "0.01"])
    out = capsys.readouterr().out
    assert code == 0 and "run SUCCEEDED" in out and "  ingest  SUCCEEDED" in out


def test_bad_token_is_one_line_naming_the_fix(kfp_env, tmp_path, capsys, caplog):
    with StandIn(SUCCESS, need_token="another-token") as stand_in:
        code = main(submit_args(stand_in.url, tmp_path))
    out, err = capsys.readouterr()
    assert code == 1 and stand_in.calls == [("GET", "/apis/v2beta1/healthz")]
    assert err.strip().count("\n") == 0, err
    assert f"{stand_in.url}/apis/v2beta1/healthz: HTTP 401" in err and "KF_PIPELINES_TOKEN" in err
    assert_no_secret(out, err, caplog.text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_a_clear_error_without_traceback(tmp_path):
    """Through the installed entry point, so stderr is exactly what a person sees."""
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    env = {**os.environ, "KF_PIPELINES_TOKEN": TOKEN, "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "faceops", "submit", "vlr_face", "--host", url, "--wait"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot reach {url}/apis/v2beta1/healthz" in proc.stderr and "check --host" in proc.stderr
    assert_no_secret(proc.stdout, proc.stderr)


def test_host_without_scheme_is_a_usage_error(kfp_env, capsys):
    assert main(["submit", "vlr_face", "--host", "ml-pipeline.kubeflow:8888"]) == 2
    assert "give the URL with its scheme" in capsys.readouterr().err


def test_urls_in_messages_carry_no_password():
    assert safe_url("http://alice:s3cret@kfp.example.com:8888/x") == "http://kfp.example.com:8888/x"
    assert safe_url("http://kfp.example.com") == "http://kfp.example.com"
