"""Saving one benchmark's figures together with the machine and versions that produced them.

A figure without its machine is not comparable, so every result file records the CPU, cores,
memory, GPU, library versions and the date beside the numbers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from .report import flatten, format_value

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
VERSIONED_PACKAGES = ("torch", "faceops", "onnxruntime")
RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def data_root() -> Path:
    """The real face data (``FACEOPS_DATA``, default ``../shared/data`` beside the repository)."""
    return Path(os.environ.get("FACEOPS_DATA") or REPO.parent / "shared" / "data")


def shown(path: Path) -> str:
    """A path as a result file records it: relative to the repository when inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def save_result(name: str, figures: dict[str, Any], notes: str = "", results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` (default ``bench/results``) and print the figures.

    ``figures`` maps a figure name (unit as a suffix, e.g. ``train_img_per_s``) to a number or
    string; nested dicts are allowed and shown flattened with dotted names in BENCHMARKS.md.
    """
    if not RESULT_NAME.match(name) or name.endswith(".json"):
        raise ValueError(f"benchmark name {name!r}: use letters, digits, '_', '-', '.' (no path, no .json)")
    if not isinstance(figures, dict) or not figures:
        raise ValueError(f"figures for {name!r} must be a non-empty dict, got {figures!r}")
    record = {
        "name": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "figures": figures,
        "notes": notes,
        "machine": machine_info(),
        "versions": versions(),
    }
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    rows = flatten(figures)
    width = max((len(k) for k, _ in rows), default=0)
    print(f"{name}:")
    for key, value in rows:
        print(f"  {key:<{width}}  {format_value(value)}")
    print(f"  -> {path}")
    return path


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu_name(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu_name() -> str | None:
    """The first CUDA device, or None (no torch, or no GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return f"{count} x {torch.cuda.get_device_name(0)}"
