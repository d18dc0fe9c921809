"""Pushgateway requests sent from one background thread, so a slow or dead gateway never slows training.

``push_to_gateway`` is a blocking HTTP PUT. Called in the training loop, an unreachable gateway
stalled every step by its timeout and, under DDP, every rank waiting for rank 0 at the next
collective. Here the caller only appends a request to a bounded queue and returns; a daemon thread
sends. A push serialises the registry when it is *sent*, so a queued push already carries the newest
state: when the queue is full the oldest request is dropped (latest state wins), and the caller never
blocks. While idle the thread also pushes every ``interval_s`` (a heartbeat), so the gateway's
copy is never older than that whatever the caller's push cadence.

Failures are never raised to the caller; the first one is logged as one WARNING naming the gateway
(later ones at DEBUG), so an unreachable gateway costs one log line per run, not one per step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, push_to_gateway

log = logging.getLogger(__name__)

Request = Callable[[], None]


class Pusher:
    """Background sender of one Pushgateway group (``job`` + ``grouping_key``) of ``registry``."""

    def __init__(self, gateway: str, job: str, grouping_key: dict[str, str], registry: CollectorRegistry,
                 timeout_s: float = 5.0, interval_s: float | None = None, maxsize: int = 1) -> None:
        self.gateway, self.job, self.grouping_key = gateway, job, dict(grouping_key)
        self.registry, self.timeout_s, self.interval_s = registry, timeout_s, interval_s
        self._queue: deque[Request] = deque(maxlen=maxsize)
        self._cond = threading.Condition()
        self._busy = self._closed = self._warned = False
        self._last_send = time.monotonic()
        self.sent = self.failed = self.dropped = 0
        self.last_error: BaseException | None = None
        self.last_ok: bool | None = None  # outcome of the latest request (None before the first)
        self._thread = threading.Thread(target=self._run, name=f"faceops-push-{gateway}", daemon=True)
        self._thread.start()

    # -- the caller's side: never blocks on the network ----------------------------------------
    def push(self) -> None:
        """Queue a push of the registry's state at send time."""
        self.submit(self.push_now)

    def submit(self, request: Request) -> None:
        """Queue ``request``; a full queue drops its oldest request. Ignored once closed."""
        with self._cond:
            if self._closed:
                return
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(request)
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued request to be sent (or to fail); True if done."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Flush with a bounded wait, then stop the thread (left to die with the process if stuck)."""
        done = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not done:
            self.warn_once(f"the last metrics were not delivered within {timeout_s:g} s")
        return done

    @property
    def ok(self) -> bool:
        """No request has failed so far."""
        return self.failed == 0

    # -- the requests (run on the thread) -------------------------------------------------------
    def push_now(self) -> None:
        """PUT the registry as the whole group (replacing what the gateway held for it)."""
        push_to_gateway(self.gateway, job=self.job, registry=self.registry, grouping_key=self.grouping_key,
                        timeout=self.timeout_s)

    def warn_once(self, problem: str) -> None:
        with self._cond:
            if self._warned:
                return
            self._warned = True
        log.warning("metrics: Pushgateway %s unreachable or failing (%s); training is not affected, "
                    "further push problems of this run are not logged again", self.gateway, problem)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    if self._heartbeat_due():
                        self._queue.append(self.push_now)
                        break
                    self._cond.wait(self._wait_s())
                if not self._queue:  # closed and drained
                    return
                request = self._queue.popleft()
                self._busy = True
            try:
                request()
                self.sent += 1
                self.last_ok = True
            except Exception as exc:  # noqa: BLE001 -- any failure (OSError, HTTPError, ...) must stay here
                self.failed += 1
                self.last_error, self.last_ok = exc, False
                log.debug("push to %s failed: %s", self.gateway, exc)
                self.warn_once(f"{type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy = False
                    self._last_send = time.monotonic()
                    self._cond.notify_all()

    def _heartbeat_due(self) -> bool:
        return bool(self.interval_s) and time.monotonic() - self._last_send >= self.interval_s

    def _wait_s(self) -> float | None:
        if not self.interval_s:
            return None
        return max(0.0, self.interval_s - (time.monotonic() - self._last_send))
