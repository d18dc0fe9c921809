"""Metrics overhead: the same tiny seeded training job with no Pushgateway, a reachable one, a hung one.

One run trains the same job (edgeface_xxs from seed 0 on in-memory synthetic faces rendered by
``faceops.data.synth``, batch 16, ``--steps`` optimiser steps, pushes every ``--push-every-steps``)
three ways, interleaved over ``--rounds`` rounds with the order rotating:

* ``none``: no Pushgateway (the registry still fills; nothing is sent);
* ``reachable``: a real ``prometheus-pushgateway`` on a 127.0.0.1 port (an in-process stand-in
  answering 200 when the binary is missing; ``reachable_gateway`` says which);
* ``stalled``: a 127.0.0.1 port whose socket listens but never accepts nor answers, so every request
  waits for its timeout (``metrics.push_timeout_s``, default 5 s): the hung gateway of the issue.

Figures per mode (mean over rounds): ``steps_per_s`` (steady state, between the first and the last
loss call, the window where the loop's pushes happen), ``job_s`` (engine construction + ``fit()``,
which includes the end-of-run flush and its bounded wait), pushes ``sent``/``failed``/``dropped``;
and the ratios ``<mode>_vs_none`` of both, per round and their median (1.0 = no cost; a speed ratio,
so job_time is none's seconds over the mode's). Run from the repository root:
``python -m bench.metrics_overhead [--steps 40 --rounds 3]`` (writes bench/results/metrics_overhead.json).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from faceops.data.augment import AugmentConfig
from faceops.data.reader import BatchDataset, LoaderConfig, SplitData
from faceops.data.synth import make_identity, render
from faceops.models import RecognizerConfig
from faceops.serve.local import free_port
from faceops.train.engine import Engine
from faceops.train.recognizer import RecognizerTrainConfig

from ._runner import save_result
from .train import TimedRecognizerTask, steady_rate

MODES = ("none", "reachable", "stalled")
MODEL = "edgeface_xxs"
NEVER = 10**9


def synthetic_faces(identities: int, per_identity: int, seed: int = 0) -> SplitData:
    """Rendered synthetic faces in memory (no files, no ingest): deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    people = [make_identity(rng) for _ in range(identities)]
    hr = np.stack([np.asarray(render(p, rng)) for p in people for _ in range(per_identity)])
    labels = np.repeat(np.arange(identities, dtype=np.int64), per_identity)
    return SplitData(hr=hr, vlr={}, labels=labels, identities=[f"id{i}" for i in range(identities)],
                     image_ids=[f"img{i}" for i in range(len(labels))])


# -- the three gateways ----------------------------------------------------------------------------
class _Ok(http.server.BaseHTTPRequestHandler):
    """Stand-in Pushgateway: accepts every push and delete, lists no groups."""

    def _ok(self, body: bytes = b"") -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_POST = do_DELETE = _ok  # noqa: N815 -- http.server's naming

    def do_GET(self) -> None:  # noqa: N802
        self._ok(json.dumps({"status": "success", "data": []}).encode())

    def log_message(self, *args) -> None:
        pass


