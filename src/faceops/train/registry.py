"""The training tasks of ``faceops train TASK``, registered by name (as backbones are).

The CLI, the launchers and the pipeline stages look a task up here, so adding a task is one entry,
and an unknown name fails listing the known ones. Every entry names the config section it reads;
:data:`faceops.config.SECTIONS` reads that section as the same class (tests/test_cli.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from faceops.models.registry import Registry
from faceops.train.dsr import DSRTrainConfig, train_dsr
from faceops.train.finetune import FinetuneConfig, finetune_edgeface
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer


@dataclass(frozen=True)
class TrainTask:
    """One ``faceops train NAME`` task: what it reads and what trains."""

    name: str  # the command word: faceops train NAME
    section: str  # the config section the task reads (recognizer: in a config file)
    config_cls: type  # the section's dataclass
    train: Callable[..., Any]  # train(cfg, resume=False) -> the engine's result (steps, checkpoints, history)
    help: str  # one line for `faceops train --help`
    stage: str  # the pipeline stage that runs the task; its log is <stage>.log
    set_example: str  # a --set shown in --help (tests/test_cli.py loads every one)


TASKS: Registry = Registry("training task")  # name -> TrainTask


def register_task(task: TrainTask) -> TrainTask:
    """Add ``task`` under its name (a second task of the same name is an error)."""
    return TASKS.register(task, name=task.name)


def get_task(name: str) -> TrainTask:
    """The task called ``name``; an unknown name raises ConfigError listing the known ones."""
    return TASKS.get(name)


register_task(TrainTask(
    "recognizer", "recognizer", RecognizerTrainConfig, train_recognizer,
    "ArcFace/CosFace training of a backbone (EdgeFace family, ResNet-34)",
    stage="train_recognizer", set_example="recognizer.engine.epochs=3"))
register_task(TrainTask(
    "dsr", "dsr", DSRTrainConfig, train_dsr,
    "DSR super-resolution VLR->HR with identity losses from a frozen recognizer",
    stage="train_dsr", set_example="dsr.engine.epochs=3"))
register_task(TrainTask(
    "finetune", "finetune", FinetuneConfig, finetune_edgeface,
    "two-stage fine-tuning of the recognizer on DSR outputs",
    stage="finetune_edgeface", set_example="finetune.stage2_epochs=3"))
