"""DDP under torchrun, the way torchvision's references do it: join the process group when
``WORLD_SIZE > 1``, optional SyncBatchNorm, one DistributedDataParallel per trainable module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from faceops.errors import TrainingError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap(modules: dict[str, nn.Module], info: DistInfo, device: torch.device, sync_bn: bool,
         find_unused: bool) -> dict[str, nn.Module]:
    """The modules as the loop runs them: each trainable one in DDP (after an optional SyncBatchNorm
    conversion, in place, so the unwrapped module is still the one checkpointed); a single process
    gets them back unchanged."""
    if not info.distributed:
        return dict(modules)
    if sync_bn and device.type != "cuda":
        raise TrainingError("engine.sync_bn: torch's SyncBatchNorm runs on CUDA devices only; this DDP run is on "
                            f"{device.type}: set engine.sync_bn=false")
    ids = [device.index] if device.type == "cuda" else None
    out = {}
    for name, m in modules.items():
        if not any(p.requires_grad for p in m.parameters()):
            out[name] = m
            continue
        if sync_bn:  # converts the BatchNorm layers inside ``m`` in place (a non-BN root comes back as is)
            m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        out[name] = DistributedDataParallel(m, device_ids=ids, find_unused_parameters=find_unused)
    return out


@contextmanager
def no_sync(modules: dict[str, nn.Module], skip: bool) -> Iterator[None]:
    """Gradient accumulation: DDP all-reduces only on the last micro-batch of an optimiser step."""
    with ExitStack() as stack:
        if skip:
            for m in modules.values():
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
        yield


def all_reduce_(t: torch.Tensor, info: DistInfo, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=op)
    return t


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's decision on every rank (early stopping)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())
