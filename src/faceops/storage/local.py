"""Local-folder backend: the embedded default.

An object is two files, ``<key>`` and its ``<key>.sha256`` sidecar. Each is written to a temp file
unique to the writer (process *and* thread) and renamed into place; the two renames of one put, and a
reader's open of the pair, happen under an ``flock`` on the object's folder (no lock file), so
concurrent writers of the same key never leave one writer's data beside another's checksum.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from faceops.storage.base import CHUNK, NotFoundError, ObjectInfo, ObjectStore, StoreError, clean_key, sha256_bytes

SIDECAR = ".sha256"


class LocalStore(ObjectStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def path(self, key: str) -> Path:
        p = (self.root / clean_key(key)).resolve()
        if p != self.root and self.root not in p.parents:
            raise StoreError(f"object key {key!r} escapes the store root {self.root}")
        return p

    @staticmethod
    @contextmanager
    def _locked(folder: Path, exclusive: bool) -> Iterator[None]:
        """flock on ``folder`` itself around sidecar+data renames (held for microseconds)."""
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def put_stream(self, key: str, stream: BinaryIO, size: int, sha256: str) -> ObjectInfo:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
        side = Path(str(tmp) + SIDECAR)
        try:
            with open(tmp, "xb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            side.write_text(sha256)
            with self._locked(dest.parent, exclusive=True):
                os.replace(side, str(dest) + SIDECAR)
                os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
        return ObjectInfo(clean_key(key), size, sha256)

    def open_read(self, key: str) -> tuple[BinaryIO, str | None]:
        p = self.path(key)
        side = Path(str(p) + SIDECAR)
        try:
            with self._locked(p.parent, exclusive=False):  # the open fd keeps this version if replaced next
                if p.is_file():
                    return open(p, "rb"), (side.read_text().strip() if side.is_file() else None)
        except (FileNotFoundError, NotADirectoryError):  # no such folder
            pass
        raise NotFoundError(f"{self.url(key)} does not exist")

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.endswith(SIDECAR) or name.endswith(".tmp") or name.startswith("."):
                    continue
                rel = Path(dirpath, name).relative_to(base).as_posix()
                if rel.startswith(prefix):
                    keys.append(rel)
        yield from sorted(keys)

    def create(self, key: str, data: bytes) -> bool:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(dest.parent, exclusive=True):  # the check and the write are one step for writers
            if dest.exists():
                return False
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
            try:
                tmp.write_bytes(data)
                Path(str(dest) + SIDECAR).write_text(sha256_bytes(data))
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return True

    def delete(self, key: str) -> None:
        p = self.path(key)
        if not p.parent.is_dir():
            return
        with self._locked(p.parent, exclusive=True):
            p.unlink(missing_ok=True)
            Path(str(p) + SIDECAR).unlink(missing_ok=True)
