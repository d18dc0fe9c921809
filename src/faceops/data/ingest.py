"""Ingest: a folder of identity sub-folders (or an s3:// prefix) -> an immutable, checksummed dataset.

Layout written to ``<store>/datasets/<name>/``::

    shards/<split>/<view>-<k>.npy   uint8 arrays [n, H, W, 3]; view = hr | vlr_<W>x<H>
    ingest_report.json              every scanned file: accepted or rejected with its reason
    manifest.json                   written last: a dataset without it does not exist

Shards are fixed-size uint8 arrays (not JPEG): training reads them with a memory map and no
decoding, which is what lets one CPU core feed thousands of images per second.

Bad input policy: a file that cannot be read or decoded (corrupt, truncated, not an image, too small,
zero bytes, a duplicate) is *rejected, not fatal*: it is skipped, named with its reason in the log,
the summary and ``ingest_report.json``, and the rest is ingested. Whatever is wrong with the source
as a whole (missing or empty folder, a pairs file that is missing, malformed or names a path outside
the source) or with the store (unreachable, wrong credentials) stops the ingest with an
:class:`IngestError` naming the file or URI and what to do. Because the manifest is published last,
in one PUT/rename, and only after every shard is stored, a failed ingest leaves no dataset behind:
re-running the same command redoes it, and a completed one is never redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from faceops.config import check, to_dict
from faceops.data.degrade import DegradeConfig, degrade
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.errors import FaceopsError
from faceops.evaluate.pairs import image_path, parse_pairs
from faceops.storage import ObjectStore, StoreError, open_store, sha256_bytes

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
SPLITS = ("train", "val", "test")
PAIRS_SPLIT = "pairs"  # images referenced by an imported pairs file (LFW protocol)
MANIFEST = "manifest.json"
REPORT = "ingest_report.json"
FORMAT_VERSION = 1
MAX_LOGGED = 10  # rejected files named one by one in the log and the summary


class IngestError(FaceopsError):
    pass


@dataclass
class SplitConfig:
    train: float = 0.8  # fraction of eligible identities per split (identity-disjoint)
    val: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        check(min(self.train, self.val, self.test) >= 0, "splits: fractions must be >= 0")
        check(abs(self.train + self.val + self.test - 1.0) < 1e-6,
              f"splits: train+val+test must be 1, got {self.train + self.val + self.test:g}")


@dataclass
class IngestConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    min_images_per_identity: int = 8  # seed recipe; fewer -> distractor (pairs/gallery only)
    max_images_per_identity: int = 150  # seed recipe: balanced sampling caps big identities
    min_image_size: int = 16  # smaller sources are rejected ("too small")
    pairs_per_split: int = 600  # generated val/test verification pairs (half genuine)
    seed: int = 0
    workers: int = 0  # decoding processes; 0 = all cores
    shard_size: int = 4096  # images per shard file

    def __post_init__(self) -> None:
        check(self.min_images_per_identity >= 2, "min_images_per_identity must be >= 2 (pairs need 2)")
        check(self.max_images_per_identity >= self.min_images_per_identity,
              "max_images_per_identity must be >= min_images_per_identity")
        check(self.shard_size >= 1, "shard_size must be >= 1")
        check(self.workers >= 0, "workers must be >= 0")


@dataclass
class Scanned:
    path: Path
    rel: str  # "<identity>/<file>"
    identity: str


@dataclass
class Decoded:
    rel: str
    sha256: str
    ok: bool
    reason: str = ""
    size: tuple[int, int] = (0, 0)
    hr: np.ndarray | None = None
    vlr: dict[str, np.ndarray] = field(default_factory=dict)


# -- scanning ------------------------------------------------------------------------------------
def scan(root: Path) -> tuple[list[Scanned], list[str]]:
    """Image candidates under ``root/<identity>/`` and the non-image files skipped."""
    if not root.exists():
        raise IngestError(f"source {root} does not exist: pass a folder of <identity>/<image> files "
                          "(e.g. LFW or ORL) or an s3://bucket/prefix")
    if not root.is_dir():
        raise IngestError(f"source {root} is a file, not a folder: pass the folder that holds one "
                          "sub-folder per identity")
    images, skipped = [], []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            skipped.append(entry.name)
            continue
        for f in sorted(entry.iterdir()):
            rel = f"{entry.name}/{f.name}"
            if f.suffix.lower() in IMAGE_EXTS:
                images.append(Scanned(f, rel, entry.name))
            else:
                skipped.append(rel)
    if not images:
        raise IngestError(f"no images found under {root}: expected <root>/<identity>/<image> with "
                          f"extensions {', '.join(sorted(IMAGE_EXTS))}; point SOURCE at that root folder")
    return images, skipped


def _decode(item: tuple[str, str, bytes, PrepareConfig, DegradeConfig, int]) -> Decoded:
    rel, sha, data, prep, deg, min_size = item
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, SyntaxError):
        return Decoded(rel, sha, False, "not an image")
    except (OSError, ValueError) as exc:
        return Decoded(rel, sha, False, f"truncated or corrupt ({exc})")
    if min(img.size) < min_size:
        return Decoded(rel, sha, False, f"too small ({img.size[0]}x{img.size[1]} < {min_size})")
    hr = prepare_face(img, prep)
    seed = int(sha[:8], 16)
    vlr = {s: degrade(hr, s, deg, seed) for s in deg.sizes}
    return Decoded(rel, sha, True, size=img.size, hr=hr, vlr=vlr)


def _read(item: Scanned) -> tuple[bytes | None, str]:
    try:
        return item.path.read_bytes(), ""
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


# -- splitting and pairs ---------------------------------------------------------------------------
def assign_splits(counts: dict[str, int], cfg: IngestConfig) -> tuple[dict[str, str], list[str]]:
    """identity -> split for identities with enough images; the rest are distractors."""
    eligible = sorted(i for i, n in counts.items() if n >= cfg.min_images_per_identity)
    distractors = sorted(i for i, n in counts.items() if n < cfg.min_images_per_identity)
    rng = np.random.default_rng(cfg.seed)
    order = [eligible[i] for i in rng.permutation(len(eligible))]
    n = len(order)
    n_val = int(round(n * cfg.splits.val))
    n_test = int(round(n * cfg.splits.test))
    if cfg.splits.val > 0 and n >= 3:
        n_val = max(n_val, 2)
    if cfg.splits.test > 0 and n >= 3:
        n_test = max(n_test, 2)
    assignment = {}
    for k, ident in enumerate(order):
        assignment[ident] = "val" if k < n_val else "test" if k < n_val + n_test else "train"
    return assignment, distractors


def make_pairs(labels: list[int], n_pairs: int, seed: int) -> list[tuple[int, int, bool]]:
    """Balanced genuine/impostor pairs (indices into one split), seeded and de-duplicated."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    multi = [lab for lab, idx in by_label.items() if len(idx) >= 2]
    keys = sorted(by_label)
    if not multi or len(keys) < 2:
        return []
    made_by_kind: dict[bool, list[tuple[int, int, bool]]] = {}
    want = n_pairs // 2
    for genuine in (True, False):
        pairs: set[tuple[int, int, bool]] = set()
        tries = 0
        while len(pairs) < want and tries < want * 20:
            tries += 1
            if genuine:
                a, b = rng.choice(by_label[multi[rng.integers(len(multi))]], 2, replace=False)
            else:
                la, lb = rng.choice(len(keys), 2, replace=False)
                a = rng.choice(by_label[keys[la]])
                b = rng.choice(by_label[keys[lb]])
            pairs.add((int(min(a, b)), int(max(a, b)), genuine))
        made_by_kind[genuine] = sorted(pairs)
    n = min(len(v) for v in made_by_kind.values())  # balanced even when genuine pairs run short
    return made_by_kind[True][:n] + made_by_kind[False][:n]


