"""What a checkpoint holds and how the engine returns to one: its own state (weights, optimiser,
schedule, scaler, hooks, RNG, progress), resume from the newest good checkpoint, the in-memory
snapshot a NaN rollback restores, and the background checkpoint write.

A mixin of :class:`~faceops.train.engine.Engine` (it reads the engine's fields; the loop lives there),
so the engine module stays the loop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from faceops.errors import TrainingError
from faceops.train.checkpoint import CheckpointError, history_uri, load_newest_good, prune_history
from faceops.train.optim import build_scheduler

log = logging.getLogger("faceops.train.engine")  # one logger for the engine's messages
SCHEDULE_FORMAT = 2  # torch's schedulers (format 1: a LambdaLR of faceops' own)


class EngineState:
    def _hook_states(self) -> dict[str, Any]:
        return {h.state_key: h.state_dict() for h in self.hooks if h.state_key}

    def state(self) -> dict:
        s = {
            "kind": self.task.kind, "stage": self.task.stage,
            **{k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "schedule_format": SCHEDULE_FORMAT, "scaler": self.scaler.state_dict(), "ema": None,
            **self._hook_states(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best": self.best, "bad_epochs": self.bad_epochs, "lr_scale": self.lr_scale,
            "base_lrs": dict(self.base_lrs), "total_steps": self.total_steps,
            "configured_steps": self.configured_steps,
            "nan_events": dict(self.nan_events), "rollbacks": self.rollbacks, "history": self.history,
            "config": self.run_config, "dataset_hash": self.dataset_hash,
        }
        s.update(self.task.checkpoint_meta())
        return s

    def load_state(self, s: dict, source: str) -> None:
        if s.get("schedule_format") != SCHEDULE_FORMAT:
            raise TrainingError(f"{source} was written by an older faceops (another schedule format): it can be "
                                "served or used as init_from, not resumed; train into a new --out")
        for k, m in self.modules.items():
            m.load_state_dict(s[k])
        self.base_lrs, self.lr_scale, self.step = dict(s["base_lrs"]), s["lr_scale"], s["step"]
        self.guard.resumed_at(self.step)
        same_plan = s["configured_steps"] == self.configured_steps
        if same_plan:  # the same run: its (possibly re-planned) schedule, built before the optimiser's LRs return
            self.total_steps = s["total_steps"]
            self.scheduler = build_scheduler(self.cfg.schedule, self.optimizer, self.total_steps,
                                             self.steps_per_epoch)
        self.optimizer.load_state_dict(s["optimizer"])
        if same_plan:
            self.scheduler.load_state_dict(s["scheduler"])
        else:  # resumed with another length (max_steps/epochs changed): the schedule of the new length
            log.info("%s: %s was configured for %d steps, this run %d: schedule re-planned at step %d",
                     self.task.stage, source, s["configured_steps"], self.configured_steps, self.step)
            self._rebuild_schedule()
        self.scaler.load_state_dict(s["scaler"])
        for h in self.hooks:
            if h.state_key:
                h.load_state_dict(s.get(h.state_key))
        torch.set_rng_state(s["rng"]["torch"])
        if torch.cuda.is_available() and s["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(s["rng"]["cuda"])
        for k in ("epoch", "batch_in_epoch", "best", "bad_epochs", "rollbacks", "history"):
            setattr(self, k, s[k])
        self.nan_events = dict(s["nan_events"])

    def _snapshot_tensors(self) -> list[torch.Tensor]:
        """What a rollback restores: weights, optimiser state, the hooks' tensors (EMA)."""
        out = [t for m in self.modules.values() for t in m.state_dict().values()]
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                out += [v for _, v in sorted(self.optimizer.state.get(p, {}).items()) if torch.is_tensor(v)]
        for state in self._hook_states().values():
            if isinstance(state, dict):
                out += [v for v in state.values() if torch.is_tensor(v)]
        return out

    def _take_snapshot(self) -> None:
        self._snapshot.take(self._snapshot_tensors())
        self._snapshot_has_state = {p for p in self.optimizer.state}
        self._good_since_snapshot = 0

    def _rollback(self) -> None:
        """Back to the last snapshot's weights and optimiser state, at a lower LR; the step, the best
        score, the early-stopping count and the schedule's position stay where they are."""
        for p in [p for p in self.optimizer.state if p not in self._snapshot_has_state]:
            del self.optimizer.state[p]  # no state yet at the snapshot: the next step starts it afresh
        self._snapshot.restore(self._snapshot_tensors())
        self.rollbacks += 1
        self.lr_scale *= self.cfg.nan_guard.lr_factor
        self._rebuild_schedule()
        self._call("on_rollback")
        log.warning("%s: %d consecutive non-finite steps (or non-finite weights) by step %d: rolled back to the "
                    "last good state, learning rate x%g (now x%g)", self.task.stage,
                    self.cfg.nan_guard.max_consecutive, self.step, self.cfg.nan_guard.lr_factor, self.lr_scale)

    def checkpoint(self, best: bool = False) -> str | None:
        """Write ``<out>/last.pt`` (+ the history of the last K good states, + ``best.pt``) off the
        training thread."""
        if not self.dist.main:
            return None
        uri = f"{self.out_uri}/last.pt"
        copies = (history_uri(self.out_uri, self.step), *((f"{self.out_uri}/best.pt",) if best else ()))
        self.writer.submit(self.state(), uri, copies,
                           done=lambda: prune_history(self.out_uri, self.cfg.keep_checkpoints))
        return uri

    def _bad_checkpoint(self, uri: str, reason: str) -> None:
        log.error("%s: unreadable checkpoint skipped: %s", self.task.stage, reason)
        self._call("on_bad_checkpoint", uri)

    def resume(self) -> bool:
        """Continue from the newest good checkpoint of ``<out>`` (``last.pt``, else the history).

        Only a run without any checkpoint starts from scratch; a corrupt one is logged, counted
        (``faceops_checkpoint_corrupt_total``) and skipped; all of them corrupt is an error.
        """
        try:
            found = load_newest_good(self.out_uri, "cpu", on_bad=self._bad_checkpoint)  # RNG states must be
            #   CPU tensors; load_state_dict moves the rest to where the modules and the optimiser live
        except CheckpointError as exc:
            raise TrainingError(f"{self.task.stage}: cannot resume: {exc}") from None
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.out_uri)
            return False
        uri, s = found
        if s.get("dataset_hash") and self.dataset_hash and s["dataset_hash"] != self.dataset_hash:
            raise TrainingError(f"{uri} was trained on dataset {s['dataset_hash'][:12]}, not "
                                f"{self.dataset_hash[:12]}: use a new --out to train on another dataset")
        self.load_state(s, uri)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", uri, self.step, self.epoch, self.batch_in_epoch)
        return True
