"""Training-engine overhead: the engine with every feature on against a bare PyTorch loop, as a ratio.

For each backbone (default ``edgeface_xs_gamma_06`` and ``resnet34``, batch 32, 112x112):

* ``engine_img_per_s``: the faceops Engine running the recognizer task with all its features on:
  NaN guard (loss/grad/param checks, rollback snapshots every 25 steps), gradient clipping,
  Prometheus metrics, a checkpoint every ``--checkpoint-every`` steps, the tqdm progress bar.
* ``bare_img_per_s``: a bare loop on the same model, margin head + cross-entropy, AdamW and the same
  in-memory batches (the same ``BatchDataset``): forward, loss, backward, step, nothing else.
* ``engine_vs_bare``: engine / bare, measured in this run with the two interleaved (target >= 0.97).
* ``gflop_per_img``: model forward FLOPs per image (``FlopCounterMode``) x3 for forward + backward;
  ``achieved_gflop_per_s`` = that x engine images/s; ``fraction_of_peak`` against ``peak_gflop_per_s``,
  :func:`bench.peak.measured_peak_gflops` (the best of a matmul sweep and resnet34's own 3x3 convolutions,
  on the same threads, before and after the models run; a fraction above 1 means the machine was busier
  during the peak sweep than during training, i.e. a failed measurement, and is reported as such).

Steady-state rates come from timestamps taken at every loss call (start-up and the final checkpoint
are outside the window); each side is warmed up first. ``--ablate`` adds the engine with one feature
off at a time (``engine_vs_bare_with_one_feature_off``), to show what each feature costs. Run from the repository root:
``python -m bench.train [--seconds 40]`` (writes bench/results/train.json).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from faceops.data.augment import AugmentConfig
from faceops.data.reader import BatchDataset, LoaderConfig, SplitData, make_loader
from faceops.models import RecognizerConfig
from faceops.train.config import EngineConfig
from faceops.train.engine import Engine
from faceops.train.optim import build_optimizer
from faceops.train.recognizer import RecognizerTask, RecognizerTrainConfig

from ._runner import save_result
from .peak import measured_peak_gflops

MODELS = ("edgeface_xs_gamma_06", "resnet34")
HR_SIZE = 112
TARGET_RATIO = 0.97
NEVER = 10**9  # a step cadence that never fires


def _no_checkpoints(e: EngineConfig) -> None:
    e.checkpoint_every_steps = NEVER


def _no_snapshots(e: EngineConfig) -> None:
    e.nan_guard.snapshot_every = NEVER


def _no_param_check(e: EngineConfig) -> None:
    e.nan_guard.check_params_every = NEVER


def _no_clipping(e: EngineConfig) -> None:
    e.clip_grad_norm = None


def _no_progress(e: EngineConfig) -> None:
    e.progress = False


#: --ablate: the engine with ONE feature off, to see what each costs
ABLATIONS = {"no_checkpoints": _no_checkpoints, "no_rollback_snapshots": _no_snapshots,
             "no_param_check": _no_param_check, "no_clipping": _no_clipping, "no_progress_bar": _no_progress}


class TimedRecognizerTask(RecognizerTask):
    """The recognizer task, stamping the time of every loss call (one per batch)."""

    stamps: list[float]

    def loss(self, batch: dict[str, torch.Tensor], nets: dict[str, torch.nn.Module]) -> tuple[torch.Tensor, dict]:
        self.stamps.append(time.perf_counter())
        return super().loss(batch, nets)


@dataclass
class Bench:
    task: TimedRecognizerTask
    train_set: BatchDataset
    cfg: RecognizerTrainConfig
    work: str
    bare_opt: torch.optim.Optimizer | None = None
    rates: dict[str, list[float]] = field(default_factory=lambda: {"bare": [], "engine": []})


def synthetic_split(images: int, classes: int, seed: int = 0) -> SplitData:
    """Random faces in memory: speed does not depend on pixel values."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (images, HR_SIZE, HR_SIZE, 3), dtype=np.uint8)
    labels = np.arange(images, dtype=np.int64) % classes
    return SplitData(hr=hr, vlr={}, labels=labels, identities=[f"id{i}" for i in range(classes)],
                     image_ids=[f"img{i}" for i in range(images)])


