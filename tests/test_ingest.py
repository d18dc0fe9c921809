"""Ingest: counts, rejects with reasons, identity-disjoint splits, roles (training classes, eval people,
distractors), images found by content, checksums, idempotence, S3, and the LFW devtrain protocol."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceops.cli import main
from faceops.config import ConfigError, from_dict
from faceops.data.ingest import (
    IngestConfig,
    SplitConfig,
    TrainClassConfig,
    ingest,
    plan_dataset,
)
from faceops.data.manifest import load_manifest
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.data.reader import load_split
from faceops.data.synth import synthesize
from faceops.evaluate import identification_metrics
from faceops.evaluate.pairs import MIN_PROTOCOL_PAIRS, MIN_PROTOCOL_PEOPLE
from faceops.storage import IntegrityError, open_store


def _report(store: str, name: str) -> dict:
    return json.loads(open_store(store).get_bytes(f"datasets/{name}/ingest_report.json"))


def _cfg(**kw) -> IngestConfig:
    kw.setdefault("train_classes", TrainClassConfig(rule="all"))
    return IngestConfig(pairs_per_split=40, **kw)


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
    rc = main(["ingest", str(faces), "--name", "syn", "--store", store, "--set", "train_classes.rule=all",
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
    r = ingest(f"{s3_bucket}/raw", "orl-s3src", str(tmp_path / "store"),
               IngestConfig(train_classes=TrainClassConfig(rule="all")), progress=False)
    assert r.summary["accepted"] == 8


@pytest.mark.realdata
@pytest.mark.slow
def test_lfw_devtrain_with_pairs(tmp_path, data_dir):
    """The default config on LFW devtrain: every person kept, a measurable held-out protocol, and the
    imported View 1 pairs beside it."""
    cfg = IngestConfig()
    cfg.prepare.center_crop = 128
    r = ingest(str(data_dir / "lfw_devtrain"), "lfw", str(tmp_path / "store"), cfg,
               pairs_file=str(data_dir / "lfw_meta" / "pairsDevTrain.txt"), progress=False)
    s = r.summary
    assert (s["scanned"], s["accepted"], s["identities_found"]) == (9525, 9525, 4038)
    assert sum(s["roles"].values()) == 4038 and s["roles"]["distractor"] == 2854  # every 1-image person
    assert s["pairs"]["pairs"] == 2200
    pairs = load_split(r.uri, "pairs")
    assert len(pairs.pairs) == 2200 and sum(p[2] for p in pairs.pairs) == 1100
    assert len(set(pairs.folds)) == 1  # pairsDevTrain has one set
    test = load_split(r.uri, "test", views=["hr"])
    counts = np.bincount(test.labels)
    assert (counts >= 2).sum() >= MIN_PROTOCOL_PEOPLE and len(test.pairs) >= MIN_PROTOCOL_PAIRS
    assert (counts == 1).sum() == s["splits"]["test"]["distractors"] > 0
    train = load_split(r.uri, "train", views=["hr"])
    assert np.bincount(train.labels).min() >= 8 and np.bincount(train.labels).max() <= 150


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


# -- every person kept, with a role ----------------------------------------------------------------
def _add_singles(faces: Path, tmp_path: Path, n: int) -> list[str]:
    """``n`` new people with one (unique) image each, as ``single_K/0000.png``."""
    extra = synthesize(tmp_path / "singles", identities=n, images_per_identity=1, seed=99, progress=False)
    names = []
    for k, folder in enumerate(sorted(extra.iterdir())):
        shutil.move(str(folder), faces / f"single_{k}")
        names.append(f"single_{k}")
    return names


def test_single_image_people_are_kept_as_distractors(tmp_path, faces):
    singles = _add_singles(faces, tmp_path, 6)
    r = ingest(str(faces), "d", str(tmp_path / "store"), _cfg(splits=SplitConfig(0.5, 0.25, 0.25)),
               progress=False)
    m = load_manifest(r.uri)
    assert len(m["people"]) == r.summary["identities_found"] == 14
    for name in singles:  # in val/test as distractors, never training classes
        assert m["people"][name]["role"] == "distractor" and m["people"][name]["split"] in ("val", "test")
    assert sorted(m["distractors"]) == sorted(singles)
    assert {p["role"] for p in m["people"].values()} == {"train_class", "eval", "distractor"}
    used_in_impostors = 0
    for split in ("val", "test"):
        data = load_split(r.uri, split, views=["hr"])
        lone = {k for k, n in enumerate(np.bincount(data.labels)) if n == 1}
        assert {data.identities[k] for k in lone} == {i for i in singles if m["people"][i]["split"] == split}
        for a, b, genuine in data.pairs:
            involved = {int(data.labels[a]), int(data.labels[b])} & lone
            assert not (genuine and involved)  # a distractor has no genuine pair ...
            used_in_impostors += bool(involved)  # ... but takes part in impostor pairs
        emb = np.random.default_rng(0).normal(size=(len(data), 8))
        ident = identification_metrics(emb / np.linalg.norm(emb, axis=1, keepdims=True), data.labels)
        assert ident["distractors"] == len(lone) and ident["gallery_identities"] == data.num_classes
        assert ident["probes"] == len(data) - data.num_classes
    assert used_in_impostors > 0
    assert r.summary["splits"]["val"]["distractors"] + r.summary["splits"]["test"]["distractors"] == 6


def _thin(faces: Path, keep: dict[str, int]) -> None:
    """Leave ``keep[identity]`` images of each listed identity."""
    for ident, n in keep.items():
        for f in sorted((faces / ident).iterdir())[n:]:
            f.unlink()


def test_training_split_honours_the_training_class_rule(tmp_path):
    faces = synthesize(tmp_path / "faces", identities=12, images_per_identity=11, seed=4, progress=False)
    counts = dict(zip(sorted(p.name for p in faces.iterdir()), [2, 3, 5, 7, 8, 8, 9, 10, 11, 11, 11, 11],
                      strict=True))
    _thin(faces, counts)
    cfg = _cfg(train_classes=TrainClassConfig(min_images=8, max_images=9), splits=SplitConfig(0.8, 0.1, 0.1))
    r = ingest(str(faces), "rule", str(tmp_path / "store"), cfg, progress=False)
    m = load_manifest(r.uri)
    train = load_split(r.uri, "train", views=["hr"])
    assert np.bincount(train.labels).min() >= 8 and np.bincount(train.labels).max() <= 9  # the cap
    assert all(counts[i] >= 8 for i in train.identities) and set(train.roles) == {"train_class"}
    for ident, n in counts.items():  # below the rule: held out for evaluation, not dropped
        p = m["people"][ident]
        assert p["images"] == n
        assert (p["role"], p["split"]) in ({("eval", "val"), ("eval", "test")} if n < 8 else
                                           {("train_class", "train"), ("eval", "val"), ("eval", "test")})
    assert r.summary["train_classes"] == train.num_classes == m["train_classes"]["classes"]
    stored = load_split(r.uri, "train", views=["hr"], roles=("train_class", "unused"))
    assert len(stored) - len(train) == r.summary["train_images_over_cap"] > 0  # kept, not trained on
    assert m["train_classes"] == {"rule": "seeds", "min_images": 8, "max_images": 9,
                                  "classes": train.num_classes}


def test_training_class_rules_are_named_and_checked():
    assert TrainClassConfig().resolved() == TrainClassConfig(rule="seeds").resolved()
    assert (TrainClassConfig().resolved().min_images, TrainClassConfig().resolved().max_images) == (8, 150)
    assert TrainClassConfig(rule="all").resolved().min_images == 2
    with pytest.raises(ConfigError, match="'best' is not one of seeds, all"):
        TrainClassConfig(rule="best")
    with pytest.raises(ConfigError, match="min_images must be >= 2"):
        TrainClassConfig(min_images=1)
    old = from_dict(IngestConfig, {"min_images_per_identity": 3, "max_images_per_identity": 20})
    assert old.train_classes.resolved().min_images == 3 and old.train_classes.resolved().max_images == 20


# -- images by content -----------------------------------------------------------------------------
LOSSLESS = {"gif": None, "bmp": "BMP", "tif": "TIFF", "webp": "WEBP", "bin": "PNG", "": "PNG"}


def test_images_are_read_by_content_in_any_pillow_format(tmp_path):
    """GIF, BMP, TIFF, WebP, a PNG named .bin and a PNG with no extension; a 16-bit PNG; and a GIF-only
    person (a GIF set was refused with "no images found")."""
    faces = synthesize(tmp_path / "faces", identities=4, images_per_identity=6, seed=8, progress=False)
    originals = {}
    for k, (ext, fmt) in enumerate(LOSSLESS.items()):
        src = faces / "id_0000" / f"{k:04d}.png"
        img = Image.open(src).convert("RGB")
        dst = src.with_name(f"face{k}.{ext}" if ext else f"face{k}")
        if fmt is None:
            img.save(dst, "GIF")
        else:
            img.save(dst, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        src.unlink()
        originals[dst.relative_to(faces).as_posix()] = None if fmt is None else img
    for f in sorted((faces / "id_0001").iterdir()):  # a person stored as GIF only
        Image.open(f).convert("RGB").save(f.with_suffix(".gif"), "GIF")
        f.unlink()
    deep = np.asarray(Image.open(faces / "id_0002" / "0000.png").convert("L"), dtype=np.uint16) * 257
    (faces / "id_0002" / "0000.png").unlink()
    Image.fromarray(deep).save(faces / "id_0002" / "deep.png")  # 16-bit greyscale
    (faces / "id_0003" / "notes.txt").write_text("not a picture, and not named like one")
    r = ingest(str(faces), "fmt", str(tmp_path / "store"), _cfg(), progress=False)
    s = r.summary
    assert (s["scanned"], s["accepted"], s["rejected"], s["skipped_non_image"]) == (24, 24, 0, 1)
    m = load_manifest(r.uri)
    where = {im["id"]: (im["split"], im["index"]) for im in m["images"]}
    assert "id_0001/0000.gif" in where
    for rel, img in originals.items():
        if img is not None:  # lossless: exactly the face the original gives
            split, index = where[rel]
            hr = load_split(r.uri, split, views=["hr"], roles=("train_class", "eval", "distractor", "unused")).hr
            np.testing.assert_array_equal(hr[index], prepare_face(img, PrepareConfig()))
    split, index = where["id_0002/deep.png"]
    hr = load_split(r.uri, split, views=["hr"], roles=("train_class", "eval", "distractor", "unused")).hr[index]
    assert hr.max() > 200 and hr.min() < 60  # scaled to 8 bits, not clipped to white


# -- the LFW devtrain protocol (names and counts only: no decoding) ---------------------------------
@pytest.mark.realdata
def test_lfw_devtrain_default_protocol_is_big_enough(data_dir):
    root = data_dir / "lfw_devtrain"
    per_identity = {d: [f"{d}/{f}" for f in os.listdir(root / d)] for d in os.listdir(root)}
    plan = plan_dataset(per_identity, IngestConfig())
    test = plan.protocol["test"]
    assert test.people >= MIN_PROTOCOL_PEOPLE and test.pairs >= MIN_PROTOCOL_PAIRS and test.measurable
    assert test.distractors > 0 and test.genuine * 2 == test.pairs
    assert len(plan.people) == 4038  # nobody dropped
    trained = [i for i, p in plan.people.items() if p["role"] == "train_class"]
    assert trained and all(plan.people[i]["images"] >= 8 for i in trained)