@contextmanager
def reachable_gateway() -> Iterator[tuple[str, str]]:
    """(host:port, what it is): the real Pushgateway binary if installed, else the stand-in."""
    binary = shutil.which("prometheus-pushgateway")
    if binary:
        addr = f"127.0.0.1:{free_port()}"
        proc = subprocess.Popen([binary, f"--web.listen-address={addr}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_ready(f"http://{addr}/-/ready")
            version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
            yield addr, (version.splitlines() or ["prometheus-pushgateway"])[0].strip()
        finally:
            proc.terminate()
            proc.wait(10)
        return
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_port}", "in-process stand-in (prometheus-pushgateway not installed)"
    finally:
        server.shutdown()
        server.server_close()


def _wait_ready(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s")


@contextmanager
def stalled_gateway() -> Iterator[str]:
    """A loopback port that listens but never accepts: connections queue in the kernel, requests are
    never answered (and once the backlog is full, new connections are never completed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- one training job ------------------------------------------------------------------------------
def run_job(data: SplitData, args: argparse.Namespace, gateway: str | None, work: str) -> dict:
    """The seeded job once; steady steps/s, job seconds and what the pusher did."""
    cfg = RecognizerTrainConfig(model=RecognizerConfig(name=MODEL),
                                loader=LoaderConfig(batch_size=args.batch, augment=AugmentConfig(enabled=False)))
    e = cfg.engine
    e.device, e.progress, e.amp, e.epochs, e.max_steps = "cpu", False, "off", 1, args.steps
    e.checkpoint_every_steps = NEVER  # one checkpoint at the end, the same in every mode
    e.metrics.pushgateway, e.metrics.push_every_steps = gateway, args.push_every_steps
    torch.manual_seed(0)
    task = TimedRecognizerTask(cfg, data, None, torch.device("cpu"))
    task.stamps = []
    train_set = BatchDataset(data, cfg.loader, seed=0)
    t0 = time.perf_counter()
    engine = Engine(task, train_set, e, work, run_id=f"bench-{os.path.basename(work)}", model_name=MODEL)
    metrics = engine.metrics
    result = engine.fit()
    job_s = time.perf_counter() - t0
    pusher = metrics.pusher if metrics is not None else None
    return {"steps": result.steps, "steps_per_s": steady_rate(task.stamps, 1), "job_s": job_s,
            "sent": pusher.sent if pusher else 0, "failed": pusher.failed if pusher else 0,
            "dropped": pusher.dropped if pusher else 0}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per job")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--identities", type=int, default=16, help="synthetic identities (margin head classes)")
    p.add_argument("--push-every-steps", type=int, default=10,
                   help="engine.metrics.push_every_steps (10 = every log step; the default 50 pushes "
                        "less often than a few dozen steps)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three modes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable cores)")
    p.add_argument("--name", default="metrics_overhead", help="result name (bench/results/<name>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    os.environ.pop("FACEOPS_PUSHGATEWAY", None)  # "none" must mean none
    per_identity = -(-args.batch * (args.steps + 2) // args.identities)  # one epoch covers the job
    data = synthetic_faces(args.identities, per_identity)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    with reachable_gateway() as (reachable, gateway_kind), stalled_gateway() as stalled, \
            tempfile.TemporaryDirectory(prefix="faceops-bench-metrics-") as work:
        gateways = {"none": None, "reachable": reachable, "stalled": stalled}
        run_job(data, args, None, f"{work}/warmup")
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[:r % 3]
            for mode in order:
                run = run_job(data, args, gateways[mode], f"{work}/{mode}-{r}")
                runs[mode].append(run)
                print(f"[bench.metrics_overhead] round {r + 1}/{args.rounds} {mode}: "
                      f"{run['steps_per_s']:.2f} steps/s, job {run['job_s']:.1f} s, pushes sent "
                      f"{run['sent']} failed {run['failed']} dropped {run['dropped']}", flush=True)
    figures: dict = {}
    for mode in MODES:
        figures[mode] = {k: float(np.mean([run[k] for run in runs[mode]]))
                         for k in ("steps_per_s", "job_s", "sent", "failed", "dropped")}
    for mode in MODES[1:]:  # per round (the three modes ran back to back), then the median
        speed = [m["steps_per_s"] / n["steps_per_s"] for m, n in zip(runs[mode], runs["none"], strict=True)]
        job = [n["job_s"] / m["job_s"] for m, n in zip(runs[mode], runs["none"], strict=True)]
        figures[f"{mode}_vs_none"] = {"steps_per_s": float(np.median(speed)), "job_time": float(np.median(job)),
                                      "steps_per_s_per_round": speed, "job_time_per_round": job}
    figures.update({"steps": args.steps, "batch": args.batch, "push_every_steps": args.push_every_steps,
                    "rounds": args.rounds, "threads": threads, "model": MODEL,
                    "reachable_gateway": gateway_kind})
    print(f"speed vs no Pushgateway: reachable {figures['reachable_vs_none']['steps_per_s']:.3f} "
          f"(job {figures['reachable_vs_none']['job_time']:.3f}), stalled "
          f"{figures['stalled_vs_none']['steps_per_s']:.3f} (job {figures['stalled_vs_none']['job_time']:.3f})")
    notes = (f"cpu, {threads} threads, {MODEL} batch {args.batch}, {args.steps} steps from seed 0 on rendered "
             f"synthetic faces, pushes every {args.push_every_steps} steps; 'stalled' = a 127.0.0.1 socket "
             "that listens but never accepts (requests time out after metrics.push_timeout_s). Ratios: "
             "steady steps/s and job time, mode vs no Pushgateway (1.0 = no cost).")
    save_result(args.name, figures, notes)
    return figures


if __name__ == "__main__":
    main()
