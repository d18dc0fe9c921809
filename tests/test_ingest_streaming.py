"""The streaming ingest's steps: shards written record by record are the bytes ``np.save`` writes,
parallel decoding keeps the input order with few images in flight, a file that changes between the
scan and its decoding is named, and an ingest's memory does not grow with the dataset."""

import io
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceops.data import decode as decode_step
from faceops.data.decode import AHEAD, CHUNK, Decoded, DecodeJob, decode_all
from faceops.data.ingest import IngestConfig, IngestError, TrainClassConfig, ingest
from faceops.data.shards import FaceScratch, views_of, write_shards
from faceops.data.synth import synthesize
from faceops.storage import open_store

SIZES = ["32x32", "14x16"]


def _decoded(rel: str, rng: np.random.Generator) -> Decoded:
    vlr = {s: rng.integers(0, 256, (int(s.split("x")[1]), int(s.split("x")[0]), 3), dtype=np.uint8) for s in SIZES}
    return Decoded(rel, "0" * 64, True, size=(250, 250), hr=rng.integers(0, 256, (112, 112, 3), dtype=np.uint8),
                   vlr=vlr)


def test_shards_are_the_bytes_np_save_writes(tmp_path: Path) -> None:
    """Byte identity with the stacked-array shards of earlier ingests keeps their content hashes."""
    rng = np.random.default_rng(0)
    decoded = {d.rel: d for d in (_decoded(f"p{i}/{i}.png", rng) for i in range(7))}
    rels = list(decoded)
    split_images = {"train": rels[:5], "test": [], "pairs": [rels[6], rels[1]]}  # p1 is in two splits
    store = open_store(str(tmp_path / "store"))
    with FaceScratch(tmp_path, views_of(SIZES)) as scratch:
        faces = {rel: scratch.add(d) for rel, d in decoded.items()}
        shards, nbytes = write_shards(store, "ds", split_images, faces, scratch, 2, tmp_path, progress=False)
    written = 0
    for split, members in split_images.items():
        assert [s["count"] for s in shards[split]] == [len(members[k:k + 2]) for k in range(0, len(members), 2)]
        for k, shard in enumerate(shards[split]):
            assert list(shard["files"]) == ["hr", "vlr_32x32", "vlr_14x16"]
            for view, entry in shard["files"].items():
                arr = np.stack([decoded[r].hr if view == "hr" else decoded[r].vlr[view[4:]]
                                for r in members[2 * k:2 * k + 2]])
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                assert store.get_bytes(f"ds/{entry['key']}") == buf.getvalue(), entry["key"]
                assert entry["shape"] == list(arr.shape)
                written += len(buf.getvalue())
    assert nbytes == written
    assert list(tmp_path.glob("shard*")) == []  # each shard's temporary file is gone once stored


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_parallel_decode_keeps_the_order_and_few_images_in_flight() -> None:
    cfg, total, workers = IngestConfig(), 300, 2
    pulled: list[int] = []

    def jobs() -> Iterator[DecodeJob]:
        for i in range(total):
            pulled.append(i)
            yield f"p/{i:04d}.png", f"{i:08x}", _png(i) if i % 7 else b"broken", cfg.prepare, cfg.degrade, 16

    parallel = []
    for d in decode_all(jobs(), total, workers, progress=False):
        if not parallel:  # the first result comes while most files are still unread
            assert len(pulled) <= CHUNK * workers * AHEAD < total
        parallel.append(d)
    serial = list(decode_all(jobs(), total, 1, progress=False))
    assert [d.rel for d in parallel] == [d.rel for d in serial] == [f"p/{i:04d}.png" for i in range(total)]
    assert [d.ok for d in parallel] == [bool(i % 7) for i in range(total)]
    for p, s in zip(parallel, serial, strict=True):
        assert p.reason == s.reason
        if p.ok:
            np.testing.assert_array_equal(p.hr, s.hr)
            for size in cfg.degrade.sizes:
                np.testing.assert_array_equal(p.vlr[size], s.vlr[size])


def _cfg() -> IngestConfig:
    return IngestConfig(train_classes=TrainClassConfig(rule="all"), pairs_per_split=40, workers=1, shard_size=16)


def test_a_file_changed_during_the_ingest_is_named_and_nothing_is_published(tmp_path: Path, monkeypatch) -> None:
    faces = synthesize(tmp_path / "faces", identities=3, images_per_identity=3, seed=2, progress=False)
    changed = faces / "id_0001" / "0001.png"
    read_file = decode_step.read_file

    def read_after_a_write(path: Path) -> tuple[bytes | None, str]:
        data, why = read_file(path)
        return (data + b"appended" if path == changed and data else data), why

    monkeypatch.setattr(decode_step, "read_file", read_after_a_write)  # the scan read it before the write
    with pytest.raises(IngestError, match=f"{changed} changed while it was being ingested"):
        ingest(str(faces), "d", str(tmp_path / "store"), _cfg(), progress=False)
    assert not (tmp_path / "store" / "datasets" / "d" / "manifest.json").exists()


def _peak_bytes(faces: Path, store: Path, name: str) -> int:
    tracemalloc.start()
    try:
        ingest(str(faces), name, str(store), _cfg(), progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ingest_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    """Twice the images, about the same peak: no step holds every file's bytes or every face."""
    small = synthesize(tmp_path / "small", identities=6, images_per_identity=10, seed=6, progress=False)
    large = synthesize(tmp_path / "large", identities=12, images_per_identity=10, seed=6, progress=False)
    _peak_bytes(small, tmp_path / "store", "warm")  # first use imports Pillow plugins etc.
    peaks = [_peak_bytes(src, tmp_path / "store", src.name) for src in (small, large)]
    hr_face = 112 * 112 * 3  # one face's HR view alone; the files and VLR views would add more
    extra_images = 60
    assert peaks[1] - peaks[0] < extra_images * hr_face / 4, peaks
