"""ObjectStore behaviour, the same suite over a local folder and a real HTTP S3 endpoint (moto), plus
the S3-only failure paths: multipart, dead endpoint, transient faults (a real TCP proxy that drops
or throttles connections, tests/faultproxy.py), missing bucket and rejected credentials (a moto server
with auth on)."""

from __future__ import annotations

import io
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy, moto_with_auth

from faceops.errors import FaceopsError
from faceops.storage import (
    IntegrityError,
    LocalStore,
    NotFoundError,
    ObjectStore,
    StoreError,
    open_store,
    sha256_bytes,
    sha256_file,
    split_uri,
)
from faceops.storage.s3 import PART_SIZE, RetryPolicy, S3Settings, S3Store

FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_bucket") + "/runs/r1")


def tamper_local(store: LocalStore, key: str, data: bytes) -> None:
    store.path(key).write_bytes(data)  # the sidecar keeps the old sha256


def tamper_s3(store: S3Store, key: str, data: bytes) -> None:
    """Overwrite with a raw client put that keeps the old sha256 metadata (no metadata update)."""
    name = store.prefix + key
    recorded = store.client.stat_object(store.bucket, name).metadata["x-amz-meta-sha256"]
    store.client.put_object(store.bucket, name, io.BytesIO(data), len(data), metadata={"sha256": recorded})


