"""The view of a local run (`faceops run`): one line per step as it starts and ends with its key figures,
the runner's whole output in <out>/logs/kfp.log (on the console too with -v), failures named with step,
cause and log, and a closing summary that points where things really are (s3:// URIs for a bucket,
with a local copy of the report)."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faceops.cli import get_args_parser
from faceops.console import PLAIN_PROGRESS_S, OutputCapture, RunView, step_figures
from faceops.run import LocalRun, _failure_message, copy_report

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_pipeline.yaml"
MAX_LINES = 60  # the whole run's console output (issue 13)
NOISE = ("executor_input", "KFP Executor", "Warning", "\x1b[", "Streamed logs", "Executing task",
         "finished with status")  # only in kfp.log
STEPS = {"arcface_resnet34": ["ingest", "run-root", "train-recognizer", "evaluate", "export", "promotion-gate",
                              "promote"]}


class Clock:
    """A settable monotonic clock: the view's elapsed times and progress cadence without sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Console:
    """A terminal stand-in: what the view wrote, and whether it claims to be a TTY."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return [ln.rsplit("\r\x1b[K", 1)[-1] for ln in self.text.splitlines() if ln.strip()]


def _task(root: Path, name: str, artifacts: dict[str, tuple[dict, object]]) -> None:
    """A task folder as kfp's local runner leaves it: executor_output.json + artifact files."""
    task = root / "pipeline-2026" / name
    task.mkdir(parents=True)
    out = {}
    for art, (metadata, content) in artifacts.items():
        path = task / art
        path.write_text(json.dumps(content) if content is not None else "<html></html>")
        out[art] = {"artifacts": [{"name": art, "uri": str(path), "metadata": metadata}]}
    (task / "executor_output.json").write_text(json.dumps({"artifacts": out}))


def _kfp_lines(name: str, status: str = "SUCCESS") -> list[str]:
    """What kfp.local prints around one task (colours included), with some executor output between."""
    return [f"15:47:20.731 - INFO - Executing task \x1b[96m'{name}'\x1b[0m",
            "15:47:20.731 - INFO - Streamed logs:", "",
            "    [KFP Executor 2026-12-01 15:47:20,781 INFO]: Got executor_input:", '    {"inputs": {}}',
            f"15:47:25.684 - INFO - Task \x1b[96m'{name}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m",
            "-" * 80]


def test_one_line_per_step_start_and_end_with_its_figures(tmp_path):
    _task(tmp_path, "ingest", {"dataset": ({"uri": "file:///s/datasets/x"},
                                           {"uri": "u", "summary": {"accepted": 58, "rejected": 2,
                                                                    "identities_found": 10}})})
    history = [{"epoch": e, "val_accuracy": a} for e, a in ((1, 0.61), (2, 0.84), (3, 0.8))]
    _task(tmp_path, "train-recognizer", {"model": ({"uri": "m"}, {"history": history, "steps": 30, "epochs": 3,
                                                                   "nan_events": {"loss": 0}}),
                                         "metrics": ({"val_accuracy": 0.8}, None)})
    evaluation = {"verification.accuracy": 0.9, "vlr.32x32.hr.verification.accuracy": 0.9,
                  "vlr.32x32.bicubic.verification.accuracy": 0.7, "vlr.32x32.dsr.verification.accuracy": 0.8,
                  "vlr.32x32.dsr.super_resolution.psnr": 24.5}
    _task(tmp_path, "evaluate-vlr", {"metrics": (evaluation, None), "report": ({"uri": "r"}, None)})
    _task(tmp_path, "export-vlr", {"repo": ({"uri": "/s/runs/r/staging", "models": ["dsr", "recognizer"]},
                                            {"repo": "/s/runs/r/staging", "models": {"recognizer": {"version": 1},
                                                                                     "dsr": {"version": 1}}})})
    _task(tmp_path, "promotion-gate", {"decision": ({"promoted": 1.0, "summary": "promoted: verification.accuracy "
                                                     "0.9000 >= 0.6: ok"}, None)})
    _task(tmp_path, "promote", {"repo": ({"uri": "/s/triton", "models": ["dsr", "recognizer"]},
                                         {"repo": "/s/triton", "run_id": "r",
                                          "models": {"recognizer": {"version": 2}, "dsr": {"version": 1}}})})
    clock, console = Clock(), Console()
    view = RunView(console, tmp_path, live=False, now=clock)
    for name in ("ingest", "train-recognizer", "evaluate-vlr", "export-vlr", "promotion-gate", "promote"):
        for line in _kfp_lines(name):
            view.feed(line)
            clock.t += 2.0
    lines = console.lines()
    assert len(lines) == 12, lines
    assert lines[0].split() == ["ingest", "started"]
    assert lines[1].split()[:3] == ["ingest", "done", "0:10"]
    assert "58 images ingested, 2 rejected, 10 people" in lines[1]
    assert "best val accuracy 0.840" in lines[3] and "30 steps" in lines[3]
    assert "32x32 accuracy HR 0.900, bicubic 0.700, DSR 0.800, DSR PSNR 24.50 dB" in lines[5]
    assert "staged dsr v1, recognizer v1" in lines[7]  # export writes the run's staging repository
    assert "promoted: verification.accuracy 0.9000 >= 0.6: ok" in lines[9]
    assert "served dsr v1, recognizer v2" in lines[11]  # what the served repository holds now
    assert not any(noise in console.text for noise in NOISE)