# -- the ingest ----------------------------------------------------------------------------------
@dataclass
class IngestResult:
    uri: str
    content_hash: str
    already_present: bool
    summary: dict


def _fingerprint(cfg: IngestConfig, files: Iterable[tuple[str, str]], pairs_sha: str | None) -> str:
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    h.update(f"format={FORMAT_VERSION};pairs={pairs_sha}".encode())
    for rel, sha in files:
        h.update(f"{rel}\0{sha}\n".encode())
    return h.hexdigest()


def _materialise_s3(source: str, tmp: Path) -> Path:
    store = open_store(source)
    for key in tqdm(list(store.list()), desc="download", unit="file"):
        store.get_file(key, tmp / key)
    return tmp


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


def _ingest_folder(root: Path, source: str, name: str, store: ObjectStore, cfg: IngestConfig,
                   pairs_file: str | None, progress: bool, t0: float) -> IngestResult:
    prefix = f"datasets/{name}"
    items, skipped = scan(root)
    if skipped:
        log.info("skipping %d non-image file(s), e.g. %s", len(skipped), ", ".join(skipped[:3]))
    raw: dict[str, bytes] = {}
    rejected: list[dict] = []
    shas: dict[str, str] = {}
    for it in items:
        data, why = _read(it)
        if data is None:
            rejected.append({"file": it.rel, "reason": why})
        elif not data:
            rejected.append({"file": it.rel, "reason": "zero-byte file"})
        else:
            raw[it.rel] = data
            shas[it.rel] = sha256_bytes(data)
    pairs_text = Path(pairs_file).read_bytes() if pairs_file else None
    fingerprint = _fingerprint(cfg, sorted(shas.items()),
                               sha256_bytes(pairs_text) if pairs_text is not None else None)
    existing = _existing_manifest(store, prefix)
    if existing is not None:
        if existing.get("fingerprint") == fingerprint:
            return IngestResult(store.url(prefix), existing["content_hash"], True, existing["summary"])
        raise IngestError(f"dataset {store.url(prefix)} already exists with different content "
                          f"(hash {existing['content_hash'][:12]}); datasets are immutable: use a new --name")

    # duplicates by content: the first path (sorted) wins
    first_of: dict[str, str] = {}
    unique: list[str] = []
    for rel in sorted(raw):
        sha = shas[rel]
        if sha in first_of:
            rejected.append({"file": rel, "reason": f"duplicate of {first_of[sha]}"})
        else:
            first_of[sha] = rel
            unique.append(rel)
    decoded = _decode_all(unique, raw, shas, cfg, progress)
    raw.clear()
    good = {d.rel: d for d in decoded if d.ok}
    rejected += [{"file": d.rel, "reason": d.reason} for d in decoded if not d.ok]
    check_total = len(good) + len(rejected)
    if check_total != len(items):  # accepted + rejected = scanned, always
        raise IngestError(f"internal accounting error: {len(good)} + {len(rejected)} != {len(items)}")
    for r in sorted(rejected, key=lambda r: r["file"])[:MAX_LOGGED]:
        log.warning("rejected %s/%s: %s (skipped; see %s)", source.rstrip("/"), r["file"], r["reason"],
                    store.url(f"{prefix}/{REPORT}"))
    if len(rejected) > MAX_LOGGED:
        log.warning("... and %d more rejected file(s): see %s", len(rejected) - MAX_LOGGED,
                    store.url(f"{prefix}/{REPORT}"))

    # identity filtering, balanced sampling, splits
    per_identity: dict[str, list[str]] = defaultdict(list)
    for rel in sorted(good):
        per_identity[rel.split("/", 1)[0]].append(rel)
    rng = np.random.default_rng(cfg.seed)
    capped = 0
    for ident, rels in per_identity.items():
        if len(rels) > cfg.max_images_per_identity:
            keep = sorted(rng.choice(len(rels), cfg.max_images_per_identity, replace=False))
            capped += len(rels) - len(keep)
            per_identity[ident] = [rels[k] for k in keep]
    assignment, distractors = assign_splits({i: len(r) for i, r in per_identity.items()}, cfg)
    split_images: dict[str, list[str]] = {s: [] for s in SPLITS}
    for ident in sorted(assignment):
        split_images[assignment[ident]].extend(per_identity[ident])

    imported = None
    if pairs_text is not None:
        imported = _import_pairs(pairs_file, good, split_images)

    manifest, shard_bytes = _write_shards(store, prefix, split_images, good, cfg, imported, progress)
    stats = {
        "scanned": len(items), "accepted": len(good), "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"].split(" (")[0].split(" of ")[0] for r in rejected)),
        "skipped_non_image": len(skipped), "capped_by_max_per_identity": capped,
        "identities_found": len(per_identity), "identities_eligible": len(assignment),
        "distractor_identities": len(distractors),
        "splits": {s: {"identities": len({r.split('/')[0] for r in v}), "images": len(v)}
                   for s, v in manifest["_split_images"].items()},
        "pairs": {s: len(p) for s, p in manifest["pairs"].items()},
        "bytes": shard_bytes, "seconds": round(time.time() - t0, 2),
        "rejected_files": [f"{r['file']}: {r['reason']}" for r in sorted(rejected, key=lambda r: r["file"])
                           ][:MAX_LOGGED],
    }
    del manifest["_split_images"]
    report = {"dataset": name, "source": source, "summary": stats,
              "skipped_non_image_files": skipped, "rejected": sorted(rejected, key=lambda r: r["file"]),
              "accepted": len(good)}
    store.put_bytes(f"{prefix}/{REPORT}", json.dumps(report, indent=1).encode())
    content_hash = hashlib.sha256(json.dumps(
        {k: manifest[k] for k in ("identities", "images", "shards", "pairs")}, sort_keys=True).encode()
    ).hexdigest()
    manifest.update({
        "format_version": FORMAT_VERSION, "name": name, "source": source,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": to_dict(cfg), "fingerprint": fingerprint, "content_hash": content_hash,
        "vlr_sizes": list(cfg.degrade.sizes), "hr_size": cfg.prepare.hr_size, "summary": stats,
        "distractors": distractors,
    })
    raced = _existing_manifest(store, prefix)  # a concurrent ingest published while this one worked
    if raced is not None:
        if raced.get("fingerprint") == fingerprint:
            return IngestResult(store.url(prefix), raced["content_hash"], True, raced["summary"])
        raise IngestError(f"dataset {store.url(prefix)} was published by a concurrent ingest with different "
                          f"content (hash {raced['content_hash'][:12]}); datasets are immutable: use a new --name")
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # publish: last
    return IngestResult(store.url(prefix), content_hash, False, stats)


