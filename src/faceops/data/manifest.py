"""Reading a dataset's manifest (the contract every stage reads a dataset through)."""

from __future__ import annotations

import json

from faceops.errors import FaceopsError
from faceops.storage import NotFoundError, open_store

MANIFEST = "manifest.json"


class DatasetError(FaceopsError):
    pass


def load_manifest(dataset_uri: str) -> dict:
    """The manifest of ``dataset_uri`` (e.g. ``/runs/store/datasets/orl`` or ``s3://b/datasets/orl``)."""
    store = open_store(dataset_uri)
    try:
        manifest = json.loads(store.get_bytes(MANIFEST))
    except NotFoundError:
        raise DatasetError(f"no dataset at {dataset_uri}: {MANIFEST} is missing (ingest it "
                           "first with `faceops ingest SOURCE --name NAME`; a half-written dataset has "
                           "no manifest)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{store.url(MANIFEST)} is not valid JSON: {exc}") from None
    return manifest
