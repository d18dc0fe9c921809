"""Prometheus metrics of a training run as an engine hook (rank 0 only; see :mod:`faceops.metrics`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faceops.metrics import MetricsConfig, StageMetrics
from faceops.train.hooks import Hook

if TYPE_CHECKING:
    from faceops.train.engine import Engine


class TrainingMetrics(Hook):
    """Counts every real optimiser step and its images exactly (read from the device at each log),
    NaN events where they happened, rollbacks and corrupt checkpoints; pushes at the configured
    interval and at each epoch end; marks the run finished at the end, as a success or a failure."""

    def __init__(self, stage: str, run_id: str, model_name: str, cfg: MetricsConfig):
        self.m = StageMetrics(stage, run_id, model_name, cfg)
        self.push_every = cfg.push_every_steps

    @property
    def registry(self):  # the run's CollectorRegistry (tests read it)
        return self.m.registry

    def on_log(self, engine: Engine, figures: dict[str, float]) -> None:
        m = self.m
        m.labels(m.steps).inc(figures["good_steps"])
        m.labels(m.images).inc(figures["good_images"])
        if "loss" not in figures:  # a read at a checkpoint or an epoch end: counts only
            return
        m.labels(m.loss).set(figures["loss"])
        m.labels(m.lr).set(figures["lr"])
        m.labels(m.grad_norm).set(figures["grad_norm"])
        m.labels(m.throughput).set(figures["images_per_s"])
        if engine.step % self.push_every < engine.cfg.log_every_steps:
            m.push()

    def on_nan(self, engine: Engine, kind: str, count: int, here: int) -> None:
        # a loss is counted where it happened (summed over DDP ranks); grads/params are all-reduced
        n = here if kind == "loss" and engine.dist.distributed else count
        if n:
            self.m.labels(self.m.nan_events, kind=kind).inc(n)

    def on_rollback(self, engine: Engine) -> None:
        self.m.labels(self.m.rollbacks).inc()

    def on_bad_checkpoint(self, engine: Engine, uri: str) -> None:
        self.m.labels(self.m.corrupt_checkpoints, checkpoint=uri.rsplit("/", 1)[-1]).inc()

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        m = self.m
        m.labels(m.epoch_seconds).set(record["seconds"])
        m.labels(m.epoch).set(record["epoch"])
        for k, v in record.items():
            if isinstance(v, float) and k != "seconds":
                m.labels(m.val_metric, name=k).set(v)
        if "mean_cosine" in record:
            m.labels(m.collapse).set(record["mean_cosine"])
        m.push()

    def on_fit_end(self, engine: Engine, success: bool) -> None:
        self.m.finish(success)
