"""Ingest: a folder of identity sub-folders (or an s3:// prefix) -> an immutable, checksummed dataset.

Layout written to ``<store>/datasets/<name>/``::

    shards/<split>/<view>-<k>.npy   uint8 arrays [n, H, W, 3]; view = hr | vlr_<W>x<H>
    ingest_report.json              every scanned file: accepted or rejected with its reason
    manifest.json                   written last: a dataset without it does not exist

Shards are fixed-size uint8 arrays (not JPEG): the training reader loads them into memory once and
never decodes an image, which is what lets one CPU core feed thousands of images per second.

An ingest streams, one step per module, so its memory holds a few images, never a dataset:

1. :mod:`~faceops.data.scan` reads each file once for its checksum (so a re-run is recognised before
   anything is decoded) and rejects duplicates;
2. :mod:`~faceops.data.decode` decodes and prepares the images in worker processes, a few chunks in
   flight, and each face is parked on local scratch disk (:class:`~faceops.data.shards.FaceScratch`);
3. :mod:`~faceops.data.dataset_plan` gives people roles and splits, and images their shard order;
4. :mod:`~faceops.data.shards` writes each shard file from the scratch, record by record;
5. this module stores the report (:mod:`~faceops.data.ingest_summary`) and publishes the manifest.

The scratch lives in the temporary folder (``TMPDIR``) and takes about the size of the shards.

The config is :class:`~faceops.data.ingest_config.IngestConfig` (re-exported here).

Every person of the source is kept, with a role in the manifest (``people``): a *training class*
(``train`` split; chosen by the training-class rule, :class:`TrainClassConfig`, e.g. the seeds'
8-150 images), an *eval* person (``val``/``test``, at least two images: genuine pairs, gallery and
probes) or a *distractor* (``val``/``test``, one image: impostor pairs and the gallery only). People
who cannot be training classes are held out first, so the rule never shrinks evaluation: on LFW
devtrain the default config gives a test split of over 500 people and 3,000 pairs.

Files are recognised by content, not by extension: anything Pillow decodes (JPEG, PNG, GIF, BMP,
TIFF, WebP, PGM, ...) is an image, whatever it is called.

Bad input policy: a file that cannot be read or decoded (corrupt, truncated, not an image, too small,
zero bytes, a duplicate) is *rejected, not fatal*: it is skipped, named with its reason in the log,
the summary and ``ingest_report.json``, and the rest is ingested. Whatever is wrong with the source
as a whole (missing or empty folder, a pairs file that is missing, malformed or names a path outside
the source, a file that changes while it is ingested) or with the store (unreachable, wrong
credentials) stops the ingest with an :class:`IngestError` naming the file or URI and what to do.
Because the manifest is published last, in one PUT/rename, and only after every shard is stored, a
failed ingest leaves no dataset behind: re-running the same command redoes it, and a completed one
is never redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from faceops.config import to_dict
from faceops.data.dataset_plan import Plan, assign_roles, import_pairs, plan_dataset, warn_small
from faceops.data.decode import Decoded, decode_all, decode_job, decode_jobs
from faceops.data.ingest_config import (
    HELD_OUT,
    INGEST_LOGGER,
    PAIRS_SPLIT,
    ROLES,
    SPLITS,
    TRAIN_CLASS_RULES,
    ClassRule,
    IngestConfig,
    IngestError,
    SplitConfig,
    TrainClassConfig,
)
from faceops.data.ingest_summary import REPORT, IngestResult, format_summary, log_rejected, summarise
from faceops.data.manifest import MANIFEST
from faceops.data.scan import IMAGE_EXTS, Scanned, SourceScan, is_image, no_images_error, scan, scan_source
from faceops.data.shards import FaceScratch, StoredFace, views_of, write_shards
from faceops.storage import ObjectStore, StoreError, open_store, sha256_bytes

__all__ = [  # the ingest's public names, importable from here as before it was split into steps
    "FORMAT_VERSION", "HELD_OUT", "IMAGE_EXTS", "MANIFEST", "PAIRS_SPLIT", "REPORT", "ROLES", "SPLITS",
    "TRAIN_CLASS_RULES", "ClassRule", "Decoded", "IngestConfig", "IngestError", "IngestResult", "Plan",
    "Scanned", "SplitConfig", "TrainClassConfig", "assign_roles", "format_summary", "ingest", "is_image",
    "no_images_error", "plan_dataset", "scan",
]

log = logging.getLogger(INGEST_LOGGER)

FORMAT_VERSION = 2  # 2: every person kept, with a role; images found by content
_decode = decode_job  # one image as ingest prepares it (tests compare evaluation's preparation with it)


def ingest(source: str, name: str, store_uri: str, cfg: IngestConfig | None = None,
           pairs_file: str | None = None, progress: bool = True) -> IngestResult:
    """Turn ``source`` into ``<store_uri>/datasets/<name>``; a no-op when already ingested."""
    cfg = cfg or IngestConfig()
    if not name or "/" in name or name.startswith("."):
        raise IngestError(f"invalid dataset name {name!r}: use letters, digits, '-', '_'")
    if pairs_file is not None and not Path(pairs_file).is_file():
        raise IngestError(f"pairs file not found: {pairs_file} (pass an LFW pairs.txt / pairsDevTrain.txt "
                          "with --pairs, or leave --pairs out to generate pairs)")
    t0 = time.time()
    target = f"{store_uri.rstrip('/')}/datasets/{name}"
    with tempfile.TemporaryDirectory(prefix="faceops-ingest-") as tmp:
        try:
            root = _materialise_s3(source, Path(tmp)) if source.startswith("s3://") else Path(source)
        except StoreError as exc:
            raise IngestError(f"cannot read the source {source}: {exc}") from exc
        try:
            return _ingest_folder(root, source, name, open_store(store_uri), cfg, pairs_file, progress, t0)
        except StoreError as exc:
            raise IngestError(
                f"ingest into {target} failed: {exc}. Nothing was published ({MANIFEST} is written last), "
                "so no reader sees a partial dataset; fix the store and re-run the same command") from exc


def _materialise_s3(source: str, tmp: Path) -> Path:
    store = open_store(source)
    for key in tqdm(list(store.list()), desc="download", unit="file"):
        store.get_file(key, tmp / key)
    return tmp


def _ingest_folder(root: Path, source: str, name: str, store: ObjectStore, cfg: IngestConfig,
                   pairs_file: str | None, progress: bool, t0: float) -> IngestResult:
    """scan -> (published already?) -> decode into scratch -> plan -> shards -> report and manifest."""
    prefix = f"datasets/{name}"
    found = scan_source(root)
    if found.skipped:
        log.info("skipping %d non-image file(s), e.g. %s", len(found.skipped), ", ".join(found.skipped[:3]))
    pairs_text = Path(pairs_file).read_bytes() if pairs_file else None
    fingerprint = _fingerprint(cfg, sorted(found.shas.items()),
                               sha256_bytes(pairs_text) if pairs_text is not None else None)
    done = _published(store, prefix, fingerprint, "already exists with different content")
    if done is not None:
        return done

    views = views_of(cfg.degrade.sizes)
    with tempfile.TemporaryDirectory(prefix="faceops-scratch-") as tmp, FaceScratch(Path(tmp), views) as scratch:
        faces = _decode_into(scratch, found, cfg, progress)
        log_rejected(found.rejected, source, store.url(f"{prefix}/{REPORT}"))
        plan = plan_dataset(_by_identity(faces), cfg)
        warn_small(plan, cfg)
        imported = import_pairs(pairs_file, faces, plan) if pairs_file else None
        shards, shard_bytes = write_shards(store, prefix, plan.split_images, faces, scratch, cfg.shard_size,
                                           Path(tmp), progress)

    stats = summarise(plan, cfg, len(found.items), len(faces), found.rejected, found.skipped, imported,
                      shard_bytes, t0)
    _put_report(store, prefix, name, source, stats, found, len(faces))
    manifest = _manifest(name, source, cfg, plan, _images(plan, faces), shards, views, imported, fingerprint, stats)
    return _publish(store, prefix, manifest)


def _put_report(store: ObjectStore, prefix: str, name: str, source: str, stats: dict, found: SourceScan,
                accepted: int) -> None:
    """``ingest_report.json``: the summary, and every skipped and rejected file by name."""
    report = {"dataset": name, "source": source, "summary": stats, "skipped_non_image_files": found.skipped,
              "rejected": sorted(found.rejected, key=lambda r: r["file"]), "accepted": accepted}
    store.put_bytes(f"{prefix}/{REPORT}", json.dumps(report, indent=1).encode())


def _publish(store: ObjectStore, prefix: str, manifest: dict) -> IngestResult:
    """Put the manifest, last: unless a concurrent ingest published one while this one worked."""
    raced = _published(store, prefix, manifest["fingerprint"],
                       "was published by a concurrent ingest with different content")
    if raced is not None:
        return raced
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return IngestResult(store.url(prefix), manifest["content_hash"], False, manifest["summary"])


def _decode_into(scratch: FaceScratch, found: SourceScan, cfg: IngestConfig, progress: bool) -> dict[str, StoredFace]:
    """Every unique candidate decoded and parked in ``scratch``, one at a time (image id -> where it is);
    the ones that fail join ``found.rejected`` with their reason."""
    faces: dict[str, StoredFace] = {}
    for d in decode_all(decode_jobs(found, cfg), len(found.unique), cfg.workers, progress):
        if d.ok:
            faces[d.rel] = scratch.add(d)
        else:
            found.rejected.append({"file": d.rel, "reason": d.reason})
    if len(faces) + len(found.rejected) != len(found.items):  # accepted + rejected = scanned, always
        raise IngestError(f"internal accounting error: {len(faces)} + {len(found.rejected)} != {len(found.items)}")
    return faces


def _by_identity(faces: dict[str, StoredFace]) -> dict[str, list[str]]:
    per_identity: dict[str, list[str]] = defaultdict(list)
    for rel in sorted(faces):
        per_identity[rel.split("/", 1)[0]].append(rel)
    return per_identity


def _fingerprint(cfg: IngestConfig, files: Iterable[tuple[str, str]], pairs_sha: str | None) -> str:
    """What makes two ingests the same: config, format, every file's name and content, the pairs file."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    h.update(f"format={FORMAT_VERSION};pairs={pairs_sha}".encode())
    for rel, sha in files:
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest()


