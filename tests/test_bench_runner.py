"""bench/_runner.save_result and bench/report: result files carry machine + versions; the report
renders one table per result file, and runs as a script from any folder."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import_from_checkout(name: str):
    """bench/ is not part of the installed package: import it from the repository root."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(name)


report = _import_from_checkout("bench.report")
save_result = _import_from_checkout("bench._runner").save_result


def test_save_result_records_figures_machine_and_versions(tmp_path: Path, capsys) -> None:
    path = save_result("toy_bench", {"img_per_s": 26.4, "batch": 32}, notes="2 threads", results_dir=tmp_path)
    assert path == tmp_path / "toy_bench.json"
    record = json.loads(path.read_text())
    assert record["figures"] == {"img_per_s": 26.4, "batch": 32} and record["notes"] == "2 threads"
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu"]
    assert record["machine"]["memory_gib"] > 0
    assert set(record["versions"]) == {"python", "torch", "faceops", "onnxruntime"}
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["versions"]["faceops"]  # installed editable in the dev venv
    assert record["date"].startswith("20") and record["date"].endswith("+00:00")
    assert "img_per_s" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["toy_bench.json"], "temp file left behind"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "x.json"])
def test_save_result_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="benchmark name"):
        save_result(name, {"a": 1}, results_dir=tmp_path)


def test_save_result_rejects_nan_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_result("nan_bench", {"loss": float("nan")}, results_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty dict"):
        save_result("empty_bench", {}, results_dir=tmp_path)


def test_report_one_table_per_result(tmp_path: Path) -> None:
    results = tmp_path / "results"
    save_result("b_second", {"latency_ms": {"p50": 10.123456, "p99": 31.0}}, results_dir=results)
    figures = {"throughput_img_per_s": 12345.678, "ok": True, "model": "r|34"}
    save_result("a_first", figures, results_dir=results)
    text = report.render(results)
    assert text.startswith("# Benchmarks")
    assert text.index("## a_first") < text.index("## b_second")
    assert text.count("| figure | value |") == 2
    assert "| latency_ms.p50 | 10.12 |" in text and "| latency_ms.p99 | 31 |" in text
    assert "| throughput_img_per_s | 12,345.7 |" in text and "| ok | True |" in text
    assert "| model | r\\|34 |" in text  # a pipe inside a value does not break the table


def test_report_without_results_and_with_a_broken_file(tmp_path: Path) -> None:
    assert "No results yet" in report.render(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        report.render(tmp_path)


@pytest.mark.parametrize("argv", [["-m", "bench.report"], [str(REPO / "bench" / "report.py")]])
def test_report_runs_as_module_and_script(tmp_path: Path, argv: list[str]) -> None:
    results = tmp_path / "results"
    save_result("cli_bench", {"x": 1.5}, results_dir=results)
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run(
        [sys.executable, *argv, "--results", str(results), "--out", str(out)],
        cwd=REPO if argv[0] == "-m" else tmp_path, check=True, capture_output=True, timeout=60,
    )
    assert "## cli_bench" in out.read_text() and "| x | 1.5 |" in out.read_text()