TAMPER: dict[type, Callable[..., None]] = {LocalStore: tamper_local, S3Store: tamper_s3}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def proxy_factory(moto_s3: dict[str, str]) -> Iterator[Callable[[], FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make() -> FaultProxy:
        proxies.append(FaultProxy(moto_s3["FACEOPS_S3_ENDPOINT"]))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def settings_for(env: dict[str, str], endpoint: str) -> S3Settings:
    return S3Settings.from_env({**env, "FACEOPS_S3_ENDPOINT": endpoint})


def assert_no_secret(text: str, env: dict[str, str]) -> None:
    for name in ("FACEOPS_S3_SECRET_KEY", "FACEOPS_S3_ACCESS_KEY"):
        assert env[name] not in text, f"{name} leaked"


# -- the shared behavioural suite ----------------------------------------------------------------
def test_put_get_exists_delete(store: ObjectStore) -> None:
    info = store.put_bytes("a/b.bin", b"hello")
    assert (info.key, info.size, info.sha256) == ("a/b.bin", 5, sha256_bytes(b"hello"))
    assert store.exists("a/b.bin") and not store.exists("a/c.bin")
    assert store.get_bytes("a/b.bin") == b"hello"
    assert store.get_bytes("a/b.bin", sha256=info.sha256) == b"hello"
    store.put_bytes("a/b.bin", b"replaced")
    assert store.get_bytes("a/b.bin") == b"replaced"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # deleting a missing key is not an error


def test_list_is_sorted_recursive_and_relative(store: ObjectStore) -> None:
    for key in ("b/2", "a/sub/3", "c", "a/1"):
        store.put_bytes(key, key.encode())
    assert list(store.list()) == ["a/1", "a/sub/3", "b/2", "c"]
    assert list(store.list("a/")) == ["a/1", "a/sub/3"]
    assert list(store.list("zzz")) == []


def test_put_file_get_file_roundtrip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(0).randbytes(100_000))
    info = store.put_file("d/src.bin", src)
    assert info.sha256 == sha256_file(src)
    out = store.get_file("d/src.bin", tmp_path / "out" / "copy.bin", sha256=info.sha256)
    assert out.read_bytes() == src.read_bytes()


def test_tampered_object_is_an_integrity_error(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("m.json", b'{"ok": true}')
    TAMPER[type(store)](store, "m.json", b'{"ok": false}')
    with pytest.raises(IntegrityError, match="checksum mismatch") as err:
        store.get_bytes("m.json")
    assert store.url("m.json") in str(err.value)

    dest = tmp_path / "dl" / "m.json"
    dest.parent.mkdir()
    dest.write_text("previous")
    with pytest.raises(IntegrityError):
        store.get_file("m.json", dest)
    assert dest.read_text() == "previous", "a failed download must not replace the destination"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.json"], "partial file left behind"


def test_expected_sha256_from_the_caller_wins(store: ObjectStore) -> None:
    store.put_bytes("x", b"data")
    with pytest.raises(IntegrityError, match=store.url("x")):
        store.get_bytes("x", sha256=sha256_bytes(b"other"))


def test_missing_key_is_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        store.get_bytes("nope")
    with pytest.raises(FileNotFoundError):  # NotFoundError is also a FileNotFoundError
        store.get_file("nope/deeper", tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("key", ["../outside", "/etc/passwd", "a/../../outside", "", ".", "a\\b"])
def test_key_escaping_the_root_is_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(StoreError):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError):
        store.get_bytes(key)


def test_create_stores_only_when_absent_and_one_racer_wins(store: ObjectStore) -> None:
    """The publish lock's primitive: on S3 a conditional PUT (If-None-Match: *) the server refuses."""
    assert store.create("locks/a", b"first")
    assert not store.create("locks/a", b"second")
    assert store.get_bytes("locks/a") == b"first"
    results: list[bool] = []
    threads = [threading.Thread(target=lambda i=i: results.append(store.create("locks/b", f"{i}".encode())))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    store.delete("locks/a")
    assert store.create("locks/a", b"again")


def test_url_names_the_object(store: ObjectStore) -> None:
    assert store.url("a/./b") == store.uri.rstrip("/") + "/a/b"


def test_local_concurrent_writers_of_one_key_never_tear(tmp_path: Path) -> None:
    """8 threads rewrite one key with different content while a reader reads it: every read matches
    its checksum (data and sidecar move together) and no temp file is left."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("k", b"first")
    errors: list[str] = []
    done = threading.Event()

    def writer(w: int) -> None:
        for i in range(25):
            try:
                store.put_bytes("k", f"writer {w} round {i} ".encode() * (1 + (w * 7 + i) % 50))
            except Exception as exc:
                errors.append(f"put: {type(exc).__name__}: {exc}")

    def reader() -> None:
        while not done.is_set():
            try:
                store.get_bytes("k")
            except Exception as exc:
                errors.append(f"get: {type(exc).__name__}: {exc}")

    watch = threading.Thread(target=reader)
    watch.start()
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    watch.join()
    assert errors == [], errors[:3]
    assert store.get_bytes("k").startswith(b"writer ")
    assert sorted(p.name for p in store.root.iterdir()) == ["k", "k.sha256"]


# -- S3 specifics ----------------------------------------------------------------------------------
def test_s3_uri_layout_and_split_uri(s3_bucket: str) -> None:
    store = open_store(f"{s3_bucket}/runs/r1/")
    assert isinstance(store, S3Store) and store.uri == f"{s3_bucket}/runs/r1"
    assert store.url("m/a.bin") == f"{s3_bucket}/runs/r1/m/a.bin"
    store.put_bytes("m/a.bin", b"A")
    sibling = open_store(f"{s3_bucket}/runs/r1x")  # shares a string prefix, not a folder
    sibling.put_bytes("other", b"B")
    assert list(store.list()) == ["m/a.bin"]
    assert list(open_store(s3_bucket).list()) == ["runs/r1/m/a.bin", "runs/r1x/other"]
    parent, name = split_uri(f"{s3_bucket}/runs/r1/m/a.bin")
    assert (parent.uri, name, parent.get_bytes(name)) == (f"{s3_bucket}/runs/r1/m", "a.bin", b"A")


def test_s3_sha256_is_object_metadata(s3_bucket: str) -> None:
    store = S3Store.from_uri(s3_bucket)
    store.put_bytes("k", b"payload")
    stat = store.client.stat_object(store.bucket, "k")
    assert stat.metadata["x-amz-meta-sha256"] == sha256_bytes(b"payload")


def test_s3_wrong_metadata_is_an_integrity_error(s3_bucket: str) -> None:
    store = S3Store.from_uri(s3_bucket)
    store.client.put_object(store.bucket, "k", io.BytesIO(b"abc"), 3, metadata={"sha256": "0" * 64})
    with pytest.raises(IntegrityError, match=f"{s3_bucket}/k"):
        store.get_bytes("k")


def test_s3_multipart_object(s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(random.Random(1).randbytes(PART_SIZE + 4 * 2**20))  # 20 MiB: two parts
    store = S3Store.from_uri(s3_bucket + "/ckpt")
    info = store.put_file("big.bin", src)
    assert store.client.stat_object(store.bucket, "ckpt/big.bin").etag.endswith("-2"), "not multipart"
    out = store.get_file("big.bin", tmp_path / "back.bin")
    assert sha256_file(out) == info.sha256 == sha256_file(src)


def test_s3_endpoint_down_fails_fast_naming_the_endpoint(
    s3_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = f"127.0.0.1:{closed_port()}"
    store = S3Store.from_uri("s3://somebucket/p", settings=settings_for(s3_env, endpoint), retry=FAST)
    start = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.get_bytes("k")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert endpoint in message and "cannot be reached" in message and "after 4 attempts" in message
    assert "FACEOPS_S3_ENDPOINT" in message
    assert isinstance(err.value, FaceopsError)
    assert "retry 3/3" in caplog.text
    assert_no_secret(message + caplog.text, s3_env)


def test_s3_hung_endpoint_times_out(s3_env: dict[str, str]) -> None:
    """A server that accepts connections but never answers: the read timeout ends each try."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        policy = RetryPolicy(attempts=2, base_delay=0.01, read_timeout=0.3)
        store = S3Store.from_uri("s3://somebucket", settings=settings_for(s3_env, endpoint), retry=policy)
        start = time.monotonic()
        with pytest.raises(StoreError, match=f"{endpoint} did not answer in time.*after 2 attempts"):
            store.exists("k")
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("mode", ["reset", "slowdown"])
def test_s3_transient_failures_are_retried(
    mode: str, s3_bucket: str, s3_env: dict[str, str], proxy_factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = proxy_factory()
    proxy.set(mode, count=2)
    store = S3Store.from_uri(s3_bucket, settings=settings_for(s3_env, proxy.endpoint), retry=FAST)
    store.put_bytes("through/proxy", b"survived")
    assert proxy.stats[mode] == 2
    assert store.get_bytes("through/proxy") == b"survived"
    assert caplog.text.count("transient") == 2
    assert_no_secret(caplog.text, s3_env)


def test_s3_get_cut_mid_body_is_read_again(s3_bucket: str, s3_env: dict[str, str], proxy_factory,
                                           tmp_path: Path) -> None:
    """An answer that breaks mid-body is a network fault, retried like one (not an IntegrityError)."""
    proxy = proxy_factory()
    store = S3Store.from_uri(s3_bucket, settings=settings_for(s3_env, proxy.endpoint), retry=FAST)
    payload = random.Random(2).randbytes(300_000)
    store.put_bytes("big", payload)
    proxy.set("cut_response", count=1)
    assert store.get_bytes("big") == payload
    proxy.set("cut_response", count=2)
    assert store.get_file("big", tmp_path / "big").read_bytes() == payload
    assert proxy.stats["cut_response"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"], "partial download left behind"
    proxy.set("cut_response")  # for good: a clear error naming the object, no partial file
    with pytest.raises(StoreError, match=rf"dropped the connection.*after 4 attempts.*{s3_bucket}/big"):
        store.get_file("big", tmp_path / "again")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".again*"))


def test_s3_retries_give_up_with_a_clear_error(s3_bucket: str, s3_env: dict[str, str], proxy_factory) -> None:
    proxy = proxy_factory()
    proxy.set("slowdown")
    store = S3Store.from_uri(s3_bucket, settings=settings_for(s3_env, proxy.endpoint), retry=FAST)
    with pytest.raises(StoreError, match="after 4 attempts.*SlowDown"):
        store.exists("k")
    assert proxy.stats["slowdown"] == FAST.attempts


def test_s3_unrewindable_stream_is_not_retried(s3_bucket: str, s3_env: dict[str, str], proxy_factory) -> None:
    """Bytes already sent cannot be re-sent from a pipe: one attempt, then a clear error."""
    proxy = proxy_factory()
    store = S3Store.from_uri(s3_bucket, settings=settings_for(s3_env, proxy.endpoint), retry=FAST)
    assert not store.exists("warm")  # bucket checked through the healthy proxy
    proxy.set("reset", count=1)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"abc")
    os.close(write_fd)
    with open(read_fd, "rb", buffering=0) as pipe, pytest.raises(StoreError, match="after 1 attempt"):
        store.put_stream("k", pipe, 3, sha256_bytes(b"abc"))


def test_s3_missing_bucket(s3_env: dict[str, str]) -> None:
    uri = f"s3://missing-{uuid.uuid4().hex[:12]}/p"
    with pytest.raises(StoreError, match=r"bucket 'missing-\w+' does not exist.*create_bucket=True"):
        open_store(uri).exists("k")  # an error, not a silent False
    store = S3Store.from_uri(uri, create_bucket=True)
    store.put_bytes("k", b"v")
    assert open_store(uri).get_bytes("k") == b"v"


# -- credentials: a second moto server with authentication enforced --------------------------------
@pytest.fixture(scope="module")
def moto_auth() -> Iterator[dict[str, str]]:
    """A moto server (own process) that enforces credentials (see :func:`faultproxy.moto_with_auth`)."""
    pytest.importorskip("boto3", reason="boto3 (a moto dependency) is needed to create a user")
    with moto_with_auth() as env:
        yield env


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"FACEOPS_S3_SECRET_KEY": "wrong-secret-value"}, "SignatureDoesNotMatch"),
        ({"FACEOPS_S3_ACCESS_KEY": "AKIAUNKNOWNKEY000000"}, "InvalidAccessKeyId"),
    ],
)
def test_s3_rejected_credentials(
    moto_auth: dict[str, str], override: dict[str, str], code: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    uri = f"s3://auth-{uuid.uuid4().hex[:12]}"
    good = S3Store.from_uri(uri, settings=S3Settings.from_env(moto_auth), create_bucket=True)
    good.put_bytes("k", b"v")  # control: the right key is accepted by this server
    bad = S3Store.from_uri(uri, settings=S3Settings.from_env({**moto_auth, **override}), retry=FAST)
    with pytest.raises(StoreError) as err:
        bad.get_bytes("k")
    message = str(err.value)
    assert code in message and "check FACEOPS_S3_ACCESS_KEY/FACEOPS_S3_SECRET_KEY" in message
    seen = message + caplog.text + repr(bad) + repr(bad.settings)
    secrets = (moto_auth["FACEOPS_S3_SECRET_KEY"], moto_auth["FACEOPS_S3_ACCESS_KEY"], *override.values())
    assert not [secret for secret in secrets if secret in seen], "a credential leaked"


# -- settings and policy: no server ----------------------------------------------------------------
def test_settings_from_env() -> None:
    base = {"FACEOPS_S3_ENDPOINT": "minio:9000", "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "sk"}
    s = S3Settings.from_env(base)
    assert (s.endpoint, s.access_key, s.secret_key) == ("minio:9000", "ak", "sk")
    assert s.secure and s.region is None
    own = S3Settings.from_env({**base, "FACEOPS_S3_ACCESS_KEY": "fk", "FACEOPS_S3_SECRET_KEY": "fs"})
    assert (own.access_key, own.secret_key) == ("fk", "fs")
    assert not S3Settings.from_env({**base, "FACEOPS_S3_SECURE": "False"}).secure
    plain = S3Settings.from_env({**base, "FACEOPS_S3_ENDPOINT": "http://minio:9000/"})
    assert (plain.endpoint, plain.secure, plain.endpoint_url) == ("minio:9000", False, "http://minio:9000")
    assert "sk" not in repr(s) and "ak" not in repr(s)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({}, "FACEOPS_S3_ENDPOINT is not set"),
        ({"FACEOPS_S3_ENDPOINT": "m:9000"}, "FACEOPS_S3_ACCESS_KEY and FACEOPS_S3_SECRET_KEY"),
        ({"FACEOPS_S3_ENDPOINT": "m:9000", "FACEOPS_S3_ACCESS_KEY": "only-the-key"}, "credentials missing"),
        ({"FACEOPS_S3_ENDPOINT": "m:9000", "FACEOPS_S3_SECURE": "maybe"}, "FACEOPS_S3_SECURE='maybe'"),
        ({"FACEOPS_S3_ENDPOINT": "ftp://m:9000"}, "scheme 'ftp'"),
        ({"FACEOPS_S3_ENDPOINT": "m:9000/minio"}, "not host:port"),
    ],
)
def test_settings_errors(env: dict[str, str], match: str) -> None:
    with pytest.raises(StoreError, match=match) as err:
        S3Settings.from_env(env)
    assert "only-the-key" not in str(err.value)


