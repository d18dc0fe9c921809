"""The view of a local pipeline run: one line per step as it starts and as it ends (elapsed time and the
step's key figures), and one live progress line for the running step on a terminal.

kfp's local runner streams each task's whole executor output (its input JSON, our logs, tqdm bars) to
the parent's stdout, logs its own progress through the root logger and warns about settings that do
nothing locally. :class:`OutputCapture` routes all of it, at the file-descriptor level (tasks are
subprocesses, and loggers hold streams from before the run), into ``<out>/logs/kfp.log``;
:class:`RunView` follows task starts and ends in that stream, and reads a finished task's figures from
what it wrote under the pipeline root (``executor_output.json`` and its artifact files), the same
outputs the KFP UI shows on a cluster. A step inside a ``dsl.ParallelFor`` runs once per item (a VLR
size): each run is its own step, labelled with its item (``train-dsr[14x16]``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
START = re.compile(r"Executing task '([^']+)'")
END = re.compile(r"Task '([^']+)' finished with status (SUCCESS|FAILURE)")
CACHED = re.compile(r"Task '?([\w.-]+)'? cache hit")
EPOCH = re.compile(r"\[(\w+)\] epoch (\d+)/(\d+) step (\d+) \S+ ?(.*)")  # the engine's per-epoch line
FIGURE = re.compile(r"(\w+)=(-?[\d.]+(?:e-?\d+)?)")
PROGRESS_FIGURES = ("val_accuracy", "val_psnr", "val_identity_cosine")  # shown on the progress line
SETTINGS = {"hr": "HR", "bicubic": "bicubic", "bicubic_finetuned": "bicubic+FT", "dsr": "DSR",
            "dsr_finetuned": "DSR+FT"}  # metrics.json's VLR settings, in table order
NAME_WIDTH = 24  # step names: the longest is finetune-edgeface[32x32]
BAR_WIDTH = 20
REFRESH_S = 0.5  # terminal: how often the live line is redrawn
PLAIN_PROGRESS_S = 60.0  # no terminal (CI): a step's first progress line after a minute, then at doubling
#   intervals (1, 3, 7, 15 ... minutes in), so a long step stays a few lines
JOIN_TIMEOUT_S = 5.0  # a process that outlived the run and still holds the pipe is not waited for
MAX_ARTIFACT_BYTES = 2 << 20  # artifact files read for figures (the HTML report is not)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def plain(text: str) -> str:
    """A stream line as the log keeps it: no colour codes, and of a progress bar's carriage-return
    redraws only the last state."""
    segments = [seg for seg in strip_ansi(text).split("\r") if seg.strip()]
    return segments[-1] if segments else ""


def clock(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# -- a finished task's key figures ------------------------------------------------------------------

def task_outputs(task_dir: Path) -> dict[str, tuple[dict, Any]]:
    """``{output name: (metadata, the artifact file's JSON or None)}`` of a task kfp ran locally."""
    try:
        executor_output = json.loads((task_dir / "executor_output.json").read_text())
    except (OSError, ValueError):
        return {}
    outputs = {}
    for name, entry in executor_output.get("artifacts", {}).items():
        artifact = (entry.get("artifacts") or [{}])[0]
        content = None
        path = Path(artifact.get("uri") or task_dir / name)
        if path.is_file() and path.stat().st_size <= MAX_ARTIFACT_BYTES:
            try:
                content = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):  # an HTML report, a plain-text file
                content = None
        outputs[name] = (artifact.get("metadata") or {}, content)
    return outputs


def _count(n: object, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{'?' if n is None else n} {noun}s"


def _ingest(summary: dict) -> str:
    return (f"{summary['accepted']} images ingested, {summary.get('rejected', 0)} rejected"
            + (f", {summary['identities_found']} people" if "identities_found" in summary else ""))


def _training(result: dict) -> str:
    history = [h for h in result.get("history") or [] if isinstance(h, dict)]
    parts = []
    for key, label in (("val_accuracy", "best val accuracy {:.3f}"), ("val_psnr", "best val PSNR {:.2f} dB"),
                       ("val_identity_cosine", "id-cos {:.3f}")):
        values = [h[key] for h in history if isinstance(h.get(key), float) and math.isfinite(h[key])]
        if values:
            parts.append(label.format(max(values)))
    bicubic = history[-1].get("val_bicubic_psnr") if history else None
    if isinstance(bicubic, float):
        parts.append(f"bicubic {bicubic:.2f} dB")
    if result.get("vlr_size"):
        parts.append(str(result["vlr_size"]))
    parts.append(_count(result.get("steps"), "step"))
    nan = sum((result.get("nan_events") or {}).values())
    if nan:
        parts.append(f"{nan} NaN events")
    return ", ".join(parts)


def _evaluation(metrics: dict) -> str:
    sizes: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        m = re.fullmatch(r"vlr\.([^.]+)\.([^.]+)\.verification\.accuracy", key)
        if m:
            sizes.setdefault(m[1], {})[m[2]] = value
    if not sizes:
        rank1 = metrics.get("identification.rank1")
        return f"accuracy {metrics['verification.accuracy']:.3f}" + (
            f", rank-1 {rank1:.3f}" if rank1 is not None else "")
    parts = []
    for size, acc in sizes.items():
        shown = ", ".join(f"{label} {acc[s]:.3f}" for s, label in SETTINGS.items() if s in acc)
        psnr = metrics.get(f"vlr.{size}.dsr.super_resolution.psnr")
        parts.append(f"{size} accuracy {shown}" + (f", DSR PSNR {psnr:.2f} dB" if psnr is not None else ""))
    return "; ".join(parts)


def _export(result: dict, metadata: dict) -> str:
    """An export stages (``staged``), a promotion serves (its result names the run)."""
    verb = "served" if "run_id" in result else "staged"
    models = result.get("models") if isinstance(result, dict) else None
    if isinstance(models, dict):
        return f"{verb} " + ", ".join(f"{name} v{info['version']}" if isinstance(info, dict) and "version" in info
                                     else name for name, info in sorted(models.items()))
    return f"{verb} " + ", ".join(metadata.get("models") or [])


def _deploy(metrics: dict) -> str:
    return (f"{int(metrics['models_ready'])} models ready on Triton, max |served - ONNX| "
            f"{metrics.get('max_abs_diff', float('nan')):.1e}")


def step_figures(task_dir: Path) -> str:
    """The few figures that say what a finished step found (empty when it left none)."""
    parts, rocs = [], []
    for metadata, content in task_outputs(task_dir).values():
        if isinstance(content, dict) and isinstance(content.get("summary"), dict) \
                and "accepted" in content["summary"]:
            parts.append(_ingest(content["summary"]))
        elif isinstance(content, dict) and "history" in content:
            parts.append(_training(content))
        elif (isinstance(content, dict) and "repo" in content) or ("models" in metadata and "uri" in metadata):
            parts.append(_export(content or {}, metadata))
        elif "verification.accuracy" in metadata or any(k.startswith("vlr.") for k in metadata):
            parts.append(_evaluation(metadata))
        elif "promoted" in metadata and "summary" in metadata:  # the promotion gate's decision
            parts.append(str(metadata["summary"]))
        elif "models_ready" in metadata:
            parts.append(_deploy(metadata))
        elif "confidenceMetrics" in metadata:  # a ClassificationMetrics artifact: one ROC curve
            rocs.append(str(metadata.get("setting", "?")))
    if rocs:
        parts.append("ROC curves " + ", ".join(rocs))
    return "; ".join(p for p in parts if p)


# -- the view ----------------------------------------------------------------------------------------

@dataclass
class _Step:
    name: str  # as shown: the KFP task name, with the loop item of a ParallelFor iteration
    started: float
    task: str = ""  # the KFP task name
    iteration: int | None = None  # the ParallelFor iteration it runs in
    epoch: int = 0
    epochs: int = 0
    figures: str = ""
    shown: float = 0.0  # when its last progress line was printed (plain output)
    interval: float = PLAIN_PROGRESS_S  # until the next one


class RunView:
    """Turns the runner's output stream into step lines on ``console``.

    ``live``: redraw one progress line for the running step (a terminal); otherwise print plain
    progress lines at growing intervals (``PLAIN_PROGRESS_S``). ``echo``: also show every line of the stream
    (``faceops run -v``). ``loops``: task name -> the items of the ParallelFor it runs in, in iteration
    order (iterations run one after another: the n-th start of such a task is its n-th item).
    """

    def __init__(self, console: TextIO, pipeline_root: Path, *, live: bool, echo: bool = False,
                 now: Callable[[], float] = time.monotonic, loops: dict[str, list[str]] | None = None):
        self.console, self.pipeline_root, self.live, self.echo, self.now = console, pipeline_root, live, echo, now
        self.loops = loops or {}
        self._starts: dict[str, int] = {}
        self.running: list[_Step] = []
        self.failed: list[str] = []
        self._lock = threading.RLock()
        self._spin = 0
        self._drawn = False

    # stream events
    def feed(self, line: str) -> None:
        """One line of the captured stream (colour codes included, as kfp wrote it)."""
        with self._lock:
            if self.echo:
                self._print(line)
            text = strip_ansi(line)
            if m := START.search(text):
                self._start(m[1])
            elif m := END.search(text):
                self._end(m[1], ok=m[2] == "SUCCESS")
            elif m := CACHED.search(text):
                self._print(self._line(m[1], "cached"))
            elif m := EPOCH.search(text):
                self._epoch(m)

    def _start(self, task: str) -> None:
        label, iteration = task, None
        if task in self.loops:
            iteration = self._starts[task] = self._starts.get(task, -1) + 1
            items = self.loops[task]
            label = f"{task}[{items[iteration]}]" if iteration < len(items) else task
        self.running.append(_Step(label, self.now(), task, iteration, shown=self.now()))
        self._print(self._line(label, "started"))

    def _end(self, task: str, ok: bool) -> None:
        step = next((s for s in self.running if s.task == task), None)
        if step:
            self.running.remove(step)
        name = step.name if step else task
        elapsed = clock(self.now() - step.started) if step else "?"
        if ok:
            figures = step_figures(self._task_dir(task, step.iteration if step else None))
            self._print(self._line(name, "done", elapsed, figures))
        else:
            self.failed.append(name)
            self._print(self._line(name, "FAILED", elapsed))

    def _epoch(self, m: re.Match) -> None:
        if not self.running:
            return
        stage = m[1].replace("_", "-")
        step = next((s for s in reversed(self.running) if s.task == stage), self.running[-1])
        step.epoch, step.epochs = int(m[2]), int(m[3])
        figures = dict(FIGURE.findall(m[5]))
        step.figures = " ".join(f"{k} {float(figures[k]):.3f}" for k in PROGRESS_FIGURES if k in figures)

    def _task_dir(self, name: str, iteration: int | None = None) -> Path:
        """The newest ``<pipeline_root>/<pipeline run>/<task>`` (one --out may hold several runs); in a
        ParallelFor, ``<pipeline run>/<loop>-iteration-<n>/<task>``."""
        where = f"*/{name}" if iteration is None else f"*/*-iteration-{iteration}/{name}"
        found = [p.parent for p in self.pipeline_root.glob(f"{where}/executor_output.json")]
        return max(found, key=lambda p: p.stat().st_mtime) if found else self.pipeline_root / name

    # progress
    def tick(self) -> None:
        """Redraw the live line, or print due plain progress lines."""
        with self._lock:
            if self.live:
                self._draw()
                return
            for step in self.running:
                if self.now() - step.shown >= step.interval:
                    step.shown, step.interval = self.now(), 2 * step.interval
                    self._print(self._progress(step, bar=False))

    def _progress(self, step: _Step, bar: bool) -> str:
        detail = ""
        if step.epochs:
            filled = round(BAR_WIDTH * step.epoch / step.epochs)
            meter = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] " if bar else ""
            detail = f"{meter}epoch {step.epoch}/{step.epochs} {step.figures}"
        elif bar:
            detail = "|/-\\"[self._spin % 4]
        return self._line(step.name, "running", clock(self.now() - step.started), detail)

    @staticmethod
    def _line(name: str, status: str, elapsed: str = "", detail: str = "") -> str:
        return f"  {name:<{NAME_WIDTH}} {status:<7} {elapsed:>7}  {detail}".rstrip()

    def _draw(self) -> None:
        self._clear()
        if not self.running:
            return
        self._spin += 1
        width = shutil.get_terminal_size((100, 24)).columns - 1
        self.console.write(self._progress(self.running[-1], bar=True)[:width])
        self.console.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.console.write("\r\x1b[K")
            self._drawn = False

    def _print(self, text: str) -> None:
        self._clear()
        self.console.write(text + "\n")
        self.console.flush()
        if self.live:
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self.console.flush()


# -- capture -----------------------------------------------------------------------------------------

class OutputCapture:
    """File descriptors 1 and 2, and ``sys.stdout``/``sys.stderr``, into a pipe while it is active.

    A thread reads the pipe, appends every line to ``log_path`` (see :func:`plain`) and hands it to
    ``on_line`` as it came. ``console`` is where the view writes: the terminal or pipe that fd 1 was (kept
    through the redirect), or ``sys.stdout`` itself when that is not fd 1 (a test's capture).
    """

    def __init__(self, log_path: Path, on_line: Callable[[str], None] | None = None):
        self.log_path, self.on_line = log_path, on_line
        sys.stdout.flush()
        try:
            is_fd1 = sys.stdout.fileno() == 1
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no file descriptor
            is_fd1 = False
        self._own_console = is_fd1
        self.console: TextIO = (os.fdopen(os.dup(1), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                                          errors="replace") if is_fd1 else sys.stdout)
        self.tty = bool(getattr(self.console, "isatty", lambda: False)())
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputCapture:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = (os.dup(1), os.dup(2))
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._sys = (sys.stdout, sys.stderr)
        # line-buffered on the pipe: kfp prints each task line as it comes, and the view follows them live
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
        self._thread = threading.Thread(target=self._read, args=(read_end,), name="faceops-run-output", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr, *self._sys):
            stream.flush()
        sys.stdout, sys.stderr = self._sys
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if self._thread:  # EOF once fds 1 and 2 no longer point at the pipe
            self._thread.join(JOIN_TIMEOUT_S)

    def close(self) -> None:
        """Close the console copy of fd 1 (after the last line of the run is printed)."""
        self.console.flush()
        if self._own_console:
            self.console.close()

    def _read(self, fd: int) -> None:
        pending = b""
        with open(self.log_path, "a", encoding="utf-8") as log:
            while chunk := os.read(fd, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8", errors="replace"), log)
            if pending:
                self._line(pending.decode("utf-8", errors="replace"), log)
        os.close(fd)

    def _line(self, text: str, log: TextIO) -> None:
        log.write(plain(text) + "\n")
        log.flush()
        if self.on_line is None:
            return
        try:
            self.on_line(text)
        except Exception:  # a view bug must not stop the reader: the run's writers would block on the pipe
            log.write("faceops: the run view failed on the line above:\n" + traceback.format_exc())
            self.on_line = None


class Ticker:
    """Calls ``fn`` every ``interval`` seconds in a daemon thread until stopped."""

    def __init__(self, fn: Callable[[], None], interval: float):
        self.fn, self.interval = fn, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faceops-run-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.fn()

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def watch_run(log_path: Path, pipeline_root: Path, *, verbose: bool = False,
              loops: dict[str, list[str]] | None = None) -> Iterator[RunView]:
    """While a local run is inside: its output goes to ``log_path`` and the console shows the steps
    (and, with ``verbose``, the whole output as well); ``loops``: see :class:`RunView`."""
    capture = OutputCapture(log_path)
    view = RunView(capture.console, pipeline_root, live=capture.tty and not verbose, echo=verbose, loops=loops)
    capture.on_line = view.feed
    try:
        with capture, Ticker(view.tick, REFRESH_S if view.live else 1.0):
            yield view
    finally:
        view.close()
        capture.close()
