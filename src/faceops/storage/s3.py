"""S3/MinIO backend (``s3://bucket/prefix``) through the ``minio`` client.

Endpoint and credentials come only from the environment (or a Kubernetes Secret mapped to it),
never from code, configs or logs:

==============================  ==================================================================
``FACEOPS_S3_ENDPOINT``         ``host:port`` of the MinIO/S3 server (required), e.g.
                                ``minio.faceops.svc:9000``; an ``http://``/``https://`` prefix also
                                sets ``FACEOPS_S3_SECURE``
``FACEOPS_S3_ACCESS_KEY``       access key (falls back to ``AWS_ACCESS_KEY_ID``)
``FACEOPS_S3_SECRET_KEY``       secret key (falls back to ``AWS_SECRET_ACCESS_KEY``)
``FACEOPS_S3_SECURE``           ``true`` (default, HTTPS) or ``false`` (plain HTTP, e.g. in-cluster MinIO)
``FACEOPS_S3_REGION``           bucket region (optional; MinIO's default is ``us-east-1``, unset = ask
                                the server)
``SSL_CERT_FILE``               CA bundle for a MinIO with a private certificate (optional)
``FACEOPS_S3_ATTEMPTS``         tries of one operation before giving up (default 5, i.e. 4 retries)
``FACEOPS_S3_CONNECT_TIMEOUT``  seconds to open a connection (default 5)
``FACEOPS_S3_READ_TIMEOUT``     seconds of silence on an open connection before a try is abandoned
                                (default 30): what bounds a stalled endpoint
==============================  ==================================================================

Every object carries its sha256 as user metadata (``x-amz-meta-sha256``), verified on every read
by :class:`~faceops.storage.base.ObjectStore`. Objects above 16 MiB go up as multipart uploads.

Transient failures (refused or reset connections, timeouts, HTTP 5xx, ``SlowDown``) are retried by
:class:`RetryPolicy` with exponential backoff (:func:`faceops.retry.retry_call`); urllib3's own
retries are switched off and its timeouts kept short so that a dead endpoint fails in seconds, with a
message that names the endpoint (never the credentials). Every operation is idempotent, so retrying is safe: a PUT is
re-sent whole (an object appears only once its complete body arrived: a cut-off PUT publishes
nothing), and a GET that breaks mid-body is read again from the start.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import BinaryIO, ClassVar, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from faceops.retry import Backoff, retry_call
from faceops.storage.base import NotFoundError, ObjectInfo, ObjectStore, StoreError, clean_key

log = logging.getLogger(__name__)

PART_SIZE = 16 * 1024 * 1024  # multipart above this size; also the part size
SHA256_META = "sha256"  # stored as x-amz-meta-sha256
SHA256_HEADER = "x-amz-meta-sha256"

TRANSIENT_S3_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"})
CREDENTIAL_S3_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch"})
MISSING_KEY_S3_CODES = frozenset({"NoSuchKey", "ResourceNotFound"})
TRANSIENT_NETWORK_ERRORS = (
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.TimeoutError,
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.MaxRetryError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
TRUE_WORDS, FALSE_WORDS = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one try may wait and how transient failures are retried: ``attempts`` tries,
    sleeping base·2^n seconds (capped) between them. The defaults give up on a dead endpoint in
    about 8 s and on a hung one (accepts, never answers) in about 2.5 min."""

    attempts: int = 5  # total tries of one operation (1 = no retry)
    base_delay: float = 0.5  # seconds before the first retry; doubles each retry
    max_delay: float = 8.0  # cap on one sleep, seconds
    connect_timeout: float = 5.0  # seconds to open a TCP/TLS connection
    read_timeout: float = 30.0  # seconds of silence on an open connection (not the whole transfer)

    def __post_init__(self) -> None:
        if self.attempts < 1 or min(self.base_delay, self.max_delay) < 0:
            raise StoreError(f"invalid {self}: attempts must be >= 1 and delays >= 0")
        if min(self.connect_timeout, self.read_timeout) <= 0:
            raise StoreError(f"invalid {self}: timeouts must be > 0")

    @property
    def backoff(self) -> Backoff:
        """The sleeps between tries, as :func:`faceops.retry.retry_call` takes them."""
        return Backoff(self.attempts, self.base_delay, self.max_delay)

    def delay(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based)."""
        return self.backoff.delay(retry)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryPolicy:
        """The defaults, overridden by ``FACEOPS_S3_ATTEMPTS`` / ``_CONNECT_TIMEOUT`` / ``_READ_TIMEOUT``."""
        env = os.environ if env is None else env
        fields = {"attempts": ("FACEOPS_S3_ATTEMPTS", int), "connect_timeout": ("FACEOPS_S3_CONNECT_TIMEOUT", float),
                  "read_timeout": ("FACEOPS_S3_READ_TIMEOUT", float)}
        values: dict[str, float] = {}
        for name, (var, kind) in fields.items():
            text = env.get(var, "").strip()
            if not text:
                continue
            try:
                values[name] = kind(text)
            except ValueError:
                raise StoreError(f"{var}={text!r} is not a{'n integer' if kind is int else ' number'}") from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except StoreError as exc:
            raise StoreError(f"{exc} (from FACEOPS_S3_ATTEMPTS / FACEOPS_S3_*_TIMEOUT)") from None


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 server is and how to sign requests; built from the environment by ``from_env``."""

    endpoint: str  # host:port, no scheme
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    secure: bool = True  # HTTPS
    region: str | None = None  # None = ask the server (GetBucketLocation)

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        endpoint = env.get("FACEOPS_S3_ENDPOINT", "").strip()
        if not endpoint:
            raise StoreError(
                "FACEOPS_S3_ENDPOINT is not set: set it to the host:port of the MinIO/S3 server "
                "(e.g. minio.faceops.svc:9000) to use s3:// URIs"
            )
        secure = _parse_bool("FACEOPS_S3_SECURE", env.get("FACEOPS_S3_SECURE", "true"))
        if "://" in endpoint:
            scheme, _, endpoint = endpoint.partition("://")
            if scheme not in ("http", "https"):
                raise StoreError(f"FACEOPS_S3_ENDPOINT has scheme {scheme!r}: use host:port, http:// or https://")
            secure = scheme == "https"
        endpoint = endpoint.rstrip("/")
        if not endpoint or "/" in endpoint:
            raise StoreError(f"FACEOPS_S3_ENDPOINT={endpoint!r} is not host:port (no path allowed)")
        access = env.get("FACEOPS_S3_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID")
        secret = env.get("FACEOPS_S3_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise StoreError(
                "S3 credentials missing: set FACEOPS_S3_ACCESS_KEY and FACEOPS_S3_SECRET_KEY "
                "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), e.g. from the Kubernetes Secret"
            )
        return cls(endpoint, access, secret, secure, env.get("FACEOPS_S3_REGION") or None)


