"""Alert rules (charts/faceops/files/alerts.yaml): promtool checks them and runs their unit tests
(files/alerts_test.yaml: the NaN alert fires on a counter increase and stays quiet otherwise; the
collapse and Triton alerts likewise). The rules and the dashboard only use metrics faceops exports.

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

FILES = Path(__file__).resolve().parents[1] / "charts" / "faceops" / "files"
DASHBOARD = FILES.parent / "dashboards" / "faceops.json"
ALERTS = {"FaceopsTrainingNaN", "FaceopsEmbeddingCollapse", "TritonFailureRatioHigh",
          "TritonQueueLatencyHigh"}


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
    # each weakened rule misses an event the unit tests inject (an increase of 2 NaNs, a first push
    # holding 1 NaN, a mean cosine of 0.995)
    ("FaceopsTrainingNaN", "[5m])) > 0", "[5m])) > 5"),
    ("FaceopsTrainingNaN", "offset 5m) > 0", "offset 5m) > 1"),
    ("FaceopsEmbeddingCollapse", "mean_cosine) > 0.99", "mean_cosine) > 0.999"),
])
def test_unit_tests_catch_a_weakened_rule(promtool, tmp_path, alert, old, new):
    text = (FILES / "alerts.yaml").read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yaml").write_text(text.replace(old, new))
    shutil.copy(FILES / "alerts_test.yaml", tmp_path)
    result = run_promtool(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and alert in result.stdout + result.stderr


def test_the_four_alerts_exist_with_severity_and_summary():
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(by_name) == ALERTS
    for rule in by_name.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert "(increase(faceops_nan_events_total[5m])) > 0" in by_name["FaceopsTrainingNaN"]["expr"]
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