def test_each_iteration_of_a_parallel_for_is_its_own_step_labelled_with_its_size(tmp_path):
    """vlr_face trains every VLR size in a ParallelFor: kfp names each iteration's task alike; the view
    labels the n-th run with the n-th size and reads its figures from that iteration's folder."""
    for i, size in enumerate(("32x32", "14x16")):
        history = [{"val_psnr": 20.0 + i, "val_identity_cosine": 0.5}]
        _task(tmp_path, f"for-loop-2-iteration-{i}/train-dsr",
              {"model": ({"uri": "d", "vlr_size": size}, {"history": history, "steps": 4, "vlr_size": size,
                                                         "nan_events": {}})})
    clock, console = Clock(), Console()
    view = RunView(console, tmp_path, live=False, now=clock, loops={"train-dsr": ["32x32", "14x16"]})
    for _ in range(2):
        for line in _kfp_lines("train-dsr"):
            view.feed(line)
            clock.t += 1.0
    lines = [ln.split(None, 2) for ln in console.lines()]
    assert [ln[:2] for ln in lines] == [["train-dsr[32x32]", "started"], ["train-dsr[32x32]", "done"],
                                        ["train-dsr[14x16]", "started"], ["train-dsr[14x16]", "done"]]
    assert "best val PSNR 20.00 dB" in lines[1][2] and "32x32" in lines[1][2]
    assert "best val PSNR 21.00 dB" in lines[3][2] and "14x16" in lines[3][2]


def test_loop_items_come_from_the_run_arguments_or_the_default():
    from faceops.pipelines.vlr_face import build

    from faceops.run import loop_items

    pipeline = build()
    default = loop_items(pipeline, {})
    assert default == dict.fromkeys(("train-dsr", "finetune-edgeface", "finetune-bicubic", "vlr-roc"),
                                    ["32x32", "14x16"])
    assert loop_items(pipeline, {"vlr_sizes": ["24x24"]})["vlr-roc"] == ["24x24"]


def test_a_failed_step_and_a_cached_one(tmp_path):
    console = Console()
    view = RunView(console, tmp_path, live=False, now=Clock())
    view.feed("16:00:00.000 - INFO - Task ingest cache hit (key=0123456789ab); skipping execution.")
    for line in _kfp_lines("train-dsr", "FAILURE"):
        view.feed(line)
    assert [ln.split()[:2] for ln in console.lines()] == [["ingest", "cached"], ["train-dsr", "started"],
                                                          ["train-dsr", "FAILED"]]
    assert view.failed == ["train-dsr"]


