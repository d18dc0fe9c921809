"""Prometheus metrics of every stage, named per the ARCHITECTURE.md contract.

Names start with ``faceops_``; counters end in ``_total``; units are suffixes. Labels are
``stage``, ``run_id``, ``model``. A stage exposes its registry on a local port (embedded default,
127.0.0.1) and/or pushes it to a Pushgateway (``FACEOPS_PUSHGATEWAY``, grouped by run and stage)
from a background thread (:mod:`.pusher`); how a run's group starts, ends and is cleaned up is in
:mod:`.stage`.
"""

from faceops.metrics.evaluation import eval_figures, publish_evaluation, record_evaluation
from faceops.metrics.pusher import Pusher
from faceops.metrics.retention import finished_groups, prune_finished
from faceops.metrics.stage import JOB, LABELS, NAN_EVENTS, RUN_FINISHED, MetricsConfig, StageMetrics, run_id_for

__all__ = [
    "JOB", "LABELS", "NAN_EVENTS", "RUN_FINISHED", "MetricsConfig", "Pusher", "StageMetrics", "eval_figures",
    "finished_groups", "prune_finished", "publish_evaluation", "record_evaluation", "run_id_for",
]
