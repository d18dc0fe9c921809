"""Evaluation figures as ``faceops_eval_metric{name, setting}`` (the dashboard's Evaluation table).

``setting`` is ``hr`` for the HR figures and ``<size>/<kind>`` per VLR size (``32x32/bicubic``,
``32x32/dsr``, ``32x32/dsr_finetuned``); ``name`` is the figure: ``accuracy``, ``eer``, ``auc``,
``threshold``, ``tar_at_far_1e-3`` (one per FAR target), ``rank1``, ``rank5``, and for super-resolved
settings ``psnr``, ``ssim``, ``identity_cosine``. Every evaluation sets them and, when a Pushgateway
is configured, pushes them (the metrics.json blocks, ARCHITECTURE.md "Evaluation output").
"""

from __future__ import annotations

from collections.abc import Iterator

from faceops.metrics.stage import MetricsConfig, StageMetrics

BLOCKS = ("verification", "identification", "super_resolution")
STAGE = "evaluate"


def eval_figures(metrics: dict) -> Iterator[tuple[str, str, float]]:
    """``(setting, name, value)`` for every figure of a metrics.json dict (the per-size ``hr`` block
    repeats the top level and is given once, as ``hr``)."""
    yield from _block("hr", metrics)
    for size, per_size in (metrics.get("vlr") or {}).items():
        for kind, block in per_size.items():
            if kind != "hr":
                yield from _block(f"{size}/{kind}", block)


def _block(setting: str, block: dict) -> Iterator[tuple[str, str, float]]:
    for section in BLOCKS:
        for key, value in (block.get(section) or {}).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if isinstance(v, int | float) and not isinstance(v, bool):
                    yield setting, key if sub is None else f"{key}_{sub}", float(v)


def record_evaluation(m: StageMetrics, metrics: dict) -> int:
    """Set ``faceops_eval_metric`` from ``metrics``; returns how many figures were set."""
    n = 0
    for setting, name, value in eval_figures(metrics):
        m.labels(m.eval_metric, name=name, setting=setting).set(value)
        n += 1
    return n


def publish_evaluation(metrics: dict, run_id: str, model: str, cfg: MetricsConfig | None = None,
                       stage: str = STAGE) -> StageMetrics:
    """Record ``metrics`` in a finished evaluate-stage run: pushed when a Pushgateway is configured
    (``cfg.pushgateway`` or ``FACEOPS_PUSHGATEWAY``); never raises for an unreachable gateway."""
    m = StageMetrics(stage, run_id, model, cfg, training=False)
    record_evaluation(m, metrics)
    m.finish(success=True)
    return m
