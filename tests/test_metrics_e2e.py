"""Prometheus end to end, with REAL servers: a training run and an evaluation push to a Pushgateway
that Prometheus scrapes, the local Triton is scraped directly, and PromQL over Prometheus's HTTP API
sees them, at default settings (no log or push interval pinned). Pushes never block training: a
gateway that never answers costs one warning, not a stall; finished runs' groups are cleaned up.
The local-run path (``MetricsConfig.port``) is checked against a real training run as well."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from faceops import config
from faceops.config import to_dict
from faceops.data.reader import load_split
from faceops.metrics import MetricsConfig, StageMetrics, eval_figures
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.serve.local import free_port
from faceops.train.checkpoint import save_checkpoint
from faceops.train.fit import fit_task
from faceops.train.hooks import Hook
from faceops.train.recognizer import RecognizerTask, RecognizerTrainConfig, train_recognizer

BATCH = 8
TINY = ["model.name=edgeface_xxs", f"loader.batch_size={BATCH}", "engine.progress=false", "engine.amp=off",
        "engine.device=cpu"]
SCRAPE_S = 1  # scrape and evaluation interval of the test Prometheus
QUERY_DEADLINE_S = 15.0  # a pushed/served value must be queryable within this (several scrapes)
START_DEADLINE_S = 30.0  # Prometheus and the Pushgateway answer /-/ready within this
BINARIES = ("prometheus", "prometheus-pushgateway")


def tiny_cfg(data: str, out: Path, *sets: str) -> RecognizerTrainConfig:
    return config.load(RecognizerTrainConfig, overrides=[*TINY, f"data={data}", f"out={out}", *sets])


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


# -- the servers -----------------------------------------------------------------------------------
@dataclass
class PromStack:
    prometheus: str  # http://127.0.0.1:PORT
    pushgateway: str  # 127.0.0.1:PORT (what FACEOPS_PUSHGATEWAY / MetricsConfig.pushgateway take)
    triton_metrics_port: int  # the static target of the "triton" job: start LocalTriton on it

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(http_get(url))
        if body.get("status") != "success":
            raise AssertionError(f"PromQL {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, accept: Callable[[list[dict]], bool]) -> list[dict]:
        """Poll ``promql`` until ``accept(result)``; fail with the last result past the deadline."""
        deadline = time.monotonic() + QUERY_DEADLINE_S
        while True:
            result = self.query(promql)
            if accept(result):
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"PromQL {promql!r} still gives {result} after {QUERY_DEADLINE_S:.0f} s "
                            f"(targets: {self.targets()})")
            time.sleep(SCRAPE_S / 4)

    def targets(self) -> list[tuple[str, str, str]]:
        active = json.loads(http_get(f"{self.prometheus}/api/v1/targets"))["data"]["activeTargets"]
        return [(t["labels"].get("job", ""), t["health"], t.get("lastError", "")) for t in active]


def scalar(result: list[dict]) -> float:
    """The value of a one-series instant vector (NaN when empty)."""
    return float(result[0]["value"][1]) if len(result) == 1 else math.nan


def prometheus_config(pushgateway: str, triton: str) -> str:
    return f"""\
global:
  scrape_interval: {SCRAPE_S}s
  scrape_timeout: {SCRAPE_S}s
  evaluation_interval: {SCRAPE_S}s
scrape_configs:
  - job_name: pushgateway
    honor_labels: true  # keep the pushed job/run_id/stage labels
    static_configs:
      - targets: ["{pushgateway}"]
  - job_name: triton
    static_configs:
      - targets: ["{triton}"]
