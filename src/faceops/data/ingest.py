"""Ingest: a folder of identity sub-folders (or an s3:// prefix) -> an immutable, checksummed dataset.

Layout written to ``<store>/datasets/<name>/``::

    shards/<split>/<view>-<k>.npy   uint8 arrays [n, H, W, 3]; view = hr | vlr_<W>x<H>
    ingest_report.json              every scanned file: accepted or rejected with its reason
    manifest.json                   written last: a dataset without it does not exist

Shards are fixed-size uint8 arrays (not JPEG): training reads them with a memory map and no
decoding, which is what lets one CPU core feed thousands of images per second.

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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from faceops.config import check, to_dict
from faceops.data.degrade import DegradeConfig, degrade
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.errors import FaceopsError
from faceops.evaluate.pairs import ProtocolSize, generate_pairs, image_path, parse_pairs, protocol_size
from faceops.storage import ObjectStore, StoreError, open_store, sha256_bytes

log = logging.getLogger(__name__)

# A file with one of these names that does not decode is *rejected* (it was meant to be an image);
# any other file is tried by content and, when Pillow cannot read it, *skipped* as a non-image.
IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
              ".webp", ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif", ".qoi", ".ico",
              ".sgi", ".ras", ".pcx"}
SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")
PAIRS_SPLIT = "pairs"  # images referenced by an imported pairs file (LFW protocol)
MANIFEST = "manifest.json"
REPORT = "ingest_report.json"
FORMAT_VERSION = 2  # 2: every person kept, with a role; images found by content
MAX_LOGGED = 10  # rejected files named one by one in the log and the summary
ROLES = ("train_class", "eval", "distractor", "unused")  # "unused": kept, but in no protocol
HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # 16/32-bit greyscale: scaled to 8 bits


class IngestError(FaceopsError):
    pass


@dataclass(frozen=True)
class ClassRule:
    min_images: int  # people with fewer images are held out, not trained on
    max_images: int  # images a class trains on at most (a seeded pick); 0 = all


#: Named training-class rules (``ingest.train_classes.rule``).
TRAIN_CLASS_RULES: dict[str, ClassRule] = {
    "seeds": ClassRule(8, 150),  # seed 000: at least 8 images, at most 150 trained on (balanced classes)
    "all": ClassRule(2, 0),  # every person with two or more images, all of them
}


@dataclass
class TrainClassConfig:
    """Which people become training classes: a recipe choice, not a filter on what a dataset holds
    (people who do not qualify stay in the dataset, held out for evaluation)."""

    rule: str = "seeds"  # a name in TRAIN_CLASS_RULES: seeds (8-150 images), all (>= 2)
    min_images: int | None = None  # overrides the rule's minimum
    max_images: int | None = None  # overrides the rule's cap (0 = no cap)

    def __post_init__(self) -> None:
        check(self.rule in TRAIN_CLASS_RULES, f"train_classes.rule {self.rule!r} is not one of "
              f"{', '.join(TRAIN_CLASS_RULES)}")
        check(self.min_images is None or self.min_images >= 2,
              f"train_classes.min_images must be >= 2 (a class needs two images), got {self.min_images}")
        check(self.max_images is None or self.max_images >= 0,
              f"train_classes.max_images must be >= 0 (0 = no cap), got {self.max_images}")
        r = self.resolved()
        check(r.max_images == 0 or r.max_images >= r.min_images,
              f"train_classes.max_images ({r.max_images}) must be 0 or >= min_images ({r.min_images})")

    def resolved(self) -> ClassRule:
        base = TRAIN_CLASS_RULES[self.rule]
        return ClassRule(base.min_images if self.min_images is None else self.min_images,
                         base.max_images if self.max_images is None else self.max_images)

    def describe(self) -> str:
        r = self.resolved()
        cap = f"at most {r.max_images} trained on" if r.max_images else "all trained on"
        return f"{self.rule}: >= {r.min_images} images, {cap}"


@dataclass
class SplitConfig:
    """Shares of the people with >= 2 images (identity-disjoint). ``val``/``test`` are minimums: people
    the training-class rule leaves out are held out too, divided val:test in the same ratio, and so
    are the single-image people (distractors)."""

    train: float = 0.8
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
    train_classes: TrainClassConfig = field(default_factory=TrainClassConfig)
    min_images_per_identity: int | None = None  # deprecated alias of train_classes.min_images
    max_images_per_identity: int | None = None  # deprecated alias of train_classes.max_images
    min_image_size: int = 16  # smaller sources are rejected ("too small")
    pairs_per_split: int = 3000  # generated val/test verification pairs (half genuine)
    seed: int = 0
    workers: int = 0  # decoding processes; 0 = all cores
    shard_size: int = 4096  # images per shard file

    def __post_init__(self) -> None:
        check(self.shard_size >= 1, "shard_size must be >= 1")
        check(self.workers >= 0, "workers must be >= 0")
        check(self.pairs_per_split >= 2, f"pairs_per_split must be >= 2, got {self.pairs_per_split}")
        aliases = {"min_images": self.min_images_per_identity, "max_images": self.max_images_per_identity}
        given = {k: v for k, v in aliases.items() if v is not None}
        if given:  # the old names meant "drop people below"; now they only choose training classes
            log.warning("ingest.min/max_images_per_identity are deprecated: they now set "
                        "ingest.train_classes.min_images/max_images (who trains; every person is kept)")
            self.train_classes = replace(self.train_classes, **given)
            self.min_images_per_identity = self.max_images_per_identity = None


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
    """Every file under ``root/<identity>/`` (images are told by content later) and what is skipped:
    files beside the identity folders, and folders inside them."""
    if not root.exists():
        raise IngestError(f"source {root} does not exist: pass a folder of <identity>/<image> files "
                          "(e.g. LFW or ORL) or an s3://bucket/prefix")
    if not root.is_dir():
        raise IngestError(f"source {root} is a file, not a folder: pass the folder that holds one "
                          "sub-folder per identity")
    files, skipped = [], []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            skipped.append(entry.name)
            continue
        for f in sorted(entry.iterdir()):
            rel = f"{entry.name}/{f.name}"
            if f.is_dir() and f.suffix.lower() not in IMAGE_EXTS:  # an image-named folder is rejected later
                skipped.append(rel)
            else:
                files.append(Scanned(f, rel, entry.name))
    return files, skipped


def no_images_error(root: Path | str) -> IngestError:
    return IngestError(f"no images found under {root}: expected <root>/<identity>/<image> files in any format "
                       "Pillow reads (JPEG, PNG, GIF, BMP, TIFF, WebP, PGM, ...); point SOURCE at that root "
                       "folder")


def is_image(data: bytes) -> bool:
    """Whether Pillow recognises ``data`` as an image (header only: cheap)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False


