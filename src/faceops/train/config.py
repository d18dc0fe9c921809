"""The engine's typed configs: optimiser, learning-rate schedule, NaN guard and the loop itself.

Recipes live in ``configs/*.yaml``; these defaults are what a section left out of a recipe gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from faceops.config import check
from faceops.metrics import MetricsConfig


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # base learning rate (the head's, unless backbone_lr is set)
    backbone_lr: float | None = None  # per-group LR for the backbone; None = lr
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD
    nesterov: bool = True  # SGD (seed 002 recipe)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW

    def __post_init__(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    """torch's schedulers, one optimiser step per scheduler step: ``cosine`` is
    ``SequentialLR(LinearLR, CosineAnnealingLR)``, ``onecycle`` is ``OneCycleLR``, ``step`` is
    ``StepLR``, ``constant`` keeps the base LR (each but onecycle after the optional warm-up)."""

    name: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_steps: int = 0  # LinearLR from warmup_start_factor * lr to lr
    warmup_start_factor: float = 0.1  # > 0 (LinearLR's start_factor)
    min_lr: float = 0.0  # cosine floor (CosineAnnealingLR's eta_min, torchvision's --lr-min)
    step_epochs: int = 10  # step: decay every N epochs
    gamma: float = 0.1  # step: decay factor
    pct_start: float = 0.3  # onecycle: fraction of the steps spent rising
    div_factor: float = 25.0  # onecycle: start LR = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final LR = start LR / final_div_factor

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 < self.warmup_start_factor <= 1,
              f"schedule.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        check(self.min_lr >= 0, f"schedule.min_lr must be >= 0, got {self.min_lr}")
        check(0 < self.pct_start < 1, f"schedule.pct_start must be in (0, 1), got {self.pct_start}")


@dataclass
class NanGuardConfig:
    max_consecutive: int = 3  # K consecutive non-finite steps -> roll back to the last good state
    lr_factor: float = 0.5  # learning rate multiplier applied at each rollback
    budget: int = 50  # total events after which training stops with an error
    snapshot_every: int = 25  # good steps between in-memory rollback snapshots
    check_params_every: int = 1  # steps between parameter finiteness checks (on the device)
    min_loss_scale: float = 1.0  # fp16: inf grads are the GradScaler's normal overflow skip above this scale
    inject_steps: list[int] = field(default_factory=list)  # fault injection (tests, demos): poison the
    #   batch of each listed step (steps advance on skipped batches too: [3, 4, 5] is three in a row)
    inject_kind: Literal["loss", "grad"] = "loss"
    inject_ranks: list[int] = field(default_factory=list)  # DDP ranks that inject; empty = all

    def __post_init__(self) -> None:
        check(self.max_consecutive >= 1, "nan_guard.max_consecutive must be >= 1")
        check(self.snapshot_every >= 1, "nan_guard.snapshot_every must be >= 1")
        check(self.check_params_every >= 1, "nan_guard.check_params_every must be >= 1")


@dataclass
class EngineConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    grad_accum: int = 1  # micro-batches per optimiser step (DDP all-reduces only on the last one)
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # CUDA only; CPU runs fp32
    clip_grad_norm: float | None = 5.0  # clip model+head gradients (seed 004: clipping fixed NaNs)
    ema_decay: float | None = None  # e.g. 0.999; checkpoints then carry EMA weights for serving
    ema_warmup_power: float = 0.75  # timm's EMA warm-up: decay 1-(1+n)^-p, capped at ema_decay
    early_stop_patience: int | None = None  # epochs without improvement of the monitored metric
    monitor: str = "val_accuracy"  # validation metric for best checkpoint / early stopping
    monitor_mode: Literal["max", "min"] = "max"
    checkpoint_every_steps: int = 200  # plus one at every epoch end
    keep_checkpoints: int = 3  # good states kept in <out>/checkpoints/ for resume to fall back on
    log_every_steps: int = 10  # also how often the device's NaN flags are read (one host sync)
    collapse_warn: float = 0.95  # warn when mean inter-identity cosine exceeds this (seed 004: 0.9999)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sync_bn: bool = False  # DDP: BatchNorm statistics over every rank (SyncBatchNorm)
    ddp_find_unused: bool = False  # DDP: allow parameters without grads (frozen stages, e.g. fine-tune stage 1)
    progress: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"engine.epochs must be >= 1, got {self.epochs}")
        check(self.grad_accum >= 1, f"engine.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.checkpoint_every_steps >= 1, "engine.checkpoint_every_steps must be >= 1")
        check(self.keep_checkpoints >= 1, "engine.keep_checkpoints must be >= 1")
        check(self.log_every_steps >= 1, "engine.log_every_steps must be >= 1")
        check(self.ema_decay is None or 0 < self.ema_decay < 1,
              f"engine.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        check(self.ema_warmup_power > 0, "engine.ema_warmup_power must be > 0")
