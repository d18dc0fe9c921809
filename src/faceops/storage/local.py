"""Local-folder backend: the embedded default. Writes are temp-file + rename, so atomic."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from faceops.storage.base import CHUNK, NotFoundError, ObjectInfo, ObjectStore, StoreError, clean_key

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

    def put_stream(self, key: str, stream: BinaryIO, size: int, sha256: str) -> ObjectInfo:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)
        Path(str(tmp) + SIDECAR).write_text(sha256)
        os.replace(str(tmp) + SIDECAR, str(dest) + SIDECAR)
        os.replace(tmp, dest)
        return ObjectInfo(clean_key(key), size, sha256)

    def open_read(self, key: str) -> tuple[BinaryIO, str | None]:
        p = self.path(key)
        if not p.is_file():
            raise NotFoundError(f"{self.url(key)} does not exist")
        side = Path(str(p) + SIDECAR)
        return open(p, "rb"), (side.read_text().strip() if side.is_file() else None)

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

    def delete(self, key: str) -> None:
        p = self.path(key)
        p.unlink(missing_ok=True)
        Path(str(p) + SIDECAR).unlink(missing_ok=True)

    def local_path(self, key: str) -> Path:
        """Direct path (no copy) for readers that memory-map shards."""
        return self.path(key)