def steady_rate(stamps: list[float], batch: int) -> float:
    """Images/s between the first and the last loss call (the last step's tail is not counted)."""
    if len(stamps) < 2:
        raise RuntimeError("need at least two steps to time")
    return (len(stamps) - 1) * batch / (stamps[-1] - stamps[0])


def make_bench(model: str, batch: int, classes: int, steps: int, checkpoint_every: int, work: str,
               device: str) -> Bench:
    cfg = RecognizerTrainConfig(model=RecognizerConfig(name=model),
                                loader=LoaderConfig(batch_size=batch, augment=AugmentConfig(enabled=False)))
    e = cfg.engine
    e.device, e.progress, e.epochs, e.max_steps = device, True, 1_000_000, steps
    e.checkpoint_every_steps = checkpoint_every
    e.amp = "off"  # fp32 on both sides (the bare loop has no autocast), comparable with the fp32 peak
    data = synthetic_split(batch * (steps + 4), classes)  # one epoch covers a round: no epoch end inside
    torch.manual_seed(0)
    task = TimedRecognizerTask(cfg, data, None, torch.device(device))
    task.model.to(device)
    task.head.to(device)
    task.stamps = []
    return Bench(task, BatchDataset(data, cfg.loader, seed=0), cfg, work)


def run_bare(b: Bench, steps: int) -> float:
    """Forward, margin head + CE, backward, AdamW step: nothing else."""
    task = b.task
    if b.bare_opt is None:
        b.bare_opt = build_optimizer(b.cfg.engine.optim, task.param_groups())
    task.model.train()
    task.head.train()
    b.train_set.set_epoch(b.train_set.epoch + 1)
    device = torch.device(b.cfg.engine.device)
    stamps = []
    for k, batch in enumerate(make_loader(b.train_set)):
        if k == steps:
            break
        synchronize(device)  # CUDA: time finished work, as the engine's loss.item() does
        stamps.append(time.perf_counter())
        batch = b.train_set.to_device(batch, device)  # uint8 -> float input, as the engine does
        emb = task.model(batch["hr"])
        logits, labels = task.head(emb, batch["label"])
        loss = task.criterion(logits, labels)
        b.bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        b.bare_opt.step()
    return steady_rate(stamps, b.cfg.loader.batch_size)


