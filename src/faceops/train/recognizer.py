"""Recognizer training task: a backbone + margin head (ArcFace/CosFace) on a dataset's train split,
validated by verification on the val split's pairs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceops.config import check, to_dict
from faceops.data.augment import AugmentConfig
from faceops.data.manifest import load_manifest
from faceops.data.reader import LoaderConfig, SplitData, load_split
from faceops.devices import resolve_device
from faceops.errors import FaceopsError
from faceops.evaluate.verification import verification_metrics
from faceops.models import MarginHeadConfig, RecognizerConfig, create_margin_head, create_recognizer
from faceops.models.contract import checkpoint_entry
from faceops.models.embed import embed_faces, module_forward
from faceops.models.pretrained import load_pretrained
from faceops.train.config import EngineConfig, OptimConfig, ScheduleConfig
from faceops.train.fit import fit_task
from faceops.train.task import FitResult, mean_inter_identity_cosine

log = logging.getLogger(__name__)


def _recognizer_augment() -> AugmentConfig:
    # seed 000: flip, rotation 10 deg, translate 0.05, colour jitter, light noise
    return AugmentConfig(rotate_p=0.5, rotate_deg=10.0, jitter_p=0.8, brightness=0.2, contrast=0.2,
                         saturation=0.2, noise_std=0.01)


@dataclass
class PhaseConfig:
    """A follow-up phase continuing from the previous phase's best weights (seed 002: lower-LR
    fine-tuning from the checkpoint) with a fresh optimiser and schedule."""

    epochs: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class RecognizerTrainConfig:
    data: str | None = None  # dataset URI (<store>/datasets/<name>); --data overrides
    out: str | None = None  # run output URI (checkpoints); --out overrides
    model: RecognizerConfig = field(default_factory=RecognizerConfig)
    margin: MarginHeadConfig = field(default_factory=MarginHeadConfig)
    loader: LoaderConfig = field(default_factory=lambda: LoaderConfig(augment=_recognizer_augment()))
    engine: EngineConfig = field(default_factory=EngineConfig)
    label_smoothing: float = 0.1  # seed 000
    pretrained: str | None = None  # user's EdgeFace/ArcFace weights (state_dict or TorchScript)
    pretrained_init_missing: bool = False  # initialise (and list) keys missing from `pretrained`
    init_from: str | None = None  # a faceops checkpoint to start from (e.g. the ResNet-34 fine-tune step)
    val_split: str = "val"
    eval_batch_size: int = 128
    phases: list[PhaseConfig] = field(default_factory=list)  # run after the main phase, in order

    def __post_init__(self) -> None:
        check(0.0 <= self.label_smoothing < 1.0, "recognizer.label_smoothing must be in [0, 1)")


def embed_arrays(model: nn.Module, images: np.ndarray, batch_size: int, device: torch.device,
                 input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Embeddings of uint8 NHWC images (``input_fn`` maps the network input first, e.g. DSR), through
    the one embedding path (:func:`faceops.models.embed.embed_faces`); the model's mode is left as is."""
    if len(images) == 0:
        return torch.zeros(0, 1)
    forward = module_forward(model, device, input_fn=input_fn, exact_fp32=False)
    return torch.from_numpy(embed_faces(forward, images, batch_size=batch_size))