def _means_image(rel: str) -> bool:
    return Path(rel).suffix.lower() in IMAGE_EXTS


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale (16-bit PGM/TIFF) scaled to 8 bits; ``convert("RGB")`` would clip it."""
    if img.mode not in HIGH_BIT_MODES:
        return img
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _decode(item: tuple[str, str, bytes, PrepareConfig, DegradeConfig, int]) -> Decoded:
    rel, sha, data, prep, deg, min_size = item
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()  # the first frame of an animated GIF / multi-page TIFF
    except (UnidentifiedImageError, SyntaxError):
        return Decoded(rel, sha, False, "not an image")
    except Image.DecompressionBombError as exc:
        return Decoded(rel, sha, False, f"too large ({exc})")
    except (OSError, ValueError, EOFError) as exc:
        return Decoded(rel, sha, False, f"truncated or corrupt ({exc})")
    if min(img.size) < min_size:
        return Decoded(rel, sha, False, f"too small ({img.size[0]}x{img.size[1]} < {min_size})")
    hr = prepare_face(_to_8bit(img), prep)
    seed = int(sha[:8], 16)
    vlr = {s: degrade(hr, s, deg, seed) for s in deg.sizes}
    return Decoded(rel, sha, True, size=img.size, hr=hr, vlr=vlr)


def _read(item: Scanned) -> tuple[bytes | None, str]:
    try:
        return item.path.read_bytes(), ""
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


# -- roles, splits and pairs -----------------------------------------------------------------------
@dataclass
class Plan:
    """Who serves which role, which images each split holds, and the generated pairs: everything
    ingest decides from identity names and image counts alone (no pixels)."""

    people: dict[str, dict]  # identity -> {"split", "role", "images"}
    split_images: dict[str, list[str]]  # split -> image ids ("<identity>/<file>") in shard order
    image_roles: dict[str, str]  # image id -> role (a training class's images beyond its cap: "unused")
    pairs: dict[str, list[tuple[int, int, bool]]]  # val/test: indices into the split
    protocol: dict[str, ProtocolSize]  # val/test

    def role_counts(self) -> dict[str, int]:
        return dict(Counter(p["role"] for p in self.people.values()))


def _targets(n: int, splits: SplitConfig) -> tuple[int, int]:
    """People the val and test fractions ask for (at least 2 each when there are 3+ people)."""
    n_val, n_test = int(round(n * splits.val)), int(round(n * splits.test))
    if splits.val > 0 and n >= 3:
        n_val = max(n_val, 2)
    if splits.test > 0 and n >= 3:
        n_test = max(n_test, 2)
    return n_val, n_test


def _divide(people: list[str], val_share: float, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A seeded val/test division with ``val_share`` of ``people`` in val."""
    order = [people[i] for i in rng.permutation(len(people))]
    k = int(round(len(order) * val_share))
    return order[:k], order[k:]


