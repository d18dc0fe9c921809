"""The NaN guard: non-finite steps are skipped on the device, counted, and acted on when read.

Each step adds to a few counters held on the training device (non-finite loss, non-finite
gradients, non-finite parameters, the current and the longest run of bad steps) and hands the
optimiser a ``found_inf`` flag so a bad step changes nothing; the host reads the counters once per
``log_every_steps`` (:meth:`NanGuard.read`). Then K bad steps in a row (or non-finite parameters)
mean a rollback to the last snapshot, and more events than the budget stop the run naming the step.

Snapshots are copies of the weights, the optimiser's state and the hooks' tensors into buffers
allocated once (:class:`TensorSnapshot`): taking one is a device-side copy, not a serialisation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from faceops.train.config import NanGuardConfig
from faceops.train.ddp import DistInfo, all_reduce_

KINDS = ("loss", "grad", "param")
# device counters: loss events here, loss events on any rank, grad, param, current run, longest run,
# bad steps, good images
_LOSS_HERE, _LOSS, _GRAD, _PARAM, _RUN, _WORST, _BAD, _IMAGES = range(8)


@dataclass
class StepFlags:
    """One step's verdict, the same on every DDP rank (0-dim bool tensors on the device)."""

    loss: torch.Tensor  # a non-finite loss on some rank
    grad: torch.Tensor  # non-finite gradients (every rank sees the all-reduced ones)
    grad_event: torch.Tensor  # ... that count as a NaN event (not an fp16 loss-scale overflow)


@dataclass
class GuardReport:
    new: dict[str, int]  # events since the last read, by kind (every rank's view)
    new_here: dict[str, int]  # ... of which this process's own losses (DDP metrics)
    good_steps: int
    good_images: int
    rollback: bool  # K bad steps in a row, or non-finite parameters, since the last read


class NanGuard:
    def __init__(self, cfg: NanGuardConfig, device: torch.device, dist: DistInfo):
        self.cfg, self.device, self.dist = cfg, device, dist
        self._c = torch.zeros(8, dtype=torch.int64, device=device)
        self._read = torch.zeros(8, dtype=torch.int64)  # host copy at the last read
        self._steps_at_read = 0
        self._to_inject = Counter(cfg.inject_steps)

    # -- on the device, every step
    def agree(self, loss_bad: torch.Tensor, grad_bad: torch.Tensor, grad_event: torch.Tensor) -> StepFlags:
        """Every rank's flags (one all-reduce under DDP, none otherwise): all ranks skip the same steps and
        count the same events, so rollbacks and the budget stay in step across ranks."""
        if not self.dist.distributed:
            return StepFlags(loss_bad, grad_bad, grad_event)
        flags = all_reduce_(torch.stack([loss_bad, grad_bad, grad_event]).to(torch.int32), self.dist,
                            torch.distributed.ReduceOp.MAX).bool()
        return StepFlags(flags[0], flags[1], flags[2])

    def observe(self, loss_here: torch.Tensor, flags: StepFlags, param_bad: torch.Tensor | None, images: int) -> None:
        """Count one optimiser step; ``loss_here`` is this rank's own loss flag (the metric counts losses
        where they happened)."""
        c = self._c
        skipped = flags.loss | flags.grad
        event = flags.loss | flags.grad_event
        c[_LOSS_HERE] += loss_here
        c[_LOSS] += flags.loss
        c[_GRAD] += flags.grad_event & ~flags.loss
        if param_bad is not None:
            c[_PARAM] += param_bad
        c[_RUN] = (c[_RUN] + 1) * event
        c[_WORST] = torch.maximum(c[_WORST], c[_RUN])
        c[_BAD] += skipped
        c[_IMAGES] += (~skipped) * images

    def resumed_at(self, step: int) -> None:
        self._steps_at_read = step

    def inject(self, step: int, kind: str, rank: int) -> bool:
        """Fault injection: each entry of ``inject_steps`` poisons one batch of that step."""
        g = self.cfg
        if g.inject_kind != kind or self._to_inject.get(step, 0) <= 0:
            return False
        if g.inject_ranks and rank not in g.inject_ranks:
            return False
        self._to_inject[step] -= 1
        return True

    # -- on the host, every log interval
    def read(self, step: int) -> GuardReport:
        now = self._c.to("cpu", copy=True)  # the one host sync (a copy: on the CPU .cpu() would alias)
        delta = now - self._read
        here = all_reduce_(delta[_LOSS_HERE:_LOSS_HERE + 1].to(self.device), self.dist).item() \
            if self.dist.distributed else int(delta[_LOSS_HERE])
        self._read = now
        steps = step - self._steps_at_read
        self._steps_at_read = step
        rollback = bool(now[_WORST] >= self.cfg.max_consecutive or delta[_PARAM] > 0)
        if rollback:
            self._c[_RUN] = 0
            self._c[_WORST] = 0
            self._read[_RUN] = self._read[_WORST] = 0
        return GuardReport(new={"loss": int(delta[_LOSS]), "grad": int(delta[_GRAD]), "param": int(delta[_PARAM])},
                           new_here={"loss": int(here), "grad": 0, "param": 0},
                           good_steps=steps - int(delta[_BAD]), good_images=int(delta[_IMAGES]), rollback=rollback)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device (no host sync)."""
    if not tensors:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


class TensorSnapshot:
    """Copies of a list of tensors kept in buffers that are allocated once (again only when the
    list's shapes change, e.g. when an optimiser creates its state at its first step)."""

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self._sig: list[tuple] = []

    def take(self, tensors: Iterable[torch.Tensor]) -> None:
        tensors = [t.detach() for t in tensors]
        sig = [(t.shape, t.dtype, t.device) for t in tensors]
        if sig != self._sig:
            self._bufs, self._sig = [torch.empty_like(t) for t in tensors], sig
        with torch.no_grad():
            for buf, t in zip(self._bufs, tensors, strict=True):
                buf.copy_(t, non_blocking=True)

    def restore(self, tensors: Iterable[torch.Tensor]) -> None:
        tensors = [t.detach() for t in tensors]
        if [(t.shape, t.dtype, t.device) for t in tensors] != self._sig:
            raise RuntimeError("snapshot and state differ in layout")
        with torch.no_grad():
            for buf, t in zip(self._bufs, tensors, strict=True):
                t.copy_(buf, non_blocking=True)