def run_engine(b: Bench, steps: int, round_id: str, cfg: EngineConfig | None = None) -> float:
    """A fresh Engine (fresh optimiser, like a new run) over the same modules, ``steps`` steps."""
    cfg = cfg or b.cfg.engine
    b.task.stamps = []
    cfg.max_steps = steps
    b.train_set.set_epoch(0)
    engine = Engine(b.task, b.train_set, cfg, f"{b.work}/{round_id}", run_id="bench",
                    model_name=b.task.model_name)
    engine.fit()
    return steady_rate(b.task.stamps, b.cfg.loader.batch_size)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops_per_image(model: torch.nn.Module) -> float:
    """Forward FLOPs of one 112x112 image (eval mode, batch 2 so BatchNorm1d is happy)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, HR_SIZE, HR_SIZE, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() / 2


def bench_model(model: str, args: argparse.Namespace, work: str) -> dict:
    probe = make_bench(model, args.batch, args.classes, 4, args.checkpoint_every, f"{work}/{model}-probe",
                       args.device)
    run_bare(probe, 2)  # warm-up (allocator, kernels)
    step_s = args.batch / run_bare(probe, 3)
    steps = min(args.max_steps, max(args.checkpoint_every + 2, int(args.seconds / args.rounds / step_s)))
    b = make_bench(model, args.batch, args.classes, steps, args.checkpoint_every, f"{work}/{model}", args.device)
    run_engine(b, 3, "warmup")
    run_bare(b, 3)
    for r in range(args.rounds):  # interleaved; the order alternates so drift hits both sides alike
        order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
        for side in order:
            rate = run_bare(b, steps) if side == "bare" else run_engine(b, steps, f"round{r}")
            b.rates[side].append(rate)
            print(f"[bench.train] {model} round {r + 1}/{args.rounds} {side}: {rate:.1f} img/s", flush=True)
    bare, engine = (float(np.mean(b.rates[k])) for k in ("bare", "engine"))
    ablation = {}
    for name, switch_off in ABLATIONS.items() if args.ablate else ():
        cfg = copy.deepcopy(b.cfg.engine)
        switch_off(cfg)
        ablation[name] = run_engine(b, steps, f"ablate-{name}", cfg) / bare
        print(f"[bench.train] {model} engine {name}: {ablation[name]:.3f} of bare", flush=True)
    per_round = [e / x for e, x in zip(b.rates["engine"], b.rates["bare"], strict=True)]
    gflop = 3 * forward_flops_per_image(b.task.model) / 1e9
    return {"bare_img_per_s": bare, "engine_img_per_s": engine, "engine_vs_bare": engine / bare,
            "engine_vs_bare_per_round": per_round, "meets_target": engine / bare >= TARGET_RATIO,
            **({"engine_vs_bare_with_one_feature_off": ablation} if ablation else {}),
            "steps_per_measurement": steps, "gflop_per_img": gflop, "achieved_gflop_per_s": gflop * engine}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="registered backbones to measure")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--classes", type=int, default=1000, help="identities of the margin head")
    p.add_argument("--seconds", type=float, default=40.0, help="target seconds of timing per side per model")
    p.add_argument("--rounds", type=int, default=2, help="interleaved bare/engine rounds")
    p.add_argument("--checkpoint-every", type=int, default=25,
                   help="engine checkpoint cadence in steps (inside every timed round; default run: 200)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (both sides fp32, synchronised once per step)")
    p.add_argument("--max-steps", type=int, default=400, help="cap on steps per measurement (fast devices)")
    p.add_argument("--ablate", action="store_true",
                   help="also time the engine with one feature off at a time (vs the bare mean)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable cores)")
    p.add_argument("--name", default="train", help="result name (bench/results/<name>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    peak_before = measured_peak_gflops(device=device, threads=threads, conv_batch=args.batch)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="faceops-bench-train-") as work:
        for model in args.models:
            figures[model] = bench_model(model, args, work)
    peak = max(peak_before, measured_peak_gflops(device=device, threads=threads, conv_batch=args.batch),
               key=lambda r: r["peak_gflop_per_s"])
    for model in args.models:
        fraction = figures[model]["achieved_gflop_per_s"] / peak["peak_gflop_per_s"]
        figures[model]["fraction_of_peak"] = fraction if fraction <= 1 else "failed: peak measured on a busier machine"
    figures["peak_gflop_per_s"] = peak["peak_gflop_per_s"]
    figures["peak_kernel"] = peak["peak_kernel"]
    figures["threads"] = threads
    figures["batch"] = args.batch
    figures["device"] = args.device
    notes = (f"{args.device}, {threads} threads, batch {args.batch}, {args.classes} identities, augmentation off "
             f"(both sides read the same in-memory BatchDataset); engine checkpoints every "
             f"{args.checkpoint_every} steps, NaN guard, clipping 5.0, metrics and progress bar on. "
             "FLOPs: forward x3; peak: bench.peak (matmul sweep and the model's 3x3 convolutions), best of "
             "before/after.")
    save_result(args.name, figures, notes)
    return figures


if __name__ == "__main__":
    main()