def assign_roles(counts: dict[str, int], cfg: IngestConfig) -> dict[str, tuple[str, str]]:
    """identity -> (split, role) for every identity.

    The val/test fractions of the people with >= 2 images are drawn first from the people the
    training-class rule leaves out (they cannot train), then from the rest; whoever the rule leaves
    out beyond that is held out as well. Everyone left trains. Single-image people are distractors,
    divided val:test in the same ratio.
    """
    rule = cfg.train_classes.resolved()
    rng = np.random.default_rng(cfg.seed)
    multi = sorted(i for i, n in counts.items() if n >= 2)
    singles = sorted(i for i, n in counts.items() if n < 2)
    left_out = [i for i in multi if counts[i] < rule.min_images]
    eligible = [i for i in multi if counts[i] >= rule.min_images]
    held_share = cfg.splits.val + cfg.splits.test
    if held_share == 0:  # nowhere to hold anyone out: kept, in no protocol
        out = {i: ("train", "train_class") for i in eligible}
        out.update({i: ("train", "unused") for i in left_out + singles})
        return out
    n_val, n_test = _targets(len(multi), cfg.splits)
    pool = [left_out[i] for i in rng.permutation(len(left_out))] + [eligible[i] for i in rng.permutation(len(eligible))]
    n_held = min(len(pool), max(n_val + n_test, len(left_out)))
    held = [pool[i] for i in rng.permutation(n_held)]
    k_val = n_val if n_held == n_val + n_test else int(round(n_held * cfg.splits.val / held_share))
    out = {i: ("train", "train_class") for i in pool[n_held:]}
    out.update({i: ("val", "eval") for i in held[:k_val]})
    out.update({i: ("test", "eval") for i in held[k_val:]})
    val_d, test_d = _divide(singles, cfg.splits.val / held_share, rng)
    out.update({i: ("val", "distractor") for i in val_d})
    out.update({i: ("test", "distractor") for i in test_d})
    return out


def plan_dataset(per_identity: dict[str, list[str]], cfg: IngestConfig) -> Plan:
    """Roles, split contents and pairs for ``per_identity`` (identity -> its image ids)."""
    roles = assign_roles({i: len(r) for i, r in per_identity.items()}, cfg)
    cap = cfg.train_classes.resolved().max_images
    rng = np.random.default_rng(cfg.seed)
    split_images: dict[str, list[str]] = {s: [] for s in SPLITS}
    image_roles: dict[str, str] = {}
    for ident in sorted(roles):
        split, role = roles[ident]
        rels = sorted(per_identity[ident])
        trained = set(rels)
        if role == "train_class" and cap and len(rels) > cap:  # balanced classes: a seeded pick trains
            trained = {rels[k] for k in rng.choice(len(rels), cap, replace=False)}
        for rel in rels:
            image_roles[rel] = role if rel in trained else "unused"
        split_images[split].extend(rels)
    pairs, protocol = {}, {}
    for k, split in enumerate(HELD_OUT, start=1):
        names = [r.split("/", 1)[0] for r in split_images[split]]
        labels = np.unique(names, return_inverse=True)[1] if names else np.zeros(0, np.int64)
        pairs[split] = generate_pairs(labels, cfg.pairs_per_split, cfg.seed + k)
        protocol[split] = protocol_size(labels, pairs[split])
    people = {i: {"split": s, "role": r, "images": len(per_identity[i])} for i, (s, r) in sorted(roles.items())}
    return Plan(people, split_images, image_roles, pairs, protocol)


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
    items, raw, shas, rejected, skipped = _read_all(root)
    if skipped:
        log.info("skipping %d non-image file(s), e.g. %s", len(skipped), ", ".join(skipped[:3]))
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

    per_identity: dict[str, list[str]] = defaultdict(list)
    for rel in sorted(good):
        per_identity[rel.split("/", 1)[0]].append(rel)
    plan = plan_dataset(per_identity, cfg)
    _warn_small(plan, cfg)
    imported = _import_pairs(pairs_file, good, plan) if pairs_text is not None else None

    manifest, shard_bytes = _write_shards(store, prefix, plan, good, cfg, imported, progress)
    stats = _summary(plan, cfg, items, good, rejected, skipped, imported, shard_bytes, t0)
    report = {"dataset": name, "source": source, "summary": stats,
              "skipped_non_image_files": skipped, "rejected": sorted(rejected, key=lambda r: r["file"]),
              "accepted": len(good)}
    store.put_bytes(f"{prefix}/{REPORT}", json.dumps(report, indent=1).encode())
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
    raced = _existing_manifest(store, prefix)  # a concurrent ingest published while this one worked
    if raced is not None:
        if raced.get("fingerprint") == fingerprint:
            return IngestResult(store.url(prefix), raced["content_hash"], True, raced["summary"])
        raise IngestError(f"dataset {store.url(prefix)} was published by a concurrent ingest with different "
                          f"content (hash {raced['content_hash'][:12]}); datasets are immutable: use a new --name")
    store.put_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=1).encode())  # publish: last
    return IngestResult(store.url(prefix), content_hash, False, stats)


