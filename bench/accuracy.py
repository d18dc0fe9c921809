"""Recognizer accuracy within a CPU budget on LFW devtrain, with the curve of accuracy against minutes.

The data is ``../shared/data/lfw_devtrain`` ingested with centre crop 128; identities with at least 8
images take part (at most 150 each), and 10% of them are held out, identity-disjoint: half as the
``val`` split (validated every epoch, picks the best checkpoint) and half as the ``test`` split.
A recognizer is trained from scratch for ``--minutes`` of wall time: the step count starts as the
budget divided by a probed step time and is re-planned at every epoch from the measured pace (the
cosine schedule is rebuilt to end with the budget), then the best checkpoint is evaluated with
``faceops.evaluate.evaluate``.

Figures (bench/results/accuracy.json):

* ``test``: verification accuracy, EER, TAR@FAR=1e-3, AUC and rank-1 on the test split (threshold
  picked on the val split's pairs); ``val``: the same on the val split (seeded 10-fold threshold);
* ``curve``: (cumulative training minutes, val accuracy) after every epoch;
* the recipe, the budget asked for and the minutes actually spent.

Artifacts in ``bench/artifacts/accuracy/`` (git-ignored): ``recognizer.pt`` (best checkpoint),
``model.onnx`` beside it, ``ingest_config.yaml`` and ``train_config.yaml``, for a held-out
``faceops evaluate`` outside the repo. Run from the repository root:
``python -m bench.accuracy [--minutes 15]``. Figures from a small budget are a floor, not what the
recipe reaches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from faceops.config import to_dict
from faceops.data.ingest import IngestConfig, SplitConfig, ingest
from faceops.data.manifest import load_manifest
from faceops.data.prepare import PrepareConfig
from faceops.data.reader import load_split
from faceops.data.tensors import to_input
from faceops.evaluate import evaluate
from faceops.export import ExportConfig, check_parity, export_onnx
from faceops.models import MarginHeadConfig, RecognizerConfig, create_margin_head, create_recognizer
from faceops.train.checkpoint import load_model
from faceops.train.engine import Engine, FitResult, build_scheduler
from faceops.train.recognizer import RecognizerTask, RecognizerTrainConfig, fit_task

from ._runner import save_result

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "bench" / "artifacts" / "accuracy"
HR_SIZE = 112


def data_root() -> Path:
    return Path(os.environ.get("FACEOPS_DATA") or REPO.parent / "shared" / "data")


def ingest_config(crop: int, min_images: int, held_out: float) -> IngestConfig:
    return IngestConfig(prepare=PrepareConfig(center_crop=crop), min_images_per_identity=min_images,
                        splits=SplitConfig(train=1 - held_out, val=held_out / 2, test=held_out / 2))


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


class BudgetPlanner:
    """Epoch-start hook that keeps the run inside the wall-clock budget on a machine whose speed
    changes (shared CPUs): from the time per step measured so far it re-plans the total steps and
    rebuilds the cosine schedule so that it still ends when the budget does."""

    def __init__(self, minutes: float, started: float):
        self.budget_s, self.started = minutes * 60, started
        self.replans: list[int] = []

    def __call__(self, epoch: int, engine: Engine) -> None:
        if engine.step == 0:
            return
        elapsed = time.time() - self.started
        per_step = elapsed / engine.step  # training, validation and checkpoints so far
        total = engine.step + max(1, int((self.budget_s - elapsed) / per_step))
        if total == engine.total_steps:
            return
        engine.total_steps = total
        engine.scheduler = build_scheduler(engine.cfg.schedule, engine.optimizer, total, engine.steps_per_epoch)
        engine.scheduler.last_epoch = engine.step
        engine._apply_lr_scale()  # the learning rate of the re-planned schedule at this step
        self.replans.append(total)


def curve(history: list[dict]) -> list[list[float]]:
    minutes = np.cumsum([h["seconds"] for h in history]) / 60
    return [[round(float(m), 2), round(float(h.get("val_accuracy", float("nan"))), 4)]
            for m, h in zip(minutes, history, strict=True)]


def publish(checkpoint: str, icfg: IngestConfig, cfg: RecognizerTrainConfig, val_images: np.ndarray) -> dict:
    """recognizer.pt + model.onnx (parity-checked) + the configs, in bench/artifacts/accuracy/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pt = ARTIFACTS / "recognizer.pt"
    shutil.copyfile(checkpoint, pt)
    (ARTIFACTS / "ingest_config.yaml").write_text(yaml.safe_dump(to_dict(icfg), sort_keys=False))
    (ARTIFACTS / "train_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    model, _ = load_model(str(pt))
    onnx_path = export_onnx(model, ARTIFACTS / "model.onnx", torch.zeros(1, 3, HR_SIZE, HR_SIZE), "recognizer",
                            ExportConfig())
    parity = check_parity("recognizer", onnx_path, model, to_input(val_images[:8]), ExportConfig())
    return {"checkpoint": str(pt.relative_to(REPO)), "onnx": str(onnx_path.relative_to(REPO)),
            "onnx_parity_max_abs": parity.max_abs}


def headline(metrics: dict) -> dict:
    v = metrics["verification"]
    return {"accuracy": v["accuracy"], "eer": v["eer"], "tar_at_far_1e-3": v["tar_at_far"]["1e-3"],
            "auc": v["auc"], "rank1": metrics["identification"]["rank1"]}


def train(cfg: RecognizerTrainConfig, on_epoch_start) -> FitResult:
    """``train_recognizer``'s steps, with the budget hook on the engine."""
    manifest = load_manifest(cfg.data)
    train_split = load_split(cfg.data, "train", views=["hr"])
    val_split = load_split(cfg.data, cfg.val_split, views=["hr"])
    torch.manual_seed(cfg.engine.seed)
    task = RecognizerTask(cfg, train_split, val_split, torch.device(cfg.engine.device))
    return fit_task(task, train_split, cfg.loader, cfg.engine, cfg.out, to_dict(cfg), manifest["content_hash"],
                    resume=False, on_epoch_start=on_epoch_start)


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
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up as a fraction of the steps")
    p.add_argument("--center-crop", type=int, default=128, help="ingest centre crop (px of 250)")
    p.add_argument("--min-images", type=int, default=8, help="images an identity needs to take part")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of identities held out (val + test)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all usable cores)")
    p.add_argument("--work", default=str(ARTIFACTS / "work"), help="store and run folders")
    p.add_argument("--name", default="accuracy", help="result name (bench/results/<name>.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    source = data_root() / "lfw_devtrain"
    if not source.is_dir():
        raise SystemExit(f"{source} not found: set FACEOPS_DATA to the folder holding lfw_devtrain")
    work = Path(args.work)
    if (work / "run").exists():
        shutil.rmtree(work / "run")  # a fresh run each time (the store is reused: ingest is idempotent)
    icfg = ingest_config(args.center_crop, args.min_images, args.held_out)
    result = ingest(str(source), "lfw_devtrain_acc", str(work / "store"), icfg, progress=False)
    splits = result.summary["splits"]
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
    test = evaluate(best, ARTIFACTS / "eval_test", data=result.uri, split="test")
    val = evaluate(best, ARTIFACTS / "eval_val", data=result.uri, split="val")
    artifacts = publish(best, icfg, cfg, load_split(result.uri, "val", views=["hr"]).hr)
    figures = {
        "test": headline(test), "val": headline(val),
        "curve_minutes_val_accuracy": curve(fit.history),
        "budget_minutes": args.minutes, "train_minutes": train_minutes, "steps": fit.steps,
        "planned_steps": steps, "replanned_steps": planner.replans,
        "epochs": fit.epochs, "step_seconds_probe": step_s, "threads": threads,
        "data": splits,
        "recipe": {"model": args.model, "margin": f"{args.margin} s=32 m={args.margin_m}", "batch": args.batch,
                   "optim": f"adamw lr={args.lr} wd={args.weight_decay}",
                   "schedule": f"cosine, warmup {cfg.engine.schedule.warmup_steps} steps",
                   "augment": "recognizer recipe (flip, rot 10, translate, jitter, noise)",
                   "label_smoothing": cfg.label_smoothing},
        "artifacts": artifacts,
    }
    notes = (f"CPU, {threads} threads, budget {args.minutes} min wall. Identity-disjoint splits of LFW "
             "devtrain (>= 8 images per identity); test figures use a threshold picked on the val pairs.")
    save_result(args.name, figures, notes)
    return figures


if __name__ == "__main__":
    main()
