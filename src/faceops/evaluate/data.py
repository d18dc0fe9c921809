"""What an evaluation runs on: faces (HR and VLR views), identity labels and verification pairs.

Two sources give the same :class:`EvalSet`: a faceops dataset split (already prepared at ingest) and
a folder of LFW-layout images with a pairs file (prepared here exactly as ingest prepares them:
same :func:`prepare_face`, same seeded :func:`degrade`, seeded by the file's sha256 as at ingest,
with the crop and degradation the models' input contracts give: see :mod:`.runner`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from faceops.data.degrade import DegradeConfig, degrade
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.evaluate.pairs import PairsError, parse_pairs, resolve_pairs
from faceops.storage import sha256_bytes

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    a: np.ndarray  # int64 [P] index of the first image
    b: np.ndarray  # int64 [P] index of the second image
    genuine: np.ndarray  # bool [P]
    folds: np.ndarray | None = None  # int64 [P] fold of each pair where the protocol has folds

    def __len__(self) -> int:
        return len(self.genuine)

    @classmethod
    def from_list(cls, pairs: list[tuple[int, int, bool]], folds: list[int] | None = None) -> PairSet:
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 3)
        f = np.asarray(folds, dtype=np.int64) if folds is not None and len(set(folds)) > 1 else None
        return cls(arr[:, 0], arr[:, 1], arr[:, 2].astype(bool), f)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Cosine similarity of each pair (embeddings are L2-normalised)."""
        e = embeddings.astype(np.float64, copy=False)
        return np.einsum("ij,ij->i", e[self.a], e[self.b])


@dataclass
class EvalSet:
    hr: np.ndarray  # uint8 [N, 112, 112, 3]
    vlr: dict[str, np.ndarray]  # "WxH" -> uint8 [N, h, w, 3]
    labels: np.ndarray  # int64 [N]
    image_ids: list[str]
    pairs: PairSet

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class EvalData:
    test: EvalSet  # evaluated
    val: EvalSet | None  # only with evaluate.threshold=val: its pairs pick the verification threshold
    source: str  # what was evaluated, for the report


def from_dataset(dataset_uri: str, split: str, vlr_sizes: list[str], val_threshold: bool = False) -> EvalData:
    """A dataset split. The val split is read (and later embedded) only for ``val_threshold``: by
    default the threshold is cross-validated on the test pairs themselves, so val costs nothing."""
    from faceops.data.manifest import DatasetError, load_manifest
    from faceops.data.reader import load_split

    manifest = load_manifest(dataset_uri)
    have = list(manifest.get("vlr_sizes", []))
    missing = [s for s in vlr_sizes if s not in have]
    if missing:
        raise DatasetError(f"{dataset_uri} has no VLR view {', '.join(missing)} (ingested sizes: "
                           f"{', '.join(have) or 'none'}); re-ingest with ingest.degrade.sizes including it")
    views = ["hr", *(f"vlr_{s}" for s in vlr_sizes)]
    test = _split_set(load_split(dataset_uri, split, views), dataset_uri, split)
    source = f"{dataset_uri} (split {split})"
    if not val_threshold or test.pairs.folds is not None:  # a pairs file's own folds come first
        return EvalData(test, None, source)
    if split == "val":
        raise DatasetError("evaluate.threshold=val would choose the threshold on the pairs it scores (--split val); "
                           "use evaluate.threshold=folds")
    if not manifest.get("pairs", {}).get("val"):
        raise DatasetError(f"evaluate.threshold=val: {dataset_uri} has no val pairs to choose the threshold on; "
                           "use evaluate.threshold=folds")
    return EvalData(test, _split_set(load_split(dataset_uri, "val", views), dataset_uri, "val"), source)


def _split_set(data, dataset_uri: str, split: str) -> EvalSet:
    from faceops.data.manifest import DatasetError

    if not data.pairs:
        raise DatasetError(f"{dataset_uri}: split {split!r} has no verification pairs (use --split test, or "
                           "'pairs' for an imported LFW pairs file)")
    return EvalSet(data.hr, dict(data.vlr), np.asarray(data.labels, dtype=np.int64), list(data.image_ids),
                   PairSet.from_list(data.pairs, data.folds))


def load_face(path: Path, prepare: PrepareConfig, degrade_cfg: DegradeConfig,
              vlr_sizes: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One image file -> (HR face, VLR views), exactly as ingest makes them."""
    raw = path.read_bytes()
    try:
        with Image.open(path) as img:
            hr = prepare_face(img, prepare)
    except (UnidentifiedImageError, OSError) as exc:
        raise PairsError(f"{path}: cannot decode image ({exc})") from None
    seed = int(sha256_bytes(raw)[:8], 16)
    return hr, {s: degrade(hr, s, degrade_cfg, seed) for s in vlr_sizes}


def from_images(images_dir: str, pairs_file: str, prepare: PrepareConfig, degrade_cfg: DegradeConfig,
                vlr_sizes: list[str], skip_missing: bool = False) -> EvalData:
    """LFW-layout images + a pairs file; identities come from the folder names."""
    pairs = parse_pairs(pairs_file)
    resolved = resolve_pairs(pairs, images_dir, skip_missing)
    if resolved.skipped_pairs:
        log.warning("skipped %d pair(s): %d image(s) missing, e.g. %s", resolved.skipped_pairs,
                    len(resolved.missing), resolved.missing[0])
    if not resolved.index:
        raise PairsError(f"{pairs_file}: no pair could be resolved under {images_dir}")
    faces = [load_face(p, prepare, degrade_cfg, vlr_sizes) for p in resolved.images]
    names = sorted(set(resolved.identities))
    label_of = {n: i for i, n in enumerate(names)}
    folds = resolved.folds if pairs.has_folds else None
    triples = [(a, b, g) for (a, b), g in zip(resolved.index, resolved.genuine, strict=True)]
    test = EvalSet(
        hr=np.stack([f[0] for f in faces]),
        vlr={s: np.stack([f[1][s] for f in faces]) for s in vlr_sizes},
        labels=np.array([label_of[n] for n in resolved.identities], dtype=np.int64),
        image_ids=[f"{p.parent.name}/{p.name}" for p in resolved.images],
        pairs=PairSet.from_list(triples, folds),
    )
    return EvalData(test, None, f"{images_dir} with {pairs_file}")
