"""What every training task does around the engine: the batches of this DDP rank, the engine with
the task's own hooks, the fit."""

from __future__ import annotations

import os
from collections.abc import Sequence

from faceops.data.reader import BatchDataset, LoaderConfig, SplitData
from faceops.metrics import run_id_for
from faceops.train.config import EngineConfig
from faceops.train.engine import Engine
from faceops.train.hooks import Hook
from faceops.train.task import FitResult, Task


def fit_task(task: Task, train: SplitData, loader: LoaderConfig, engine_cfg: EngineConfig, out: str,
             run_config: dict, dataset_hash: str, resume: bool, hooks: Sequence[Hook] = (),
             train_set: BatchDataset | None = None) -> FitResult:
    """Fit ``task`` on ``train`` (or on the task's own ``train_set``, as DSR brings)."""
    if train_set is None:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        train_set = BatchDataset(train, loader, seed=engine_cfg.seed, train=True, rank=rank, world_size=world)
    engine = Engine(task, train_set, engine_cfg, out, run_id=run_id_for(out), run_config=run_config,
                    model_name=getattr(task, "model_name", ""), dataset_hash=dataset_hash, hooks=hooks)
    return engine.fit(resume=resume)
