"""The one training engine: every task (recognizer, DSR, EdgeFace fine-tune) runs through it.

A task supplies modules, a loss for a batch and a validation; the engine owns everything that
must be right once: optimisers and schedules, AMP, clipping, gradient accumulation, EMA, the NaN
guard (skip, count, roll back, give up with a clear message), atomic checkpoints and exact resume,
early stopping, progress, Prometheus metrics and DDP under torchrun.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from faceops.config import check, to_dict
from faceops.data.reader import BatchDataset, make_loader
from faceops.errors import FaceopsError
from faceops.metrics import MetricsConfig, StageMetrics
from faceops.train.checkpoint import (
    CheckpointError,
    NonFiniteCheckpointError,
    history_uri,
    load_newest_good,
    prune_history,
    save_checkpoint,
)

log = logging.getLogger(__name__)


class TrainingError(FaceopsError):
    pass


# -- configs ---------------------------------------------------------------------------------------
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
    name: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warm-up from warmup_start_factor*lr
    warmup_start_factor: float = 0.1
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    step_epochs: int = 10  # step schedule: decay every N epochs
    gamma: float = 0.1  # step schedule decay factor
    pct_start: float = 0.3  # OneCycle: fraction of steps spent rising


@dataclass
class NanGuardConfig:
    max_consecutive: int = 3  # K consecutive non-finite events -> roll back to the last good state
    lr_factor: float = 0.5  # learning rate multiplier applied at each rollback
    budget: int = 50  # total events after which training stops with an error
    snapshot_every: int = 25  # good steps between in-memory rollback snapshots
    check_params_every: int = 1  # steps between parameter finiteness checks
    min_loss_scale: float = 1.0  # fp16: inf grads are the GradScaler's normal overflow skip above this scale
    inject_steps: list[int] = field(default_factory=list)  # fault injection (tests, demos)
    inject_kind: Literal["loss", "grad"] = "loss"
    inject_ranks: list[int] = field(default_factory=list)  # DDP ranks that inject; empty = all


@dataclass
class EngineConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    grad_accum: int = 1  # micro-batches per optimiser step
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # CUDA only; CPU runs fp32
    clip_grad_norm: float | None = 5.0  # clip model+head gradients (seed 004: clipping fixed NaNs)
    ema_decay: float | None = None  # e.g. 0.999; checkpoints then carry EMA weights for serving
    early_stop_patience: int | None = None  # epochs without improvement of the monitored metric
    monitor: str = "val_accuracy"  # validation metric for best checkpoint / early stopping
    monitor_mode: Literal["max", "min"] = "max"
    checkpoint_every_steps: int = 200  # plus one at every epoch end
    keep_checkpoints: int = 3  # good states kept in <out>/checkpoints/ for resume to fall back on
    log_every_steps: int = 10
    collapse_warn: float = 0.95  # warn when mean inter-identity cosine exceeds this (seed 004: 0.9999)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
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


# -- the task interface ----------------------------------------------------------------------------
class Task(Protocol):
    stage: str  # metrics label / checkpoint kind prefix
    kind: str  # checkpoint kind: recognizer | dsr

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by checkpoint key; 'model' is the one that is served."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'backbone' / 'head' parameter lists (per-group learning rates)."""

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Loss of a batch and figures for the progress bar (scalar tensors are read only when logged,
        so a GPU step does not wait on them)."""

    def validate(self) -> dict[str, float]:
        """Validation figures (must include EngineConfig.monitor); may include 'mean_cosine'."""

    def checkpoint_meta(self) -> dict: ...


# -- helpers -------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"engine.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def build_optimizer(cfg: OptimConfig, groups: dict[str, list[nn.Parameter]]) -> torch.optim.Optimizer:
    lrs = {"backbone": cfg.backbone_lr or cfg.lr, "head": cfg.lr}
    params = [{"params": [p for p in ps if p.requires_grad], "lr": lrs.get(name, cfg.lr), "name": name}
              for name, ps in groups.items()]
    params = [g for g in params if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: ScheduleConfig, opt: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, total_steps)
    warm = min(cfg.warmup_steps, total - 1)

    def factor(step: int) -> float:
        if cfg.name == "onecycle":  # triangular-cosine one-cycle as a LambdaLR (resumable, per group)
            peak = max(1, int(total * cfg.pct_start))
            if step < peak:
                return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / peak
            t = (step - peak) / max(1, total - peak)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if step < warm:
            return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warm
        if cfg.name == "cosine":
            t = (step - warm) / max(1, total - warm)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if cfg.name == "step":
            return cfg.gamma ** (step // max(1, cfg.step_epochs * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def mean_inter_identity_cosine(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise cosine between identity centroids: near 1 means the embedding collapsed."""
    ids = labels.unique()
    if len(ids) < 2:
        return float("nan")
    cent = torch.stack([emb[labels == i].mean(0) for i in ids])
    cent = torch.nn.functional.normalize(cent, dim=1)
    sim = cent @ cent.T
    n = len(ids)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack(norms)).all())


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# -- the engine -------------------------------------------------------------------------------------
@dataclass
class FitResult:
    steps: int
    epochs: int
    best: float | None
    history: list[dict]
    nan_events: dict[str, int]
    rollbacks: int
    checkpoint: str | None
    best_checkpoint: str | None
    stopped_early: bool = False


