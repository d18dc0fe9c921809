"""Optimisers and learning-rate schedules: torch's own, built from the configs.

Optimisers are the *fused* AdamW/SGD so that a non-finite step is skipped on the device (the
optimiser's ``found_inf``, as ``GradScaler`` uses it) without the host waiting for the verdict.

The schedule is a function of (base LR per group, NaN-rollback scale, total steps, step); when one
of the first three changes mid-run (a fine-tune stage, a rollback, a re-planned budget), the
scheduler is rebuilt and replayed to the current step, so the LR is what a run with those settings
from the start would have at that step, and the scheduler's ``state_dict`` resumes exactly.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from faceops.train.config import OptimConfig, ScheduleConfig


def build_optimizer(cfg: OptimConfig, groups: dict[str, list[nn.Parameter]]) -> torch.optim.Optimizer:
    """One param group per name (``backbone`` takes ``backbone_lr``); frozen parameters left out."""
    lrs = {"backbone": cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr, "head": cfg.lr}
    params = [{"params": [p for p in ps if p.requires_grad], "lr": lrs.get(name, cfg.lr), "name": name}
              for name, ps in groups.items()]
    params = [g for g in params if g["params"]]
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay, fused=True)
        if cfg.momentum:  # fused SGD leaves the buffer uninitialised when the very first step is skipped;
            for g in opt.param_groups:  # zeros give the same first update (buf = grad) without that
                for p in g["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


def build_scheduler(cfg: ScheduleConfig, opt: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int) -> sched.LRScheduler:
    """The schedule over ``total_steps`` optimiser steps from each group's ``initial_lr`` (its ``lr``
    when unset)."""
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
        g["lr"] = g["initial_lr"]
    total = max(1, total_steps)
    if cfg.name == "onecycle":
        return sched.OneCycleLR(opt, max_lr=[g["initial_lr"] for g in opt.param_groups], total_steps=total,
                                pct_start=cfg.pct_start, div_factor=cfg.div_factor,
                                final_div_factor=cfg.final_div_factor)
    warm = min(cfg.warmup_steps, total - 1)
    if cfg.name == "cosine":
        main: sched.LRScheduler = sched.CosineAnnealingLR(opt, T_max=max(1, total - warm), eta_min=cfg.min_lr)
    elif cfg.name == "step":
        main = sched.StepLR(opt, step_size=max(1, cfg.step_epochs * steps_per_epoch), gamma=cfg.gamma)
    else:
        main = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if warm <= 0:
        return main
    for g in opt.param_groups:  # SequentialLR starts its first scheduler from initial_lr
        g["lr"] = g["initial_lr"]
    warmup = sched.LinearLR(opt, start_factor=cfg.warmup_start_factor, total_iters=warm)
    return sched.SequentialLR(opt, [warmup, main], milestones=[warm])


def replay(scheduler: sched.LRScheduler, steps: int) -> None:
    """Advance a freshly built scheduler to ``steps`` (torch's chainable schedulers have no seek)."""
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": replay, by design
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def current_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}
