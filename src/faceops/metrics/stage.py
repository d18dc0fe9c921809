"""The metrics one stage run reports: its registry, a local /metrics port, its Pushgateway group.

Lifecycle of a run's Pushgateway group (``job="faceops"``, grouped by ``run_id`` and ``stage``), which
the alert rules (charts/faceops/files/alerts.yaml) rely on:

* start: the group is pushed at once with ``faceops_run_finished 0``, the start time and every
  counter at 0 (so ``increase()`` sees a run's first NaN events);
* running: :meth:`StageMetrics.push` queues a push; a background thread sends it (and re-pushes every
  ``push_interval_s``), so training never waits on the network (:mod:`.pusher`);
* end: :meth:`StageMetrics.finish` sets ``faceops_run_finished 1`` (and, on success,
  ``faceops_run_last_success_timestamp_seconds``), sends the final state with a bounded wait and
  deletes finished groups older than ``finished_retention_s`` (:mod:`.retention`).

Why mark finished rather than delete the group at once: deleting right after the final push usually
beats the next scrape, so the last validation figures and every evaluation figure would never reach
Prometheus. A finished group stays scrapeable for the retention; the training alerts ignore finished
runs (``unless on (run_id, stage) faceops_run_finished == 1``); a run that dies without finishing
keeps ``faceops_run_finished 0`` and is caught by the stalled-training alert.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from faceops.config import check
from faceops.metrics.pusher import Pusher
from faceops.metrics.retention import prune_finished

log = logging.getLogger(__name__)

JOB = "faceops"
NAN_EVENTS = "faceops_nan_events_total"
RUN_FINISHED = "faceops_run_finished"
LABELS = ("stage", "run_id", "model")


@dataclass
class MetricsConfig:
    port: int | None = None  # serve /metrics here (local run); None = don't serve
    address: str = "127.0.0.1"  # loopback unless told otherwise
    pushgateway: str | None = None  # host:port; default from FACEOPS_PUSHGATEWAY
    push_every_steps: int = 50  # push cadence; a final push always happens
    push_interval_s: float = 30.0  # background re-push while running (0 = only when asked)
    push_timeout_s: float = 5.0  # one HTTP request to the Pushgateway (sent off the training thread)
    finish_timeout_s: float = 12.0  # finish()/close() wait at most this for the final push (a push
    # in flight + the final one); push_timeout_s when the gateway's latest request failed
    finished_retention_s: float = 3600.0  # finished runs' groups older than this are deleted (0 = never)

    def __post_init__(self) -> None:
        check(self.push_every_steps >= 1, f"metrics.push_every_steps must be >= 1, got {self.push_every_steps}")
        check(self.push_interval_s >= 0, f"metrics.push_interval_s must be >= 0, got {self.push_interval_s}")
        check(self.push_timeout_s > 0, f"metrics.push_timeout_s must be > 0, got {self.push_timeout_s}")
        check(self.finish_timeout_s >= 0, f"metrics.finish_timeout_s must be >= 0, got {self.finish_timeout_s}")
        check(self.finished_retention_s >= 0,
              f"metrics.finished_retention_s must be >= 0, got {self.finished_retention_s}")


def run_id_for(out: str) -> str:
    """A stage's ``run_id`` label: ``FACEOPS_RUN_ID`` when set, else the pipeline run's id for an output
    below ``<store>/runs/<run_id>/``, else the output's last path component. Every step of one run pushes
    under its run's id, so two runs never overwrite each other's Pushgateway groups."""
    if os.environ.get("FACEOPS_RUN_ID"):
        return os.environ["FACEOPS_RUN_ID"]
    parts = out.rstrip("/").split("/")
    if "runs" in parts[:-1]:
        return parts[len(parts) - 1 - parts[::-1].index("runs") + 1]
    return parts[-1]


class StageMetrics:
    """The metrics one stage run reports; one registry per run so tests stay isolated.

    ``training=False`` (evaluation) leaves out the step/image counters, which only training moves
    and which the stalled-training alert watches.
    """

    def __init__(self, stage: str, run_id: str, model: str = "", cfg: MetricsConfig | None = None,
                 training: bool = True):
        self.cfg = cfg or MetricsConfig()
        self.stage, self.run_id, self.model = stage, run_id, model
        self.registry = CollectorRegistry()
        self._declare(self.registry)
        for kind in ("loss", "grad", "param"):  # present at 0 so rate()/increase() work from the start
            self.nan_events.labels(**self._labels, kind=kind)
        self.rollbacks.labels(**self._labels)
        if training:
            self.steps.labels(**self._labels)
            self.images.labels(**self._labels)
        self.labels(self.run_finished).set(0)
        self.labels(self.run_start).set(time.time())
        self.finished: bool | None = None  # None while running, else the outcome given to finish()
        self._final_sent = False
        self._server = None
        if self.cfg.port is not None:
            self._server = start_http_server(self.cfg.port, addr=self.cfg.address, registry=self.registry)
            log.info("metrics on http://%s:%d/metrics", self.cfg.address, self.cfg.port)
        gateway = self.cfg.pushgateway or os.environ.get("FACEOPS_PUSHGATEWAY") or None
        self._pusher = Pusher(gateway, JOB, {"run_id": run_id, "stage": stage}, self.registry,
                              self.cfg.push_timeout_s, self.cfg.push_interval_s) if gateway else None
        self.push()  # the group exists from the start, counters at 0

    def _declare(self, r: CollectorRegistry) -> None:
        self.nan_events = Counter(NAN_EVENTS, "Non-finite loss/grad/param events (batch skipped)",
                                  [*LABELS, "kind"], registry=r)
        self.rollbacks = Counter("faceops_rollbacks_total", "Rollbacks to the last good state",
                                 LABELS, registry=r)
        self.corrupt_checkpoints = Counter("faceops_checkpoint_corrupt_total",
                                           "Unreadable checkpoints skipped on resume", [*LABELS, "checkpoint"],
                                           registry=r)
        self.steps = Counter("faceops_train_steps_total", "Optimiser steps taken", LABELS, registry=r)
        self.images = Counter("faceops_train_images_total", "Images processed", LABELS, registry=r)
        self.loss = Gauge("faceops_train_loss", "Last training loss", LABELS, registry=r)
        self.lr = Gauge("faceops_train_learning_rate", "Current learning rate", LABELS, registry=r)
        self.grad_norm = Gauge("faceops_train_grad_norm", "Gradient L2 norm before clipping", LABELS,
                               registry=r)
        self.throughput = Gauge("faceops_train_images_per_second", "Training throughput", LABELS,
                                registry=r)
        self.epoch_seconds = Gauge("faceops_train_epoch_seconds", "Duration of the last epoch", LABELS,
                                   registry=r)
        self.epoch = Gauge("faceops_train_epoch", "Current epoch", LABELS, registry=r)
        self.val_metric = Gauge("faceops_val_metric", "Validation metrics", [*LABELS, "name"], registry=r)
        self.collapse = Gauge("faceops_embedding_mean_cosine",
                              "Mean pairwise cosine across identities (collapse if near 1)", LABELS,
                              registry=r)
        self.eval_metric = Gauge("faceops_eval_metric", "Evaluation figures", [*LABELS, "name", "setting"],
                                 registry=r)
        self.run_finished = Gauge(RUN_FINISHED, "1 once the run has ended (success or failure), 0 while "
                                  "it runs; alerts ignore finished runs", LABELS, registry=r)
        self.run_start = Gauge("faceops_run_start_timestamp_seconds", "Unix time the run started", LABELS,
                               registry=r)
        self.last_success = Gauge("faceops_run_last_success_timestamp_seconds",
                                  "Unix time the run ended successfully (absent unless it did)", LABELS,
                                  registry=r)

    @property
    def _labels(self) -> dict[str, str]:
        return {"stage": self.stage, "run_id": self.run_id, "model": self.model}

    @property
    def pusher(self) -> Pusher | None:
        """The background sender (None without a Pushgateway)."""
        return self._pusher

    def labels(self, metric, **extra):
        return metric.labels(**self._labels, **extra)

    def push(self) -> None:
        """Queue a push to the Pushgateway (if configured); returns at once, never raises."""
        if self._pusher is not None:
            self._pusher.push()

    def finish(self, success: bool) -> bool:
        """End the run: mark it finished, send the final state (bounded wait: ``finish_timeout_s``, or
        ``push_timeout_s`` when the gateway's latest request failed), delete long-finished groups,
        stop the /metrics port. Idempotent (the first outcome stays). Returns True when the final
        state reached the gateway (or none is configured); an undelivered one is the run's single
        warning naming the gateway."""
        if self.finished is not None:
            return True
        self.finished = success
        self.labels(self.run_finished).set(1)
        if success:
            self.labels(self.last_success).set(time.time())
        delivered = True
        if self._pusher is not None:
            wait = self.cfg.finish_timeout_s
            if self._pusher.last_ok is False:  # known unreachable: one attempt's worth of waiting, not more
                wait = min(wait, self.cfg.push_timeout_s)
            self._pusher.submit(self._final_request)
            delivered = self._pusher.close(wait) and self._final_sent
        self._stop_server()
        return delivered

    def close(self) -> None:
        """``finish(False)`` unless the run already finished: the end of a run of unknown outcome."""
        self.finish(False)

    def _final_request(self) -> None:
        pusher = self._pusher
        pusher.push_now()
        self._final_sent = True
        if self.cfg.finished_retention_s > 0:
            try:
                prune_finished(pusher.gateway, JOB, self.cfg.finished_retention_s, self.cfg.push_timeout_s)
            except Exception as exc:  # noqa: BLE001 -- housekeeping only: never fails the run
                log.info("metrics: could not prune finished groups on %s: %s", pusher.gateway, exc)

    def _stop_server(self) -> None:
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