class Engine:
    def __init__(self, task: Task, train_set: BatchDataset, cfg: EngineConfig, out_uri: str,
                 run_id: str = "local", run_config: dict | None = None, dataset_hash: str = "",
                 model_name: str = "",
                 on_epoch_start: Callable[[int, Engine], None] | None = None):
        self.task, self.train_set, self.cfg = task, train_set, cfg
        self.out_uri = out_uri.rstrip("/")
        self.run_config, self.dataset_hash = run_config or {}, dataset_hash
        self.on_epoch_start = on_epoch_start
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.dist.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.modules = task.modules()
        for m in self.modules.values():
            m.to(self.device)
        self.wrapped = self._wrap_ddp()
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.steps_per_epoch = max(1, len(train_set) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(cfg.optim, task.param_groups())
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) \
            if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ema = self._init_ema()
        self.metrics = StageMetrics(task.stage, run_id, model_name,
                                    cfg.metrics) if self.dist.main else None
        # progress state (all of it is checkpointed)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: float | None = None
        self.bad_epochs = 0
        self.lr_scale = 1.0
        self.nan_events = {"loss": 0, "grad": 0, "param": 0}
        self._nan_this_process = {"loss": 0}  # this rank's, not yet in rank 0's metric (DDP)
        self.consecutive_nan = 0
        self.rollbacks = 0
        self.overflow_skips = 0  # fp16 loss-scale overflows (not NaN events)
        self.history: list[dict] = []
        self._snapshot: dict | None = None
        self._good_since_snapshot = 0

    # ---- setup
    def _wrap_ddp(self) -> dict[str, nn.Module]:
        if self.dist.world_size <= 1:
            return self.modules
        ids = [self.device.index] if self.device.type == "cuda" else None
        unused = self.cfg.ddp_find_unused
        return {k: DistributedDataParallel(m, device_ids=ids, find_unused_parameters=unused)
                if any(p.requires_grad for p in m.parameters())
                else m for k, m in self.modules.items()}

    def _init_ema(self) -> dict[str, torch.Tensor] | None:
        if not self.cfg.ema_decay:
            return None
        return {k: v.detach().clone() for k, v in self.modules["model"].state_dict().items()}

    def _update_ema(self) -> None:
        """EMA with timm's warm-up: decay min(d, (1+n)/(10+n)) after n updates, so early averages
        follow the model instead of staying near the random initialisation."""
        if self.ema is None:
            return
        n = self.step  # updates before this one (called before the step counter moves)
        d = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for k, v in self.modules["model"].state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.ema[k].copy_(v)

    # ---- state
    def state(self) -> dict:
        s = {
            "kind": self.task.kind, "stage": self.task.stage,
            **{k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best": self.best, "bad_epochs": self.bad_epochs, "lr_scale": self.lr_scale,
            "nan_events": dict(self.nan_events), "rollbacks": self.rollbacks, "history": self.history,
            "config": self.run_config, "dataset_hash": self.dataset_hash,
        }
        s.update(self.task.checkpoint_meta())
        return s

    def load_state(self, s: dict) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(s[k])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.ema = s.get("ema") or self.ema
        torch.set_rng_state(s["rng"]["torch"])
        if torch.cuda.is_available() and s["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])
        for k in ("step", "epoch", "batch_in_epoch", "best", "bad_epochs", "lr_scale", "rollbacks",
                  "history"):
            setattr(self, k, s[k])
        self.nan_events = dict(s["nan_events"])

    def _take_snapshot(self) -> None:
        self._snapshot = copy.deepcopy({k: v for k, v in self.state().items() if k not in ("history",)})
        self._good_since_snapshot = 0

    def _rollback(self, step: int) -> None:
        """Restore the weights and optimiser of the last good snapshot, nothing else: progress, the
        best score, the early-stopping count and the schedule's position stay where they are (a
        rollback must neither re-open ``best.pt`` to a worse model nor make the LR lag the step)."""
        snap = self._snapshot
        keep = (dict(self.nan_events), self.rollbacks + 1, self.lr_scale * self.cfg.nan_guard.lr_factor,
                self.history, self.step, self.epoch, self.batch_in_epoch, self.best, self.bad_epochs)
        self.load_state({**copy.deepcopy(snap), "history": self.history})
        (self.nan_events, self.rollbacks, self.lr_scale, self.history,
         self.step, self.epoch, self.batch_in_epoch, self.best, self.bad_epochs) = keep
        self.scheduler.last_epoch = self.step  # one scheduler step per optimiser step
        self._apply_lr_scale()
        self.consecutive_nan = 0
        if self.metrics:
            self.metrics.labels(self.metrics.rollbacks).inc()
        log.warning("%s: %d consecutive non-finite steps at step %d: rolled back to the last good state, "
                    "learning rate x%g (now x%g)", self.task.stage, self.cfg.nan_guard.max_consecutive, step,
                    self.cfg.nan_guard.lr_factor, self.lr_scale)

    def _apply_lr_scale(self) -> None:
        sched = self.scheduler
        for g, b, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            g["lr"] = b * f(sched.last_epoch) * self.lr_scale

    def checkpoint(self, name: str = "last.pt") -> str | None:
        """Write ``<out>/<name>``; ``last.pt`` also goes to the history of the last K good states."""
        if not self.dist.main:
            return None
        uri = f"{self.out_uri}/{name}"
        copies = (history_uri(self.out_uri, self.step),) if name == "last.pt" else ()
        try:
            save_checkpoint(uri, self.state(), copies)
        except NonFiniteCheckpointError as exc:
            log.error("%s (the previous checkpoint is kept)", exc)
            return None
        if copies:
            prune_history(self.out_uri, self.cfg.keep_checkpoints)
        return uri

    def _bad_checkpoint(self, uri: str, reason: str) -> None:
        log.error("%s: unreadable checkpoint skipped: %s", self.task.stage, reason)
        if self.metrics:
            self.metrics.labels(self.metrics.corrupt_checkpoints, checkpoint=uri.rsplit("/", 1)[-1]).inc()

    def resume(self) -> bool:
        """Continue from the newest good checkpoint of ``<out>`` (``last.pt``, else the history).

        Only a run without any checkpoint starts from scratch; a corrupt one is logged, counted
        (``faceops_checkpoint_corrupt_total``) and skipped; all of them corrupt is an error.
        """
        try:
            found = load_newest_good(self.out_uri, self.device, on_bad=self._bad_checkpoint)
        except CheckpointError as exc:
            raise TrainingError(f"{self.task.stage}: cannot resume: {exc}") from None
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.out_uri)
            return False
        uri, s = found
        if s.get("dataset_hash") and self.dataset_hash and s["dataset_hash"] != self.dataset_hash:
            raise TrainingError(f"{uri} was trained on dataset {s['dataset_hash'][:12]}, not "
                                f"{self.dataset_hash[:12]}: use a new --out to train on another dataset")
        self.load_state(s)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", uri, self.step, self.epoch,
                 self.batch_in_epoch)
        return True

    # ---- the loop
    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every DDP rank."""
        if self.dist.world_size <= 1:
            return ok
        flag = torch.tensor([float(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _nan_event(self, kind: str, here: bool = True) -> None:
        """Count a skipped batch; K in a row -> roll back; past the budget -> stop with the step.

        The guard's state counts the event on every rank (they skip and roll back together). The
        metric counts where it happened: a loss is per rank (``here``), summed into rank 0's counter
        at each epoch end; grads and params are all-reduced, so rank 0 counts those itself.
        """
        self.nan_events[kind] += 1
        self.consecutive_nan += 1
        if kind == "loss" and self.dist.world_size > 1:
            self._nan_this_process[kind] += int(here)
        elif self.metrics:
            self.metrics.labels(self.metrics.nan_events, kind=kind).inc()
        total = sum(self.nan_events.values())
        where = f"step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})"
        log.warning("%s: non-finite %s at %s: batch skipped (%d events so far)", self.task.stage, kind,
                    where, total)
        guard = self.cfg.nan_guard
        if total > guard.budget:
            raise TrainingError(f"{self.task.stage}: NaN budget exceeded ({total} > nan_guard.budget="
                                f"{guard.budget}) at {where}; last non-finite value: {kind}. Lower optim.lr, "
                                "enable clipping (engine.clip_grad_norm) or soften the margin (margin.m); "
                                f"the last good checkpoint is {self.out_uri}/last.pt")
        if self.consecutive_nan >= guard.max_consecutive:
            self._rollback(self.step)

    def _forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            loss, stats = self.task.loss(batch)
        return loss.float(), stats

    def _should_inject(self, kind: str) -> bool:
        """Fault injection: each entry of nan_guard.inject_steps poisons one batch at that step
        (repeat a step to poison consecutive batches, e.g. to trigger a rollback)."""
        g = self.cfg.nan_guard
        if g.inject_kind != kind or self._to_inject.get(self.step, 0) <= 0:
            return False
        if g.inject_ranks and self.dist.rank not in g.inject_ranks:
            return False
        self._to_inject[self.step] -= 1
        return True

    def fit(self, resume: bool = False) -> FitResult:
        """Train to the end; the run's metrics are marked finished, as a success or a failure."""
        try:
            result = self._fit(resume)
        except BaseException:
            self._finish_metrics(success=False)
            raise
        self._finish_metrics(success=True)
        return result

    def _fit(self, resume: bool) -> FitResult:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if resume:
            self.resume()
        self._apply_lr_scale()
        self._take_snapshot()
        stopped_early = False
        self._to_inject = Counter(cfg.nan_guard.inject_steps)
        while self.epoch < cfg.epochs and self.step < self.total_steps:
            if self.on_epoch_start:
                self.on_epoch_start(self.epoch, self)
            t0 = time.time()
            done_early = self._run_epoch()
            epoch_s = time.time() - t0
            if done_early and self.step >= self.total_steps and self.batch_in_epoch < len(self.train_set):
                # max_steps reached mid-epoch: validate + checkpoint, then stop
                self._end_epoch(epoch_s, partial=True)
                break
            stop = self._end_epoch(epoch_s)
            if stop:
                stopped_early = True
                break
        best_uri = f"{self.out_uri}/best.pt" if self.best is not None else None
        return FitResult(self.step, self.epoch, self.best, self.history, dict(self.nan_events),
                         self.rollbacks, f"{self.out_uri}/last.pt", best_uri, stopped_early)

    def _run_epoch(self) -> bool:
        cfg = self.cfg
        self.train_set.set_epoch(self.epoch)
        for m in self.modules.values():
            m.train(any(p.requires_grad for p in m.parameters()))
        n_batches = len(self.train_set)
        loader = make_loader(self.train_set, self.batch_in_epoch)
        bar = tqdm(total=n_batches, initial=self.batch_in_epoch, unit="batch",
                   desc=f"{self.task.stage} epoch {self.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.dist.main), leave=False)
        t_last, imgs_last, imgs_step = time.time(), 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        micro = 0
        for batch in loader:
            batch = self.train_set.to_device(batch, self.device)
            loss, stats = self._forward_loss(batch)
            if self._should_inject("loss"):
                loss = loss * float("nan")
            self.batch_in_epoch += 1
            local_ok = bool(torch.isfinite(loss))
            if not self._all_ranks(local_ok):  # every rank skips together, or DDP's all-reduce would hang
                self.optimizer.zero_grad(set_to_none=True)
                micro = imgs_step = 0
                self._nan_event("loss", here=not local_ok)
                bar.update(1)
                continue
            self.scaler.scale(loss / cfg.grad_accum).backward()
            micro += 1
            imgs_last += len(batch["label"]) * self.dist.world_size
            imgs_step += len(batch["label"]) * self.dist.world_size
            if micro < cfg.grad_accum and self.batch_in_epoch < n_batches:
                bar.update(1)
                continue
            micro = 0
            ok = self._optimizer_step()
            bar.update(1)
            step_images, imgs_step = imgs_step, 0
            if not ok:
                continue
            self.step += 1
            if self.metrics:  # one real optimiser step: never counted twice, whatever the log interval
                self.metrics.labels(self.metrics.steps).inc()
                self.metrics.labels(self.metrics.images).inc(step_images)
            self.consecutive_nan = 0
            self._good_since_snapshot += 1
            if self._good_since_snapshot >= cfg.nan_guard.snapshot_every:
                self._take_snapshot()
            if self.step % cfg.log_every_steps == 0 or self.step == 1:
                dt = max(1e-9, time.time() - t_last)
                ips = imgs_last / dt
                t_last, imgs_last = time.time(), 0
                self._log_step(loss.item(), stats, ips, bar)
            if self.step % cfg.checkpoint_every_steps == 0:
                self.checkpoint()
            if self.step >= self.total_steps:
                bar.close()
                return True
        bar.close()
        return False

    def _optimizer_step(self) -> bool:
        cfg = self.cfg
        g = cfg.nan_guard
        if self._should_inject("grad"):
            next(p for p in self.params if p.grad is not None).grad.fill_(float("nan"))
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(grad_norm) or not _all_finite(grads):
            if self.scaler.is_enabled() and self.scaler.get_scale() > g.min_loss_scale:
                self.scaler.step(self.optimizer)  # fp16 overflow: the scaler skips the step, lowers its scale
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.overflow_skips += 1
                return False
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            self._nan_event("grad")
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._apply_lr_scale()
        if self.step % g.check_params_every == 0 and not _all_finite([p.detach() for p in self.params]):
            self.nan_events["param"] += 1
            if self.metrics:
                self.metrics.labels(self.metrics.nan_events, kind="param").inc()
            log.warning("%s: non-finite parameters after step %d: rolling back", self.task.stage, self.step)
            self._rollback(self.step)
            return False
        self._update_ema()
        self._last_grad_norm = float(grad_norm)
        return True

    def _log_step(self, loss: float, stats: dict, ips: float, bar: tqdm) -> None:
        lr = self.optimizer.param_groups[-1]["lr"]
        bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{float(v):.3f}" for k, v in stats.items()}, lr=f"{lr:.2e}",
                        ips=f"{ips:.0f}")
        if self.metrics:
            m = self.metrics
            m.labels(m.loss).set(loss)
            m.labels(m.lr).set(lr)
            m.labels(m.grad_norm).set(getattr(self, "_last_grad_norm", 0.0))
            m.labels(m.throughput).set(ips)
            if self.step % self.cfg.metrics.push_every_steps == 0:
                m.push()

    @contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """Validate what is served: with an EMA, the EMA weights pick ``best.pt`` and stop early."""
        if self.ema is None:
            yield
            return
        model = self.modules["model"]
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.ema)
        try:
            yield
        finally:
            model.load_state_dict(raw)

    def _count_rank_nan_losses(self) -> None:
        """Add every DDP rank's non-finite losses since the last epoch end to rank 0's counter."""
        if self.dist.world_size <= 1:
            return
        n = torch.tensor([float(self._nan_this_process["loss"])], device=self.device)
        self._nan_this_process["loss"] = 0
        dist.all_reduce(n)
        if self.metrics and n.item() > 0:
            self.metrics.labels(self.metrics.nan_events, kind="loss").inc(n.item())

    def _end_epoch(self, seconds: float, partial: bool = False) -> bool:
        cfg = self.cfg
        self._count_rank_nan_losses()
        if not partial:
            self.epoch += 1
            self.batch_in_epoch = 0
        figures: dict[str, float] = {}
        if self.dist.main:
            for m in self.modules.values():
                m.eval()
            with torch.no_grad(), self._ema_weights():
                figures = self.task.validate()
        stop = False
        if self.dist.main:
            record = {"epoch": self.epoch, "step": self.step, "seconds": round(seconds, 2), **figures}
            self.history.append(record)
            mc = figures.get("mean_cosine")
            if mc is not None and mc > cfg.collapse_warn:
                log.warning("%s: embedding collapse suspected: mean inter-identity cosine %.4f > %.2f "
                            "(seed 004 saw 0.9999 just before failure)", self.task.stage, mc,
                            cfg.collapse_warn)
            value = figures.get(cfg.monitor)
            improved = value is not None and math.isfinite(value) and (
                self.best is None or (value > self.best if cfg.monitor_mode == "max" else value < self.best))
            if improved:
                self.best, self.bad_epochs = value, 0
            else:
                self.bad_epochs += 1
            self.checkpoint()
            if improved:
                self.checkpoint("best.pt")
            self._report_epoch(record, seconds)
            stop = bool(cfg.early_stop_patience and self.bad_epochs >= cfg.early_stop_patience)
            if stop:
                log.info("%s: early stop: %s did not improve for %d epoch(s) (best %.4f)", self.task.stage,
                         cfg.monitor, self.bad_epochs, self.best)
        if self.dist.world_size > 1:
            flag = torch.tensor([int(stop)], device=self.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def _report_epoch(self, record: dict, seconds: float) -> None:
        figs = " ".join(f"{k}={v:.4f}" for k, v in record.items()
                        if k not in ("epoch", "step", "seconds") and isinstance(v, float))
        nan = sum(self.nan_events.values())
        print(f"[{self.task.stage}] epoch {record['epoch']}/{self.cfg.epochs} step {self.step} "
              f"{seconds:.1f}s {figs} nan_events={nan} rollbacks={self.rollbacks}", flush=True)
        if self.metrics:
            m = self.metrics
            m.labels(m.epoch_seconds).set(seconds)
            m.labels(m.epoch).set(record["epoch"])
            for k, v in record.items():
                if isinstance(v, float) and k not in ("seconds",):
                    m.labels(m.val_metric, name=k).set(v)
            if "mean_cosine" in record:
                m.labels(m.collapse).set(record["mean_cosine"])
            m.push()

    def _finish_metrics(self, success: bool) -> None:
        if self.metrics:
            self.metrics.finish(success)
            self.metrics = None


def run_config_dict(cfg: object) -> dict:
    return to_dict(cfg)
