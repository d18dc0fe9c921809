"""Ingest step 1: find the image candidates under a source folder, checksum them, drop duplicates.

Each file is read once, hashed and let go: a scan holds names and checksums, never the bytes of a
dataset (decoding reads each file again, one at a time). Files are told by content, not by name:
anything Pillow opens is an image, and a file that is neither named nor shaped like one is skipped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from faceops.data.ingest_config import IngestError
from faceops.storage import sha256_bytes

# A file with one of these names that does not decode is *rejected* (it was meant to be an image);
# any other file is tried by content and, when Pillow cannot read it, *skipped* as a non-image.
IMAGE_EXTS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
              ".webp", ".pgm", ".ppm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif", ".qoi", ".ico",
              ".sgi", ".ras", ".pcx"}


@dataclass
class Scanned:
    path: Path
    rel: str  # "<identity>/<file>"
    identity: str


@dataclass
class SourceScan:
    """What the scan found; ``accepted + rejected == len(items)`` holds from here to the report."""

    items: list[Scanned]  # every image candidate, in scan order
    shas: dict[str, str]  # rel -> sha256 of each readable, non-empty candidate
    rejected: list[dict]  # {"file", "reason"}: unreadable and zero-byte files, then duplicates
    skipped: list[str]  # non-image files and folders, sorted
    unique: list[str]  # candidates left to decode: sorted, the first path of each content

    def to_decode(self) -> list[tuple[Scanned, str]]:
        """The unique candidates with their checksums, in decoding order."""
        by_rel = {it.rel: it for it in self.items}
        return [(by_rel[rel], self.shas[rel]) for rel in self.unique]


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


def scan_source(root: Path) -> SourceScan:
    """Scan ``root`` and checksum every candidate, one file in memory at a time."""
    files, skipped = scan(root)
    items: list[Scanned] = []
    shas: dict[str, str] = {}
    rejected: list[dict] = []
    for it in files:
        data, why = read_file(it.path)
        if data is not None and not _means_image(it.rel) and not is_image(data):
            skipped.append(it.rel)
            continue
        items.append(it)
        if data is None:
            rejected.append({"file": it.rel, "reason": why})
        elif not data:
            rejected.append({"file": it.rel, "reason": "zero-byte file"})
        else:
            shas[it.rel] = sha256_bytes(data)
    if not items:
        raise no_images_error(root)
    return SourceScan(items, shas, rejected, sorted(skipped), _first_of_each(shas, rejected))


def _first_of_each(shas: dict[str, str], rejected: list[dict]) -> list[str]:
    """Duplicates by content are rejected (appended to ``rejected``): the first path, sorted, wins."""
    first_of: dict[str, str] = {}
    unique: list[str] = []
    for rel in sorted(shas):
        sha = shas[rel]
        if sha in first_of:
            rejected.append({"file": rel, "reason": f"duplicate of {first_of[sha]}"})
        else:
            first_of[sha] = rel
            unique.append(rel)
    return unique


def read_file(path: Path) -> tuple[bytes | None, str]:
    """The file's bytes, or None and why it cannot be read (a rejection reason, not an exception)."""
    try:
        return path.read_bytes(), ""
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"


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
