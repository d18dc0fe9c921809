"""Ingest: counts, rejects with reasons, identity-disjoint splits, checksums, idempotence, S3."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceops.cli import main
from faceops.data.ingest import IngestConfig, ingest
from faceops.data.manifest import load_manifest
from faceops.data.reader import load_split
from faceops.data.synth import synthesize
from faceops.storage import IntegrityError, open_store


def _report(store: str, name: str) -> dict:
    return json.loads(open_store(store).get_bytes(f"datasets/{name}/ingest_report.json"))


def _cfg(**kw) -> IngestConfig:
    return IngestConfig(min_images_per_identity=2, pairs_per_split=40, **kw)


@pytest.fixture
def faces(tmp_path) -> Path:
    return synthesize(tmp_path / "faces", identities=8, images_per_identity=5, seed=3, progress=False)


def test_bad_files_are_rejected_with_reasons(tmp_path, faces):
    bad = faces / "id_0000"
    (bad / "zero.jpg").write_bytes(b"")
    good_jpeg = bad / "ok.jpg"
    Image.open(faces / "id_0001" / "0000.png").save(good_jpeg, quality=90)
    (bad / "truncated.jpg").write_bytes(good_jpeg.read_bytes()[:300])
    good_jpeg.unlink()
    (bad / "text.jpg").write_text("this is not an image")
    Image.new("RGB", (1, 1)).save(bad / "tiny.png")
    shutil.copy(faces / "id_0002" / "0001.png", bad / "dup.png")
    (bad / "unreadable.jpg").mkdir()  # a folder with an image name: cannot be read as a file
    (faces / "notes.txt").write_text("a README beside the identity folders")
    (bad / "meta.json").write_text("{}")
    store = str(tmp_path / "store")
    res = ingest(str(faces), "bad", store, _cfg(), progress=False)
    s = res.summary
    reasons = {r["file"]: r["reason"] for r in _report(store, "bad")["rejected"]}
    assert reasons["id_0000/zero.jpg"] == "zero-byte file"
    assert reasons["id_0000/truncated.jpg"].startswith("truncated")
    assert reasons["id_0000/text.jpg"] == "not an image"
    assert reasons["id_0000/tiny.png"].startswith("too small")
    assert reasons.get("id_0000/dup.png") == "duplicate of id_0002/0001.png" or \
        reasons.get("id_0002/0001.png") == "duplicate of id_0000/dup.png"
    assert reasons["id_0000/unreadable.jpg"].startswith("unreadable")
    assert s["accepted"] == 40 and s["rejected"] == 6  # one of the duplicate pair is kept
    assert s["accepted"] + s["rejected"] == s["scanned"] == 46
    assert s["skipped_non_image"] == 2


def test_splits_disjoint_checksums_and_idempotent(tmp_path, faces, capsys):
    store = str(tmp_path / "store")
    r1 = ingest(str(faces), "syn", store, _cfg(), progress=False)
    m = load_manifest(r1.uri)
    by_split = {s: {im["identity"] for im in m["images"] if im["split"] == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert all(len(v) >= 1 for v in by_split.values())
    for split in ("val", "test"):
        pairs = m["pairs"][split]
        assert sum(p[2] for p in pairs) * 2 == len(pairs) > 0  # balanced
    train = load_split(r1.uri, "train")
    assert train.hr.shape[1:] == (112, 112, 3) and train.vlr["14x16"].shape[1:] == (16, 14, 3)
    assert train.vlr["32x32"].dtype == np.uint8
    # second run: already present, same hash, nothing written
    rc = main(["ingest", str(faces), "--name", "syn", "--store", store, "--set", "min_images_per_identity=2",
               "--set", "pairs_per_split=40"])
    out = capsys.readouterr().out
    assert rc == 0 and "already present" in out and r1.content_hash[:16] in out
    # a tampered shard is detected with a clear error naming it
    shard = Path(store) / "datasets/syn" / m["shards"]["train"][0]["files"]["hr"]["key"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="hr-00000.npy"):
        load_split(r1.uri, "train")


def test_same_name_different_content_is_refused(tmp_path, faces):
    store = str(tmp_path / "store")
    ingest(str(faces), "syn", store, _cfg(), progress=False)
    with pytest.raises(Exception, match="immutable"):
        ingest(str(faces), "syn", store, _cfg(seed=5), progress=False)


def test_deterministic_content_hash(tmp_path, faces):
    a = ingest(str(faces), "a", str(tmp_path / "s1"), _cfg(), progress=False)
    b = ingest(str(faces), "a", str(tmp_path / "s2"), _cfg(), progress=False)
    assert a.content_hash == b.content_hash


@pytest.mark.realdata
def test_orl_local_and_s3(tmp_path, data_dir, s3_bucket):
    cfg = IngestConfig()
    local = ingest(str(data_dir / "orl"), "orl", str(tmp_path / "store"), cfg, progress=False)
    s = local.summary
    assert (s["scanned"], s["accepted"], s["rejected"], s["identities_found"]) == (400, 400, 0, 40)
    assert s["skipped_non_image"] == 1  # README.txt
    remote = ingest(str(data_dir / "orl"), "orl", s3_bucket, cfg, progress=False)
    assert remote.content_hash == local.content_hash
    test = load_split(remote.uri, "test")  # through the checksum-verifying cache
    assert len(test) == s["splits"]["test"]["images"]
    # an S3 source: the dataset folder uploaded under a prefix, then ingested from s3://
    src = open_store(f"{s3_bucket}/raw")
    for p in sorted((data_dir / "orl" / "s1").iterdir())[:4] + sorted((data_dir / "orl" / "s2").iterdir())[:4]:
        src.put_file(f"{p.parent.name}/{p.name}", p)
    r = ingest(f"{s3_bucket}/raw", "orl-s3src", str(tmp_path / "store"), IngestConfig(min_images_per_identity=2),
               progress=False)
    assert r.summary["accepted"] == 8


@pytest.mark.realdata
@pytest.mark.slow
def test_lfw_devtrain_with_pairs(tmp_path, data_dir):
    cfg = IngestConfig()
    cfg.prepare.center_crop = 128
    r = ingest(str(data_dir / "lfw_devtrain"), "lfw", str(tmp_path / "store"), cfg,
               pairs_file=str(data_dir / "lfw_meta" / "pairsDevTrain.txt"), progress=False)
    s = r.summary
    assert (s["scanned"], s["accepted"], s["identities_found"]) == (9525, 9525, 4038)
    assert s["pairs"]["pairs"] == 2200
    pairs = load_split(r.uri, "pairs")
    assert len(pairs.pairs) == 2200 and sum(p[2] for p in pairs.pairs) == 1100
    assert len(set(pairs.folds)) == 1  # pairsDevTrain has one set


def test_s3_endpoint_down_names_endpoint_and_publishes_nothing(tmp_path, faces, monkeypatch, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("FACEOPS_S3_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("FACEOPS_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("FACEOPS_S3_SECRET_KEY", "s3cr3t-value")
    monkeypatch.setenv("FACEOPS_S3_SECURE", "false")
    rc = main(["ingest", str(faces), "--name", "x", "--store", "s3://bucket"])
    err = capsys.readouterr().err
    assert rc == 1 and f"127.0.0.1:{port}" in err and "s3cr3t-value" not in err
