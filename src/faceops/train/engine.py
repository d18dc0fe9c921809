"""The one training engine: every task (recognizer, DSR, EdgeFace fine-tune) runs through it.

The loop is small and visible (:meth:`Engine._train_epoch`, :meth:`Engine._optimizer_step`):
forward, loss, backward, clip, step, schedule, in the spirit of torchvision's reference
``train.py``. A task supplies modules, the loss of a batch given the modules to run (DDP-wrapped or
not: torchvision's ``model_without_ddp`` pattern) and a validation. Everything else is a part with
one job: :mod:`~faceops.train.optim` (torch's optimisers and schedules), :mod:`~faceops.train.guard`
(the NaN guard: device-side skip, counts, snapshots, rollback), :mod:`~faceops.train.writer`
(checkpoints off the training thread), :mod:`~faceops.train.ddp`, and hooks
(:mod:`~faceops.train.hooks`: EMA, early stopping, metrics, progress, and the run's own, e.g. a
fine-tune's stages or a benchmark's budget planner).

The training thread waits on the device once per ``log_every_steps`` (loss, flags, counters) and at
epoch ends, never per step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch

from faceops.data.reader import BatchDataset, make_loader
from faceops.devices import resolve_device
from faceops.errors import TrainingError
from faceops.train import ddp
from faceops.train.config import EngineConfig
from faceops.train.ema import EMA
from faceops.train.guard import NanGuard, TensorSnapshot, all_finite
from faceops.train.hooks import EarlyStopping, Hook, Progress
from faceops.train.metrics_hook import TrainingMetrics
from faceops.train.optim import build_optimizer, build_scheduler, replay
from faceops.train.state import EngineState
from faceops.train.task import FitResult, Task
from faceops.train.writer import CheckpointWriter

log = logging.getLogger(__name__)


class Engine(EngineState):
    def __init__(self, task: Task, train_set: BatchDataset, cfg: EngineConfig, out_uri: str,
                 run_id: str = "local", run_config: dict | None = None, dataset_hash: str = "",
                 model_name: str = "", hooks: Sequence[Hook] = ()):
        self.task, self.train_set, self.cfg = task, train_set, cfg
        self.out_uri = out_uri.rstrip("/")
        self.run_config, self.dataset_hash = run_config or {}, dataset_hash
        self.device = resolve_device(cfg.device, "engine.device")
        self.dist = ddp.init_distributed(self.device)
        if self.dist.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.modules = task.modules()
        for m in self.modules.values():
            m.to(self.device)
        self.nets = ddp.wrap(self.modules, self.dist, self.device, cfg.sync_bn, cfg.ddp_find_unused)
        self.params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        self.steps_per_epoch = max(1, math.ceil(len(train_set) / cfg.grad_accum))  # a last partial group steps too
        self.configured_steps = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.total_steps = self.configured_steps  # a hook may re-plan it (replan)
        self.optimizer = build_optimizer(cfg.optim, task.param_groups())
        self.base_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.lr_scale = 1.0
        self.scheduler = build_scheduler(cfg.schedule, self.optimizer, self.total_steps, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) \
            if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.guard = NanGuard(cfg.nan_guard, self.device, self.dist)
        self.writer = CheckpointWriter()
        self._snapshot = TensorSnapshot()
        self.hooks: list[Hook] = [*self._standard_hooks(run_id, model_name), *hooks]
        # progress (all of it is checkpointed)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: float | None = None
        self.bad_epochs = 0
        self.nan_events = {"loss": 0, "grad": 0, "param": 0}
        self.rollbacks = 0
        self.history: list[dict] = []
        self._stop: str | None = None
        self._good_since_snapshot = 0

    def _standard_hooks(self, run_id: str, model_name: str) -> list[Hook]:
        cfg = self.cfg
        hooks: list[Hook] = [Progress(cfg.progress)]
        if cfg.ema_decay:
            hooks.append(EMA(self.modules["model"], cfg.ema_decay, cfg.ema_warmup_power))
        if cfg.early_stop_patience:
            hooks.append(EarlyStopping(cfg.early_stop_patience))
        self.metrics: TrainingMetrics | None = None
        if self.dist.main:
            self.metrics = TrainingMetrics(self.task.stage, run_id, model_name, cfg.metrics)
            hooks.append(self.metrics)
        return hooks

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            getattr(h, name)(self, *args)

    # ---- controls for hooks and tasks
    def set_base_lrs(self, lrs: dict[str, float]) -> None:
        """New base learning rates per group (e.g. a fine-tune's second stage); the schedule's shape
        and position stay, the NaN-rollback scale still applies."""
        if {k: lrs.get(k, v) for k, v in self.base_lrs.items()} != self.base_lrs:
            self.base_lrs = {k: lrs.get(k, v) for k, v in self.base_lrs.items()}
            self._rebuild_schedule()

    def replan(self, total_steps: int) -> None:
        """Stretch or shrink the schedule to end at ``total_steps`` (a budget planner's re-plan)."""
        if total_steps != self.total_steps:
            self.total_steps = total_steps
            self._rebuild_schedule()

    def request_stop(self, reason: str) -> None:
        self._stop = reason

    def _rebuild_schedule(self) -> None:
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.base_lrs[g["name"]] * self.lr_scale
        self.scheduler = build_scheduler(self.cfg.schedule, self.optimizer, self.total_steps, self.steps_per_epoch)
        replay(self.scheduler, self.step)

    # ---- the loop
    def fit(self, resume: bool = False) -> FitResult:
        """Train to the end; hooks hear whether it ended as a success or a failure."""
        try:
            result = self._fit(resume)
        except BaseException:
            self._end(success=False)
            raise
        self._end(success=True)
        return result

    def _end(self, success: bool) -> None:
        try:
            self.writer.close()
        except Exception:
            if success:
                raise
            log.exception("%s: the last checkpoint write failed too", self.task.stage)  # keep the first error
        finally:
            self._call("on_fit_end", success)

    def _fit(self, resume: bool) -> FitResult:
        torch.manual_seed(self.cfg.seed)
        if resume:
            self.resume()
        self._call("on_fit_start")
        self._take_snapshot()
        while self.epoch < self.cfg.epochs and self.step < self.total_steps and self._stop is None:
            self._call("on_epoch_start")
            t0 = time.time()
            self._train_epoch()
            partial = self.batch_in_epoch < len(self.train_set)  # max_steps reached mid-epoch
            self._end_epoch(time.time() - t0, partial)
            if partial:
                break
        if self._stop:
            log.info("%s: %s", self.task.stage, self._stop)
        best_uri = f"{self.out_uri}/best.pt" if self.best is not None else None
        return FitResult(self.step, self.epoch, self.best, self.history, dict(self.nan_events),
                         self.rollbacks, f"{self.out_uri}/last.pt", best_uri, self._stop is not None)

    def _train_epoch(self) -> None:
        cfg = self.cfg
        self.train_set.set_epoch(self.epoch)
        for m in self.modules.values():
            m.train(any(p.requires_grad for p in m.parameters()))
        n_batches = len(self.train_set)
        self.optimizer.zero_grad(set_to_none=True)
        micro, images, loss_bad = 0, 0, torch.zeros((), dtype=torch.bool, device=self.device)
        t_log, images_log = time.time(), 0
        for batch in make_loader(self.train_set, self.batch_in_epoch):
            batch = self.train_set.to_device(batch, self.device)
            self.batch_in_epoch += 1
            micro += 1
            last_micro = micro == cfg.grad_accum or self.batch_in_epoch == n_batches
            with ddp.no_sync(self.nets, skip=not last_micro):
                loss, stats = self._forward(batch)
                if self.guard.inject(self.step, "loss", self.dist.rank):
                    loss = loss * float("nan")
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_bad = loss_bad | ~torch.isfinite(loss.detach())
            images += len(batch["label"]) * self.dist.world_size
            if not last_micro:
                continue
            grad_norm = self._optimizer_step(loss_bad, images)
            self.step += 1
            images_log += images
            micro, images, loss_bad = 0, 0, torch.zeros((), dtype=torch.bool, device=self.device)
            self._call("on_step_end")
            if self.step % cfg.log_every_steps == 0 or self.step == 1:
                now = time.time()
                self._read_guard(loss, stats, grad_norm, images_log / max(1e-9, now - t_log))
                t_log, images_log = now, 0
            if self.step % cfg.checkpoint_every_steps == 0 and self._stop is None:
                self._read_guard(loss, stats, grad_norm, 0.0, log_figures=False)
                self.checkpoint()
            if self.step >= self.total_steps or self._stop is not None:
                return

    def _forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        ctx = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            loss, stats = self.task.loss(batch, self.nets)
        return loss.float(), stats

    def _optimizer_step(self, loss_bad: torch.Tensor, images: int) -> torch.Tensor:
        """Unscale, clip, step and schedule; a non-finite step is skipped on the device."""
        cfg, opt = self.cfg, self.optimizer
        if self.guard.inject(self.step, "grad", self.dist.rank):
            next(p for p in self.params if p.grad is not None).grad.fill_(float("nan"))
        self.scaler.unscale_(opt)
        if cfg.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm, foreach=True)
        else:  # the norm for the guard and the log, without scaling every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None],
                                                      foreach=True)
        grad_bad = ~torch.isfinite(grad_norm)
        grad_event = grad_bad
        if self.scaler.is_enabled():  # fp16: inf grads above min_loss_scale are the scaler's skip, not an event
            grad_event = grad_bad & ~loss_bad & ~(self.scaler._scale > cfg.nan_guard.min_loss_scale)
        flags = self.guard.agree(loss_bad, grad_bad, grad_event)  # every rank skips the same steps
        skip = flags.loss | flags.grad
        opt.found_inf = skip.float()
        opt.step()
        del opt.found_inf
        if self.scaler.is_enabled():
            self.scaler.update()
        opt.zero_grad(set_to_none=True)
        self.scheduler.step()
        param_bad = None
        if (self.step + 1) % cfg.nan_guard.check_params_every == 0:
            param_bad = ~all_finite([p.detach() for p in self.params])
        self.guard.observe(loss_bad, flags, param_bad, images)
        return grad_norm

    def _read_guard(self, loss: torch.Tensor, stats: dict, grad_norm: torch.Tensor, images_per_s: float,
                    log_figures: bool = True) -> None:
        """The host's look at the device: NaN events, rollback, budget, and the log's figures."""
        report = self.guard.read(self.step)
        for kind, n in report.new.items():
            if n:
                self.nan_events[kind] += n
                self._call("on_nan", kind, n, report.new_here[kind])
                log.warning("%s: non-finite %s on %d step(s) by step %d (epoch %d, batch %d): skipped "
                            "(%d events so far)", self.task.stage, kind, n, self.step, self.epoch,
                            self.batch_in_epoch, sum(self.nan_events.values()))
        total, guard = sum(self.nan_events.values()), self.cfg.nan_guard
        if total > guard.budget:
            last = next(k for k in ("param", "grad", "loss") if report.new[k]) if any(report.new.values()) else "loss"
            raise TrainingError(f"{self.task.stage}: NaN budget exceeded ({total} > nan_guard.budget={guard.budget}) "
                                f"at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch}); last "
                                f"non-finite value: {last}. Lower optim.lr, enable clipping (engine.clip_grad_norm) "
                                f"or soften the margin (margin.m); the last good checkpoint is {self.out_uri}/last.pt")
        if report.rollback:
            self._rollback()
        elif not any(report.new.values()):
            self._good_since_snapshot += report.good_steps
            if self._good_since_snapshot >= guard.snapshot_every and bool(all_finite(self.params)):
                self._take_snapshot()  # (weights unchecked since the last check_params_every step: check)
        if self.dist.distributed:  # a stop one rank asked for (a hook) stops every rank at the same step
            flag = ddp.all_reduce_(torch.tensor([int(self._stop is not None)], device=self.device), self.dist,
                                   torch.distributed.ReduceOp.MAX)
            if flag.item() and self._stop is None:
                self._stop = "stopped by another rank"
        figures: dict[str, float] = {"good_steps": report.good_steps, "good_images": report.good_images}
        if log_figures:
            values = torch.stack([loss.detach().float(), grad_norm.detach().float(),
                                  *[torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                                    for v in stats.values()]]).tolist()
            figures.update(loss=values[0], **dict(zip(stats, values[2:], strict=True)),
                           lr=self.optimizer.param_groups[-1]["lr"], grad_norm=values[1], images_per_s=images_per_s)
        self._call("on_log", figures)

    def _end_epoch(self, seconds: float, partial: bool) -> None:
        cfg = self.cfg
        self._read_guard(torch.zeros(()), {}, torch.zeros(()), 0.0, log_figures=False)
        if not partial:
            self.epoch += 1
            self.batch_in_epoch = 0
        if self.dist.main:
            for m in self.modules.values():
                m.eval()
            with torch.no_grad(), ExitStack() as stack:
                for h in self.hooks:
                    stack.enter_context(h.validating(self))
                figures = self.task.validate()
            record = {"epoch": self.epoch, "step": self.step, "seconds": round(seconds, 2), **figures}
            self.history.append(record)
            mc = figures.get("mean_cosine")
            if mc is not None and mc > cfg.collapse_warn:
                log.warning("%s: embedding collapse suspected: mean inter-identity cosine %.4f > %.2f "
                            "(seed 004 saw 0.9999 just before failure)", self.task.stage, mc, cfg.collapse_warn)
            value = figures.get(cfg.monitor)
            improved = value is not None and math.isfinite(value) and (
                self.best is None or (value > self.best if cfg.monitor_mode == "max" else value < self.best))
            if improved:
                self.best, self.bad_epochs = value, 0
            elif value is None:
                if not partial and self.epoch == 1:
                    log.warning("%s: validation gives no %s (no val split, or no pairs in it): no best.pt and no "
                                "early stopping in this run", self.task.stage, cfg.monitor)
            elif not partial:  # a max_steps stop mid-epoch is not an epoch without improvement
                self.bad_epochs += 1
            self._call("on_epoch_end", record)  # before the checkpoint: a stop decided here is in it
            self.checkpoint(best=improved)
        stop = ddp.broadcast_flag(self._stop is not None, self.dist, self.device)
        if stop and self._stop is None:
            self._stop = "stopped by rank 0"
