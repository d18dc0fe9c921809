"""Training reader: deterministic batches, paired augmentation, balanced sampling, remote cache, and
reading by role (training classes only for training; distractors dropped on request)."""

import numpy as np
import pytest
import torch

from faceops.data.augment import Augment, AugmentConfig
from faceops.data.reader import BatchDataset, LoaderConfig, epoch_order, load_split, make_loader
from faceops.data.synth import synthesize


def test_batches_depend_only_on_seed_epoch_and_index(tiny_dataset):
    data = load_split(tiny_dataset, "train")
    cfg = LoaderConfig(batch_size=4, vlr_view="32x32")
    a = BatchDataset(data, cfg, seed=3)
    b = BatchDataset(data, cfg, seed=3)
    b.set_epoch(1)
    b.set_epoch(0)
    cpu = torch.device("cpu")
    first = [a.to_device(x, cpu) for x in make_loader(a)]
    resumed = [b.to_device(x, cpu) for x in make_loader(b, start_batch=2)]
    for x, y in zip(first[2:], resumed, strict=True):
        assert torch.equal(x["hr"], y["hr"]) and torch.equal(x["label"], y["label"])
    assert first[0]["hr"].dtype == torch.float32 and first[0]["hr"].shape == (4, 3, 112, 112)
    assert first[0]["vlr"].shape == (4, 3, 32, 32)
    assert first[0]["hr"].min() >= -1 and first[0]["hr"].max() <= 1
    a.set_epoch(1)
    assert not torch.equal(a.to_device(a[0], cpu)["hr"], first[0]["hr"])  # new epoch: reshuffled, re-augmented
    assert a[0]["hr"].dtype == torch.uint8  # workers only gather bytes


def test_worker_processes_give_the_same_batches(tiny_dataset):
    data = load_split(tiny_dataset, "train")
    in_proc = BatchDataset(data, LoaderConfig(batch_size=4), seed=0)
    workers = BatchDataset(data, LoaderConfig(batch_size=4, workers=2), seed=0)
    cpu = torch.device("cpu")
    for x, y in zip(make_loader(in_proc), make_loader(workers), strict=True):
        assert torch.equal(in_proc.to_device(x, cpu)["hr"], workers.to_device(y, cpu)["hr"])


def test_ddp_ranks_split_the_global_batch(tiny_dataset):
    data = load_split(tiny_dataset, "train")
    cfg = LoaderConfig(batch_size=8)
    cpu = torch.device("cpu")
    one = BatchDataset(data, cfg, seed=0)
    whole = one.to_device(one[1], cpu)
    ranks = [BatchDataset(data, cfg, seed=0, rank=r, world_size=2) for r in range(2)]
    parts = [ds.to_device(ds[1], cpu) for ds in ranks]
    assert torch.equal(torch.cat([p["hr"] for p in parts]), whole["hr"])


def test_paired_augmentation_keeps_vlr_and_hr_aligned():
    torch.manual_seed(0)
    smooth = torch.rand(6, 3, 8, 8) * 2 - 1  # low-frequency content survives down-sampling
    hr = torch.nn.functional.interpolate(smooth, size=(112, 112), mode="bilinear", align_corners=False)
    vlr = torch.nn.functional.interpolate(hr, size=(32, 32), mode="area")
    aug = Augment(AugmentConfig(rotate_p=1.0, rotate_deg=10, jitter_p=1.0, noise_std=0.0))
    out = aug({"hr": hr, "vlr": vlr, "label": torch.zeros(6)}, torch.Generator().manual_seed(1))
    down = torch.nn.functional.interpolate(out["hr"], size=(32, 32), mode="area")
    paired = (down - out["vlr"]).abs().mean()
    unpaired = (down - out["vlr"].roll(1, 0)).abs().mean()
    assert paired < unpaired / 3


def test_identity_balanced_sampling():
    labels = np.array([0] * 90 + [1] * 10)
    order = epoch_order(labels, seed=0, epoch=0, balanced=True)
    share = (labels[order] == 1).mean()
    assert 0.35 < share < 0.65  # each identity equally likely, not 10%
    assert sorted(epoch_order(labels, 0, 0, balanced=False)) == list(range(100))


def test_remote_shards_are_cached_and_verified(tmp_path, s3_bucket, monkeypatch):
    from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest

    monkeypatch.setenv("FACEOPS_CACHE", str(tmp_path / "cache"))
    faces = synthesize(tmp_path / "f", identities=8, images_per_identity=3, seed=2, progress=False)
    r = ingest(str(faces), "c", s3_bucket, IngestConfig(train_classes=TrainClassConfig(rule="all"),
                                                        pairs_per_split=10), progress=False)
    a = load_split(r.uri, "train")
    cached = sorted((tmp_path / "cache" / "shards").iterdir())
    assert cached
    cached[0].write_bytes(b"corrupted")  # a damaged cache entry is re-fetched, never trusted
    b = load_split(r.uri, "train")
    assert np.array_equal(a.hr, b.hr)


def test_missing_dataset_is_a_clear_error(tmp_path):
    from faceops.data.manifest import DatasetError

    with pytest.raises(DatasetError, match="ingest it first"):
        load_split(str(tmp_path / "nope"), "train")


def test_reading_by_role_remaps_pairs(tmp_path):
    import shutil

    from faceops.data.ingest import IngestConfig, SplitConfig, TrainClassConfig, ingest

    faces = synthesize(tmp_path / "f", identities=8, images_per_identity=3, seed=4, progress=False)
    lone = synthesize(tmp_path / "lone", identities=8, images_per_identity=1, seed=5, progress=False)
    for k, folder in enumerate(sorted(lone.iterdir())):
        shutil.move(str(folder), faces / f"lone_{k}")
    cfg = IngestConfig(train_classes=TrainClassConfig(rule="all"), splits=SplitConfig(0.5, 0.25, 0.25),
                       pairs_per_split=40, workers=1)
    uri = ingest(str(faces), "roles", str(tmp_path / "store"), cfg, progress=False).uri
    whole = load_split(uri, "test", views=["hr"])
    assert set(whole.roles) == {"eval", "distractor"}
    evals = load_split(uri, "test", views=["hr"], roles=("eval",))
    assert set(evals.roles) == {"eval"} and len(evals) == whole.roles.count("eval")
    by_id = {i: k for k, i in enumerate(evals.image_ids)}
    kept = [(whole.image_ids[a], whole.image_ids[b], g) for a, b, g in whole.pairs
            if whole.roles[a] == whole.roles[b] == "eval"]
    assert [(evals.image_ids[a], evals.image_ids[b], g) for a, b, g in evals.pairs] == kept
    assert all((evals.labels[a] == evals.labels[b]) == g for a, b, g in evals.pairs)
    assert np.array_equal(evals.hr, whole.hr[[whole.image_ids.index(i) for i in by_id]])
    train = load_split(uri, "train", views=["hr"])
    assert set(train.roles) == {"train_class"} and np.bincount(train.labels).min() >= 2
