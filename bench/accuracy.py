"""Recognizer accuracy within a CPU budget on LFW devtrain, with the curve of accuracy against minutes.

The data is ``../shared/data/lfw_devtrain`` ingested with centre crop 128. Every person is kept
(``faceops.data.ingest``): the training classes follow ``--train-classes`` (``seeds``: 8-150 images,
151 people; ``all``: every person with 2+ images), and everyone else is held out, identity-disjoint,
``--val-share`` of them as the ``val`` split (validated every epoch, picks the best checkpoint) and
the rest as the ``test`` split; the single-image people are distractors in both (impostor pairs,
identification gallery). With the defaults (``all``, 30% held out, 15% of them in val) 829 people
are training classes and the test protocol is 302 people with 2+ images, 2,426 distractors and 3,000
pairs (1,500 genuine): the 300 people / 2,000 pairs a comparison of two recipes needs, and no more
held out than that, since every held-out person is a class the recognizer does not learn from. The
ingest summary's ``protocol`` says what a run got.

A recognizer is trained from scratch for ``--minutes`` of wall time: the step count starts as the
budget divided by a probed step time and is re-planned at every epoch from the measured pace (the
cosine schedule is rebuilt to end with the budget), then the best checkpoint is evaluated with
``faceops.evaluate.evaluate``.

Figures (bench/results/<name>.json):

* ``test``: verification accuracy with its standard error (10-fold, LFW protocol), EER, TAR@FAR=1e-3,
  AUC, rank-1 / rank-5 with binomial standard errors, and the protocol's size (pairs, folds, probes,
  gallery distractors); ``val``: the same on the val split;
* ``curve``: (cumulative training minutes, val accuracy) after every epoch;
* ``data``: the splits and the held-out ``protocol`` sizes; the recipe, the budget asked for and the
  minutes actually spent.

Artifacts in ``--artifacts`` (default ``bench/artifacts/accuracy/``, git-ignored): ``recognizer.pt``
(best checkpoint), ``model.onnx`` beside it, ``ingest_config.yaml`` and ``train_config.yaml``, for a
held-out ``faceops evaluate`` outside the repo. Run from the repository root:
``python -m bench.accuracy [--minutes 15]``; a smoke run that touches nothing tracked:
``python -m bench.accuracy --minutes 0.3 --artifacts /tmp/acc --results bench/results/tmp``.
Figures from a small budget are a floor, not what the recipe reaches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from faceops.config import to_dict
from faceops.data.ingest import TRAIN_CLASS_RULES, IngestConfig, SplitConfig, TrainClassConfig, ingest
from faceops.data.manifest import load_manifest
from faceops.data.prepare import PrepareConfig
from faceops.data.reader import load_split
from faceops.data.tensors import to_input
from faceops.evaluate import evaluate
from faceops.export import ExportConfig, check_parity, export_onnx
from faceops.models import MarginHeadConfig, RecognizerConfig, create_margin_head, create_recognizer
from faceops.train.checkpoint import load_model
from faceops.train.engine import Engine
from faceops.train.fit import fit_task
from faceops.train.hooks import Hook
from faceops.train.recognizer import RecognizerTask, RecognizerTrainConfig
from faceops.train.task import FitResult

from ._runner import data_root, save_result, shown

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "bench" / "artifacts" / "accuracy"
HR_SIZE = 112


def ingest_config(crop: int, min_images: int | None, held_out: float, rule: str = "all",
                  val_share: float = 0.15) -> IngestConfig:
    """LFW devtrain as the benchmark ingests it: ``held_out`` of the people with 2+ images (at least;
    everyone the training-class rule leaves out is held out too), ``val_share`` of them in val."""
    return IngestConfig(prepare=PrepareConfig(center_crop=crop),
                        train_classes=TrainClassConfig(rule=rule, min_images=min_images),
                        splits=SplitConfig(train=1 - held_out, val=held_out * val_share,
                                           test=held_out * (1 - val_share)))


def recipe(args: argparse.Namespace, data: str, out: str) -> RecognizerTrainConfig:
    """A CPU-budget recipe: small EdgeFace, AdamW + warm-up + cosine, ArcFace s=32 m=0.3, augmentation on."""
    cfg = RecognizerTrainConfig(data=data, out=out, model=RecognizerConfig(name=args.model),
                                margin=MarginHeadConfig(name=args.margin, s=32.0, m=args.margin_m))
    cfg.loader.batch_size = args.batch
    e = cfg.engine
    e.device, e.progress, e.epochs = "cpu", False, 10_000  # the step budget ends the run
    e.optim.lr, e.optim.weight_decay = args.lr, args.weight_decay
    e.schedule.name = "cosine"
    e.checkpoint_every_steps = 10_000  # one checkpoint per epoch is enough here
    cfg.engine = replace(e, ema_decay=args.ema_decay or None)  # replace: the config's own checks run
    return cfg


def seconds_per_step(cfg: RecognizerTrainConfig, classes: int, repeats: int = 3) -> float:
    """Forward + loss + backward + AdamW step of the recipe's model on one batch (after a warm-up)."""
    model, head = create_recognizer(cfg.model), create_margin_head(cfg.margin, cfg.model.embedding_dim, classes)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.engine.optim.lr)
    x = torch.rand(cfg.loader.batch_size, 3, HR_SIZE, HR_SIZE) * 2 - 1
    y = torch.randint(0, classes, (cfg.loader.batch_size,))

    def step() -> None:
        logits, labels = head(model(x), y)
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


