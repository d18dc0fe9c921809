"""The one object-store interface every stage uses.

Keys are ``/``-separated relative paths. Every object carries its sha256 (recorded at put,
verified at get), so a tampered or truncated object is an error, never silently read.
"""

from __future__ import annotations

import hashlib
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from faceops.errors import FaceopsError

CHUNK = 8 * 1024 * 1024
T = TypeVar("T")


class StoreError(FaceopsError, RuntimeError):
    """A store operation failed; the message names the URI and what to do."""


class IntegrityError(StoreError):
    """An object's content does not match its recorded sha256."""


class NotFoundError(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def clean_key(key: str) -> str:
    """Normalise a key and refuse one that escapes the store's root (``..``, absolute)."""
    if not key or "\\" in key or "\x00" in key:
        raise StoreError(f"invalid object key {key!r}")
    norm = posixpath.normpath(key)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise StoreError(f"object key {key!r} escapes the store root")
    return norm


class ObjectStore(ABC):
    """put/get/exists/list/delete with sha256 on every object."""

    uri: str

    @abstractmethod
    def put_stream(self, key: str, stream: BinaryIO, size: int, sha256: str) -> ObjectInfo:
        """Store ``size`` bytes from ``stream`` (whose sha256 the caller computed)."""

    @abstractmethod
    def open_read(self, key: str) -> tuple[BinaryIO, str | None]:
        """A readable stream of the object and its recorded sha256 (None if unknown)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix``, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` does not exist yet, atomically; False when it does (a lock or a
        claim: of two writers exactly one gets True)."""

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{clean_key(key)}"

    # -- conveniences built on the primitives -------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        import io

        return self.put_stream(key, io.BytesIO(data), len(data), sha256_bytes(data))

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        path = Path(path)
        digest = sha256_file(path)
        with open(path, "rb") as f:
            return self.put_stream(key, f, path.stat().st_size, digest)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        def attempt() -> tuple[bytes, str | None]:
            stream, recorded = self._open_once(key)
            with stream:
                return stream.read(), recorded

        data, recorded = self._retried("get", self.url(key), attempt)
        self._verify(key, sha256_bytes(data), sha256 or recorded)
        return data

    def get_file(self, key: str, dest: str | Path, sha256: str | None = None) -> Path:
        """Download to ``dest`` atomically, verifying the checksum before the rename."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")

        def attempt() -> tuple[str, str | None]:
            h = hashlib.sha256()
            stream, recorded = self._open_once(key)
            with stream, open(tmp, "wb") as out:
                for chunk in iter(lambda: stream.read(CHUNK), b""):
                    h.update(chunk)
                    out.write(chunk)
            return h.hexdigest(), recorded

        try:
            actual, recorded = self._retried("get", self.url(key), attempt)
            self._verify(key, actual, sha256 or recorded)
        except BaseException:  # never leave a partial download behind
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(dest)
        return dest

    # -- hooks for backends whose reads can fail mid-stream ---------------------------------------
    def _open_once(self, key: str) -> tuple[BinaryIO, str | None]:
        """One attempt at opening ``key``; a backend that retries overrides it with a raw open."""
        return self.open_read(key)

    def _retried(self, action: str, target: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (e.g. one whole read: open + body) under the backend's retry policy, failures
        as :class:`StoreError` naming ``target``; a local store has nothing to retry: once."""
        return fn()

    def _verify(self, key: str, actual: str, expected: str | None) -> None:
        if expected and actual != expected:
            raise IntegrityError(
                f"checksum mismatch for {self.url(key)}: expected sha256 {expected[:12]}…, got "
                f"{actual[:12]}… — the object was modified or truncated; re-ingest or restore it"
            )
