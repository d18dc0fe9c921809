"""The one retry helper and the one readiness wait (faceops.retry): backoff, what is retried, what the
caller sees when retrying ends; deterministic through an injected sleep and clock."""

from __future__ import annotations

import math

import pytest

from faceops.errors import FaceopsError
from faceops.retry import Backoff, poll, retry_call


class Flaky:
    """Fails with ``errors`` in turn, then returns "ok"."""

    def __init__(self, *errors: Exception):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [Backoff(6, 0.5, 8.0).delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert Backoff(3, 0.25).max_delay == math.inf and Backoff(3, 0.25).delay(5) == 4.0


def test_jitter_shortens_each_sleep_by_at_most_its_fraction() -> None:
    backoff = Backoff(5, 1.0, jitter=0.5)
    assert backoff.delay(2, draw=lambda: 0.0) == 2.0
    assert backoff.delay(2, draw=lambda: 1.0) == 1.0
    assert all(0.5 <= backoff.delay(1) <= 1.0 for _ in range(50))


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"base_delay": -1}, {"jitter": 2}])
def test_invalid_backoff_is_an_error(kwargs: dict) -> None:
    with pytest.raises(FaceopsError, match="attempts must be >= 1"):
        Backoff(**{"attempts": 3, "base_delay": 0.1, **kwargs})


def test_transient_failures_are_retried_with_backoff() -> None:
    sleeps: list[float] = []
    retries: list[tuple[str, int, float]] = []
    fn = Flaky(ConnectionError("a"), ConnectionError("b"))
    result = retry_call(fn, Backoff(5, 0.5, 8.0), retry_on=lambda e: isinstance(e, ConnectionError),
                        on_retry=lambda e, n, pause: retries.append((str(e), n, pause)), sleep=sleeps.append)
    assert result == "ok" and fn.calls == 3
    assert sleeps == [0.5, 1.0] and retries == [("a", 1, 0.5), ("b", 2, 1.0)]


def test_give_up_names_the_attempts_made() -> None:
    """After the last attempt, and at once for a failure not worth retrying, ``give_up`` chooses the error."""
    def give_up(exc: Exception, attempts: int) -> None:
        raise FaceopsError(f"{exc} after {attempts} attempts") from exc

    sleeps: list[float] = []
    transient = Flaky(*[ConnectionError("down")] * 9)
    with pytest.raises(FaceopsError, match="down after 4 attempts"):
        retry_call(transient, Backoff(4, 0.1), retry_on=lambda e: isinstance(e, ConnectionError),
                   give_up=give_up, sleep=sleeps.append)
    assert transient.calls == 4 and len(sleeps) == 3
    fatal = Flaky(ConnectionError("blip"), ValueError("bad request"))
    with pytest.raises(FaceopsError, match="bad request after 2 attempts"):
        retry_call(fatal, Backoff(4, 0.1), retry_on=lambda e: isinstance(e, ConnectionError),
                   give_up=give_up, sleep=sleeps.append)


def test_without_give_up_the_failure_itself_propagates() -> None:
    fn = Flaky(KeyError("k"))
    with pytest.raises(KeyError):
        retry_call(fn, Backoff(3, 0.1), retry_on=lambda e: False, give_up=lambda e, n: None, sleep=pytest.fail)
    assert fn.calls == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_poll_returns_once_ready() -> None:
    clock, answers = FakeClock(), iter([False, False, True])
    assert poll(lambda: next(answers), timeout_s=10, interval_s=0.25, sleep=clock.sleep, clock=clock) is True
    assert clock.now == 0.5


def test_poll_returns_the_last_result_at_the_deadline() -> None:
    """The caller tells ready from timed out by the result; the probe runs after the last sleep too."""
    clock, calls = FakeClock(), []

    def probe() -> list[str]:
        calls.append(clock.now)
        return ["recognizer v2"]

    left = poll(probe, lambda pending: not pending, timeout_s=5, interval_s=2, sleep=clock.sleep, clock=clock)
    assert left == ["recognizer v2"] and calls == [0, 2, 4, 6]


def test_poll_lets_probe_errors_through() -> None:
    def probe() -> bool:
        raise RuntimeError("server exited")

    with pytest.raises(RuntimeError, match="server exited"):
        poll(probe, timeout_s=10, interval_s=1, sleep=pytest.fail)


def test_triton_client_retries_only_an_unreachable_server() -> None:
    from tritonclient.utils import InferenceServerException

    from faceops.serve.client import FaceClient, InvalidInputError, ServerUnavailableError

    client = FaceClient("127.0.0.1:1", protocol="http", retries=2, retry_backoff_s=0.0)
    refused = Flaky(*[ConnectionRefusedError("refused")] * 9)
    with pytest.raises(ServerUnavailableError, match=r"127\.0\.0\.1:1 .*after 3 attempts.*'faceops serve'") as err:
        client._call("server ready", None, refused)
    assert refused.calls == 3 and err.value.__cause__ is None
    rejected = Flaky(InferenceServerException("unexpected shape for input", status="INVALID_ARGUMENT"))
    with pytest.raises(InvalidInputError, match="input rejected"):
        client._call("infer recognizer", "recognizer", rejected)
    assert rejected.calls == 1
