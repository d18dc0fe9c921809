"""Skip budget: a test run fails when a test is skipped for a reason that hides a broken install.

Allowed: "needs a CUDA device" (and "runs only without a CUDA device") everywhere, "needs real data"
only while the real data folder ($FACEOPS_DATA or ../shared/data) is absent, and "needs chromium" only
when not running as root (as root, scripts/test.sh installs Debian's chromium). Anything else
(a missing package, binary or server) fails the run: a green CI that skipped its S3 or Triton tests
is not green. Loaded by tests/conftest.py; ``FACEOPS_SKIP_BUDGET=off`` turns it off for a local
partial run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GPU_REASONS = ("needs a CUDA device", "runs only without a CUDA device")
DATA_REASON = "needs real data"
CHROMIUM_REASON = "needs chromium"  # the report's browser test; scripts/test.sh installs it as root


def data_folder() -> Path:
    return Path(os.environ.get("FACEOPS_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data").expanduser()


def allowed(reason: str) -> bool:
    reason = reason.removeprefix("Skipped: ")
    if reason.startswith(GPU_REASONS):
        return True
    if reason.startswith(CHROMIUM_REASON):
        return not is_root()
    return reason.startswith(DATA_REASON) and not data_folder().is_dir()


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_over_budget: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or os.environ.get("FACEOPS_SKIP_BUDGET") == "off":
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not allowed(reason):
        _over_budget.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter) -> None:
    if _over_budget:
        terminalreporter.section("skip budget exceeded", red=True)
        for nodeid, reason in _over_budget:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line("only 'needs a CUDA device' (and, without the data folder, 'needs real data'; "
                              "not as root, 'needs chromium') may skip: install what is missing "
                              "(bash scripts/test.sh does) or fix the test")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _over_budget and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
