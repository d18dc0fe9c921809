"""Prometheus metrics of every stage, named per the ARCHITECTURE.md contract.

Names start with ``faceops_``; counters end in ``_total``; units are suffixes. Labels are
``stage``, ``run_id``, ``model``. A stage exposes its registry on a local port (embedded default,
127.0.0.1) and/or pushes it to a Pushgateway (``FACEOPS_PUSHGATEWAY``, grouped by run and stage).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, start_http_server

log = logging.getLogger(__name__)

NAN_EVENTS = "faceops_nan_events_total"
LABELS = ("stage", "run_id", "model")


@dataclass
class MetricsConfig:
    port: int | None = None  # serve /metrics here (local run); None = don't serve
    address: str = "127.0.0.1"  # loopback unless told otherwise
    pushgateway: str | None = None  # host:port; default from FACEOPS_PUSHGATEWAY
    push_every_steps: int = 50  # push cadence; a final push always happens


class StageMetrics:
    """The metrics one stage run reports; one registry per run so tests stay isolated."""

    def __init__(self, stage: str, run_id: str, model: str = "", cfg: MetricsConfig | None = None):
        self.cfg = cfg or MetricsConfig()
        self.stage, self.run_id, self.model = stage, run_id, model
        self.registry = CollectorRegistry()
        r = self.registry
        self.nan_events = Counter(NAN_EVENTS, "Non-finite loss/grad/param events (batch skipped)",
                                  [*LABELS, "kind"], registry=r)
        self.rollbacks = Counter("faceops_rollbacks_total", "Rollbacks to the last good state",
                                 LABELS, registry=r)
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
        for kind in ("loss", "grad", "param"):  # present at 0 so rate()/increase() work from the start
            self.nan_events.labels(**self._labels, kind=kind)
        self.rollbacks.labels(**self._labels)
        self._server = None
        self._pushgateway = self.cfg.pushgateway or os.environ.get("FACEOPS_PUSHGATEWAY") or None
        if self.cfg.port is not None:
            self._server = start_http_server(self.cfg.port, addr=self.cfg.address, registry=r)
            log.info("metrics on http://%s:%d/metrics", self.cfg.address, self.cfg.port)

    @property
    def _labels(self) -> dict[str, str]:
        return {"stage": self.stage, "run_id": self.run_id, "model": self.model}

    def labels(self, metric, **extra):
        return metric.labels(**self._labels, **extra)

    def push(self) -> None:
        """Push to the Pushgateway (if configured); a failure is logged, never fatal to training."""
        if not self._pushgateway:
            return
        try:
            push_to_gateway(self._pushgateway, job="faceops", registry=self.registry,
                            grouping_key={"run_id": self.run_id, "stage": self.stage}, timeout=5)
        except OSError as exc:
            log.warning("could not push metrics to Pushgateway %s: %s", self._pushgateway, exc)

    def close(self) -> None:
        self.push()
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None
