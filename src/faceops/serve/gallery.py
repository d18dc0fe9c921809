"""Identification gallery: embeddings + labels of known faces, stored as one npz in the store.

A gallery records the input contract of the model that embedded it (how its faces were prepared):
it is built only from a dataset prepared as the served model takes faces, and searched only with
queries prepared the same way, so enrolled and query embeddings are comparable.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from faceops.errors import FaceopsError
from faceops.models.contract import (
    HR_FIELDS,
    ContractConflictError,
    InputContract,
    check_prepared_alike,
    dataset_contract,
    shown,
)
from faceops.storage import split_uri


def object_of(uri: str):
    """(store, key) of an object URI; a plain (relative) path is resolved first."""
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    return split_uri(uri)


@dataclass(frozen=True)
class Match:
    """One identity found by :meth:`Gallery.search` (and ``FaceClient.identify``)."""

    identity: str
    score: float  # best cosine of the query against this identity's gallery images
    image_id: str  # the gallery image that gave the best score


@dataclass
class Gallery:
    embeddings: np.ndarray  # float32 [N, D], L2-normalised
    labels: np.ndarray  # int64 [N], index into identities
    identities: list[str]  # name of each label
    image_ids: list[str]  # the dataset image of each row
    contract: InputContract | None = None  # how its faces were prepared; None: built before contracts

    def check_contract(self, served: InputContract, model: str) -> None:
        """Queries prepared by ``served`` must be prepared as the enrolled faces were."""
        if self.contract is None:
            return
        diff = self.contract.differences(served, HR_FIELDS)
        if diff:
            name, enrolled, query = diff[0]
            raise ContractConflictError(
                f"the gallery was built from faces with {name} = {shown(enrolled)}, but {model} takes {name} = "
                f"{shown(query)}: rebuild it with 'faceops gallery build' against this server")

    def search(self, query: np.ndarray, top_k: int = 5) -> list[Match]:
        """Identities ranked by their best cosine to ``query`` (one embedding)."""
        if len(self.embeddings) == 0:
            raise FaceopsError("the gallery is empty: build it with "
                               "'faceops gallery build DATASET --out URI'")
        q = query / max(float(np.linalg.norm(query)), 1e-12)
        scores = self.embeddings @ q
        best: dict[int, int] = {}
        for row in np.argsort(-scores):
            best.setdefault(int(self.labels[row]), int(row))
        ranked = sorted(best.items(), key=lambda kv: -scores[kv[1]])[:top_k]
        return [Match(self.identities[label], float(scores[row]), self.image_ids[row])
                for label, row in ranked]

    def save(self, uri: str) -> str:
        buf = io.BytesIO()
        extra = {} if self.contract is None else {"contract": np.array(json.dumps(self.contract.to_dict()))}
        np.savez(buf, embeddings=self.embeddings.astype(np.float32), labels=self.labels.astype(np.int64),
                 identities=np.array(json.dumps(self.identities)),
                 image_ids=np.array(json.dumps(self.image_ids)), **extra)
        store, key = object_of(uri)
        store.put_bytes(key, buf.getvalue())
        return store.url(key)

    @classmethod
    def load(cls, uri: str) -> Gallery:
        store, key = object_of(uri)
        try:
            with np.load(io.BytesIO(store.get_bytes(key)), allow_pickle=False) as z:
                contract = (InputContract.from_dict(json.loads(str(z["contract"])), uri) if "contract" in z.files
                            else None)
                return cls(z["embeddings"], z["labels"], json.loads(str(z["identities"])),
                           json.loads(str(z["image_ids"])), contract)
        except (KeyError, ValueError) as exc:
            raise FaceopsError(f"{uri} is not a faceops gallery (npz with embeddings, labels, identities, "
                               f"image_ids): {exc}") from None


class EmbeddingServer(Protocol):
    """What a gallery needs of a client (``FaceClient``): the served recognizer's contract and embeddings."""

    url: str
    recognizer: str

    def contract(self) -> InputContract: ...

    def embed(self, images: np.ndarray, vlr: bool | None = None, prepared: bool = False) -> np.ndarray: ...


def build_gallery(client: EmbeddingServer, dataset_uri: str, split: str = "test",
                  vlr: bool | None = None) -> Gallery:
    """Embed every HR image of ``split`` through ``client`` (the served model). The dataset's faces
    were prepared at ingest: they are sent as they are, and must be what the served model takes."""
    from faceops.data.reader import load_split

    served = client.contract()
    check_prepared_alike(dataset_uri, dataset_contract(dataset_uri), served,
                         f"the served model '{client.recognizer}' at {client.url}",
                         "enrol a dataset ingested with ingest.prepare.{name}={want}")
    data = load_split(dataset_uri, split, views=["hr"])
    if len(data) == 0:
        raise FaceopsError(f"{dataset_uri} split {split!r} has no images to build a gallery from")
    embeddings = client.embed(data.hr, vlr=vlr, prepared=True)
    return Gallery(embeddings.astype(np.float32), data.labels, list(data.identities), list(data.image_ids),
                   served.hr_part())


def threshold_from_metrics(uri: str) -> float:
    """``verification.threshold`` of an evaluation's metrics.json (a path or store URI)."""
    store, key = object_of(uri)
    try:
        metrics = json.loads(store.get_bytes(key))
        return float(metrics["verification"]["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FaceopsError(f"{uri} has no verification.threshold (an evaluation's metrics.json): "
                           f"{exc}") from None