def _existing_manifest(store: ObjectStore, prefix: str) -> dict | None:
    if not store.exists(f"{prefix}/{MANIFEST}"):
        return None
    return json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))


def _decode_all(unique: list[str], raw: dict[str, bytes], shas: dict[str, str], cfg: IngestConfig,
                progress: bool) -> list[Decoded]:
    workers = cfg.workers or os.cpu_count() or 1
    jobs = ((rel, shas[rel], raw[rel], cfg.prepare, cfg.degrade, cfg.min_image_size) for rel in unique)
    bar = tqdm(total=len(unique), desc="decode+prepare", unit="img", disable=not progress)
    out = []
    if workers == 1 or len(unique) < 64:
        for job in jobs:
            out.append(_decode(job))
            bar.update()
    else:
        with ProcessPoolExecutor(workers) as pool:
            for d in pool.map(_decode, jobs, chunksize=32):
                out.append(d)
                bar.update()
    bar.close()
    return out


def _import_pairs(pairs_file: str, good: dict[str, Decoded], split_images: dict[str, list[str]]) -> dict:
    """Resolve an LFW pairs file; its images form the ``pairs`` split (identities may overlap train)."""
    parsed = parse_pairs(pairs_file)
    for k, p in enumerate(parsed.pairs):
        for who in (p.name1, p.name2):
            if not who or who in (".", "..") or "/" in who or "\\" in who:
                raise IngestError(f"{pairs_file}: pair {k + 1} names {who!r}, which is not an identity folder "
                                  "of the source (a path or '..' would escape it): use bare identity names "
                                  "as in LFW's pairs.txt")
    refs = [(image_path("", p.name1, p.num1).as_posix(), image_path("", p.name2, p.num2).as_posix(), p)
            for p in parsed.pairs]
    miss = sorted({f for a, b, _ in refs for f in (a, b) if f not in good})
    if miss:
        raise IngestError(f"{pairs_file}: pairs reference {len(miss)} image(s) missing from the source "
                          f"or rejected at ingest, e.g. {miss[:3]} (see the rejected files above): add them "
                          "to the source or use the pairs file that belongs to it")
    files = sorted({f for a, b, _ in refs for f in (a, b)})
    split_images[PAIRS_SPLIT] = files
    index = {f: i for i, f in enumerate(files)}
    return {"pairs": [(index[a], index[b], p.genuine) for a, b, p in refs],
            "folds": [p.fold for _, _, p in refs], "n_folds": parsed.n_folds, "file": Path(pairs_file).name}


