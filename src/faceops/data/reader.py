"""Training-time reader: a dataset's split as in-memory uint8 arrays, served as whole batches.

Batches are formed by fancy-indexing the arrays and augmented as a batch (see
:mod:`faceops.data.augment`), so no per-image decoding or Python loop sits on the hot path. The
order and the augmentation of batch ``b`` of epoch ``e`` depend only on (seed, e, b): resuming
mid-epoch, or changing the number of workers, gives the same batches.

The ``train`` split is read as its training classes only (manifest role ``train_class``): images of a
class beyond the training-class cap stay in the dataset but are not trained on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from faceops.data.augment import Augment, AugmentConfig
from faceops.data.manifest import DatasetError, load_manifest
from faceops.data.tensors import to_input
from faceops.storage import LocalStore, ObjectStore, open_store


@dataclass
class SplitData:
    hr: np.ndarray  # uint8 [N, H, W, 3]
    vlr: dict[str, np.ndarray]  # "WxH" -> uint8 [N, h, w, 3]
    labels: np.ndarray  # int64 [N], contiguous 0..C-1 within the split
    identities: list[str]  # name of each label
    image_ids: list[str]
    pairs: list[tuple[int, int, bool]] = field(default_factory=list)  # val/test/pairs verification
    folds: list[int] | None = None  # fold of each pair (imported LFW pairs)
    roles: list[str] = field(default_factory=list)  # manifest role of each image (train_class/eval/distractor)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    return Path(os.environ.get("FACEOPS_CACHE", Path.home() / ".cache" / "faceops"))


def _read_array(store: ObjectStore, key: str, sha256: str) -> np.ndarray:
    """Checksum-verified read; remote shards go through a content-addressed local cache."""
    if isinstance(store, LocalStore):
        return np.load(io.BytesIO(store.get_bytes(key, sha256=sha256)), allow_pickle=False)
    cached = cache_dir() / "shards" / f"{sha256}.npy"
    if not cached.is_file():
        store.get_file(key, cached, sha256=sha256)
    from faceops.storage import sha256_file

    if sha256_file(cached) != sha256:  # a corrupted cache entry is re-fetched, never trusted
        cached.unlink()
        store.get_file(key, cached, sha256=sha256)
    return np.load(cached, allow_pickle=False)


#: Roles read by default per split: training reads training classes only; other splits read everything.
DEFAULT_ROLES: dict[str, tuple[str, ...]] = {"train": ("train_class",)}


def load_split(dataset_uri: str, split: str, views: list[str] | None = None,
               roles: Sequence[str] | None = None) -> SplitData:
    """Arrays of one split (``train``/``val``/``test``/``pairs``); ``views`` default to all.

    ``roles`` keeps only images of those manifest roles (default :data:`DEFAULT_ROLES`: the training
    classes for ``train``, everything elsewhere); datasets ingested before roles existed read whole.
    """
    manifest = load_manifest(dataset_uri)
    if split not in manifest["shards"]:
        raise DatasetError(f"{dataset_uri} has no split {split!r} (has: {', '.join(manifest['shards'])})")
    store = open_store(dataset_uri)
    wanted = views or manifest["views"]
    unknown = sorted(set(wanted) - set(manifest["views"]))
    if unknown:
        raise DatasetError(f"{dataset_uri} has no view(s) {unknown} (has: {', '.join(manifest['views'])})")
    arrays: dict[str, list[np.ndarray]] = {v: [] for v in wanted}
    for shard in manifest["shards"][split]:
        for view in wanted:
            f = shard["files"][view]
            arrays[view].append(_read_array(store, f["key"], f["sha256"]))
    hr_shape = (0, manifest["hr_size"], manifest["hr_size"], 3)
    stacked = {v: np.concatenate(a) if a else np.zeros(hr_shape, np.uint8) for v, a in arrays.items()}
    images = sorted((im for im in manifest["images"] if im["split"] == split), key=lambda im: im["index"])
    keep = _kept(images, roles if roles is not None else DEFAULT_ROLES.get(split))
    pairs = [(int(a), int(b), bool(g)) for a, b, g in manifest["pairs"].get(split, [])]
    folds = manifest["pairs_import"]["folds"] if split == "pairs" and "pairs_import" in manifest else None
    if keep is not None:
        stacked = {v: a[keep] for v, a in stacked.items()}
        images = [images[k] for k in keep]
        pairs, folds = _remap_pairs(pairs, folds, keep)
    names = sorted({im["identity"] for im in images})
    ids = {n: i for i, n in enumerate(names)}
    labels = np.array([ids[im["identity"]] for im in images], dtype=np.int64)
    return SplitData(hr=stacked.get("hr", np.zeros(hr_shape, np.uint8)),
                     vlr={v[4:]: a for v, a in stacked.items() if v.startswith("vlr_")},
                     labels=labels, identities=names, image_ids=[im["id"] for im in images],
                     pairs=pairs, folds=folds, roles=[im.get("role", "") for im in images])


def _kept(images: list[dict], roles: Sequence[str] | None) -> np.ndarray | None:
    """Positions of the images with one of ``roles``; None when every image is kept."""
    if roles is None or not images or "role" not in images[0]:
        return None
    keep = np.array([k for k, im in enumerate(images) if im["role"] in roles], dtype=np.int64)
    return None if keep.size == len(images) else keep


def _remap_pairs(pairs: list[tuple[int, int, bool]], folds: list[int] | None,
                 keep: np.ndarray) -> tuple[list[tuple[int, int, bool]], list[int] | None]:
    """Pairs (and their folds) re-indexed onto the kept images; pairs using a dropped image go."""
    new = {int(old): k for k, old in enumerate(keep)}
    out, out_folds = [], []
    for k, (a, b, g) in enumerate(pairs):
        if a in new and b in new:
            out.append((new[a], new[b], g))
            if folds is not None:
                out_folds.append(folds[k])
    return out, (out_folds if folds is not None else None)


def epoch_order(labels: np.ndarray, seed: int, epoch: int, balanced: bool) -> np.ndarray:
    """Sample order of one epoch: a permutation, or identity-balanced sampling with replacement
    (each identity equally likely, so identities with many images do not dominate)."""
    rng = np.random.default_rng([seed, epoch])
    n = len(labels)
    if not balanced:
        return rng.permutation(n)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum())


@dataclass
class LoaderConfig:
    batch_size: int = 64
    workers: int = 0  # DataLoader worker processes (0 = in the training process)
    balanced: bool = True  # identity-balanced sampling (seed recipe)
    drop_last: bool = True
    vlr_view: str | None = None  # also deliver this VLR view ("32x32") with each batch
    augment: AugmentConfig = field(default_factory=AugmentConfig)


class BatchDataset(Dataset):
    """Item ``b`` is batch ``b`` of the current epoch as uint8 NHWC tensors {'hr', 'label'[, 'vlr']}
    plus the augmentation seed; :meth:`to_device` turns it into float network input on the training
    device and augments it there (on a GPU the CPU only gathers bytes, so few workers feed it).

    ``rank``/``world_size`` shard every batch for DDP: each rank gets its slice of the same global
    batch (augmented with the global batch's draws), so N processes see exactly what one would.
    """

    def __init__(self, data: SplitData, cfg: LoaderConfig, seed: int, train: bool = True,
                 rank: int = 0, world_size: int = 1):
        if cfg.vlr_view and cfg.vlr_view not in data.vlr:
            raise DatasetError(f"VLR view {cfg.vlr_view!r} not in the dataset (has: {', '.join(data.vlr)})")
        if len(data) == 0:
            raise DatasetError("the split is empty: nothing to train on")
        self.data, self.cfg, self.seed, self.train = data, cfg, seed, train
        self.rank, self.world_size = rank, world_size
        self.augment = Augment(cfg.augment) if train else None
        self.epoch = 0
        self._order = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = None

    @property
    def order(self) -> np.ndarray:
        if self._order is None:
            if self.train:
                self._order = epoch_order(self.data.labels, self.seed, self.epoch, self.cfg.balanced)
            else:
                self._order = np.arange(len(self.data))
        return self._order

    def __len__(self) -> int:
        n, b = len(self.data), self.cfg.batch_size
        if self.train and self.cfg.drop_last and n >= b:
            return n // b
        return (n + b - 1) // b

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        idx = self.order[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
        part = np.array_split(np.arange(len(idx)), self.world_size)[self.rank]
        mine = idx[part]
        out = {"hr": torch.from_numpy(self.data.hr[mine]), "label": torch.from_numpy(self.data.labels[mine])}
        if self.cfg.vlr_view:
            out["vlr"] = torch.from_numpy(self.data.vlr[self.cfg.vlr_view][mine])
        seed = int(np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(1)[0])
        # host integers, not a tensor: reading them on the training thread must never wait on a device
        out["aug"] = (seed, int(part[0]) if len(part) else 0, len(idx))
        return out

    def to_device(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """uint8 batch -> float NCHW in [-1, 1] on ``device``, augmented (training) with its seed.

        Bytes cross to the device as uint8; :class:`Augment` takes them as they are and makes the float
        input in the same pass as the augmentation (no separate float copy of the batch)."""
        seed, start, total = batch["aug"]
        out = {"label": batch["label"].to(device, non_blocking=True)}
        for view in ("hr", "vlr"):
            if view in batch:
                x = batch[view].to(device, non_blocking=True)
                out[view] = x if isinstance(self.augment, Augment) else to_input(x)  # others take floats
        if self.augment is None:
            return out
        gen = torch.Generator(device=device).manual_seed(seed)
        return self.augment(out, gen, start, total)


def make_loader(ds: BatchDataset, start_batch: int = 0) -> DataLoader:
    """A DataLoader over whole batches from ``start_batch`` (resume mid-epoch)."""
    return DataLoader(ds, batch_size=None, sampler=range(start_batch, len(ds)),
                      num_workers=ds.cfg.workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())  # its base seed would draw from the global RNG that
    #   checkpoints save: a resumed epoch would then be one draw ahead (batches depend on (seed, epoch, b))
