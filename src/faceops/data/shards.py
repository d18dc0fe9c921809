"""Ingest step 4: park decoded faces on local disk, then write each split's shards from there.

Which split an image lands in, and where, is known only once every image has been decoded (a file
that fails to decode changes the plan). Rather than hold every face in memory until then, each one is
appended to a scratch file per view, one fixed-size record per image. Shards are then written one
file at a time, the ``.npy`` header followed by the records in shard order, so memory holds one face,
never a split; the bytes are exactly those ``np.save`` writes for the stacked array.

Scratch and shard files are read and written with plain file I/O, not a memory map, so the pages
they pass through stay in the page cache instead of counting against the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from faceops.data.decode import Decoded
from faceops.data.ingest_config import IngestError
from faceops.storage import ObjectInfo, ObjectStore


@dataclass(frozen=True)
class StoredFace:
    """An accepted image once its pixels are in the scratch: what the manifest and shards need."""

    sha256: str
    size: tuple[int, int]  # the source image's (width, height)
    slot: int  # its record in every view's scratch file


def views_of(sizes: list[str]) -> list[str]:
    """Shard views in manifest order: ``hr``, then ``vlr_<WxH>`` per degraded size."""
    return ["hr"] + [f"vlr_{s}" for s in sizes]


class FaceScratch:
    """Decoded faces on local disk, per view, addressable by slot; a context manager that closes them."""

    def __init__(self, folder: Path, views: list[str]) -> None:
        self.views = views
        self.layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # view -> (face shape, dtype)
        # open for the scratch's lifetime, closed by close() / the with block
        self._files: dict[str, BinaryIO] = {v: open(folder / f"{v}.bin", "w+b") for v in views}  # noqa: SIM115
        self._count = 0

    def add(self, d: Decoded) -> StoredFace:
        """Append ``d``'s views; its arrays can be dropped once this returns."""
        arrays = {"hr": d.hr, **{f"vlr_{s}": a for s, a in d.vlr.items()}}
        for view in self.views:
            arr = np.ascontiguousarray(arrays[view])
            want = self.layout.setdefault(view, (arr.shape, arr.dtype))
            if (arr.shape, arr.dtype) != want:  # shards are fixed-size: prepare/degrade always agree
                raise IngestError(f"internal error: {view} of {d.rel} is {arr.dtype}{list(arr.shape)}, "
                                  f"other faces {want[1]}{list(want[0])}")
            self._files[view].write(arr.tobytes())
        self._count += 1
        return StoredFace(d.sha256, d.size, self._count - 1)

    def record(self, view: str, slot: int) -> bytes:
        shape, dtype = self.layout[view]
        size = int(np.prod(shape)) * dtype.itemsize
        f = self._files[view]
        f.seek(slot * size)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> FaceScratch:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_shards(store: ObjectStore, prefix: str, split_images: dict[str, list[str]], faces: dict[str, StoredFace],
                 scratch: FaceScratch, shard_size: int, workdir: Path, progress: bool) -> tuple[dict, int]:
    """Every split's shards (``shards/<split>/<view>-<k>.npy``) put to ``store``: the manifest's
    ``shards`` entry and the bytes written."""
    shards: dict[str, list[dict]] = {}
    nbytes = 0
    bar = tqdm(total=sum(len(v) for v in split_images.values()), desc="write shards", unit="img",
               disable=not progress)
    for split, rels in split_images.items():
        shards[split] = []
        for k in range(0, len(rels), shard_size):
            chunk = rels[k:k + shard_size]
            slots = [faces[r].slot for r in chunk]
            files = {}
            for view in scratch.views:
                key = f"shards/{split}/{view}-{k // shard_size:05d}.npy"
                shape, info = _put_shard(store, f"{prefix}/{key}", scratch, view, slots, workdir)
                files[view] = {"key": key, "sha256": info.sha256, "shape": list(shape)}
                nbytes += info.size
            shards[split].append({"count": len(chunk), "files": files})
            bar.update(len(chunk))
    bar.close()
    return shards, nbytes


def _put_shard(store: ObjectStore, key: str, scratch: FaceScratch, view: str, slots: list[int],
               workdir: Path) -> tuple[tuple[int, ...], ObjectInfo]:
    """One shard file, built on disk record by record, then stored (``put_file`` can retry it)."""
    face_shape, dtype = scratch.layout[view]
    shape = (len(slots), *face_shape)
    path = workdir / "shard.npy"
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)  # np.save's header for this shape
            for slot in slots:
                f.write(scratch.record(view, slot))
        return shape, store.put_file(key, path)
    finally:
        path.unlink(missing_ok=True)