def _published(store: ObjectStore, prefix: str, fingerprint: str, conflict: str) -> IngestResult | None:
    """The dataset already published at ``prefix`` if it is this ingest's; refused if it is another's."""
    if not store.exists(f"{prefix}/{MANIFEST}"):
        return None
    existing = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
    if existing.get("fingerprint") == fingerprint:
        return IngestResult(store.url(prefix), existing["content_hash"], True, existing["summary"])
    raise IngestError(f"dataset {store.url(prefix)} {conflict} (hash {existing['content_hash'][:12]}); "
                      "datasets are immutable: use a new --name")


def _images(plan: Plan, faces: dict[str, StoredFace]) -> list[dict]:
    """The manifest's image entries, split by split in shard order (``index``: the row in its split)."""
    return [{"id": rel, "identity": rel.split("/", 1)[0], "split": split,
             "role": "eval" if split == PAIRS_SPLIT else plan.image_roles[rel],
             "sha256": faces[rel].sha256, "hr_size": list(faces[rel].size), "index": off}
            for split, rels in plan.split_images.items() for off, rel in enumerate(rels)]


def _manifest(name: str, source: str, cfg: IngestConfig, plan: Plan, images: list[dict], shards: dict,
              views: list[str], imported: dict | None, fingerprint: str, stats: dict) -> dict:
    """The manifest; its content hash covers what a reader gets (not when or how it was made)."""
    pairs = {s: [list(p) for p in v] for s, v in plan.pairs.items()}
    if imported is not None:
        pairs[PAIRS_SPLIT] = imported["pairs"]
    manifest = {"identities": sorted(plan.people), "people": plan.people, "images": images, "shards": shards,
                "pairs": pairs, "views": views}
    if imported is not None:
        manifest["pairs_import"] = {k: imported[k] for k in ("file", "folds", "n_folds")}
    content_hash = hashlib.sha256(json.dumps(
        {k: manifest[k] for k in ("identities", "people", "images", "shards", "pairs")}, sort_keys=True).encode()
    ).hexdigest()
    rule = cfg.train_classes.resolved()
    manifest.update({
        "format_version": FORMAT_VERSION, "name": name, "source": source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": to_dict(cfg), "fingerprint": fingerprint, "content_hash": content_hash,
        "vlr_sizes": list(cfg.degrade.sizes), "hr_size": cfg.prepare.hr_size, "summary": stats,
        "distractors": sorted(i for i, p in plan.people.items() if p["role"] == "distractor"),
        "train_classes": {"rule": cfg.train_classes.rule, "min_images": rule.min_images,
                          "max_images": rule.max_images, "classes": stats["train_classes"]},
        "protocol": {s: p.as_dict() for s, p in plan.protocol.items()},
    })
    return manifest