def validate_embeddings(emb: torch.Tensor, data: SplitData) -> dict[str, float]:
    """Verification on the split's pairs and the embedding-collapse figure."""
    figures = {"mean_cosine": mean_inter_identity_cosine(emb, torch.from_numpy(data.labels))}
    if data.pairs:
        a = torch.tensor([p[0] for p in data.pairs])
        b = torch.tensor([p[1] for p in data.pairs])
        scores = (F.normalize(emb[a], dim=1) * F.normalize(emb[b], dim=1)).sum(1).numpy()
        genuine = np.array([p[2] for p in data.pairs])
        v = verification_metrics(scores, genuine, n_folds=min(10, max(2, len(scores) // 20)))
        figures.update(val_accuracy=v["accuracy"], val_eer=v["eer"], val_auc=v["auc"])
    return figures


class RecognizerTask:
    stage = "train_recognizer"
    kind = "recognizer"

    def __init__(self, cfg: RecognizerTrainConfig, train: SplitData, val: SplitData | None,
                 device: torch.device, input_view: str = "hr",
                 input_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cfg, self.val, self.device = cfg, val, device
        self.input_view, self.input_fn = input_view, input_fn
        self.model = create_recognizer(cfg.model)
        self.model_name = cfg.model.name
        self.head = create_margin_head(cfg.margin, cfg.model.embedding_dim, train.num_classes)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "head": self.head}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = self.model.param_groups()
        return {"backbone": groups["backbone"], "head": groups["head"] + list(self.head.parameters())}

    def loss(self, batch: dict[str, torch.Tensor], nets: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
        x = batch["hr"] if self.input_view == "hr" else batch["vlr"]
        if self.input_fn is not None:
            x = self.input_fn(x)
        return self.margin_loss(x, batch["label"], nets)

    def margin_loss(self, x: torch.Tensor, labels: torch.Tensor,
                    nets: dict[str, nn.Module]) -> tuple[torch.Tensor, dict]:
        logits, labels = nets["head"](nets["model"](x), labels)
        loss = self.criterion(logits, labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()  # a tensor: read only when logged
        return loss, {"acc": acc}

    def validate(self) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {}
        images = self.val.hr if self.input_view == "hr" else self.val.vlr[self.input_view]
        emb = embed_arrays(self.model, images, self.cfg.eval_batch_size, self.device, self.input_fn)
        return validate_embeddings(emb, self.val)

    def checkpoint_meta(self) -> dict:
        """What a checkpoint needs beyond weights: the architecture, and the input contract (the
        training dataset's face preparation), so nothing downstream guesses how to prepare faces."""
        if not hasattr(self, "_contract_meta"):  # read once: the dataset is immutable
            self._contract_meta = checkpoint_entry(self.cfg.data)
        return {"model_config": to_dict(self.cfg.model), "num_classes": self.head.num_classes,
                "input_view": self.input_view, **self._contract_meta}


def prepare_start(model: nn.Module, cfg: RecognizerTrainConfig) -> dict | None:
    """Start from a user's pretrained file or a faceops checkpoint, when configured; returns the
    checkpoint of ``init_from`` (its head may be reused: see ``load_head``)."""
    ckpt = None
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained, strict=True, init_missing=cfg.pretrained_init_missing)
        log.info("pretrained weights from %s: %s", cfg.pretrained, report.summary())
    if cfg.init_from:
        from faceops.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(cfg.init_from)
        if ckpt["kind"] != "recognizer":
            raise FaceopsError(f"init_from {cfg.init_from} is a {ckpt['kind']} checkpoint, not a recognizer")
        model.load_state_dict(ckpt.get("ema") or ckpt["model"])
    return ckpt


def load_head(head: nn.Module, ckpt: dict | None, dataset_hash: str) -> bool:
    """Reuse a checkpoint's margin head (class centres) when it was trained on the same identities."""
    state = (ckpt or {}).get("head")
    if state is None or ckpt.get("dataset_hash") != dataset_hash:
        return False
    if any(state[k].shape != v.shape for k, v in head.state_dict().items() if k in state):
        return False
    head.load_state_dict(state)
    return True


def train_recognizer(cfg: RecognizerTrainConfig, resume: bool = False) -> FitResult:
    """Train a recognizer on ``cfg.data``; checkpoints go to ``cfg.out``."""
    if not cfg.data or not cfg.out:
        raise FaceopsError("recognizer training needs a dataset (--data or recognizer.data) and an output "
                           "URI (--out or recognizer.out)")
    manifest = load_manifest(cfg.data)
    train = load_split(cfg.data, "train", views=["hr"])
    val = load_split(cfg.data, cfg.val_split, views=["hr"]) if cfg.val_split in manifest["shards"] else None
    log.info("training %s on %d images of %d identities (%s)", cfg.model.name, len(train), train.num_classes,
             cfg.data)
    device = resolve_device(cfg.engine.device, "engine.device")
    torch.manual_seed(cfg.engine.seed)  # model init is part of the run: same seed, same weights
    task = RecognizerTask(cfg, train, val, device)
    prepare_start(task.model, cfg)
    result = fit_task(task, train, cfg.loader, cfg.engine, cfg.out, to_dict(cfg), manifest["content_hash"],
                      resume)
    for i, phase in enumerate(cfg.phases, start=1):
        log.info("phase %d/%d: %d epochs, %s lr %g, from %s", i, len(cfg.phases), phase.epochs,
                 phase.optim.name, phase.optim.lr, result.best_checkpoint or result.checkpoint)
        phase_cfg = replace(cfg, init_from=result.best_checkpoint or result.checkpoint, pretrained=None,
                            engine=replace(cfg.engine, epochs=phase.epochs, optim=phase.optim,
                                           schedule=phase.schedule), phases=[])
        task = RecognizerTask(phase_cfg, train, val, device)
        start = prepare_start(task.model, phase_cfg)
        if not load_head(task.head, start, manifest["content_hash"]):  # seed 002: continue, not restart
            raise FaceopsError(f"phase {i}: the margin head of {phase_cfg.init_from} does not fit this dataset")
        result = fit_task(task, train, cfg.loader, phase_cfg.engine, f"{cfg.out.rstrip('/')}/phase{i}",
                          to_dict(phase_cfg), manifest["content_hash"], resume)
    return result