def _parse_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise StoreError(f"{name}={value!r} is not a boolean: use true or false")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b/"); the prefix is empty or ends with ``/``."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise StoreError(
            f"invalid bucket name {bucket!r} in {uri!r}: 3-63 lowercase letters, digits, '.' or '-'"
        )
    prefix = prefix.strip("/")
    return bucket, (clean_key(prefix) + "/" if prefix else "")


def make_http_client(policy: RetryPolicy) -> urllib3.PoolManager:
    """Short timeouts and no urllib3 retries: :class:`RetryPolicy` alone decides."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=policy.connect_timeout, read=policy.read_timeout),
        retries=False,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``; the bucket is checked (or created) on first use."""

    #: (endpoint, bucket, credentials digest) checked in this process: a new key is probed again, so
    #: wrong credentials get the listing's precise error code rather than a HEAD's bare 403
    _ready_buckets: ClassVar[set[tuple[str, str, str]]] = set()

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        settings: S3Settings | None = None,
        retry: RetryPolicy | None = None,
        create_bucket: bool = False,
    ):
        self.bucket, self.prefix = parse_s3_uri(f"s3://{bucket}/{prefix}")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.settings = settings or S3Settings.from_env()
        self.retry = retry or RetryPolicy.from_env()
        self.create_bucket = create_bucket
        self.client = Minio(
            self.settings.endpoint,
            access_key=self.settings.access_key,
            secret_key=self.settings.secret_key,
            secure=self.settings.secure,
            region=self.settings.region,
            http_client=make_http_client(self.retry),
        )

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        settings: S3Settings | None = None,
        retry: RetryPolicy | None = None,
        create_bucket: bool = False,
    ) -> S3Store:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket, prefix, settings=settings, retry=retry, create_bucket=create_bucket)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.settings.endpoint_url!r})"

    # -- ObjectStore primitives ---------------------------------------------------------------
    def put_stream(self, key: str, stream: BinaryIO, size: int, sha256: str) -> ObjectInfo:
        name = self._object_name(key)
        self._ensure_bucket()
        seekable = getattr(stream, "seekable", lambda: False)()
        start = stream.tell() if seekable else 0

        def upload() -> None:
            if seekable:
                stream.seek(start)  # a retry sends the whole object again
            self.client.put_object(
                self.bucket, name, stream, size, metadata={SHA256_META: sha256}, part_size=PART_SIZE
            )

        policy = self.retry if seekable else replace(self.retry, attempts=1)  # can't rewind: no retry
        self._retried("put", self.url(key), upload, policy)
        return ObjectInfo(clean_key(key), size, sha256)

    def open_read(self, key: str) -> tuple[BinaryIO, str | None]:
        """The object as a stream (opening is retried; a failure later, mid-body, is a StoreError:
        :meth:`get_bytes` / :meth:`get_file` retry the whole read instead)."""
        response = self._retried("get", self.url(key), lambda: self._get(key))
        return cast(BinaryIO, _ObjectBody(response, self.url(key))), response.headers.get(SHA256_HEADER)

    def _open_once(self, key: str) -> tuple[BinaryIO, str | None]:
        response = self._get(key)
        return cast(BinaryIO, _ObjectBody(response, self.url(key), raw=True)), response.headers.get(SHA256_HEADER)

    def _get(self, key: str) -> urllib3.BaseHTTPResponse:
        name = self._object_name(key)
        self._ensure_bucket()
        return self.client.get_object(self.bucket, name)

    def exists(self, key: str) -> bool:
        name = self._object_name(key)
        self._ensure_bucket()
        try:
            self._retried("stat", self.url(key), lambda: self.client.stat_object(self.bucket, name))
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix.startswith("/") or "\\" in prefix or ".." in prefix.split("/"):
            raise StoreError(f"invalid list prefix {prefix!r} for {self.uri}")
        self._ensure_bucket()
        full = self.prefix + prefix

        def names() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=full, recursive=True)
            return [o.object_name for o in objects if not o.is_dir and o.object_name]

        yield from sorted(n[len(self.prefix):] for n in self._retried("list", f"{self.uri}/{prefix}", names))

    def create(self, key: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``, honoured by AWS S3 and MinIO): the server refuses
        it with 412 when the key exists. minio-py's public put_object cannot send that header (it turns
        unknown headers into user metadata), hence its low-level PutObject. A retried PUT whose first
        attempt landed gets 412 too: the object then holds ``data``, which counts as created."""
        name = self._object_name(key)
        self._ensure_bucket()
        headers = {"If-None-Match": "*", SHA256_HEADER: hashlib.sha256(data).hexdigest()}

        def put() -> bool:
            try:
                self.client._put_object(self.bucket, name, data, headers=headers)
            except S3Error as exc:
                if exc.code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                try:
                    return self.get_bytes(key) == data
                except NotFoundError:  # removed since: someone else's, now gone; the caller tries again
                    return False
            return True

        return self._retried("create", self.url(key), put)

    def delete(self, key: str) -> None:
        name = self._object_name(key)
        self._ensure_bucket()
        self._retried("delete", self.url(key), lambda: self.client.remove_object(self.bucket, name))

    # -- internals ------------------------------------------------------------------------------
    def _object_name(self, key: str) -> str:
        return self.prefix + clean_key(key)

    def _ensure_bucket(self) -> None:
        """One listing per (endpoint, bucket) and process: turns a missing bucket or bad credentials
        into a clear error up front (HEAD requests carry no error code to tell them apart)."""
        ident = self._bucket_ident()
        if ident in self._ready_buckets:
            return

        def probe() -> None:
            next(iter(self.client.list_objects(self.bucket, prefix=self.prefix)), None)

        try:
            self._retried("open", self.uri, probe)
        except _MissingBucket:
            if not self.create_bucket:
                raise
            self._retried("create bucket", f"s3://{self.bucket}", self._make_bucket)
        self._ready_buckets.add(ident)

    def _bucket_ident(self) -> tuple[str, str, str]:
        secret = f"{self.settings.access_key}\0{self.settings.secret_key}".encode()
        return self.settings.endpoint_url, self.bucket, hashlib.sha256(secret).hexdigest()

    def _make_bucket(self) -> None:
        try:
            self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code != "BucketAlreadyOwnedByYou":  # created concurrently: fine
                raise

    def _retried(self, action: str, target: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
        """Run ``fn`` under the retry policy; every failure leaves as a :class:`StoreError`."""
        policy = policy or self.retry

        def log_retry(exc: Exception, retry: int, pause: float) -> None:
            log.warning(
                "%s %s at %s: transient %s, retry %d/%d in %.2fs", action, target,
                self.settings.endpoint_url, _brief(exc), retry, policy.attempts - 1, pause,
            )

        def give_up(exc: Exception, attempts: int) -> None:
            if not isinstance(exc, StoreError):
                raise self._translate(exc, action, target, attempts) from exc

        return retry_call(fn, policy.backoff, retry_on=is_transient, on_retry=log_retry, give_up=give_up)

    def _translate(self, exc: Exception, action: str, target: str, attempts: int) -> StoreError:
        endpoint = self.settings.endpoint_url
        what = f"{action} {target}"
        tries = f" after {attempts} attempt{'s' if attempts > 1 else ''}"
        if _is_network(exc):
            failure = ("did not answer in time" if _is_silence(exc) else
                       "dropped the connection" if _is_dropped(exc) else "cannot be reached")
            return StoreError(
                f"the S3 endpoint {endpoint} {failure} ({_brief(exc)}){tries} while trying to {what}: "
                "check FACEOPS_S3_ENDPOINT / FACEOPS_S3_SECURE and that the server is running"
            )
        code = exc.code if isinstance(exc, S3Error) else None
        if code in MISSING_KEY_S3_CODES:
            return NotFoundError(f"{target} does not exist (endpoint {endpoint})")
        if code == "NoSuchBucket":
            self._ready_buckets.discard(self._bucket_ident())
            return _MissingBucket(
                f"bucket {self.bucket!r} does not exist at {endpoint}: create it (e.g. "
                f"`mc mb <alias>/{self.bucket}`; on the cluster add it to the chart's s3.buckets) or open "
                "the store with create_bucket=True"
            )
        if code in CREDENTIAL_S3_CODES:
            return StoreError(
                f"{endpoint} rejected the credentials ({code}) while trying to {what}: check "
                "FACEOPS_S3_ACCESS_KEY/FACEOPS_S3_SECRET_KEY (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        if code == "AccessDenied":
            return StoreError(
                f"access denied by {endpoint} while trying to {what}: check FACEOPS_S3_ACCESS_KEY/"
                f"FACEOPS_S3_SECRET_KEY and that this user's policy allows it on bucket {self.bucket!r}"
            )
        return StoreError(f"S3 request failed{tries} while trying to {what} at {endpoint}: {_brief(exc)}")


class _MissingBucket(StoreError):
    """The bucket does not exist (internal: lets ``_ensure_bucket`` offer to create it)."""


class _ObjectBody(io.IOBase):
    """A GET response as a read-only stream that returns its connection to the pool on close."""

    def __init__(self, response: urllib3.BaseHTTPResponse, url: str, raw: bool = False):
        self._response = response
        self._url = url
        self._raw = raw  # let network errors through to a caller that retries the whole read

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._response.read(None if size is None or size < 0 else size)
        except TRANSIENT_NETWORK_ERRORS as exc:
            if self._raw:
                raise
            raise StoreError(f"reading {self._url} failed mid-stream ({_brief(exc)}): try again") from exc

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


def _is_network(exc: Exception) -> bool:
    return isinstance(exc, TRANSIENT_NETWORK_ERRORS)


def _is_dropped(exc: Exception) -> bool:
    """The connection was open and then reset or closed mid-request (not refused)."""
    return isinstance(exc, urllib3.exceptions.ProtocolError | http.client.HTTPException | ConnectionResetError)


def _is_silence(exc: Exception) -> bool:
    """A read timeout: the server accepted the connection but did not answer."""
    return isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError)


def is_transient(exc: Exception) -> bool:
    """Worth retrying: the network failed or the server said it is overloaded / broken for now."""
    if _is_network(exc):
        return True
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_S3_CODES or exc.response.status >= 500
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, InvalidResponseError):  # e.g. an HTML 502 page from a proxy
        return getattr(exc, "_code", 0) >= 500
    return False


def _brief(exc: Exception) -> str:
    """Exception class and message, one line, bounded (server messages never hold our secret)."""
    text = f"{exc.code}: {exc.message}" if isinstance(exc, S3Error) else f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 240 else text[:237] + "..."