def _read_all(root: Path) -> tuple[list[Scanned], dict[str, bytes], dict[str, str], list[dict], list[str]]:
    """(image candidates, their bytes, their sha256, rejected, skipped): a file whose name does not
    say "image" and whose content Pillow does not recognise is skipped as a non-image."""
    files, skipped = scan(root)
    items: list[Scanned] = []
    raw: dict[str, bytes] = {}
    shas: dict[str, str] = {}
    rejected: list[dict] = []
    for it in files:
        data, why = _read(it)
        if data is not None and not _means_image(it.rel) and not is_image(data):
            skipped.append(it.rel)
            continue
        items.append(it)
        if data is None:
            rejected.append({"file": it.rel, "reason": why})
        elif not data:
            rejected.append({"file": it.rel, "reason": "zero-byte file"})
        else:
            raw[it.rel] = data
            shas[it.rel] = sha256_bytes(data)
    if not items:
        raise no_images_error(root)
    return items, raw, shas, rejected, sorted(skipped)


def _warn_small(plan: Plan, cfg: IngestConfig) -> None:
    """Say so when the data cannot give the protocol or the training classes a run expects."""
    if not any(p["role"] == "train_class" for p in plan.people.values()) and cfg.splits.train > 0:
        log.warning("no training classes: no person meets the training-class rule (%s); set "
                    "ingest.train_classes (e.g. rule: all) to train on this dataset", cfg.train_classes.describe())
    short = plan.protocol["test"].shortfall()
    if short and cfg.splits.test > 0:
        log.warning("test split: %s", short)


def _summary(plan: Plan, cfg: IngestConfig, items: list[Scanned], good: dict[str, Decoded], rejected: list[dict],
             skipped: list[str], imported: dict | None, shard_bytes: int, t0: float) -> dict:
    """The ingest summary (CLI table, ingest_report.json, manifest): splits count what their reader
    returns, so ``train`` is the training classes and their trained images."""
    splits = {}
    for split, rels in plan.split_images.items():
        if split == PAIRS_SPLIT:
            splits[split] = {"identities": len({r.split("/", 1)[0] for r in rels}), "images": len(rels)}
            continue
        used = [r for r in rels if split != "train" or plan.image_roles[r] == "train_class"]
        people = {r.split("/", 1)[0] for r in used}
        splits[split] = {"identities": len(people), "images": len(used)}
        if split in HELD_OUT:
            splits[split]["distractors"] = sum(plan.people[i]["role"] == "distractor" for i in people)
    roles = plan.role_counts()
    return {
        "scanned": len(items), "accepted": len(good), "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"].split(" (")[0].split(" of ")[0] for r in rejected)),
        "skipped_non_image": len(skipped),
        "identities_found": len(plan.people), "train_classes": roles.get("train_class", 0),
        "train_class_rule": cfg.train_classes.describe(),
        "roles": {r: roles.get(r, 0) for r in ROLES},
        "distractor_identities": roles.get("distractor", 0),
        "train_images_over_cap": sum(1 for rel, r in plan.image_roles.items()
                                     if r == "unused" and plan.people[rel.split("/", 1)[0]]["role"] == "train_class"),
        "splits": splits,
        "pairs": {**{s: len(p) for s, p in plan.pairs.items()},
                  **({PAIRS_SPLIT: len(imported["pairs"])} if imported else {})},
        "protocol": {s: p.as_dict() for s, p in plan.protocol.items()},
        "bytes": shard_bytes, "seconds": round(time.time() - t0, 2),
        "rejected_files": [f"{r['file']}: {r['reason']}" for r in sorted(rejected, key=lambda r: r["file"])
                           ][:MAX_LOGGED],
    }


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


