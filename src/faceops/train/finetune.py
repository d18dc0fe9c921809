"""Two-stage fine-tuning of an EdgeFace recognizer on DSR outputs of VLR faces (seeds 003 and 004).

The network input is the frozen DSR model's output for the VLR view (eval mode, no gradients) or,
with ``upsample: bicubic``, the VLR face upsampled bicubically: the control run, the same fine-tune
without DSR, since fine-tuning is extra training and only the gap between the two runs is what DSR
adds. A fraction ``hr_mix`` of every batch can be the HR image instead, so the model keeps working on HR
faces. Stage 1 (``stage1_epochs``) trains the embedding head and the margin head with the backbone
frozen; stage 2 unfreezes the backbone at a much lower learning rate. The stage follows from the
epoch number alone (the :class:`TwoStages` hook at each epoch start), so resuming across the switch
lands in the same state as an uninterrupted run. The result is a recognizer checkpoint (kind ``recognizer``,
served as ``recognizer``) that records its input function, the DSR model and VLR view it was tuned for.

The optimiser holds both parameter groups from the start (a frozen parameter has no gradient, so
AdamW leaves it and its state alone); a stage only sets ``requires_grad`` and the groups' base LRs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from faceops.config import check, from_dict, to_dict
from faceops.data.augment import AugmentConfig
from faceops.data.degrade import RESAMPLE_BITS, parse_size, resize_weights
from faceops.data.manifest import DatasetError, load_manifest
from faceops.data.reader import LoaderConfig, SplitData, load_split
from faceops.data.tensors import MEAN, STD
from faceops.devices import resolve_device
from faceops.errors import FaceopsError
from faceops.models import MarginHeadConfig, RecognizerConfig
from faceops.models.contract import vlr_size_of
from faceops.train.config import EngineConfig, OptimConfig, ScheduleConfig
from faceops.train.engine import Engine
from faceops.train.fit import fit_task
from faceops.train.hooks import Hook
from faceops.train.losses import Frozen
from faceops.train.recipes import recipe
from faceops.train.recognizer import (
    RecognizerTask,
    RecognizerTrainConfig,
    embed_arrays,
    load_head,
    prepare_start,
    validate_embeddings,
)
from faceops.train.task import FitResult

log = logging.getLogger(__name__)

STAGES = {"dsr": "finetune_edgeface", "bicubic": "finetune_bicubic"}  # stage name per input function


def _finetune_augment() -> AugmentConfig:
    # seed 003 fine-tune: flip 0.5, rotation 5 deg, colour jitter 0.07/0.07/0.05; no translation or noise
    return AugmentConfig(flip_p=0.5, rotate_p=1.0, rotate_deg=5.0, translate=0.0, jitter_p=1.0,
                         brightness=0.07, contrast=0.07, saturation=0.05, noise_std=0.0)


def _finetune_engine() -> EngineConfig:
    return EngineConfig(
        clip_grad_norm=1.0,  # seed 004: clipping at 1.0 stopped the NaNs
        early_stop_patience=10,  # seed 003 (32x32)
        monitor="val_accuracy", monitor_mode="max",  # verification on DSR outputs of the val split
        optim=OptimConfig(name="adamw", weight_decay=3e-5),  # seed 003 32x32; LRs come from the stage fields
        schedule=ScheduleConfig(name="cosine"),
        ddp_find_unused=True,  # stage 1 freezes the backbone: no grads for it under DDP
    )


@dataclass
class FinetuneConfig:
    data: str | None = None  # dataset URI with the VLR view; --data overrides
    out: str | None = None  # run output URI; --out overrides
    upsample: Literal["dsr", "bicubic"] = "dsr"  # input function: the frozen DSR model, or bicubic upsampling
    #   (the control run: the same fine-tune without DSR)
    dsr: str | None = None  # frozen DSR checkpoint URI (upsample: dsr); its vlr_size must equal vlr_size
    vlr_size: str = "32x32"  # VLR view fed through the input function
    init_from: str | None = None  # faceops recognizer checkpoint to start from (its architecture is used)
    pretrained: str | None = None  # or: a user's EdgeFace weights file (state_dict or TorchScript)
    pretrained_init_missing: bool = False  # initialise (and list) keys missing from `pretrained` (seed 004)
    reuse_head: bool = True  # take init_from's margin head when it was trained on the same dataset
    model: RecognizerConfig = field(default_factory=lambda: RecognizerConfig(name="edgeface_xxs", head="linear"))
    #   architecture for `pretrained` (ignored with init_from, whose checkpoint names it); the official
    #   EdgeFace head (one Linear), so official weights load strictly
    margin: MarginHeadConfig = field(default_factory=MarginHeadConfig)  # ArcFace s=32 m=0.3 (seed 004);
    #   the 32x32 recipe uses m=0.45
    label_smoothing: float = 0.08  # seed 003 32x32
    stage1_epochs: int = 5  # head-only epochs (seed 004: epochs 1-5)
    stage2_epochs: int = 25  # full-model epochs (seed 003 32x32: 25)
    head_lr: float = 9e-4  # stage 1 embedding + margin head LR (seed 003; stable variant 1e-4)
    head_lr_stage2: float = 6e-5  # stage 2 head LR (seed 003; stable variant 3e-5)
    backbone_lr: float = 6e-6  # stage 2 backbone LR (seed 003; stable variant 3e-6)
    hr_mix: float = 0.0  # fraction of each batch fed as HR instead of DSR(VLR), to keep HR accuracy
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(batch_size=28,
                                                                      augment=_finetune_augment()))
    #   batch 28 (seed 003 32x32); loader.vlr_view follows vlr_size
    engine: EngineConfig = field(default_factory=_finetune_engine)  # engine.epochs = stage1 + stage2
    val_split: str = "val"
    validate_hr: bool = True  # also report val_hr_accuracy (HR faces) each epoch
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        check(0.0 <= self.label_smoothing < 1.0, "finetune.label_smoothing must be in [0, 1)")
        check(0.0 <= self.hr_mix <= 1.0, f"finetune.hr_mix must be a fraction in [0, 1], got {self.hr_mix}")
        total = self.stage1_epochs + self.stage2_epochs
        check(min(self.stage1_epochs, self.stage2_epochs) >= 0 and total > 0,
              "finetune.stage1_epochs and stage2_epochs must be >= 0 with at least one epoch in all")
        for name in ("head_lr", "head_lr_stage2", "backbone_lr"):
            check(getattr(self, name) > 0, f"finetune.{name} must be > 0, got {getattr(self, name)}")
        check(self.loader.vlr_view in (None, self.vlr_size),
              f"finetune.loader.vlr_view {self.loader.vlr_view!r} disagrees with finetune.vlr_size "
              f"{self.vlr_size!r}: set finetune.vlr_size only")
        self.loader.vlr_view = self.vlr_size
        self.engine.epochs = self.stage1_epochs + self.stage2_epochs

    def recognizer_config(self) -> RecognizerTrainConfig:
        """The recognizer-task view of this config (what RecognizerTask and prepare_start read)."""
        return RecognizerTrainConfig(
            data=self.data, out=self.out, model=self.model, margin=self.margin, loader=self.loader,
            engine=self.engine, label_smoothing=self.label_smoothing, pretrained=self.pretrained,
            pretrained_init_missing=self.pretrained_init_missing, init_from=self.init_from,
            val_split=self.val_split, eval_batch_size=self.eval_batch_size)


def finetune_recipe(name: str = "32x32") -> FinetuneConfig:
    """A seed recipe (``configs/``): ``32x32``, ``14x16`` or ``stable`` (seed 004's NaN-free variant)."""
    return recipe(FinetuneConfig, "finetune", name)


# -- the input functions ----------------------------------------------------------------------------
class FrozenDSR(Frozen):
    """The DSR model as the recognizer's input function: eval mode, no graph, no gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x)


class BicubicUpsample(nn.Module):
    """VLR -> HR by bicubic upsampling as evaluation's ``bicubic`` rows do it
    (:func:`faceops.data.degrade.upsample_bicubic`: Pillow's weights, across then down, each pass
    clipped to the pixel range), so the control fine-tune trains on the faces it is evaluated on;
    torch's own bicubic differs (another kernel, another border). A fixed linear map per axis,
    batched on the device: no per-image work on the training hot path."""

    def __init__(self, vlr_size: str, hr_hw: tuple[int, int]):
        super().__init__()
        w, h = parse_size(vlr_size)
        for name, n_in, n_out in (("rows", h, hr_hw[0]), ("cols", w, hr_hw[1])):
            weights = resize_weights(n_in, n_out) / float(1 << RESAMPLE_BITS)  # Pillow's fixed point -> float
            self.register_buffer(name, torch.from_numpy(weights).float(), persistent=False)
        self.low, self.high = (0.0 - MEAN) / STD, (1.0 - MEAN) / STD  # the network input's pixel range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("nchw,pw->nchp", x, self.cols.to(x.dtype)).clamp(self.low, self.high)
        return torch.einsum("oh,nchp->ncop", self.rows.to(x.dtype), x).clamp(self.low, self.high)


def input_function(cfg: FinetuneConfig, hr_hw: tuple[int, int]) -> nn.Module:
    """What turns the VLR view into the recognizer's input: the frozen DSR, or bicubic upsampling."""
    if cfg.upsample == "bicubic":
        return BicubicUpsample(cfg.vlr_size, hr_hw)
    return FrozenDSR(load_frozen_dsr(cfg.dsr, cfg.vlr_size))


# -- the task ---------------------------------------------------------------------------------------
class FinetuneTask(RecognizerTask):
    kind = "recognizer"

    def __init__(self, cfg: FinetuneConfig, train: SplitData, val: SplitData | None, device: torch.device,
                 input_fn: nn.Module):
        self.ft = cfg
        self.stage = STAGES[cfg.upsample]
        super().__init__(cfg.recognizer_config(), train, val, device, input_view=cfg.vlr_size,
                         input_fn=input_fn.to(device))
        self.current_stage = 0

    # -- the two stages
    def stage_for(self, epoch: int) -> int:
        return 1 if epoch < self.ft.stage1_epochs else 2

    def stage_lrs(self, stage: int) -> dict[str, float]:
        """Base LR per optimiser group; a frozen backbone gets 0 so nothing can move it."""
        if stage == 1:
            return {"backbone": 0.0, "head": self.ft.head_lr}
        return {"backbone": self.ft.backbone_lr, "head": self.ft.head_lr_stage2}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().param_groups()
        return {"backbone": groups["backbone"], "head": groups["head"]}

    # -- training and validation
    def loss(self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
        if self.current_stage == 1:
            self.model.backbone.eval()  # frozen backbone: no BatchNorm statistics move either
        x = self.input_fn(batch["vlr"])
        n_hr = round(self.ft.hr_mix * len(x))  # batches are shuffled: the first n_hr are a random subset
        if n_hr:
            x = torch.cat([batch["hr"][:n_hr], x[n_hr:]])
        return self.margin_loss(x, batch["label"], nets)

    def validate(self) -> dict[str, float]:
        figures = super().validate()
        if figures and self.ft.validate_hr:
            emb = embed_arrays(self.model, self.val.hr, self.cfg.eval_batch_size, self.device)
            hr = validate_embeddings(emb, self.val)
            if "val_accuracy" in hr:
                figures["val_hr_accuracy"] = hr["val_accuracy"]
        return figures

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "upsample": self.ft.upsample, "dsr": self.ft.dsr,
                "vlr_size": self.ft.vlr_size, "finetune_stage": self.current_stage, "hr_mix": self.ft.hr_mix}


class TwoStages(Hook):
    """At each epoch start: freeze or unfreeze the backbone and set the groups' base LRs for the
    epoch's stage (through the engine's :meth:`~Engine.set_base_lrs`, so the schedule and the
    NaN-rollback scale still apply)."""

    def __init__(self, task: FinetuneTask):
        self.task = task

    def on_epoch_start(self, engine: Engine) -> None:
        task = self.task
        stage = task.stage_for(engine.epoch)
        task.model.backbone.requires_grad_(stage == 2)
        lrs = task.stage_lrs(stage)
        engine.set_base_lrs(lrs)
        if stage != task.current_stage:
            log.info("%s: epoch %d: stage %d (%s), LRs %s", task.stage, engine.epoch + 1, stage,
                     "head only, backbone frozen" if stage == 1 else "backbone unfrozen",
                     {k: f"{v:.1e}" for k, v in lrs.items()})
            task.current_stage = stage


# -- entry point ------------------------------------------------------------------------------------
def load_frozen_dsr(uri: str, vlr_size: str) -> nn.Module:
    from faceops.train.checkpoint import load_model

    model, meta = load_model(uri)
    size = vlr_size_of(meta)
    if meta.get("kind") != "dsr":
        raise FaceopsError(f"finetune.dsr {uri} is a {meta.get('kind')!r} checkpoint, not a DSR model")
    if size != vlr_size:
        raise FaceopsError(f"finetune.dsr {uri} was trained for {size}, but finetune.vlr_size is {vlr_size}: "
                           "use the DSR model of that size or set finetune.vlr_size")
    return model


def _start_model(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict | None]:
    """With ``init_from``, the checkpoint's architecture replaces ``cfg.model``; returns its head too."""
    if not cfg.init_from:
        if not cfg.pretrained:
            log.warning("finetune: neither init_from nor pretrained is set: fine-tuning a random %s",
                        cfg.model.name)
        return cfg, None
    from faceops.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.init_from)
    if ckpt["kind"] != "recognizer":
        raise FaceopsError(f"finetune.init_from {cfg.init_from} is a {ckpt['kind']} checkpoint, "
                           "not a recognizer")
    model_cfg = from_dict(RecognizerConfig, ckpt["model_config"], f"{cfg.init_from} model_config")
    return replace(cfg, model=model_cfg), ckpt