@pytest.mark.parametrize("uri", ["s3://Bad_Bucket/x", "s3://ab", "s3://", "s3://bucket/../x"])
def test_bad_s3_uri(uri: str) -> None:
    with pytest.raises(StoreError):
        S3Store.from_uri(uri, settings=S3Settings("m:9000", "a", "b"))


def test_retry_policy_from_env() -> None:
    assert RetryPolicy.from_env({}) == RetryPolicy()
    policy = RetryPolicy.from_env({"FACEOPS_S3_ATTEMPTS": "2", "FACEOPS_S3_CONNECT_TIMEOUT": "0.5",
                                   "FACEOPS_S3_READ_TIMEOUT": "3"})
    assert (policy.attempts, policy.connect_timeout, policy.read_timeout) == (2, 0.5, 3.0)
    with pytest.raises(StoreError, match="FACEOPS_S3_ATTEMPTS='two' is not an integer"):
        RetryPolicy.from_env({"FACEOPS_S3_ATTEMPTS": "two"})
    with pytest.raises(StoreError, match="timeouts must be > 0.*FACEOPS_S3_"):
        RetryPolicy.from_env({"FACEOPS_S3_READ_TIMEOUT": "0"})


def test_retry_policy_backoff() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert sum(policy.delay(n) for n in range(1, policy.attempts)) <= 8, "default gives up within ~8 s"
    with pytest.raises(StoreError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(StoreError, match="timeouts"):
        RetryPolicy(read_timeout=0)