"""


def _start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_ready(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} not ready after {START_DEADLINE_S:.0f} s:\n{log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prom_stack(tmp_path_factory) -> Iterator[PromStack]:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"needs the {' and '.join(missing)} binar{'ies' if len(missing) > 1 else 'y'} "
                    "(apt-get install -y --no-install-recommends prometheus prometheus-pushgateway; "
                    "scripts/test.sh installs them in CI)")
    work = tmp_path_factory.mktemp("prometheus")
    host = "127.0.0.1"
    pg_addr, prom_addr = f"{host}:{free_port(host)}", f"{host}:{free_port(host)}"
    triton_port = free_port(host)
    (work / "prometheus.yml").write_text(prometheus_config(pg_addr, f"{host}:{triton_port}"))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(["prometheus-pushgateway", f"--web.listen-address={pg_addr}"],
                            work / "pushgateway.log"))
        procs.append(_start(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address={prom_addr}"],
                            work / "prometheus.log"))
        _wait_ready(f"http://{pg_addr}/-/ready", procs[0], work / "pushgateway.log")
        _wait_ready(f"http://{prom_addr}/-/ready", procs[1], work / "prometheus.log")
        yield PromStack(f"http://{prom_addr}", pg_addr, triton_port)
    finally:
        for proc in reversed(procs):
            _stop(proc)


# -- training -> Pushgateway -> Prometheus --------------------------------------------------------
@pytest.mark.slow
def test_training_pushes_reach_prometheus(prom_stack, tiny_dataset, tmp_path):
    """Default log and push intervals (10 and 50 steps, more than this run takes): the counters are
    exact anyway, and the run ends marked finished and successful."""
    torch.set_num_threads(1)
    run_id = f"e2e-{time.time_ns()}"  # unique: the Pushgateway and Prometheus outlive a single test
    injected = [1, 3, 5]  # three poisoned losses, never two in a row: skipped, counted, no rollback
    cfg = tiny_cfg(tiny_dataset, tmp_path / run_id, "engine.epochs=3",
                   f"engine.nan_guard.inject_steps={injected}",
                   f"engine.metrics.pushgateway={prom_stack.pushgateway}")
    assert cfg.engine.log_every_steps > 1 and cfg.engine.metrics.push_every_steps > 1
    started = time.time()
    result = train_recognizer(cfg)
    assert result.nan_events["loss"] == len(injected) and result.rollbacks == 0
    assert 3 < result.steps < cfg.engine.log_every_steps * 2  # steps between two logs are counted too

    nan_total = prom_stack.wait_for(f'sum(faceops_nan_events_total{{run_id="{run_id}"}})',
                                    lambda r: scalar(r) == len(injected))
    assert scalar(nan_total) == len(injected)
    by_kind = prom_stack.query(f'faceops_nan_events_total{{run_id="{run_id}"}}')
    assert {s["metric"]["kind"]: float(s["value"][1]) for s in by_kind} == {"loss": 3.0, "grad": 0.0,
                                                                            "param": 0.0}
    loss = prom_stack.wait_for(f'faceops_train_loss{{run_id="{run_id}"}}', lambda r: len(r) == 1)
    labels = loss[0]["metric"]
    assert labels["job"] == "faceops" and labels["stage"] == "train_recognizer"
    assert labels["model"] == "edgeface_xxs"
    assert math.isfinite(scalar(loss)) and scalar(loss) > 0
    ips = prom_stack.wait_for(f'faceops_train_images_per_second{{run_id="{run_id}"}}', lambda r: len(r) == 1)
    assert scalar(ips) > 0
    steps = prom_stack.wait_for(f'faceops_train_steps_total{{run_id="{run_id}"}}', lambda r: len(r) == 1)
    assert scalar(steps) == result.steps - len(injected)  # real optimiser steps: the skipped ones add nothing
    images = prom_stack.wait_for(f'faceops_train_images_total{{run_id="{run_id}"}}', lambda r: len(r) == 1)
    assert scalar(images) == (result.steps - len(injected)) * BATCH
    finished = prom_stack.wait_for(f'faceops_run_finished{{run_id="{run_id}"}}', lambda r: scalar(r) == 1)
    assert finished[0]["metric"]["stage"] == "train_recognizer"
    success = prom_stack.wait_for(f'faceops_run_last_success_timestamp_seconds{{run_id="{run_id}"}}',
                                  lambda r: len(r) == 1)
    assert started <= scalar(success) <= time.time()


# -- evaluation -> Pushgateway -> Prometheus ------------------------------------------------------
def _checkpoints(root: Path) -> tuple[str, str, str]:
    """Tiny random recognizer, fine-tuned recognizer and 32x32 DSR checkpoints."""
    uris = []
    for name, seed in (("rec", 0), ("ft", 1)):
        torch.manual_seed(seed)
        rcfg = RecognizerConfig(name="edgeface_xxs")
        uris.append(save_checkpoint(str(root / f"{name}.pt"), {
            "kind": "recognizer", "model_config": to_dict(rcfg), "model": create_recognizer(rcfg).state_dict(),
            "config": {}}))
    torch.manual_seed(2)
    dcfg = DSRConfig(vlr_size="32x32", base_channels=8, residual_blocks=1)
    uris.append(save_checkpoint(str(root / "dsr.pt"), {
        "kind": "dsr", "model_config": to_dict(dcfg), "model": create_dsr(dcfg).state_dict(), "config": {},
        "vlr_size": "32x32"}))
    return uris[0], uris[1], uris[2]


@pytest.mark.slow
def test_every_evaluation_figure_reaches_prometheus(prom_stack, tiny_dataset, tmp_path, monkeypatch):
    """The pipeline's evaluate stage, configured only by FACEOPS_PUSHGATEWAY (as on the cluster):
    every figure of metrics.json, for HR and each VLR setting, is a faceops_eval_metric series."""
    from faceops.stages import evaluate_stage

    torch.set_num_threads(1)
    monkeypatch.setenv("FACEOPS_PUSHGATEWAY", prom_stack.pushgateway)
    monkeypatch.delenv("FACEOPS_RUN_ID", raising=False)
    rec, ft, dsr = _checkpoints(tmp_path)
    run_id = f"eval-{time.time_ns()}"
    result = evaluate_stage(rec, tiny_dataset, str(tmp_path / run_id), dsr_uris=[dsr], finetuned_uri=ft,
                            vlr_sizes=["32x32"])
    written = json.loads((tmp_path / run_id / "metrics.json").read_text())
    expected = {(setting, name): value for setting, name, value in eval_figures(written)}
    assert {s for s, _ in expected} == {"hr", "32x32/bicubic", "32x32/dsr", "32x32/dsr_finetuned"}
    for figure in ("accuracy", "eer", "auc", "threshold", "tar_at_far_1e-3", "rank1", "rank5"):
        assert ("32x32/dsr_finetuned", figure) in expected, figure
    for figure in ("psnr", "ssim", "identity_cosine"):
        assert ("32x32/dsr", figure) in expected and ("hr", figure) not in expected, figure
    assert result["verification"] == written["verification"]

    promql = f'faceops_eval_metric{{run_id="{run_id}"}}'
    series = prom_stack.wait_for(promql, lambda r: len(r) == len(expected))
    got = {(s["metric"]["setting"], s["metric"]["name"]): float(s["value"][1]) for s in series}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    labels = series[0]["metric"]
    assert labels["stage"] == "evaluate" and labels["model"] == "edgeface_xxs" and labels["job"] == "faceops"
    finished = prom_stack.wait_for(f'faceops_run_finished{{run_id="{run_id}", stage="evaluate"}}',
                                   lambda r: scalar(r) == 1)
    assert scalar(finished) == 1
    assert not prom_stack.query(f'faceops_train_steps_total{{run_id="{run_id}"}}')  # not a training run


@pytest.mark.slow
def test_pushgateway_from_environment(prom_stack, monkeypatch):
    """FACEOPS_PUSHGATEWAY alone (the cluster's way) is enough; each push replaces the run's group."""
    monkeypatch.setenv("FACEOPS_PUSHGATEWAY", prom_stack.pushgateway)
    run_id = f"env-{time.time_ns()}"
    metrics = StageMetrics("evaluate", run_id, "edgeface_xxs")
    metrics.labels(metrics.eval_metric, name="accuracy", setting="hr").set(0.75)
    metrics.push()
    metrics.labels(metrics.eval_metric, name="accuracy", setting="hr").set(0.875)
    metrics.close()  # the final push
    promql = f'faceops_eval_metric{{run_id="{run_id}", stage="evaluate", name="accuracy"}}'
    assert scalar(prom_stack.wait_for(promql, lambda r: scalar(r) == 0.875)) == 0.875


@pytest.mark.slow
def test_finished_groups_are_deleted_after_the_retention(prom_stack):
    """A run that ends deletes the finished groups older than the retention; a run still going (or
    dead without finishing, which the stalled alert reports) and a fresh finished one are kept."""
    gateway, tag = prom_stack.pushgateway, time.time_ns()
    cfg = MetricsConfig(pushgateway=gateway, push_interval_s=0, finished_retention_s=3600)
    old = StageMetrics("train_dsr", f"old-{tag}", "dsr", cfg)
    assert old.finish(success=True)
    running = StageMetrics("train_recognizer", f"running-{tag}", "edgeface_xxs", cfg)
    assert running.pusher.flush(10)
    time.sleep(1.5)  # the old run's group is now older than the next run's retention

    def present() -> set[str]:
        return {g["run_id"] for g in _groups(gateway) if g.get("run_id", "").endswith(f"-{tag}")}

    assert {f"old-{tag}", f"running-{tag}"} <= present()
    new = StageMetrics("finetune_edgeface", f"new-{tag}", "edgeface_xxs",
                       MetricsConfig(pushgateway=gateway, push_interval_s=0, finished_retention_s=1.0))
    assert new.finish(success=False)
    assert present() == {f"running-{tag}", f"new-{tag}"}
    running.finish(success=True)


def _groups(gateway: str) -> list[dict[str, str]]:
    return [g["labels"] for g in json.loads(http_get(f"http://{gateway}/api/v1/metrics"))["data"]]


# -- Triton's own metrics --------------------------------------------------------------------------
@pytest.mark.slow
def test_prometheus_scrapes_local_triton(prom_stack, tmp_path):
    pytest.importorskip("pytriton", reason="the local Triton needs nvidia-pytriton: pip install 'faceops[serve]'")
    from faceops.export import export_modules
    from faceops.export.triton_repo import parse_config
    from faceops.models import RecognizerConfig, create_recognizer
    from faceops.serve import FaceClient, LocalTriton

    torch.set_num_threads(1)
    torch.manual_seed(0)
    recognizer = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()
    export_modules(recognizer, str(tmp_path / "repo"))
    batches = [2, 3, 1]
    with LocalTriton(str(tmp_path / "repo"), metrics_port=prom_stack.triton_metrics_port) as triton:
        client = FaceClient(triton.grpc_url, timeout=30.0)
        # the model's warm-up (model_warmup in its config) runs inferences at load: Triton counts them
        warmups = parse_config((tmp_path / "repo" / "recognizer" / "config.pbtxt").read_text()).model_warmup
        warmup = sum(w.batch_size * max(1, w.count) for w in warmups)
        rng = np.random.default_rng(0)
        for n in batches:
            x = rng.uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)
            assert client.infer("recognizer", x).shape == (n, 512)
        count = prom_stack.wait_for('sum(nv_inference_count{job="triton", model="recognizer"})',
                                    lambda r: scalar(r) == warmup + sum(batches))
        assert scalar(count) > 0
        ok = prom_stack.query('sum(nv_inference_request_success{job="triton", model="recognizer"})')
        assert scalar(ok) == len(batches) + len(warmups)  # a warm-up sample is one successful request


# -- the local-run path: /metrics on a port while training ---------------------------------------
def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_metrics_port_serves_during_training_and_is_freed(tiny_dataset, tmp_path):
    torch.set_num_threads(1)
    port = free_port()
    cfg = tiny_cfg(tiny_dataset, tmp_path / "local-run", "engine.epochs=2", f"engine.metrics.port={port}",
                   "engine.nan_guard.inject_steps=[1]")
    pages: list[str] = []

    class ScrapeBetweenEpochs(Hook):
        def on_epoch_start(self, engine) -> None:
            if engine.epoch == 1:  # after one full epoch: loss, steps and the NaN event are set
                pages.append(http_get(f"http://127.0.0.1:{port}/metrics"))

    train = load_split(tiny_dataset, "train", views=["hr"])
    task = RecognizerTask(cfg, train, None, torch.device("cpu"))
    fit_task(task, train, cfg.loader, cfg.engine, cfg.out, {}, "", resume=False, hooks=[ScrapeBetweenEpochs()])
    assert len(pages) == 1
    samples = {(s.name, s.labels.get("kind")): s for f in text_string_to_metric_families(pages[0])
               for s in f.samples}
    loss = samples[("faceops_train_loss", None)]
    assert loss.labels == {"stage": "train_recognizer", "run_id": "local-run", "model": "edgeface_xxs"}
    assert math.isfinite(loss.value) and loss.value > 0
    assert samples[("faceops_nan_events_total", "loss")].value == 1.0
    assert samples[("faceops_train_steps_total", None)].value >= 1
    assert not _port_open(port), f"port {port} still open after training ended"


def test_stage_metrics_port_binds_loopback_and_closes():
    port = free_port()
    metrics = StageMetrics("evaluate", "port-check", "edgeface_xxs", MetricsConfig(port=port))
    try:
        metrics.labels(metrics.eval_metric, name="eer", setting="hr").set(0.125)
        page = http_get(f"http://127.0.0.1:{port}/metrics")
        assert ('faceops_eval_metric{model="edgeface_xxs",name="eer",run_id="port-check",setting="hr",'
                'stage="evaluate"} 0.125') in page
        assert 'faceops_nan_events_total{kind="param",model="edgeface_xxs",run_id="port-check"' in page
        assert not _port_open(port, "127.0.0.2"), "bound beyond 127.0.0.1 (another loopback address answers)"
    finally:
        metrics.close()
    assert not _port_open(port)
    again = StageMetrics("evaluate", "port-reuse", "", MetricsConfig(port=port))  # the next run gets it
    try:
        assert 'run_id="port-reuse"' in http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        again.close()


# -- pushes never slow or stop training ------------------------------------------------------------
class _Recorder(http.server.BaseHTTPRequestHandler):
    """A Pushgateway stand-in that records PUT bodies; the first request waits for ``release``."""

    bodies: list[str]
    first: threading.Event
    release: threading.Event

    def do_PUT(self) -> None:  # noqa: N802 -- http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        first = not self.first.is_set()
        self.first.set()
        if first:
            self.release.wait(30)
        self.bodies.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _sample(body: str, name: str) -> float | None:
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name:
                return s.value
    return None


def test_push_returns_at_once_and_the_latest_state_wins():
    """While the gateway holds a push, 50 more pushes neither block nor pile up: the queue keeps one,
    and what is sent next is the state at send time (the newest loss), not the state when queued."""
    handler = type("Recorder", (_Recorder,), {"bodies": [], "first": threading.Event(),
                                              "release": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = MetricsConfig(pushgateway=f"127.0.0.1:{server.server_port}", push_interval_s=0)
        m = StageMetrics("train_recognizer", "latest-wins", "edgeface_xxs", cfg)
        assert handler.first.wait(10), "the start push never arrived"

        def burst() -> None:
            for k in range(1, 51):
                m.labels(m.loss).set(k)
                m.push()

        caller = threading.Thread(target=burst)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "push() blocked while the gateway held a request"
        assert m.pusher.dropped == 49
        handler.release.set()
        assert m.finish(success=True)
    finally:
        server.shutdown()
        server.server_close()
    first, *later = handler.bodies
    assert _sample(first, "faceops_train_loss") is None and _sample(first, "faceops_run_finished") == 0
    assert later and all(_sample(b, "faceops_train_loss") == 50 for b in later)
    assert _sample(later[-1], "faceops_run_finished") == 1


def _stalled_gateway() -> tuple[socket.socket, str]:
    """A loopback port that accepts TCP connections in the kernel but never answers (a hung gateway)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("gateway_kind", ["never answers", "refuses"])
def test_unreachable_pushgateway_costs_one_warning_not_the_run(tiny_dataset, tmp_path, caplog, gateway_kind):
    torch.set_num_threads(1)
    if gateway_kind == "never answers":
        sock, gateway = _stalled_gateway()
    else:
        sock, gateway = None, f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    caplog.set_level(logging.WARNING)
    try:
        cfg = tiny_cfg(tiny_dataset, tmp_path / "unreachable", "engine.epochs=2",
                       f"engine.metrics.pushgateway={gateway}")
        result = train_recognizer(cfg)
    finally:
        if sock is not None:
            sock.close()
    assert result.steps > 0 and (tmp_path / "unreachable" / "last.pt").is_file()
    naming = [r for r in caplog.records if gateway in r.getMessage()]
    assert len(naming) == 1, [r.getMessage() for r in naming]
    assert naming[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.name.startswith("faceops.metrics") and r not in naming]


@pytest.mark.slow
def test_ddp_nan_losses_of_every_rank_reach_prometheus(prom_stack, tiny_dataset, tmp_path):
    """Two DDP ranks, a non-finite loss on each at different steps: rank 0's pushed counter holds both."""
    run_id = f"ddp-{time.time_ns()}"
    out = tmp_path / run_id  # the run id is the output folder's name
    sets = ["model.name=edgeface_xxs", "loader.batch_size=8", "engine.progress=false", "engine.amp=off",
            "engine.epochs=6", "engine.max_steps=4", "engine.nan_guard.inject_steps=[1, 3]",
            f"engine.metrics.pushgateway={prom_stack.pushgateway}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "faceops", "train", "recognizer", "--data", tiny_dataset, "--out", str(out),
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # each injected step poisons one batch on every rank: 2 steps x 2 ranks
    nan = prom_stack.wait_for(f'faceops_nan_events_total{{run_id="{run_id}",kind="loss"}}',
                              lambda res: len(res) == 1 and scalar(res) == 4)
    assert scalar(nan) == 4


def test_every_step_of_a_pipeline_run_pushes_under_the_runs_id(monkeypatch):
    """Two runs never share a Pushgateway group: a step's output below <store>/runs/<id>/ labels it <id>."""
    from faceops.metrics import run_id_for

    monkeypatch.delenv("FACEOPS_RUN_ID", raising=False)
    assert run_id_for("s3://faceops-data/runs/0f1e-uuid/recognizer") == "0f1e-uuid"
    assert run_id_for("s3://faceops-data/runs/0f1e-uuid/dsr_14x16/") == "0f1e-uuid"
    assert run_id_for("/data/runs/r7/evaluation") == "r7"
    assert run_id_for("/tmp/e2e-1") == "e2e-1"  # outside a pipeline: the output's own name
    monkeypatch.setenv("FACEOPS_RUN_ID", "given")
    assert run_id_for("s3://faceops-data/runs/0f1e-uuid/recognizer") == "given"
