"""Alert rules (charts/faceops/files/alerts.yaml): promtool checks them and runs their unit tests
(files/alerts_test.yaml: each alert fires when it should, and the training alerts stay quiet for a
finished run and for an old run whose series come back). Each unit test is shown to matter: a rule
weakened in the way a mistake would weaken it fails them. Every alert links an existing runbook
page (docs/runbooks/<alert>.md). The rules and the dashboard only use metrics faceops exports.

promtool comes with Debian's `prometheus` package (CI installs it); without it those tests skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from faceops.metrics import NAN_EVENTS, StageMetrics

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "charts" / "faceops" / "files"
DASHBOARD = FILES.parent / "dashboards" / "faceops.json"
RUNBOOKS = REPO / "docs" / "runbooks"
RUNBOOK_URL = "https://github.com/faceops/faceops/blob/main/docs/runbooks/"
ALERTS = {"FaceopsTrainingNaN", "FaceopsEmbeddingCollapse", "FaceopsTrainingStalled", "TritonDown",
          "TritonFailureRatioHigh", "TritonQueueLatencyHigh"}
TRAINING_ALERTS = ("FaceopsTrainingNaN", "FaceopsEmbeddingCollapse", "FaceopsTrainingStalled")
NOT_FINISHED = "unless on (run_id, stage) (faceops_run_finished == 1)"


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool not found: apt-get install -y --no-install-recommends prometheus")
    return binary


def run_promtool(promtool: str, *args: str, cwd: Path = FILES) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules() -> list[dict]:
    groups = yaml.safe_load((FILES / "alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules(promtool):
    result = run_promtool(promtool, "check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass(promtool):
    result = run_promtool(promtool, "test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("alert", "old", "new"), [
    # each weakened rule misses (or wrongly raises) an event the unit tests inject
    ("FaceopsTrainingNaN", "[5m])) > 0", "[5m])) > 5"),  # an increase of 2 NaNs
    ("FaceopsTrainingNaN", "offset 5m) > 0", "offset 5m) > 1"),  # a first push holding 1 NaN
    ("FaceopsTrainingNaN", "_seconds < 600)", "_seconds < 60000)"),  # an old crashed run coming back
    ("FaceopsTrainingNaN", NOT_FINISHED, ""),  # a run that ended right after a NaN
    ("FaceopsEmbeddingCollapse", "mean_cosine) > 0.99", "mean_cosine) > 0.999"),  # 0.995 for 5 min
    ("FaceopsEmbeddingCollapse", NOT_FINISHED, ""),  # a collapsed run that ended
    ("FaceopsTrainingStalled", "[15m])) == 0", "[15m])) < 0"),  # a run stopped at step 100
    ("FaceopsTrainingStalled", "[15m]", "[5m]"),  # fires too early (20 min of silence needed)
    ("FaceopsTrainingStalled", NOT_FINISHED, ""),  # a finished run does not step
    ("TritonDown", 'absent(up{job=~".*triton.*"})', 'absent(up{job=~".*"})'),  # no Triton target at all
    ("TritonDown", "== 0", "< 0"),  # a target down for 6 minutes
])
def test_unit_tests_catch_a_weakened_rule(promtool, tmp_path, alert, old, new):
    text = (FILES / "alerts.yaml").read_text()
    data = yaml.safe_load(text)
    (rule,) = [r for g in data["groups"] for r in g["rules"] if r["alert"] == alert]
    assert rule["expr"].count(old) == 1, (alert, old, rule["expr"])
    rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(data, sort_keys=False, width=200))
    assert run_promtool(promtool, "check", "rules", "alerts.yaml", cwd=tmp_path).returncode == 0
    shutil.copy(FILES / "alerts_test.yaml", tmp_path)
    result = run_promtool(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and f"alertname: {alert}," in result.stdout + result.stderr


def test_the_alerts_exist_with_severity_summary_and_runbook():
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(by_name) == ALERTS
    for rule in by_name.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["annotations"]["runbook_url"] == f"{RUNBOOK_URL}{rule['alert']}.md"
    for name in TRAINING_ALERTS:  # a run that ended never keeps or raises a training alert
        assert NOT_FINISHED in by_name[name]["expr"], name
    assert "(increase(faceops_nan_events_total[5m])) > 0" in by_name["FaceopsTrainingNaN"]["expr"]
    assert "increase(faceops_train_steps_total[15m])" in by_name["FaceopsTrainingStalled"]["expr"]
    assert 'up{job=~".*triton.*"} == 0' in by_name["TritonDown"]["expr"]
    assert "nv_inference_request_failure" in by_name["TritonFailureRatioHigh"]["expr"]
    assert "nv_inference_request_success" in by_name["TritonFailureRatioHigh"]["expr"]
    assert "nv_inference_queue_duration_us" in by_name["TritonQueueLatencyHigh"]["expr"]
    assert "nv_inference_count" in by_name["TritonQueueLatencyHigh"]["expr"]


def exported_metric_names() -> set[str]:
    """Metric names faceops registers (counters with their _total suffix)."""
    metrics = StageMetrics(stage="train_recognizer", run_id="contract")
    try:
        families = list(metrics.registry.collect())
    finally:
        metrics.close()
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def test_rules_and_dashboard_use_only_metrics_faceops_exports():
    exported = exported_metric_names()
    assert NAN_EVENTS in exported
    used_by_rules = {name for rule in rules() for name in re.findall(r"\bfaceops_\w+", rule["expr"])}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    used_by_dashboard = {name for expr in exprs for name in re.findall(r"\bfaceops_\w+", expr)}
    assert used_by_rules and used_by_dashboard
    assert used_by_rules <= exported, used_by_rules - exported
    assert used_by_dashboard <= exported, used_by_dashboard - exported


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_each_runbook_page_says_what_it_means_how_to_check_and_what_to_do(alert):
    page = RUNBOOKS / f"{alert}.md"
    assert page.is_file(), f"{alert}'s runbook_url points to {page}, which does not exist"
    text = page.read_text()
    assert text.startswith(f"# {alert}\n")
    for heading in ("## What it means", "## How to check", "## What to do"):
        assert heading in text, (alert, heading)
    assert alert in (RUNBOOKS / "README.md").read_text()
