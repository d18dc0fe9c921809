"""DSR training task: super-resolve a dataset's VLR view to HR, guided by a frozen recognizer.

One model per VLR size (the size is part of the model config and recorded in the checkpoint as
``vlr_size``, so ``load_model`` and the evaluator pick the right one). The losses (pixel, perceptual,
identity, feature matching, TV; :mod:`faceops.train.losses`) use the frozen recognizer, which is
kept out of the engine's modules so it never trains. Validation reports PSNR, SSIM and identity
cosine (recognizer(SR) vs recognizer(HR)) every epoch, beside the bicubic baseline computed once;
the engine keeps ``best.pt`` by identity cosine.

Training pairs are made on the training device (:class:`~faceops.data.augment.SRPairAugment`): the HR
face is augmented and then degraded into the VLR input by the degradation the dataset's manifest
records (ingest's ``degrade``), so the model learns on the VLR faces evaluation feeds it (resampling
the stored pair instead blurred both faces, issue 11).

Defaults are seed 003's 32x32 recipe (batch 14, AdamW lr 1.3e-4 with warm-up, rotation +-6 deg with
p=0.65, colour jitter p=0.3); :func:`dsr_recipe` reads a size's recipe from ``configs/``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from faceops.config import check, to_dict
from faceops.data.augment import AugmentConfig, SRPairAugment
from faceops.data.degrade import DegradeConfig, degrade_batch, upsample_bicubic
from faceops.data.manifest import DatasetError, load_manifest
from faceops.data.reader import BatchDataset, LoaderConfig, SplitData, load_split
from faceops.data.tensors import to_input, to_uint8
from faceops.devices import resolve_device
from faceops.errors import FaceopsError
from faceops.evaluate.sr_metrics import identity_cosine, psnr, ssim
from faceops.models import DSRConfig, create_dsr, parse_size
from faceops.models.contract import (
    DEGRADE_FIELDS,
    ContractConflictError,
    InputContract,
    checkpoint_entry,
    explicit_fields,
    shown,
)
from faceops.train.config import EngineConfig, OptimConfig, ScheduleConfig
from faceops.train.fit import fit_task
from faceops.train.losses import DSRLoss, DSRLossConfig, RecognizerStages
from faceops.train.recipes import RECIPES, recipe
from faceops.train.recognizer import embed_arrays
from faceops.train.task import FitResult

log = logging.getLogger(__name__)


def _dsr_engine() -> EngineConfig:
    return EngineConfig(
        epochs=100,  # seed 003: --epochs 100
        clip_grad_norm=1.0,  # seed 003 tuning tips: grad_clip 1.0
        monitor="val_identity_cosine", monitor_mode="max",  # best.pt = best identity preservation
        optim=OptimConfig(name="adamw", lr=1.3e-4, weight_decay=0.0),  # seed 003 32x32; EDSR uses no decay
        schedule=ScheduleConfig(name="cosine", warmup_steps=500),  # warm-up (seed: 5 epochs), cosine decay
    )


def _dsr_augment() -> AugmentConfig:
    # seed 003 32x32: rotation +-6 deg p=0.65, jitter p=0.3 (0.93-1.07); no input noise: a DSR input's
    # noise is the dataset's degradation (ingest.degrade.noise_std), as at evaluation
    return AugmentConfig(noise_std=0.0)


@dataclass
class DSRTrainConfig:
    data: str | None = None  # dataset URI with an HR view and the VLR view; --data overrides
    out: str | None = None  # run output URI (checkpoints); --out overrides
    recognizer: str | None = None  # frozen recognizer checkpoint URI (faceops checkpoint) for the losses
    vlr_size: str = "32x32"  # VLR view to super-resolve (WxH); one DSR model per size
    model: DSRConfig = field(default_factory=DSRConfig)  # model.vlr_size follows vlr_size
    losses: DSRLossConfig = field(default_factory=DSRLossConfig)
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(batch_size=14, augment=_dsr_augment()))
    #   batch 14 (seed 003); augment: the DSR recipe, applied to the HR face before it is degraded into
    #   the VLR input; loader.vlr_view follows vlr_size
    degrade: DegradeConfig | None = None  # the VLR degradation to learn; null: the dataset's (its manifest's
    #   ingest.degrade); set, it must equal the dataset's (blur_sigma, noise_std, jpeg_quality) or training
    #   stops naming both
    engine: EngineConfig = field(default_factory=_dsr_engine)
    val_split: str = "val"  # split for PSNR/SSIM/identity cosine; skipped when the dataset lacks it
    val_max_images: int = 512  # validation images (evenly spaced over the split) to bound its cost
    eval_batch_size: int = 64  # images per forward pass in validation

    def __post_init__(self) -> None:
        parse_size(self.vlr_size)
        default_size = DSRConfig.vlr_size
        check(self.model.vlr_size in (self.vlr_size, default_size),
              f"dsr.model.vlr_size {self.model.vlr_size!r} disagrees with dsr.vlr_size {self.vlr_size!r}: "
              "set dsr.vlr_size only")
        check(self.loader.vlr_view in (None, self.vlr_size),
              f"dsr.loader.vlr_view {self.loader.vlr_view!r} disagrees with dsr.vlr_size {self.vlr_size!r}: "
              "set dsr.vlr_size only")
        self.model.vlr_size = self.vlr_size  # one source of truth: the VLR size of this run
        self.loader.vlr_view = self.vlr_size
        check(self.val_max_images >= 1, f"dsr.val_max_images must be >= 1, got {self.val_max_images}")
        check(self.eval_batch_size >= 1, f"dsr.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        check(not self.loader.augment.enabled or self.loader.augment.noise_std == 0,
              f"dsr.loader.augment.noise_std must be 0, got {self.loader.augment.noise_std}: a DSR input's noise "
              "is the dataset's degradation (ingest.degrade.noise_std), the same at training and evaluation")


def dsr_recipe(vlr_size: str = "32x32") -> DSRTrainConfig:
    """Seed 003's recipe for ``vlr_size`` from ``configs/`` (32x32: ``vlr_face.yaml``, 14x16:
    ``vlr_14x16.yaml``); another size starts from the 32x32 recipe at that size."""
    if vlr_size in RECIPES:
        return recipe(DSRTrainConfig, "dsr", vlr_size)
    base = recipe(DSRTrainConfig, "dsr", "32x32")
    return replace(base, vlr_size=vlr_size, model=replace(base.model, vlr_size=vlr_size),
                   loader=replace(base.loader, vlr_view=vlr_size))


# -- the task ---------------------------------------------------------------------------------------
@torch.no_grad()
def super_resolve(model: nn.Module, vlr: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """uint8 VLR [N, h, w, 3] -> uint8 SR [N, H, H, 3] (the model in its current mode)."""
    out = [to_uint8(model(to_input(vlr[i:i + batch_size]).to(device)))
           for i in range(0, len(vlr), batch_size)]
    return np.concatenate(out)


def sr_figures(prefix: str, sr: np.ndarray, hr: np.ndarray, sr_emb: torch.Tensor,
               hr_emb: torch.Tensor) -> dict[str, float]:
    return {f"{prefix}_psnr": psnr(sr, hr), f"{prefix}_ssim": ssim(sr, hr),
            f"{prefix}_identity_cosine": identity_cosine(sr_emb.numpy(), hr_emb.numpy())}


class DSRTask:
    stage = "train_dsr"
    kind = "dsr"

    def __init__(self, cfg: DSRTrainConfig, recognizer: nn.Module, val: SplitData | None,
                 device: torch.device, recognizer_uri: str = ""):
        self.cfg, self.val, self.device, self.recognizer_uri = cfg, val, device, recognizer_uri
        self.model = create_dsr(cfg.model)
        self.model_name = f"dsr_{cfg.vlr_size}"
        self.recognizer = RecognizerStages(recognizer).to(device)  # frozen: outside modules()
        self.criterion = DSRLoss(cfg.losses, self.recognizer).to(device)
        self._baseline: dict[str, float] | None = None
        self._hr_emb: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": list(self.model.parameters())}

    def loss(self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
        return self.criterion(nets["model"](batch["vlr"]), batch["hr"])

    def _embed(self, images: np.ndarray) -> torch.Tensor:
        return embed_arrays(self.recognizer, images, self.cfg.eval_batch_size, self.device)

    def validate(self) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {}
        hr, vlr = self.val.hr, self.val.vlr[self.cfg.vlr_size]
        if self._hr_emb is None:
            self._hr_emb = self._embed(hr)
            bicubic = upsample_bicubic(vlr, hr.shape[1])
            self._baseline = sr_figures("val_bicubic", bicubic, hr, self._embed(bicubic), self._hr_emb)
            log.info("%s: bicubic baseline on %d val images: %s", self.stage, len(hr),
                     " ".join(f"{k}={v:.4f}" for k, v in self._baseline.items()))
        sr = super_resolve(self.model, vlr, self.cfg.eval_batch_size, self.device)
        return {**sr_figures("val", sr, hr, self._embed(sr), self._hr_emb), **self._baseline}

    def checkpoint_meta(self) -> dict:
        """The architecture, the VLR size and the input contract: the dataset's face preparation and
        the degradation that made the VLR faces this model learnt to undo."""
        if not hasattr(self, "_contract_meta"):  # read once: the dataset is immutable
            self._contract_meta = checkpoint_entry(self.cfg.data, self.cfg.vlr_size)
        return {"model_config": to_dict(self.cfg.model), "vlr_size": self.cfg.vlr_size,
                "hr_size": self.cfg.model.hr_size, "recognizer": self.recognizer_uri, **self._contract_meta}


# -- training pairs: augmented HR faces, degraded on the device ----------------------------------------
def training_degradation(cfg: DSRTrainConfig, manifest: dict) -> DegradeConfig:
    """The degradation that made the dataset's VLR view (its manifest's ingest config), which training
    applies to augmented HR faces; an explicit ``dsr.degrade`` that differs is an error naming both."""
    recorded = InputContract.from_manifest(manifest, cfg.vlr_size, f"{cfg.data} manifest")
    for name, value in explicit_fields(degrade=cfg.degrade).items():
        if value != getattr(recorded, name):
            raise ContractConflictError(
                f"dsr.degrade.{name} = {shown(value)}, but {cfg.data} made its VLR faces with {name} = "
                f"{shown(getattr(recorded, name))} (manifest config.degrade): a DSR model must learn the "
                "degradation its evaluation faces have; drop dsr.degrade or re-ingest with ingest.degrade."
                f"{name} = {shown(value)}")
    return recorded.degrade_config([cfg.vlr_size])


#: Stored faces compared with their on-the-fly degradation before training (a bounded, one-off cost).
REPRODUCE_CHECK_IMAGES = 64


def check_reproduces(train: SplitData, degrade: DegradeConfig, vlr_size: str, source: str) -> None:
    """Stop when degrading the stored HR faces does not give the stored VLR faces (a dataset made by
    another degradation than its manifest says). Only a deterministic degradation can be compared."""
    drawn = (degrade.blur_sigma[0] != degrade.blur_sigma[1] or degrade.noise_std[1] > 0
             or (degrade.jpeg_quality is not None and degrade.jpeg_quality[0] != degrade.jpeg_quality[1]))
    if drawn or len(train) == 0:
        return
    n = min(len(train), REPRODUCE_CHECK_IMAGES)
    hr = torch.from_numpy(train.hr[:n]).permute(0, 3, 1, 2)
    made = degrade_batch(hr, vlr_size, degrade, torch.Generator()).permute(0, 2, 3, 1).numpy()
    diff = np.abs(made.astype(np.int16) - train.vlr[vlr_size][:n])
    if diff.max() > 1:  # Pillow's arithmetic is reproduced exactly; allow a level for other Pillows
        raise DatasetError(
            f"{source}: its stored {vlr_size} faces are not its HR faces degraded as its manifest says "
            f"({', '.join(f'{k}={shown(getattr(degrade, k))}' for k in DEGRADE_FIELDS)}): up to "
            f"{int(diff.max())} levels apart on {int((diff.max(axis=(1, 2, 3)) > 1).sum())} of {n} faces; "
            "re-ingest it so that DSR training and evaluation see the same VLR faces")


class SRPairBatches(BatchDataset):
    """Training batches whose VLR inputs are made on the training device from augmented HR faces
    (:class:`~faceops.data.augment.SRPairAugment`): the loader gathers HR bytes only."""

    def __init__(self, data: SplitData, cfg: LoaderConfig, seed: int, vlr_size: str, degrade: DegradeConfig,
                 rank: int = 0, world_size: int = 1):
        super().__init__(data, replace(cfg, vlr_view=None), seed, train=True, rank=rank, world_size=world_size)
        self.augment = SRPairAugment(cfg.augment, vlr_size, degrade)


def training_batches(cfg: DSRTrainConfig, train: SplitData, manifest: dict) -> SRPairBatches:
    """The DSR training set of ``cfg`` over ``train`` (this process's DDP rank)."""
    degrade = training_degradation(cfg, manifest)
    check_reproduces(train, degrade, cfg.vlr_size, str(cfg.data))
    return SRPairBatches(train, cfg.loader, cfg.engine.seed, cfg.vlr_size, degrade,
                         rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1")))


# -- entry point ------------------------------------------------------------------------------------
def evenly_spaced(data: SplitData, n: int) -> SplitData:
    """At most ``n`` images spread over the split (identities stay represented); pairs dropped."""
    if len(data) <= n:
        return data
    idx = np.linspace(0, len(data) - 1, n).round().astype(int)
    return SplitData(hr=data.hr[idx], vlr={k: v[idx] for k, v in data.vlr.items()}, labels=data.labels[idx],
                     identities=data.identities, image_ids=[data.image_ids[i] for i in idx])


def load_frozen_recognizer(uri: str, device: torch.device) -> nn.Module:
    """A faceops recognizer checkpoint in eval mode, no gradients (the loss network)."""
    from faceops.train.checkpoint import load_model

    model, meta = load_model(uri)
    if meta.get("kind") != "recognizer":
        raise FaceopsError(f"dsr.recognizer {uri} is a {meta.get('kind')!r} checkpoint; it must be a faceops "
                           "recognizer checkpoint (faceops train recognizer ... -> best.pt)")
    return model.requires_grad_(False).eval().to(device)


def _view_splits(cfg: DSRTrainConfig, manifest: dict) -> tuple[SplitData, SplitData | None]:
    view = f"vlr_{cfg.vlr_size}"
    if view not in manifest["views"]:
        raise DatasetError(f"{cfg.data} has no VLR view {cfg.vlr_size} (views: "
                           f"{', '.join(manifest['views'])}); re-ingest with --set degrade.sizes=[...] "
                           "including it, or pick another vlr_size")
    if manifest["hr_size"] != cfg.model.hr_size:
        raise DatasetError(f"{cfg.data} holds {manifest['hr_size']}px HR faces but dsr.model.hr_size is "
                           f"{cfg.model.hr_size}: they must match")
    train = load_split(cfg.data, "train", views=["hr", view])
    val = None
    if cfg.val_split in manifest["shards"]:
        val = evenly_spaced(load_split(cfg.data, cfg.val_split, views=["hr", view]), cfg.val_max_images)
    return train, val


def train_dsr(cfg: DSRTrainConfig, resume: bool = False) -> FitResult:
    """Train the DSR model for ``cfg.vlr_size`` on ``cfg.data``; checkpoints go to ``cfg.out``."""
    if not cfg.data or not cfg.out or not cfg.recognizer:
        raise FaceopsError("DSR training needs a dataset (--data or dsr.data), an output URI (--out or "
                           "dsr.out) and the frozen recognizer checkpoint (dsr.recognizer=URI)")
    manifest = load_manifest(cfg.data)
    train, val = _view_splits(cfg, manifest)
    train_set = training_batches(cfg, train, manifest)  # before the recognizer: a degradation error is early
    device = resolve_device(cfg.engine.device, "engine.device")
    recognizer = load_frozen_recognizer(cfg.recognizer, device)
    log.info("training DSR %s -> %dpx on %d images (%s), losses from %s", cfg.vlr_size, cfg.model.hr_size,
             len(train), cfg.data, cfg.recognizer)
    torch.manual_seed(cfg.engine.seed)  # the DSR's initial weights are part of the run's recipe
    task = DSRTask(cfg, recognizer, val, device, cfg.recognizer)
    return fit_task(task, train, cfg.loader, cfg.engine, cfg.out, to_dict(cfg), manifest["content_hash"], resume,
                    train_set=train_set)
