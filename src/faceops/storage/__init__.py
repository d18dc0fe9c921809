"""One store interface (:class:`ObjectStore`), two backends: a local folder and S3/MinIO.

``open_store(uri)`` picks the backend from the URI: ``s3://bucket[/prefix]`` -> MinIO/S3 (endpoint
and credentials from the environment, see :mod:`faceops.storage.s3`), anything else
(``file:///…`` or a plain path) -> a local folder.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from faceops.storage.base import (
    IntegrityError,
    NotFoundError,
    ObjectInfo,
    ObjectStore,
    StoreError,
    sha256_bytes,
    sha256_file,
)
from faceops.storage.local import LocalStore

__all__ = [
    "IntegrityError", "NotFoundError", "ObjectInfo", "ObjectStore", "StoreError", "LocalStore",
    "open_store", "split_uri", "sha256_bytes", "sha256_file",
]


def open_store(uri: str) -> ObjectStore:
    """The store rooted at ``uri``."""
    if uri.startswith("s3://"):
        from faceops.storage.s3 import S3Store

        return S3Store.from_uri(uri)
    if uri.startswith("file://"):
        return LocalStore(unquote(urlparse(uri).path))
    if "://" in uri:
        raise StoreError(f"unsupported store URI {uri!r}: use a path, file:///path or s3://bucket/prefix")
    return LocalStore(uri)


def split_uri(uri: str) -> tuple[ObjectStore, str]:
    """``s3://bucket/a/b/c`` -> (store at s3://bucket/a/b, 'c'): the store holding an object."""
    uri = uri.rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name or parent in ("s3:", "s3:/"):
        raise StoreError(f"{uri!r} does not name an object inside a store")
    if parent == "file://":
        parent = "file:///"
    return open_store(parent or "/"), name
