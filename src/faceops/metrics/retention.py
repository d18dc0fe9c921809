"""Deleting the Pushgateway groups of runs that finished long ago.

The Pushgateway never forgets a group: with one group per run and stage, finished runs would pile up
and Prometheus would scrape their last values forever. A run ending does not delete its own group at
once (the final figures, e.g. the evaluation table, must be scraped first, and Prometheus scrapes
every 30 s on the cluster); instead it marks itself finished, and every run that ends deletes the
finished groups of its job older than a retention. Prometheus keeps their history in its TSDB.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request

from prometheus_client import delete_from_gateway

log = logging.getLogger(__name__)

FINISHED = "faceops_run_finished"


def _url(gateway: str) -> str:
    return gateway if gateway.startswith(("http://", "https://")) else f"http://{gateway}"


def finished_groups(gateway: str, job: str, older_than_s: float, timeout_s: float = 5.0,
                    now: float | None = None) -> list[dict[str, str]]:
    """Grouping keys (without ``job``) of ``job``'s groups marked finished and last pushed before
    ``now - older_than_s`` (the Pushgateway's own ``push_time_seconds``)."""
    with urllib.request.urlopen(f"{_url(gateway).rstrip('/')}/api/v1/metrics", timeout=timeout_s) as resp:
        groups = json.loads(resp.read())["data"]
    cutoff = (time.time() if now is None else now) - older_than_s
    found = []
    for group in groups:
        labels = dict(group.get("labels", {}))
        if labels.pop("job", None) != job:
            continue
        finished = [float(m["value"]) for m in group.get(FINISHED, {}).get("metrics", [])]
        pushed = [float(m["value"]) for m in group.get("push_time_seconds", {}).get("metrics", [])]
        if finished and min(finished) == 1 and pushed and max(pushed) < cutoff:
            found.append(labels)
    return found


def prune_finished(gateway: str, job: str, older_than_s: float, timeout_s: float = 5.0) -> int:
    """Delete the groups :func:`finished_groups` names; returns how many were deleted."""
    groups = finished_groups(gateway, job, older_than_s, timeout_s)
    for key in groups:
        delete_from_gateway(gateway, job=job, grouping_key=key, timeout=timeout_s)
    if groups:
        log.info("metrics: deleted %d finished run group(s) older than %g s from Pushgateway %s", len(groups),
                 older_than_s, gateway)
    return len(groups)
