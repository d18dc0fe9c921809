"""VLR benchmark: HR / bicubic / DSR / DSR + fine-tuned recognizer at 32x32 and 14x16 on LFW.

The chain ``ingest -> train recognizer -> train DSR (per size) -> fine-tune on DSR outputs (per size)
-> evaluate`` runs on ``../shared/data/lfw_devtrain`` (centre crop 128), identity-disjoint splits: the
models never see the test split's people, which the table is measured on (verification accuracy,
TAR@FAR=1e-3, rank-1, plus DSR PSNR/SSIM against bicubic). Each training stage gets a CPU budget in
minutes (``--minutes-per-stage``): its step count is the budget divided by the step time of a probe
run of the same stage (measured, not assumed, on a shared machine), so
figures from a small budget are a floor, not what the recipe reaches.

Models land in ``bench/artifacts/vlr/`` (git-ignored) as ``recognizer.pt``, ``dsr_32x32.pt``,
``dsr_14x16.pt``, ``recognizer_finetuned.pt`` (32x32; ``recognizer_finetuned_14x16.pt`` for 14x16),
each with its ``.onnx`` and the ``.yaml`` config it was trained with, so a held-out evaluation can run
on them with ``faceops evaluate`` outside the repo. Run from the repository root:
``python -m bench.vlr [--minutes-per-stage 1.5]`` (writes bench/results/vlr.json).

Goal (issue): DSR + fine-tuning recovers at least half of the accuracy bicubic loses against HR at 32x32.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from faceops import config
from faceops.config import to_dict
from faceops.data.ingest import IngestConfig, ingest
from faceops.data.prepare import PrepareConfig
from faceops.evaluate import evaluate
from faceops.models import RecognizerConfig
from faceops.train.checkpoint import load_model
from faceops.train.dsr import dsr_recipe, train_dsr
from faceops.train.finetune import finetune_edgeface, finetune_recipe
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer

from ._runner import save_result

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "bench" / "artifacts" / "vlr"
SIZES = ("32x32", "14x16")
SETTINGS = ("hr", "bicubic", "dsr", "dsr_finetuned")


def data_root() -> Path:
    return Path(os.environ.get("FACEOPS_DATA") or REPO.parent / "shared" / "data")


def seconds_per_step(train: Callable, cfg, name: str, work: Path, probe_steps: int = 6) -> float:
    """Wall time per step of a short probe run of the real stage (setup and validation included, so
    the estimate errs on the long side and the stage stays within its budget on a busy machine)."""
    probe = copy.deepcopy(cfg)
    probe.out, probe.engine.max_steps = str(work / "probe" / name), probe_steps
    t0 = time.time()
    train(probe)
    return (time.time() - t0) / probe_steps


def steps_for(budget_min: float, step_s: float) -> int:
    return max(5, int(budget_min * 60 / step_s))


def _vlr(size: str, batch: int) -> torch.Tensor:
    w, h = (int(v) for v in size.split("x"))
    return torch.rand(batch, 3, h, w) * 2 - 1


def train_images(data: str) -> int:
    from faceops.data.manifest import load_manifest

    return sum(im["split"] == "train" for im in load_manifest(data)["images"])


def publish(src: str, name: str, cfg: object, kind: str) -> dict:
    """Copy a checkpoint into the artifacts folder with its config and an ONNX export beside it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dst = ARTIFACTS / f"{name}.pt"
    shutil.copyfile(src, dst)
    (ARTIFACTS / f"{name}.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    out = {"checkpoint": str(dst.relative_to(REPO))}
    try:
        from faceops.export import ExportConfig, export_onnx

        model, meta = load_model(str(dst))
        example = _vlr(meta["vlr_size"], 1) if kind == "dsr" else torch.rand(1, 3, 112, 112) * 2 - 1
        export_onnx(model, ARTIFACTS / f"{name}.onnx", example, kind, ExportConfig())
        out["onnx"] = str((ARTIFACTS / f"{name}.onnx").relative_to(REPO))
    except ImportError as exc:  # export is optional for the benchmark's figures
        out["onnx"] = f"skipped: {exc}"
    return out


def table_row(block: dict) -> dict:
    v, i = block["verification"], block["identification"]
    row = {"accuracy": v["accuracy"], "tar_at_far_1e-3": v["tar_at_far"]["1e-3"], "rank1": i["rank1"]}
    if "super_resolution" in block:
        row |= {"psnr_db": block["super_resolution"]["psnr"], "ssim": block["super_resolution"]["ssim"]}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes-per-stage", type=float, default=1.5,
                   help="CPU minutes for each training stage (recognizer, DSR x2, fine-tune x2)")
    p.add_argument("--recognizer", default="edgeface_xxs", help="backbone of the recognizer")
    p.add_argument("--dsr-channels", type=int, default=32, help="DSR base channels (recipe: 128)")
    p.add_argument("--dsr-blocks", type=int, default=4, help="DSR residual blocks (recipe: 16)")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    p.add_argument("--work", default=str(ARTIFACTS / "work"), help="store and run folders")
    p.add_argument("--init-recognizer", metavar="CKPT",
                   help="use this trained recognizer checkpoint instead of training one (e.g. the one "
                   "bench/accuracy.py leaves in bench/artifacts/accuracy/recognizer.pt)")
    p.add_argument("--ingest-config", metavar="YAML",
                   help="ingest config to use (e.g. bench/artifacts/accuracy/ingest_config.yaml, so the held-out "
                   "identities match the recognizer's)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(args.work)
    budget = args.minutes_per_stage
    icfg = (config.load(IngestConfig, args.ingest_config) if args.ingest_config
            else IngestConfig(prepare=PrepareConfig(center_crop=128)))
    data = ingest(str(data_root() / "lfw_devtrain"), "lfw_devtrain", str(work / "store"), icfg,
                  progress=False).uri
    timings: dict[str, float] = {}

    model_cfg = RecognizerConfig(name=args.recognizer)
    rc = RecognizerTrainConfig(data=data, out=str(work / "recognizer"), model=model_cfg)
    rc.loader.batch_size, rc.engine.progress, rc.engine.epochs = 32, False, 1000
    t0 = time.time()
    if args.init_recognizer:
        rec_uri = str(Path(args.init_recognizer).resolve())
    else:
        rc.engine.max_steps = steps_for(budget, seconds_per_step(train_recognizer, rc, "recognizer", work))
        rc.engine.schedule.warmup_steps = max(1, rc.engine.max_steps // 10)
        rec_uri = train_recognizer(rc).best_checkpoint
    timings["recognizer_s"] = time.time() - t0
    artifacts = {"recognizer": publish(rec_uri, "recognizer", rc, "recognizer")}

    table: dict[str, dict] = {}
    for size in SIZES:
        dc = dsr_recipe(size)
        dc.data, dc.out, dc.recognizer = data, str(work / f"dsr_{size}"), rec_uri
        dc.model.base_channels, dc.model.residual_blocks = args.dsr_channels, args.dsr_blocks
        dc.engine.progress, dc.engine.epochs, dc.val_max_images = False, 1000, 256
        dc.engine.optim.lr = 5e-4  # a few hundred steps need more than the recipe's 1.3e-4
        dc.engine.max_steps = steps_for(budget, seconds_per_step(train_dsr, dc, f"dsr_{size}", work))
        dc.engine.schedule.warmup_steps = max(1, dc.engine.max_steps // 10)
        t0 = time.time()
        dsr_uri = train_dsr(dc).best_checkpoint
        timings[f"dsr_{size}_s"] = time.time() - t0
        artifacts[f"dsr_{size}"] = publish(dsr_uri, f"dsr_{size}", dc, "dsr")

        fc = finetune_recipe(size)
        fc.data, fc.out, fc.dsr, fc.init_from = data, str(work / f"finetune_{size}"), dsr_uri, rec_uri
        fc.engine.progress = False
        steps = steps_for(budget, seconds_per_step(finetune_edgeface, fc, f"finetune_{size}", work))
        epoch = max(1, train_images(data) // fc.loader.batch_size)
        # stage 1 (one epoch) only when the budget leaves room for stage 2; the head comes from the
        # recognizer run (same dataset), so a short budget goes to stage 2
        fc.stage1_epochs = 1 if steps >= 2 * epoch else 0
        fc.stage2_epochs = max(1, -(-steps // epoch) - fc.stage1_epochs)
        fc.engine.epochs = fc.stage1_epochs + fc.stage2_epochs
        fc.engine.progress, fc.engine.max_steps = False, steps
        fc.head_lr_stage2, fc.backbone_lr = 3e-4, 1e-4  # budget-sized steps (recipe: 6e-5 / 6e-6)
        t0 = time.time()
        ft_uri = finetune_edgeface(fc).best_checkpoint
        timings[f"finetune_{size}_s"] = time.time() - t0
        ft_name = "recognizer_finetuned" if size == "32x32" else f"recognizer_finetuned_{size}"
        artifacts[ft_name] = publish(ft_uri, ft_name, fc, "recognizer")

        metrics = evaluate(rec_uri, work / f"eval_{size}", data=data, dsr=[dsr_uri], finetuned=ft_uri,
                           vlr=[size])
        table[size] = {k: table_row(metrics["vlr"][size][k]) for k in SETTINGS}
        acc = {k: table[size][k]["accuracy"] for k in SETTINGS}
        lost = acc["hr"] - acc["bicubic"]
        table[size]["recovered_fraction_of_bicubic_loss"] = (acc["dsr_finetuned"] - acc["bicubic"]) / lost \
            if lost > 0 else None

    figures = {"table": table, "train_seconds": timings, "minutes_per_stage": budget,
               "total_minutes": (time.time() - t_start) / 60, "recognizer": args.recognizer,
               "dsr": {"base_channels": args.dsr_channels, "residual_blocks": args.dsr_blocks},
               "artifacts": artifacts}
    save_result("vlr", figures, notes=f"LFW devtrain (centre crop 128), held-out test identities; "
                f"{budget} CPU min per training stage on {args.threads} threads")


if __name__ == "__main__":
    main()