def finetune_edgeface(cfg: FinetuneConfig, resume: bool = False) -> FitResult:
    """Fine-tune a recognizer on DSR outputs (or bicubic upsampling) of ``cfg.data``'s VLR view;
    checkpoints go to ``cfg.out``."""
    if not cfg.data or not cfg.out:
        raise FaceopsError("fine-tuning needs a dataset (--data or finetune.data) and an output URI (--out or "
                           "finetune.out)")
    if (cfg.upsample == "dsr") != bool(cfg.dsr):
        raise FaceopsError("finetune.upsample=dsr needs the DSR checkpoint (finetune.dsr=URI)" if cfg.upsample == "dsr"
                           else f"finetune.upsample=bicubic trains without DSR, but finetune.dsr is {cfg.dsr}: "
                           "unset it, or set finetune.upsample=dsr")
    manifest = load_manifest(cfg.data)
    view = f"vlr_{cfg.vlr_size}"
    if view not in manifest["views"]:
        raise DatasetError(f"{cfg.data} has no VLR view {cfg.vlr_size} (views: "
                           f"{', '.join(manifest['views'])})")
    cfg, start = _start_model(cfg)
    train = load_split(cfg.data, "train", views=["hr", view])
    has_val = cfg.val_split in manifest["shards"]
    val = load_split(cfg.data, cfg.val_split, views=["hr", view]) if has_val else None
    device = resolve_device(cfg.engine.device, "engine.device")
    upsample = input_function(cfg, train.hr.shape[1:3])
    torch.manual_seed(cfg.engine.seed)  # a new margin head's class centres are part of the run's recipe
    task = FinetuneTask(cfg, train, val, device, upsample)
    prepare_start(task.model, task.cfg)
    if cfg.reuse_head and load_head(task.head, start, manifest["content_hash"]):
        log.info("finetune: margin head taken from %s (same dataset)", cfg.init_from)
    log.info("fine-tuning %s on %s(%s) of %d images: %d head-only + %d full epochs", cfg.model.name,
             cfg.upsample, cfg.vlr_size, len(train), cfg.stage1_epochs, cfg.stage2_epochs)
    return fit_task(task, train, cfg.loader, cfg.engine, cfg.out, to_dict(cfg), manifest["content_hash"],
                    resume, hooks=[TwoStages(task)])