def test_training_progress_live_on_a_terminal_and_plain_at_growing_intervals(tmp_path):
    epoch = ("\r  train epoch 3/20:  50%|###  | 2/4 [00:01<00:01]\r[train_recognizer] epoch 5/20 step 40 1.2s "
             "mean_cosine=0.1000 val_accuracy=0.7512 val_eer=0.2000 nan_events=0 rollbacks=0")
    clock, tty = Clock(), Console()
    live = RunView(tty, tmp_path, live=True, now=clock)
    live.feed(_kfp_lines("train-recognizer")[0])
    live.feed(epoch)
    clock.t += 65
    live.tick()
    last = tty.text.rsplit("\r\x1b[K", 1)[-1]
    assert "train-recognizer" in last and "1:05" in last and "epoch 5/20" in last and "val_accuracy 0.751" in last
    assert "[#####" in last  # 5 of 20 epochs: a quarter of the bar

    clock, plain = Clock(), Console()
    view = RunView(plain, tmp_path, live=False, now=clock)
    view.feed(_kfp_lines("train-recognizer")[0])
    view.feed(epoch)
    for _ in range(int(15 * PLAIN_PROGRESS_S) - 1):  # almost 15 minutes of one tick a second
        clock.t += 1
        view.tick()
    progress = [ln for ln in plain.lines() if "running" in ln]
    assert [ln.split()[2] for ln in progress] == ["1:00", "3:00", "7:00"]  # doubling intervals: a few lines
    assert "epoch 5/20 val_accuracy 0.751" in progress[0]
    assert "\r" not in plain.text and "\x1b" not in plain.text


def test_figures_of_dsr_training_and_the_deploy_check(tmp_path):
    history = [{"val_psnr": 22.0, "val_identity_cosine": 0.7, "val_bicubic_psnr": 21.0},
               {"val_psnr": 23.5, "val_identity_cosine": 0.8, "val_bicubic_psnr": 21.0}]
    _task(tmp_path, "train-dsr", {"model": ({"uri": "d", "vlr_size": "32x32"},
                                            {"history": history, "steps": 8, "epochs": 1, "vlr_size": "32x32",
                                             "nan_events": {"loss": 2, "grad": 1}})})
    _task(tmp_path, "deploy", {"metrics": ({"models_ready": 3.0, "max_abs_diff": 2e-7, "latency_ms": 5.0}, None)})
    dsr = step_figures(tmp_path / "pipeline-2026" / "train-dsr")
    assert dsr == "best val PSNR 23.50 dB, id-cos 0.800, bicubic 21.00 dB, 32x32, 8 steps, 3 NaN events"
    assert step_figures(tmp_path / "pipeline-2026" / "deploy") == \
        "3 models ready on Triton, max |served - ONNX| 2.0e-07"
    assert step_figures(tmp_path / "missing") == ""


