"""EMA of the served model: timm's ``ModelEmaV3`` (foreach lerp, warm-up, no host sync) as a hook.

Evaluation, export and ``best.pt`` all use the EMA weights when it is on, so validation runs with
them swapped in. The checkpoint's ``ema`` entry is the plain model ``state_dict`` (what
``load_model`` serves); the warm-up follows the engine's step, so resume needs nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from faceops.train.hooks import Hook

if TYPE_CHECKING:
    from faceops.train.engine import Engine


class EMA(Hook):
    state_key = "ema"

    def __init__(self, model: nn.Module, decay: float, warmup_power: float):
        self.model = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=warmup_power)

    def on_step_end(self, engine: Engine) -> None:
        self.ema.update(self.model, step=engine.step)

    @contextmanager
    def _swapped(self) -> Iterator[None]:
        raw = {k: t.detach().clone() for k, t in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.model.load_state_dict(raw)

    def validating(self, engine: Engine):  # noqa: ARG002 - the same for every engine
        return self._swapped()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if state:
            self.ema.module.load_state_dict(state)
