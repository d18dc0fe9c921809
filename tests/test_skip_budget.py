"""The skip budget fails a run that skipped for a missing install, and lets GPU/real-data skips pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, body: str, data: Path | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text("import pytest\n" + body)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FACEOPS_DATA": str(data or tmp_path / "absent")}
    env.pop("FACEOPS_SKIP_BUDGET", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "skip_budget", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_case.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def test_a_missing_package_skip_fails_the_run(tmp_path):
    r = _pytest(tmp_path, "def test_ok(): pass\n"
                          "def test_s3(): pytest.importorskip('no_such_package_moto', reason='needs moto')\n")
    assert r.returncode == 1, r.stdout
    assert "skip budget exceeded" in r.stdout and "test_s3" in r.stdout and "needs moto" in r.stdout


def test_gpu_and_absent_real_data_skips_pass(tmp_path):
    r = _pytest(tmp_path, "def test_gpu(): pytest.skip('needs a CUDA device')\n"
                          "def test_data(): pytest.skip('needs real data: not found')\n"
                          "@pytest.mark.xfail(reason='known')\ndef test_x(): assert False\n")
    assert r.returncode == 0, r.stdout


def test_real_data_skip_fails_when_the_data_folder_exists(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    r = _pytest(tmp_path, "def test_data(): pytest.skip('needs real data: LFW not found')\n", data=data)
    assert r.returncode == 1, r.stdout
