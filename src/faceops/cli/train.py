"""``faceops train TASK`` (the tasks of :mod:`faceops.train.registry`): one command group, one engine."""

from __future__ import annotations

import argparse
import json
import os

from faceops import config
from faceops.cli._common import add_config_args
from faceops.storage import split_uri
from faceops.train.registry import TASKS, get_task


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recognizer, a DSR model or fine-tune on DSR outputs",
                       description="Every task runs on the same engine: NaN guard, AMP (CUDA), checkpoints "
                       "with exact --resume, early stopping, progress, Prometheus metrics, DDP via torchrun.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for task in map(get_task, TASKS.names()):
        t = tasks.add_parser(task.name, help=task.help, description=f"{task.help}. Config section: '{task.section}:'.")
        add_config_args(t, task.section, task.set_example)
        t.add_argument("--data", metavar="URI", help="dataset URI (<store>/datasets/<name>)")
        t.add_argument("--out", metavar="URI", help="run output URI: checkpoints last.pt / best.pt")
        t.add_argument("--resume", action="store_true", help="continue from <out>/last.pt exactly")
        t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data={args.data}")
    if args.out:
        overrides.append(f"out={args.out}")
    cfg = config.load(task.config_cls, args.config, overrides, section=task.section)
    result = task.train(cfg, resume=args.resume)
    summary = {"task": args.task, "model": result.best_checkpoint or result.checkpoint,
               "checkpoint": result.checkpoint, "best_checkpoint": result.best_checkpoint,
               "steps": result.steps, "epochs": result.epochs, "best": result.best,
               "history": result.history, "nan_events": result.nan_events, "rollbacks": result.rollbacks,
               "stopped_early": result.stopped_early, "vlr_size": getattr(cfg, "vlr_size", None)}
    if int(os.environ.get("RANK", "0")) == 0:  # the run's summary, read by pipeline stages
        store, key = split_uri(f"{cfg.out.rstrip('/')}/result.json")
        store.put_bytes(key, json.dumps(summary, indent=1).encode())
        print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=1))
    return 0