class BudgetPlanner(Hook):
    """Keeps the run inside the wall-clock budget on a machine whose speed changes (shared CPUs): at
    each epoch start, from the time per step measured so far, it re-plans the total steps; the engine
    rebuilds the schedule so that it still ends when the budget does."""

    def __init__(self, minutes: float, started: float):
        self.budget_s, self.started = minutes * 60, started
        self.replans: list[int] = []

    def on_epoch_start(self, engine: Engine) -> None:
        if engine.step == 0:
            return
        elapsed = time.time() - self.started
        per_step = elapsed / engine.step  # training, validation and checkpoints so far
        total = engine.step + max(1, int((self.budget_s - elapsed) / per_step))
        if total != engine.total_steps:
            engine.replan(total)
            self.replans.append(total)


def curve(history: list[dict]) -> list[list[float]]:
    minutes = np.cumsum([h["seconds"] for h in history]) / 60
    return [[round(float(m), 2), round(float(h.get("val_accuracy", float("nan"))), 4)]
            for m, h in zip(minutes, history, strict=True)]


def publish(checkpoint: str, icfg: IngestConfig, cfg: RecognizerTrainConfig, val_images: np.ndarray,
            artifacts: Path = ARTIFACTS) -> dict:
    """recognizer.pt + model.onnx (parity-checked) + the configs, in ``artifacts``."""
    artifacts.mkdir(parents=True, exist_ok=True)
    pt = artifacts / "recognizer.pt"
    shutil.copyfile(checkpoint, pt)
    (artifacts / "ingest_config.yaml").write_text(yaml.safe_dump(to_dict(icfg), sort_keys=False))
    (artifacts / "train_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    model, _ = load_model(str(pt))
    onnx_path = export_onnx(model, artifacts / "model.onnx", torch.zeros(1, 3, HR_SIZE, HR_SIZE), "recognizer",
                            ExportConfig())
    parity = check_parity("recognizer", onnx_path, model, to_input(val_images[:8]), ExportConfig())
    return {"checkpoint": shown(pt), "onnx": shown(onnx_path), "onnx_parity_max_abs": parity.max_abs}


def headline(metrics: dict) -> dict:
    """The figures a comparison needs, each accuracy with its standard error and the protocol's size."""
    v, i = metrics["verification"], metrics["identification"]
    keep_v = ("accuracy", "accuracy_se", "eer", "auc", "threshold", "pairs", "folds")
    keep_i = ("rank1", "rank1_se", "rank5", "rank5_se", "probes", "gallery_identities", "distractors")
    return {**{k: v[k] for k in keep_v if k in v}, "tar_at_far_1e-3": v["tar_at_far"]["1e-3"],
            **{k: i[k] for k in keep_i if k in i}}


def train(cfg: RecognizerTrainConfig, planner: BudgetPlanner) -> FitResult:
    """``train_recognizer``'s steps, with the budget hook on the engine."""
    manifest = load_manifest(cfg.data)
    train_split = load_split(cfg.data, "train", views=["hr"])
    val_split = load_split(cfg.data, cfg.val_split, views=["hr"])
    torch.manual_seed(cfg.engine.seed)
    task = RecognizerTask(cfg, train_split, val_split, torch.device(cfg.engine.device))
    return fit_task(task, train_split, cfg.loader, cfg.engine, cfg.out, to_dict(cfg), manifest["content_hash"],
                    resume=False, hooks=[planner])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget (CPU)")
    p.add_argument("--model", default="edgeface_xxs", help="registered backbone")
    p.add_argument("--margin", default="arcface", help="margin head: arcface | cosface | combined")
    p.add_argument("--margin-m", type=float, default=0.3, help="margin (arcface: radians)")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the weights (timm-style warm-up), validated and saved; 0 = off")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the steps")
    p.add_argument("--center-crop", type=int, default=128, help="ingest centre crop (px of 250)")
    p.add_argument("--train-classes", default="all", choices=sorted(TRAIN_CLASS_RULES),
                   help="training-class rule: seeds = 8-150 images per class, all = every person with 2+")
    p.add_argument("--min-images", type=int, default=None, help="override the rule's minimum images per class")
    p.add_argument("--held-out", type=float, default=0.3,
                   help="share of the people with 2+ images held out at least (val + test)")
    p.add_argument("--val-share", type=float, default=0.15,
                   help="share of the held-out people in val (per-epoch validation); the rest are the test split")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable cores)")
    p.add_argument("--artifacts", default=str(ARTIFACTS), help="checkpoint, ONNX and configs go here")
    p.add_argument("--work", default=None, help="store and run folders (default: ARTIFACTS/work)")
    p.add_argument("--name", default="accuracy", help="result name (<results>/<name>.json)")
    p.add_argument("--results", default=None, help="results folder (default bench/results)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    source = data_root() / "lfw_devtrain"
    if not source.is_dir():
        raise SystemExit(f"{source} not found: set FACEOPS_DATA to the folder holding lfw_devtrain")
    artifacts = Path(args.artifacts)
    work = Path(args.work) if args.work else artifacts / "work"
    if (work / "run").exists():
        shutil.rmtree(work / "run")  # a fresh run each time (the store is reused: ingest is idempotent)
    icfg = ingest_config(args.center_crop, args.min_images, args.held_out, args.train_classes, args.val_share)
    result = ingest(str(source), "lfw_devtrain_acc", str(work / "store"), icfg, progress=False)
    splits, protocol = result.summary["splits"], result.summary["protocol"]
    print(f"[bench.accuracy] {result.summary['train_classes']} training classes "
          f"({icfg.train_classes.describe()}); test protocol {protocol['test']}", flush=True)
    cfg = recipe(args, result.uri, str(work / "run"))
    step_s = seconds_per_step(cfg, splits["train"]["identities"])
    steps = max(10, int(args.minutes * 60 * 0.85 / step_s))  # ~15% for data, validation, checkpoints
    cfg.engine.max_steps = steps
    cfg.engine.schedule.warmup_steps = max(1, int(steps * args.warmup))
    print(f"[bench.accuracy] {args.model}: {step_s:.2f} s/step -> {steps} steps "
          f"(~{steps * args.batch / max(1, splits['train']['images']):.1f} epochs) in {args.minutes} min", flush=True)
    t0 = time.time()
    planner = BudgetPlanner(args.minutes, t0)
    fit = train(cfg, planner)
    train_minutes = (time.time() - t0) / 60
    best = fit.best_checkpoint or fit.checkpoint
    test = evaluate(best, artifacts / "eval_test", data=result.uri, split="test")
    val = evaluate(best, artifacts / "eval_val", data=result.uri, split="val")
    published = publish(best, icfg, cfg, load_split(result.uri, "val", views=["hr"]).hr, artifacts)
    figures = {
        "test": headline(test), "val": headline(val),
        "curve_minutes_val_accuracy": curve(fit.history),
        "budget_minutes": args.minutes, "train_minutes": train_minutes, "steps": fit.steps,
        "planned_steps": steps, "replanned_steps": planner.replans,
        "epochs": fit.epochs, "step_seconds_probe": step_s, "threads": threads,
        "data": {"train_classes": result.summary["train_classes"], "train_class_rule": icfg.train_classes.describe(),
                 "splits": splits, "protocol": protocol},
        "recipe": {"model": args.model, "margin": f"{args.margin} s=32 m={args.margin_m}", "batch": args.batch,
                   "optim": f"adamw lr={args.lr} wd={args.weight_decay}",
                   "schedule": f"cosine, warmup {cfg.engine.schedule.warmup_steps} steps",
                   "augment": "recognizer recipe (flip, rot 10, translate, jitter, noise)",
                   "label_smoothing": cfg.label_smoothing, "ema_decay": args.ema_decay or None},
        "artifacts": published,
    }
    t = protocol["test"]
    notes = (f"CPU, {threads} threads, budget {args.minutes} min wall. Identity-disjoint splits of LFW devtrain, "
             f"every person kept: {result.summary['train_classes']} training classes "
             f"({icfg.train_classes.describe()}); test = {t['people']} held-out people with 2+ images, "
             f"{t['distractors']} single-image distractors, {t['pairs']} pairs; accuracy +- standard error "
             "over 10 folds, rank-k +- binomial standard error.")
    save_result(args.name, figures, notes, Path(args.results) if args.results else None)
    return figures


if __name__ == "__main__":
    main()
