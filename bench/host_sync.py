"""Where the training thread waits on the device: a profile of host syncs by engine phase.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()`` or ``.numpy()`` of a device tensor makes
the host wait for the queued kernels; on a CPU the same calls are where such waits would be. This
counts them (and ``torch.save`` on the training thread: synchronous serialisation) while the engine
trains, attributed to the phase they come from:

* ``per_step``: inside the loop's step path (``_train_epoch``, ``_optimizer_step``, the task's loss,
  ``on_step_end`` hooks) -- the figure that must be 0;
* ``periodic``: the reads the engine makes on purpose (``_read_guard`` once per ``log_every_steps``,
  epoch ends with validation, checkpoints);
* ``torch_save_on_training_thread``: must be 0 (checkpoints are written by the writer thread).

Run from the repository root: ``python -m bench.host_sync [--steps 60]`` (writes
bench/results/host_sync.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ._runner import save_result

SYNC_METHODS = ("item", "__bool__", "tolist", "numpy", "__float__", "__int__")
PERIODIC = {"_read_guard", "_end_epoch", "checkpoint", "resume", "_take_snapshot", "_rollback",
            "_get_iterator"}  # the last: a DataLoader's per-epoch seed
STEP_PATH = {"_train_epoch"}


def _phase(frame) -> str | None:
    names = set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    if names & PERIODIC:
        return "periodic"
    if names & STEP_PATH:
        return "per_step"
    return None


@contextmanager
def host_syncs() -> Iterator[Counter]:
    """Count host syncs and training-thread ``torch.save`` calls by phase while the block runs."""
    counts: Counter = Counter()
    main = threading.main_thread()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}
    real_save = torch.save

    def wrap(name: str):
        original = originals[name]

        def counted(self, *args, **kwargs):
            if threading.current_thread() is main:
                phase = _phase(sys._getframe(1))
                if phase:
                    counts[phase] += 1
                    counts[f"{phase}:{name}"] += 1
            return original(self, *args, **kwargs)

        return counted

    def save(*args, **kwargs):
        if threading.current_thread() is main and _phase(sys._getframe(1)):
            counts["torch_save_on_training_thread"] += 1
        return real_save(*args, **kwargs)

    for name in SYNC_METHODS:
        setattr(torch.Tensor, name, wrap(name))
    torch.save = save
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.save = real_save


def profile(steps: int, log_every: int, checkpoint_every: int, work: str) -> dict:
    from .train import make_bench

    b = make_bench("edgeface_xxs", batch=16, classes=20, steps=steps, checkpoint_every=checkpoint_every,
                   work=work, device="cpu")
    b.cfg.engine.log_every_steps = log_every
    b.cfg.engine.max_steps = steps
    b.cfg.engine.progress = False
    from faceops.train.engine import Engine

    engine = Engine(b.task, b.train_set, b.cfg.engine, f"{work}/run", run_id="bench-sync")
    with host_syncs() as counts:
        engine.fit()
    return {"steps": engine.step, "log_every_steps": log_every, "checkpoint_every_steps": checkpoint_every,
            "per_step_syncs": counts["per_step"], "periodic_syncs": counts["periodic"],
            "periodic_syncs_per_step": round(counts["periodic"] / max(1, engine.step), 3),
            "torch_save_on_training_thread": counts["torch_save_on_training_thread"],
            "by_method": {k: v for k, v in counts.items() if ":" in k}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--name", default="host_sync")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="faceops-bench-sync-") as work:
        figures = profile(args.steps, args.log_every, args.checkpoint_every, work)
    print(figures)
    save_result(args.name, figures, "edgeface_xxs, batch 16, CPU, every engine feature on; per_step must be 0")
    return figures


if __name__ == "__main__":
    main()
