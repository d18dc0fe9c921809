"""Ingest step 2: decode and prepare one image at a time (its HR face and seeded VLR views).

A file that does not decode becomes a :class:`Decoded` with ``ok=False`` and the reason (rejected,
not fatal). Decoding runs in worker processes in chunks, exactly as ``pool.map(chunksize=CHUNK)``
would, but with only a few chunks in flight: the files are read as the workers need them, so
memory holds a handful of images, not a dataset's bytes and faces. Results come back in input order.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from faceops.data.degrade import DegradeConfig, degrade
from faceops.data.ingest_config import IngestConfig, IngestError
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.data.scan import SourceScan, read_file
from faceops.storage import sha256_bytes

HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # 16/32-bit greyscale: scaled to 8 bits
PARALLEL_MIN = 64  # fewer images are decoded in this process: a pool would cost more than it saves
CHUNK = 32  # images per task a worker takes
AHEAD = 4  # chunks in flight per worker: enough to keep it busy, few enough to bound memory

#: (image id, its sha256, its bytes, prepare config, degrade config, smallest accepted side)
DecodeJob = tuple[str, str, bytes, PrepareConfig, DegradeConfig, int]


@dataclass
class Decoded:
    rel: str
    sha256: str
    ok: bool
    reason: str = ""
    size: tuple[int, int] = (0, 0)
    hr: np.ndarray | None = None
    vlr: dict[str, np.ndarray] = field(default_factory=dict)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale (16-bit PGM/TIFF) scaled to 8 bits; ``convert("RGB")`` would clip it."""
    if img.mode not in HIGH_BIT_MODES:
        return img
    a = np.asarray(img, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def decode_job(job: DecodeJob) -> Decoded:
    """One image's bytes -> its HR face and VLR views (the VLR noise is seeded by its sha256)."""
    rel, sha, data, prep, deg, min_size = job
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


def decode_jobs(found: SourceScan, cfg: IngestConfig) -> Iterator[DecodeJob]:
    """The scan's unique candidates as jobs, each file read again only when its turn comes."""
    for item, sha in found.to_decode():
        data, why = read_file(item.path)
        if data is None or sha256_bytes(data) != sha:
            raise IngestError(f"{item.path} changed while it was being ingested ({why or 'new content'}): "
                              "re-run the ingest once nothing writes to the source")
        yield item.rel, sha, data, cfg.prepare, cfg.degrade, cfg.min_image_size


def decode_all(jobs: Iterable[DecodeJob], total: int, workers: int, progress: bool) -> Iterator[Decoded]:
    """Every job decoded, in order: in worker processes (``workers``; 0 = all cores) unless few."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=total, desc="decode+prepare", unit="img", disable=not progress)
    try:
        if workers == 1 or total < PARALLEL_MIN:
            for job in jobs:
                yield decode_job(job)
                bar.update()
            return
        with ProcessPoolExecutor(workers) as pool:
            for chunk in _bounded(pool, jobs, workers * AHEAD):
                yield from chunk
                bar.update(len(chunk))
    finally:
        bar.close()


def _decode_chunk(jobs: list[DecodeJob]) -> list[Decoded]:
    return [decode_job(job) for job in jobs]


def _bounded(pool: ProcessPoolExecutor, jobs: Iterable[DecodeJob], window: int) -> Iterator[list[Decoded]]:
    """``pool.map(decode_job, jobs, chunksize=CHUNK)``, chunk by chunk, with at most ``window`` chunks
    submitted ahead (``Executor.map`` submits all of them at once, and so holds every job's bytes)."""
    pending: deque[Future[list[Decoded]]] = deque()
    it = iter(jobs)
    try:
        while chunk := list(islice(it, CHUNK)):
            pending.append(pool.submit(_decode_chunk, chunk))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an ingest that stops (an error, a changed file) does not wait for work it will not use
        for future in pending:
            future.cancel()
