"""What the engine trains and what it returns: the task interface, the fit's result, and the
embedding-collapse figure tasks report in validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class Task(Protocol):
    stage: str  # metrics label / log prefix
    kind: str  # checkpoint kind: recognizer | dsr

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules by checkpoint key; 'model' is the one that is served."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """'backbone' / 'head' parameter lists (per-group learning rates)."""

    def loss(self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
        """Loss of a batch run through ``nets`` (``modules()``, DDP-wrapped when distributed) and
        figures for the log as tensors (read only at a log step)."""

    def validate(self) -> dict[str, float]:
        """Validation figures (must include EngineConfig.monitor); may include 'mean_cosine'."""

    def checkpoint_meta(self) -> dict: ...


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


def mean_inter_identity_cosine(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise cosine between identity centroids: near 1 means the embedding collapsed."""
    ids = labels.unique()
    if len(ids) < 2:
        return float("nan")
    cent = torch.nn.functional.normalize(torch.stack([emb[labels == i].mean(0) for i in ids]), dim=1)
    sim = cent @ cent.T
    n = len(ids)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
