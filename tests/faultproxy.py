"""S3 fault doubles for tests: a real TCP fault proxy, and a moto server that enforces credentials.

:class:`FaultProxy` listens on 127.0.0.1 and forwards raw TCP to an upstream server (moto's S3).
Its mode is switched at run time, from the test or by a byte pattern seen in a request (:meth:`arm`),
and every fault is bounded in time and/or count, so a test can say "the endpoint misbehaves for 2 s"
and then check that the client recovered:

``pass``          forward both ways
``reset``         abort connections with a TCP RST: new ones at once, open ones at their next request
``cut_request``   forward the first ``cut_bytes`` of a request, then RST (the server sees half a body)
``cut_response``  forward the request, then only the first ``cut_bytes`` of the answer, then RST
``stall``         accept and hold: nothing forwarded, nothing answered, until the fault ends (then RST)
``slowdown``      answer the request with S3's ``503 SlowDown`` instead of forwarding it

Faults act on real sockets, so the client under test sees what a flaky network shows it:
``ConnectionResetError``, ``IncompleteRead``, read timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

Mode = Literal["pass", "reset", "cut_request", "cut_response", "stall", "slowdown"]
MODES: tuple[str, ...] = ("pass", "reset", "cut_request", "cut_response", "stall", "slowdown")
CHUNK = 65536
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                 b"<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>")
SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode() + SLOWDOWN_BODY)


def abort(sock: socket.socket | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN: the peer sees 'connection reset'."""
    if sock is None:
        return
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes the other pump thread blocked in recv
    with suppress(OSError):
        sock.close()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.upstream: socket.socket | None = None
        self.cut_response = False  # forward only cut_bytes of the next answer
        self.held = False  # stalled: data in either direction is dropped
        self.closed = threading.Event()

    def abort(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            abort(self.client)
            abort(self.upstream)


class FaultProxy:
    """TCP proxy on loopback in front of ``upstream`` (``host:port``) with run-time switchable faults."""

    def __init__(self, upstream: str, cut_bytes: int = 700):
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_bytes = cut_bytes
        self.stats: Counter[str] = Counter()  # connections, requests, and one count per fault mode
        self._lock = threading.Lock()
        self._mode: str = "pass"
        self._until: float | None = None  # monotonic end of the current fault
        self._left: int | None = None  # faults left in the current fault
        self._trigger: tuple[bytes, str, float | None, int | None] | None = None
        self._links: set[_Link] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True).start()

    # -- control --------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        with self._lock:
            return self._current()

    def set(self, mode: Mode, seconds: float | None = None, count: int | None = None) -> None:
        """Switch to ``mode`` until ``seconds`` have passed or ``count`` faults were applied."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
        with self._lock:
            self._switch(mode, seconds, count)

    def arm(self, trigger: bytes, mode: Mode, seconds: float | None = None, count: int | None = None) -> None:
        """Switch to ``mode`` (as :meth:`set`) when a request containing ``trigger`` arrives; that
        request is the first one faulted."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
        with self._lock:
            self._trigger = (trigger, mode, seconds, count)

    @contextmanager
    def faults(self, mode: Mode, seconds: float | None = None, count: int | None = None) -> Iterator[None]:
        self.set(mode, seconds, count)
        try:
            yield
        finally:
            self.set("pass")

    def wait_until_pass(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.mode != "pass" and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.set("pass")
        with suppress(OSError):
            self._listener.close()
        for link in list(self._links):
            link.abort()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (callers hold self._lock) ----------------------------------------------------
    def _switch(self, mode: str, seconds: float | None, count: int | None) -> None:
        self._mode = mode
        self._until = None if seconds is None or mode == "pass" else time.monotonic() + seconds
        self._left = None if mode == "pass" else count
        if mode != "pass":
            self._trigger = None

    def _current(self) -> str:
        if self._mode != "pass" and self._until is not None and time.monotonic() >= self._until:
            self._switch("pass", None, None)
        return self._mode

    def _take(self, data: bytes | None) -> str:
        """The mode that applies to this request chunk (``None``: a new connection); counts a fault."""
        with self._lock:
            if data is not None:
                self.stats["requests"] += 1
            mode = self._current()
            if mode == "pass" and data is not None and self._trigger and self._trigger[0] in data:
                self._switch(*self._trigger[1:])
                mode = self._mode
            if mode != "pass":
                self.stats[mode] += 1
                if self._left is not None:
                    self._left -= 1
                    if self._left <= 0:
                        self._switch("pass", None, None)
            return mode

    # -- the proxy ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.stats["connections"] += 1
            link = _Link(client)
            self._links.add(link)
            threading.Thread(target=self._serve, args=(link,), daemon=True).start()

    def _serve(self, link: _Link) -> None:
        try:
            mode = self._take(None) if self.mode in ("reset", "stall") else "pass"
            if mode == "reset":
                link.abort()
                return
            if mode == "stall":
                self._hold(link)
                return
            try:
                link.upstream = socket.create_connection(self.upstream, timeout=5)
                link.upstream.settimeout(None)
            except OSError:
                link.abort()
                return
            threading.Thread(target=self._downlink, args=(link,), daemon=True).start()
            self._uplink(link)
        finally:
            self._links.discard(link)

    def _uplink(self, link: _Link) -> None:
        """Client -> server, applying the mode to each chunk."""
        while not link.closed.is_set():
            try:
                data = link.client.recv(CHUNK)
            except OSError:
                break
            if not data:
                with suppress(OSError):
                    link.upstream.shutdown(socket.SHUT_WR)
                return
            mode = "pass" if link.cut_response else self._take(data)  # one fault per cut answer
            try:
                if mode == "reset":
                    break
                if mode == "stall":
                    self._hold(link)
                    return
                if mode == "cut_request":
                    link.upstream.sendall(data[: min(self.cut_bytes, len(data) - 1)])
                    time.sleep(0.05)  # let the server read the partial request before the RST
                    break
                if mode == "slowdown":
                    link.client.sendall(SLOWDOWN)
                    link.closed.set()  # a clean close after the answer, not a reset
                    link.client.close()
                    link.upstream.close()
                    return
                if mode == "cut_response":
                    link.cut_response = True
                link.upstream.sendall(data)
            except OSError:
                break
        link.abort()

    def _downlink(self, link: _Link) -> None:
        """Server -> client; cuts or drops the answer when the link is faulted."""
        sent = 0
        while not link.closed.is_set():
            try:
                data = link.upstream.recv(CHUNK)
            except OSError:
                break
            if not data:
                with suppress(OSError):
                    link.client.shutdown(socket.SHUT_WR)
                return
            if link.held:
                continue
            try:
                if link.cut_response:
                    link.client.sendall(data[: max(0, self.cut_bytes - sent)])
                    sent += len(data)
                    if sent >= self.cut_bytes:
                        break
                    continue
                link.client.sendall(data)
            except OSError:
                break
        link.abort()

    def _hold(self, link: _Link) -> None:
        """Stall: read and drop the client's bytes until the stall ends or the client gives up."""
        link.held = True
        link.client.settimeout(0.05)
        while not link.closed.is_set() and self.mode == "stall":
            try:
                if not link.client.recv(CHUNK):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        link.abort()


# -- a moto server that checks signatures ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_with_auth(timeout_s: float = 30.0) -> Iterator[dict[str, str]]:
    """A moto server (own process) that enforces credentials; yields the FACEOPS_S3_* settings of a
    user allowed ``s3:*``. Its first 3 requests (create the IAM user, its key, its policy) need no
    auth; after that every request must be signed by that user's key."""
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the auth-enforcing moto server did not start") from None
                time.sleep(0.1)
        iam = boto3.client(
            "iam", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="faceops")
        key = iam.create_access_key(UserName="faceops")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="faceops", PolicyName="s3", PolicyDocument=json.dumps(policy))
        yield {
            "FACEOPS_S3_ENDPOINT": f"127.0.0.1:{port}",
            "FACEOPS_S3_ACCESS_KEY": key["AccessKeyId"],
            "FACEOPS_S3_SECRET_KEY": key["SecretAccessKey"],
            "FACEOPS_S3_SECURE": "false",
            "FACEOPS_S3_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)
