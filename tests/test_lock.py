"""The lock (constraints.txt) is the environment: venv, CI, images and compiled pipelines agree on it."""

from __future__ import annotations

import re
import runpy
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
lock = runpy.run_path(str(REPO / "scripts" / "check_lock.py"))
PINS = lock["read_lock"]()


def test_installed_versions_equal_the_lock():
    assert lock["lock_differences"](PINS, lock["installed"]()) == []


def test_every_requirement_of_faceops_all_is_locked_and_in_range():
    assert lock["unmet_requirements"](lock["installed"]()) == []


def test_a_dependency_missing_from_the_lock_is_an_install_failure():
    """What venv.sh sees when a test dependency (moto) is dropped from the lock: an error, not a skip."""
    have = {n: v for n, v in lock["installed"]().items() if n != "moto"}
    problems = lock["unmet_requirements"](have)
    assert any(p.startswith("moto[server]") and "faceops[dev]" in p for p in problems), problems
    pins = {n: v for n, v in PINS.items() if n != "moto"}
    assert any("moto==" in p and "not in the lock" in p for p in lock["lock_differences"](pins, lock["installed"]()))


def test_lock_pins_every_line_exactly(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("kfp>=2.7\n")
    with pytest.raises(SystemExit, match="not an exact pin"):
        lock["read_lock"](bad)


def test_lock_holds_the_machines_torch():
    assert PINS["torch"] == "2.14.1" and PINS["torchvision"] == "0.29.1"


@pytest.mark.parametrize("name", ["vlr_face", "arcface_resnet34"])
def test_compiled_pipelines_come_from_the_locked_kfp_and_install_nothing_at_pod_start(name):
    """The images carry the lock's kfp; a step that ran `pip install kfp==...` would fail on an
    egress-restricted cluster and could get another kfp than the one that compiled it."""
    text = (REPO / "pipelines" / f"{name}.yaml").read_text()
    sdk = yaml.safe_load(text.split("\n---\n")[0])["sdkVersion"]
    assert sdk == f"kfp-{PINS['kfp']}", f"pipelines/{name}.yaml: compiled by {sdk}, locked kfp {PINS['kfp']}"
    assert "pip install" not in text and "pip3 install" not in text


@pytest.mark.parametrize("dockerfile", sorted((REPO / "images").glob("*/Dockerfile")), ids=lambda p: p.parent.name)
def test_images_install_from_the_lock(dockerfile):
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    installs = [line for line in text.splitlines() if re.search(r"\bpip install\b", line)]
    for line in installs:
        # the one exception: torch/torchvision from the PyTorch CPU index, without dependencies
        assert "-c constraints.txt" in line or ("--no-deps" in line and "torch==" + PINS["torch"] in line), line
    if installs:
        assert re.search(r"^COPY .*constraints\.txt", text, re.M), f"{dockerfile} does not copy the lock"
        assert "!constraints.txt" in (REPO / ".dockerignore").read_text()


def test_venv_script_installs_exactly_the_lock_and_fails_loudly():
    text = (REPO / "scripts" / "venv.sh").read_text()
    assert "set -euo pipefail" in text
    assert "--no-deps -r constraints.txt" in text and "pip[@]}\" check" in text and "check_lock.py" in text
    assert "|| true" not in text.split("stamp=")[1].split("echo \"$want\"")[0].replace(
        'cat "$stamp" 2>/dev/null || true', ""), "an install step swallows its exit code"


@pytest.mark.parametrize("case", ["full disk", "unreadable free space"])
def test_venv_script_refuses_a_full_disk_before_touching_the_venv(tmp_path, case):
    """CI once died half-way through pip with "[Errno 28] No space left on device": the script must
    say where space is short and how much it needs, and leave no torn .venv behind; a free space it
    cannot read (here: no Python to ask) stops it too instead of skipping the check."""
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/venv.sh", "pyproject.toml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / "constraints.txt").write_text("no-such-package-faceops==0\n")  # a broken check fails fast
    env = {"PATH": "/usr/bin:/bin", "FACEOPS_VENV_MIN_FREE_GB": "1000000", "TMPDIR": str(tmp_path / "missing")}
    if case == "unreadable free space":
        env |= {"PYTHON": "/bin/false", "FACEOPS_VENV_MIN_FREE_GB": "0"}
    run = subprocess.run(["bash", "scripts/venv.sh"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode == 1, run.stderr
    if case == "full disk":
        assert f"{tmp_path} has " in run.stderr and "needs about 1000000 GB" in run.stderr, run.stderr
        assert "FACEOPS_VENV_MIN_FREE_GB" in run.stderr
    else:
        assert "cannot read the free space of ." in run.stderr, run.stderr
    assert not (tmp_path / ".venv").exists()