def _write_shards(store: ObjectStore, prefix: str, split_images: dict[str, list[str]],
                  good: dict[str, Decoded], cfg: IngestConfig, imported: dict | None,
                  progress: bool) -> tuple[dict, int]:
    identities = sorted({r.split("/", 1)[0] for v in split_images.values() for r in v})
    images, shards, pairs, nbytes = [], {}, {}, 0
    views = ["hr"] + [f"vlr_{s}" for s in cfg.degrade.sizes]
    bar = tqdm(total=sum(len(v) for v in split_images.values()), desc="write shards", unit="img",
               disable=not progress)
    for split, rels in split_images.items():
        shards[split] = []
        for k in range(0, len(rels), cfg.shard_size):
            chunk = rels[k:k + cfg.shard_size]
            files = {}
            for view in views:
                arr = np.stack([good[r].hr if view == "hr" else good[r].vlr[view[4:]] for r in chunk])
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                key = f"shards/{split}/{view}-{k // cfg.shard_size:05d}.npy"
                info = store.put_bytes(f"{prefix}/{key}", buf.getvalue())
                files[view] = {"key": key, "sha256": info.sha256, "shape": list(arr.shape)}
                nbytes += info.size
            shards[split].append({"count": len(chunk), "files": files})
            bar.update(len(chunk))
        for off, rel in enumerate(rels):
            d = good[rel]
            images.append({"id": rel, "identity": rel.split("/", 1)[0], "split": split, "sha256": d.sha256,
                           "hr_size": list(d.size), "index": off})
        if split in ("val", "test"):
            labels = [r.split("/", 1)[0] for r in rels]
            ids = {n: i for i, n in enumerate(sorted(set(labels)))}
            pairs[split] = make_pairs([ids[n] for n in labels], cfg.pairs_per_split,
                                      cfg.seed + (1 if split == "val" else 2))
    bar.close()
    if imported is not None:
        pairs[PAIRS_SPLIT] = imported["pairs"]
    manifest = {"identities": identities, "images": images, "shards": shards, "pairs": pairs,
                "views": views, "_split_images": split_images}
    if imported is not None:
        manifest["pairs_import"] = {k: imported[k] for k in ("file", "folds", "n_folds")}
    return manifest, nbytes


def format_summary(result: IngestResult) -> str:
    s = result.summary
    rows = [("dataset", result.uri), ("content hash", result.content_hash[:16]),
            ("status", "already present (nothing to do)" if result.already_present else "ingested"),
            ("scanned images", s["scanned"]), ("accepted", s["accepted"]), ("rejected", s["rejected"])]
    rows += [(f"  rejected: {k}", v) for k, v in sorted(s["rejected_by_reason"].items())]
    rows += [("  rejected file", f) for f in s.get("rejected_files", [])]
    if s["rejected"]:
        rows += [("  every rejection in", f"{result.uri}/{REPORT}")]
    rows += [("skipped non-image files", s["skipped_non_image"]),
             ("capped (max per identity)", s["capped_by_max_per_identity"]),
             ("identities (eligible/found)", f"{s['identities_eligible']}/{s['identities_found']}")]
    rows += [(f"split {k}", f"{v['identities']} ids, {v['images']} images") for k, v in s["splits"].items()]
    rows += [(f"pairs {k}", v) for k, v in s["pairs"].items()]
    rows += [("bytes", f"{s['bytes'] / 1e6:.1f} MB"), ("time", f"{s['seconds']:.1f} s")]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