def _import_pairs(pairs_file: str, good: dict[str, Decoded], plan: Plan) -> dict:
    """Resolve an LFW pairs file; its images form the ``pairs`` split (identities may overlap train),
    and its folds are kept. ``name_NNNN.jpg`` also matches the same stem in another format."""
    parsed = parse_pairs(pairs_file)
    for k, p in enumerate(parsed.pairs):
        for who in (p.name1, p.name2):
            if not who or who in (".", "..") or "/" in who or "\\" in who:
                raise IngestError(f"{pairs_file}: pair {k + 1} names {who!r}, which is not an identity folder "
                                  "of the source (a path or '..' would escape it): use bare identity names "
                                  "as in LFW's pairs.txt")
    by_stem: dict[str, str] = {}
    for rel in sorted(good):
        by_stem.setdefault(rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel, rel)

    def resolve(name: str, num: int) -> str:
        rel = image_path("", name, num).as_posix()
        return rel if rel in good else by_stem.get(rel.rsplit(".", 1)[0], rel)

    refs = [(resolve(p.name1, p.num1), resolve(p.name2, p.num2), p) for p in parsed.pairs]
    miss = sorted({f for a, b, _ in refs for f in (a, b) if f not in good})
    if miss:
        raise IngestError(f"{pairs_file}: pairs reference {len(miss)} image(s) missing from the source "
                          f"or rejected at ingest, e.g. {miss[:3]} (see the rejected files above): add them "
                          "to the source or use the pairs file that belongs to it")
    files = sorted({f for a, b, _ in refs for f in (a, b)})
    plan.split_images[PAIRS_SPLIT] = files
    index = {f: i for i, f in enumerate(files)}
    return {"pairs": [(index[a], index[b], p.genuine) for a, b, p in refs],
            "folds": [p.fold for _, _, p in refs], "n_folds": parsed.n_folds, "file": Path(pairs_file).name}


def _write_shards(store: ObjectStore, prefix: str, plan: Plan, good: dict[str, Decoded], cfg: IngestConfig,
                  imported: dict | None, progress: bool) -> tuple[dict, int]:
    identities = sorted(plan.people)
    images, shards, nbytes = [], {}, 0
    views = ["hr"] + [f"vlr_{s}" for s in cfg.degrade.sizes]
    bar = tqdm(total=sum(len(v) for v in plan.split_images.values()), desc="write shards", unit="img",
               disable=not progress)
    for split, rels in plan.split_images.items():
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
            role = "eval" if split == PAIRS_SPLIT else plan.image_roles[rel]
            images.append({"id": rel, "identity": rel.split("/", 1)[0], "split": split, "role": role,
                           "sha256": d.sha256, "hr_size": list(d.size), "index": off})
    bar.close()
    pairs = {s: [list(p) for p in v] for s, v in plan.pairs.items()}
    if imported is not None:
        pairs[PAIRS_SPLIT] = imported["pairs"]
    manifest = {"identities": identities, "people": plan.people, "images": images, "shards": shards,
                "pairs": pairs, "views": views}
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
    roles = s["roles"]
    unused = f", {roles['unused']} unused" if roles["unused"] else ""
    rows += [("skipped non-image files", s["skipped_non_image"]),
             ("people", f"{s['identities_found']}: {roles['train_class']} training classes, {roles['eval']} eval, "
                        f"{roles['distractor']} distractors{unused}"),
             ("training-class rule", s["train_class_rule"]),
             ("images over the class cap", s["train_images_over_cap"])]
    for k, v in s["splits"].items():
        extra = f", {v['distractors']} distractors" if v.get("distractors") else ""
        rows.append((f"split {k}", f"{v['identities']} ids, {v['images']} images{extra}"))
    rows += [(f"pairs {k}", v) for k, v in s["pairs"].items()]
    for k, p in s["protocol"].items():
        size = f"{p['people']} people (+{p['distractors']} distractors), {p['pairs']} pairs"
        rows.append((f"protocol {k}", size if p["measurable"] else f"{size}: too small to compare recipes"))
    rows += [("bytes", f"{s['bytes'] / 1e6:.1f} MB"), ("time", f"{s['seconds']:.1f} s")]
    width = max(len(str(k)) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