def test_capture_takes_every_writer_into_the_log(tmp_path, capsys):
    """print, raw fd writes, a child process, sys.stderr (warnings) and logging all land in the log, not on
    the console."""
    log_path = tmp_path / "logs" / "kfp.log"
    seen: list[str] = []
    with OutputCapture(log_path, seen.append) as capture:
        print("from print")
        os.write(1, b"raw fd 1\n")
        os.write(2, b"raw fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        sys.stderr.write("UserWarning: a local-only setting\n")  # what warnings.showwarning does
        handler = logging.StreamHandler(sys.stderr)  # as kfp's logger: the stream of the moment
        logging.getLogger("faceops.test").addHandler(handler)
        logging.getLogger("faceops.test").warning("\x1b[96mcoloured\x1b[0m")
        logging.getLogger("faceops.test").removeHandler(handler)
        print("\rbar  10%|#\rbar 100%|##########\r")  # tqdm's redraws: the log keeps the last state
        capture.console.write("to the console\n")
    capture.close()
    text = log_path.read_bytes().decode()  # as written: read_text() would turn a \r into a newline
    for expected in ("from print", "raw fd 1", "raw fd 2", "child out", "child err", "a local-only setting",
                     "coloured"):
        assert expected in text and any(expected in s for s in seen), expected
    assert "\x1b" not in text and "\r" not in text and "bar 100%|##########\n" in text and "10%" not in text
    out, err = capsys.readouterr()
    assert out == "to the console\n" and "raw fd" not in err


def test_failure_without_a_step_log_names_the_exception_in_the_runner_log(tmp_path):
    """A step that dies before it logs (an import error) is still named with its cause and a log."""
    (tmp_path / "logs").mkdir()
    kfp_log = tmp_path / "logs" / "kfp.log"
    kfp_log.write_text("\n".join([
        "10:00:00.000 - INFO - Executing task 'train-dsr'", "ValueError: an earlier task's error",
        "10:00:01.000 - INFO - Executing task 'finetune-edgeface'", "    Traceback (most recent call last):",
        "      File \"x.py\", line 1, in <module>",
        "    ImportError: cannot import name 'finetune_args' from 'faceops.stages'",
        "10:00:02.000 - ERROR - Task 'finetune-edgeface' finished with status FAILURE"]))
    msg = _failure_message("Pipeline \x1b[95m'vlr-face'\x1b[0m finished with status FAILURE. Inner task failed: "
                           "\x1b[96m'finetune-edgeface'\x1b[0m.", tmp_path)
    assert msg == (f"step 'finetune-edgeface' failed: ImportError: cannot import name 'finetune_args' from "
                   f"'faceops.stages' (log: {kfp_log})")


def test_a_failed_iteration_is_named_with_its_size_log(tmp_path):
    """A step inside the ParallelFor writes one log per size; the failure points to the newest one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_dsr_32x32.log").write_text("10:00:00 INFO faceops: fine\n")
    failed = logs / "train_dsr_14x16.log"
    failed.write_text("10:01:00 ERROR faceops.stages: stage train_dsr_14x16 failed: no view vlr_14x16\n")
    os.utime(logs / "train_dsr_32x32.log", (1, 1))
    msg = _failure_message("Pipeline \x1b[95m'vlr-face'\x1b[0m finished with status FAILURE. Inner task failed: "
                           "\x1b[96m'train-dsr'\x1b[0m inside \x1b[96m'for-loop-1-iteration-1'\x1b[0m.", tmp_path)
    assert msg == f"step 'train-dsr' failed: stage train_dsr_14x16 failed: no view vlr_14x16 (log: {failed})"


def test_summary_of_a_bucket_run_prints_its_uris(tmp_path):
    run = LocalRun(tmp_path, "s3://bucket/runs/run", "s3://bucket/triton", tmp_path / "logs", 90.0,
                   report_copy=tmp_path / "report")
    text = run.summary()
    for uri in ("s3://bucket/runs/run/evaluation/report.html", "s3://bucket/runs/run/evaluation/metrics.json",
                "s3://bucket/triton", "s3://bucket/runs/run"):
        assert uri in text
    assert str(tmp_path / "report" / "report.html") in text and str(tmp_path / "store") not in text
    assert run.local_metrics() is None  # no copy was made here: nothing local to read
    assert LocalRun(tmp_path, "s3://b/runs/run", "s3://b/triton", tmp_path, 1.0).local_metrics() is None


def test_report_is_copied_from_the_bucket_with_its_images(s3_bucket, tmp_path):
    from faceops.storage import open_store

    store = open_store(f"{s3_bucket}/runs/run/evaluation")
    store.put_bytes("report.html", b'<img src="roc.png"><img src="grid_32x32.png">')
    store.put_bytes("roc.png", b"\x89PNG roc")
    store.put_bytes("grid_32x32.png", b"\x89PNG grid")
    store.put_bytes("metrics.json", b'{"verification": {}}')
    dest = copy_report(f"{s3_bucket}/runs/run/evaluation", tmp_path / "report")
    assert sorted(p.name for p in dest.iterdir()) == ["grid_32x32.png", "metrics.json", "report.html", "roc.png"]
    assert (dest / "roc.png").read_bytes() == b"\x89PNG roc"


@pytest.mark.parametrize("argv", [["run", "arcface_resnet34", "-v"], ["-v", "run", "arcface_resnet34"],
                                  ["run", "arcface_resnet34"]])
def test_verbose_before_or_after_run(argv):
    assert get_args_parser().parse_args(argv).verbose is ("-v" in argv)


def _faceops(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "faceops", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def check_clean_view(output: str, steps: list[str], out: Path) -> None:
    lines = output.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{output}"
    for step in steps:
        assert [ln.split()[1] for ln in lines if ln.split()[:1] == [step]] == ["started", "done"], (step, output)
    assert not any(noise in output for noise in NOISE), output
    assert "setting" in output and "accuracy" in output  # the evaluation table
    assert str(out / "logs" / "kfp.log") in output and str(out / "logs") in output
    assert "executor_input" in (out / "logs" / "kfp.log").read_text()  # what the console no longer shows


@pytest.mark.slow
def test_tiny_run_prints_one_line_per_step_start_and_end(tmp_path):
    r = _faceops("run", "arcface_resnet34", "--config", str(TINY), "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_clean_view(r.stdout + r.stderr, STEPS["arcface_resnet34"], tmp_path)
    (run,) = (tmp_path / "store" / "runs").iterdir()  # named by the run id the first line prints
    assert f"run id {run.name} " in r.stdout.splitlines()[0]
    assert str(run / "evaluation" / "report.html") in r.stdout


@pytest.mark.slow
def test_failing_step_is_named_with_cause_and_log_and_v_shows_everything(tmp_path):
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    (empty / "someone" / "notes.txt").write_text("no faces here")
    for verbose in ([], ["-v"]):
        out = tmp_path / f"o{len(verbose)}"
        r = _faceops("run", "arcface_resnet34", *verbose, "--config", str(TINY), "--data", str(empty),
                     "--out", str(out))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "step 'ingest' failed" in r.stderr and "no images found" in r.stderr
        assert str(out / "logs" / "ingest.log") in r.stderr
        assert [ln.split()[:2] for ln in r.stdout.splitlines() if ln.split()[:1] == ["ingest"]] == \
            [["ingest", "started"], ["ingest", "FAILED"]]
        shown = "executor_input" in r.stdout
        assert shown == bool(verbose), r.stdout  # -v: the runner's whole output, as before the view
        assert "executor_input" in (out / "logs" / "kfp.log").read_text()


@pytest.mark.slow
def test_bucket_run_prints_s3_uris_and_copies_the_report(s3_bucket, tmp_path):
    r = _faceops("run", "arcface_resnet34", "--config", str(TINY), "--out", str(tmp_path),
                 "--param", f"store_uri={s3_bucket}", "--param", f"model_repo_uri={s3_bucket}/triton")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = re.search(r"run id (\S+) ", r.stdout)[1]
    run = f"{s3_bucket}/runs/{run_id}"
    rows = dict(ln.strip().split(None, 1) for ln in r.stdout.splitlines()
                if ln.startswith("  ") and ln.split()[0] in ("metrics", "checkpoints"))
    assert rows == {"metrics": f"{run}/evaluation/metrics.json", "checkpoints": run}
    assert f"report            {run}/evaluation/report.html" in r.stdout
    assert f"model repository  {s3_bucket}/triton" in r.stdout
    assert str(tmp_path / "store") not in r.stdout  # no local path that does not exist
    copy = tmp_path / "report" / "report.html"
    assert f"report (local)    {copy}" in r.stdout
    html = copy.read_text()
    pngs = [p.name for p in copy.parent.glob("*.png")]
    assert pngs and all(re.search(rf"src=[\"']{p}[\"']", html) for p in pngs)
    check_clean_view(r.stdout + r.stderr, STEPS["arcface_resnet34"], tmp_path)
