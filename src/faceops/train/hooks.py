"""The engine's hook interface and the hooks every run has (early stopping, progress).

A hook is called at fixed points of :class:`~faceops.train.engine.Engine`'s loop. It reads the
engine's public state (``step``, ``epoch``, ``best``, ``bad_epochs``, ``optimizer``) and changes the
run only through the engine's controls: :meth:`~Engine.set_base_lrs`, :meth:`~Engine.replan` and
:meth:`~Engine.request_stop`. Every method is optional. ``on_step_end`` runs after every optimiser
step and must not wait on the device; figures a hook needs from the device arrive in ``on_log``,
where the engine has already read them (one host sync per ``log_every_steps``).

A hook whose ``state_key`` is set has its ``state_dict()`` saved in each checkpoint under that key
and handed back to ``load_state_dict`` on resume.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from faceops.train.engine import Engine

log = logging.getLogger(__name__)


class Hook:
    state_key: str | None = None

    def on_fit_start(self, engine: Engine) -> None: ...

    def on_epoch_start(self, engine: Engine) -> None: ...

    def on_step_end(self, engine: Engine) -> None: ...

    def on_log(self, engine: Engine, figures: dict[str, float]) -> None:
        """Each time the host reads the device: ``good_steps`` and ``good_images`` since the last read;
        every ``log_every_steps`` also loss, lr, grad_norm, images_per_s and the task's figures."""

    def on_nan(self, engine: Engine, kind: str, count: int, here: int) -> None:
        """``count`` new non-finite events of ``kind`` (loss, grad, param) since the last log; ``here``
        of them on this process (DDP ranks each see their own losses)."""

    def on_rollback(self, engine: Engine) -> None: ...

    def on_bad_checkpoint(self, engine: Engine, uri: str) -> None: ...

    def validating(self, engine: Engine) -> AbstractContextManager[None]:
        """A context validation runs in (e.g. with the EMA weights swapped in)."""
        return nullcontext()

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None: ...

    def on_fit_end(self, engine: Engine, success: bool) -> None: ...

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, state: Any) -> None: ...


class EarlyStopping(Hook):
    """Stop when the monitored figure has not improved for ``patience`` epochs."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        if engine.bad_epochs >= self.patience and engine.best is not None:
            engine.request_stop(f"early stop: {engine.cfg.monitor} did not improve for {engine.bad_epochs} "
                                f"epoch(s) (best {engine.best:.4f})")


class Progress(Hook):
    """One tqdm bar per epoch (rank 0) and one summary line per epoch."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_epoch_start(self, engine: Engine) -> None:
        self.bar = tqdm(total=len(engine.train_set), initial=engine.batch_in_epoch, unit="batch",
                        desc=f"{engine.task.stage} epoch {engine.epoch + 1}/{engine.cfg.epochs}",
                        disable=not (self.enabled and engine.dist.main), leave=False)
        self._seen = engine.batch_in_epoch

    def on_step_end(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.update(engine.batch_in_epoch - self._seen)
            self._seen = engine.batch_in_epoch

    def on_log(self, engine: Engine, figures: dict[str, float]) -> None:
        if self.bar is not None and "loss" in figures:
            shown = {k: v for k, v in figures.items() if k not in ("good_steps", "good_images", "grad_norm")}
            self.bar.set_postfix({k: f"{v:.2e}" if k == "lr" else f"{v:.3f}" if k != "images_per_s"
                                  else f"{v:.0f}" for k, v in shown.items()})

    def on_epoch_end(self, engine: Engine, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not engine.dist.main:
            return
        figs = " ".join(f"{k}={v:.4f}" for k, v in record.items()
                        if k not in ("epoch", "step", "seconds") and isinstance(v, float))
        print(f"[{engine.task.stage}] epoch {record['epoch']}/{engine.cfg.epochs} step {engine.step} "
              f"{record['seconds']:.1f}s {figs} nan_events={sum(engine.nan_events.values())} "
              f"rollbacks={engine.rollbacks}", flush=True)

    def on_fit_end(self, engine: Engine, success: bool) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
