"""The one place that waits: retrying a failing call with backoff, and polling until something is ready.

Every network edge of faceops (the S3 store, the Triton client, the local Triton launcher, the deploy
check) waits the same two ways, so each wait has one definition and is deterministic in tests: the
clock and ``sleep`` are arguments, and jitter is off unless asked for.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from faceops.errors import FaceopsError

T = TypeVar("T")

Sleep = Callable[[float], None]


@dataclass(frozen=True)
class Backoff:
    """``attempts`` tries of one call, sleeping ``base_delay``·2^(n-1) seconds (capped at
    ``max_delay``) before retry n. ``jitter`` (0..1) shortens each sleep by up to that fraction, at
    random, so that many clients failing together do not retry in lockstep."""

    attempts: int  # total tries (1 = no retry)
    base_delay: float  # seconds before the first retry; doubles each retry
    max_delay: float = math.inf  # cap on one sleep, seconds
    jitter: float = 0.0  # fraction of each sleep drawn away at random; 0 = deterministic

    def __post_init__(self) -> None:
        if self.attempts < 1 or min(self.base_delay, self.max_delay) < 0 or not 0 <= self.jitter <= 1:
            raise FaceopsError(f"invalid {self}: attempts must be >= 1, delays >= 0 and jitter in [0, 1]")

    def delay(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based)."""
        pause = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return pause * (1.0 - self.jitter * draw()) if self.jitter else pause


def retry_call(
    fn: Callable[[], T],
    backoff: Backoff,
    *,
    retry_on: Callable[[Exception], bool],
    on_retry: Callable[[Exception, int, float], None] | None = None,
    give_up: Callable[[Exception, int], None] | None = None,
    sleep: Sleep = time.sleep,
) -> T:
    """``fn()``, tried again after failures that ``retry_on`` accepts, as ``backoff`` says.

    ``on_retry(failure, retry, pause)`` runs before each sleep (to log it). When retrying ends (a
    failure not worth retrying, or the last attempt failed) ``give_up(failure, attempts_made)`` may
    raise the error callers should see, naming what was tried; otherwise the failure propagates.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retry_on(exc) or attempt >= backoff.attempts:
                if give_up is not None:
                    give_up(exc, attempt)
                raise
            pause = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, pause)
            sleep(pause)
            attempt += 1


def poll(
    probe: Callable[[], T],
    until: Callable[[T], bool] = bool,
    *,
    timeout_s: float,
    interval_s: float,
    sleep: Sleep = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call ``probe`` every ``interval_s`` seconds until ``until(result)`` holds or ``timeout_s`` has
    passed; returns the last result (test it with ``until`` to tell ready from timed out).

    ``probe`` runs at least once and again after every sleep, the one that crosses the deadline too.
    Errors it raises propagate (a server process that died is not worth waiting for).
    """
    deadline = clock() + timeout_s
    while True:
        result = probe()
        if until(result) or clock() >= deadline:
            return result
        sleep(interval_s)
