"""``faceops evaluate``: verification/identification (HR and VLR settings), metrics.json + report.html."""

from __future__ import annotations

import argparse

from faceops import config
from faceops.cli._common import add_config_args


def _sizes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a recognizer (and DSR models) on a dataset split or LFW pairs",
        description="Verification (accuracy, EER, AUC, TAR@FAR, threshold) and identification (rank-1/5) "
        "of MODEL (a faceops checkpoint or an ONNX file) on HR faces and, with --vlr, on VLR faces upsampled "
        "bicubically (+ a recognizer fine-tuned on them: the control), by DSR, and by DSR + a recognizer "
        "fine-tuned on DSR outputs. Writes OUT/metrics.json and "
        "OUT/report.html (ROC/DET curves, score histograms, SR sample grids).")
    p.add_argument("--model", required=True, help="recognizer: checkpoint (path/URI) or .onnx file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DATASET_URI",
                     help="ingested dataset, e.g. faceops-runs/store/datasets/lfw")
    src.add_argument("--images", metavar="DIR", help="LFW-layout folder DIR/<Name>/<Name>_<NNNN>.jpg")
    p.add_argument("--split", default="test", help="dataset split with pairs: test (default), val or pairs")
    p.add_argument("--pairs", metavar="PAIRS_FILE", help="LFW pairs file (with --images)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder for metrics.json and report.html")
    p.add_argument("--flip", action="store_true", help="flip-averaged embeddings")
    p.add_argument("--dsr", type=_sizes, default=[], metavar="DSR_MODEL[,DSR_MODEL2]",
                   help="DSR model(s), checkpoint or ONNX; each serves the VLR size it was trained for")
    p.add_argument("--finetuned", metavar="FT_MODEL",
                   help="recognizer fine-tuned on DSR outputs (needs --dsr)")
    p.add_argument("--finetuned-bicubic", metavar="FT_MODEL",
                   help="the control: the recognizer fine-tuned the same way on bicubic faces (no DSR)")
    p.add_argument("--vlr", type=_sizes, default=[], metavar="SIZE[,SIZE]",
                   help="VLR sizes WxH, e.g. 32x32,14x16 (default: the DSR models' sizes)")
    p.add_argument("--skip-missing", action="store_true",
                   help="--images mode: drop pairs whose image file is missing instead of failing")
    add_config_args(p, "evaluate", "evaluate.batch_size=32")
    p.epilog = ("--config FILE: section 'evaluate' (batch_size, flip, threshold: folds | val, n_folds, seed, ...); "
                "--set overrides its keys. --images faces are prepared as the models' input contracts say (crop, size, "
                "normalisation, VLR degradation: recorded at training), so no ingest config is needed; keys "
                "given under 'ingest.prepare' / 'ingest.degrade' must agree with the models (an error names "
                "both values otherwise) and are what a model saved without a contract is assumed to take.")
    p.set_defaults(func=run_evaluate)


def _stated_preparation(path: str | None) -> tuple[dict, dict]:
    """The ``ingest.prepare`` / ``ingest.degrade`` keys the config file states (checked and typed by
    the ingest section's own loader): only what a user wrote can contradict a model."""
    from faceops.data.ingest import IngestConfig

    if not path:
        return {}, {}
    ingest_cfg = config.load(IngestConfig, path, section="ingest")
    section = config.read_yaml(path).get("ingest") or {}
    stated = {}
    for name in ("prepare", "degrade"):
        given = section.get(name) or {}
        typed = config.to_dict(getattr(ingest_cfg, name))
        stated[name] = {k: typed[k] for k in given if k in typed}
    return stated["prepare"], stated["degrade"]


def run_evaluate(args: argparse.Namespace) -> int:
    from faceops.config import ConfigError
    from faceops.evaluate import EvalConfig, evaluate, summary_table

    if args.images and not args.pairs:
        raise ConfigError("--images needs --pairs PAIRS_FILE (LFW pairs format)")
    if args.pairs and not args.images:
        raise ConfigError("--pairs goes with --images DIR (a dataset brings its own pairs)")
    cfg = config.load(EvalConfig, args.config, args.overrides, section="evaluate")
    if args.flip:
        cfg.flip = True
    if args.skip_missing:
        cfg.skip_missing = True
    prepare, degrade = _stated_preparation(args.config)
    metrics = evaluate(args.model, args.out, data=args.data, split=args.split, images=args.images,
                       pairs=args.pairs, dsr=args.dsr, finetuned=args.finetuned,
                       finetuned_bicubic=args.finetuned_bicubic, vlr=args.vlr, cfg=cfg,
                       prepare=prepare, degrade=degrade)
    print(summary_table(metrics))
    print(f"wrote {args.out}/metrics.json and {args.out}/report.html")
    return 0
