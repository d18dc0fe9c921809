"""The one recognizer interface: a backbone trunk, an embedding head, L2 normalisation.

Evaluation, DSR losses, ONNX export and serving only use this interface and never branch on the
architecture:

- ``forward(x)``: float [N, 3, 112, 112] in [-1, 1] -> L2-normalised [N, embedding_dim];
- ``embedding_dim`` and ``input_size``;
- ``forward_stages(x, num_stages=None)``: the feature maps after each backbone stage (the DSR
  perceptual / feature-matching losses use the early ones);
- ``param_groups()``: backbone vs head parameters, for per-group learning rates (the seeds train the
  head 10-100x faster than the backbone).

Backbones register with ``@register_backbone`` and are built from a :class:`RecognizerConfig` by
:func:`create_recognizer`. A backbone family whose reference models shape the embedding head too
(EdgeFace's gamma variants factorise its Linear, insightface's IResNet fixes its BatchNorm scale) says
so in an ``adapt_head(head)`` method, so published weights load as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faceops.config import ConfigError, check
from faceops.models.heads import EMBEDDING_HEADS, create_embedding_head
from faceops.models.registry import Registry

INPUT_SIZE = 112  # the HR face size every recognizer takes (serving contract: [-1, 3, 112, 112])


@dataclass
class RecognizerConfig:
    """Which recognizer to build; every field is a recipe knob."""

    name: str = "edgeface_xs_gamma_06"  # registered backbone (BACKBONES.names()): edgeface_*, iresnet*, resnet34
    embedding_dim: int = 512  # output embedding size (serving contract: 512)
    head: str = "linear_bn"  # embedding head: linear (official EdgeFace), linear_bn, two_layer (seed 000)
    dropout: float = 0.0  # dropout before the head's first Linear (two_layer halves it for its second)
    drop_path_rate: float = 0.0  # stochastic depth in EdgeNeXt blocks (EdgeFace only)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model args (EdgeFace only)

    def __post_init__(self) -> None:
        check(self.name in BACKBONES, f"recognizer.name: unknown backbone {self.name!r}; "
                                      f"choose one of {BACKBONES.names()}")
        check(self.head in EMBEDDING_HEADS, f"recognizer.head: unknown head {self.head!r}; "
                                            f"choose one of {EMBEDDING_HEADS.names()}")
        check(self.embedding_dim > 0, f"recognizer.embedding_dim must be > 0, got {self.embedding_dim}")
        check(0.0 <= self.dropout < 1.0, f"recognizer.dropout must be in [0, 1), got {self.dropout}")
        check(0.0 <= self.drop_path_rate < 1.0,
              f"recognizer.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


class StagedTrunk(nn.Module):
    """A trunk built as ``stem``, then ``stages`` (a sequence), then ``forward_tail`` (pooling, norm):
    the per-stage feature maps that the DSR perceptual and feature-matching losses compare come from
    here, in the same pass as the features when both are wanted (:meth:`forward_with_stages`)."""

    stem: nn.Module
    stages: nn.Sequential

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map -> pooled features [N, feature_dim]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tail(self.stages(self.stem(x)))

    def forward_stages(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages if num_stages is None else self.stages[:num_stages]:
            x = stage(x)
            out.append(x)
        return out

    def forward_with_stages(self, x: torch.Tensor, num_stages: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first ``num_stages`` stage maps and the features, running every stage once."""
        maps = self.forward_stages(x)
        return maps[:num_stages], self.forward_tail(maps[-1])


# A builder returns a trunk: [N, 3, 112, 112] -> [N, feature_dim] pooled features, with ``feature_dim`` and
# ``forward_stages`` (see StagedTrunk), optionally ``adapt_head`` and ``remap_state_dict``.
BACKBONES: Registry[Callable[[RecognizerConfig], nn.Module]] = Registry("backbone")
register_backbone = BACKBONES.register


class Recognizer(nn.Module):
    """Backbone trunk + embedding head + L2 normalisation.

    Parameters are named ``backbone.*`` and ``embedding.*``; a trunk may provide
    ``remap_state_dict(state_dict)`` to translate third-party checkpoints (official EdgeFace, bare timm)
    into these names, which :func:`~faceops.models.pretrained.load_pretrained` applies.
    """

    input_size = INPUT_SIZE

    def __init__(self, backbone: nn.Module, embedding: nn.Module, embedding_dim: int, name: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = embedding
        self.embedding_dim = embedding_dim
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embedding(self.backbone(x)), dim=1)

    def forward_stages(self, x: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """Feature maps after each backbone stage (the first ``num_stages`` only, stopping early)."""
        return self.backbone.forward_stages(x, num_stages)

    def forward_with_stages(self, x: torch.Tensor, num_stages: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first ``num_stages`` stage maps and the embedding, in one pass (the DSR losses want both)."""
        maps, features = self.backbone.forward_with_stages(x, num_stages)
        return maps, F.normalize(self.embedding(features), dim=1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{'backbone': [...], 'head': [...]}`` for per-group learning rates."""
        return {"backbone": list(self.backbone.parameters()), "head": list(self.embedding.parameters())}

    def remap_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        remap = getattr(self.backbone, "remap_state_dict", None)
        return remap(state_dict) if remap is not None else state_dict


def create_recognizer(cfg: RecognizerConfig | None = None) -> Recognizer:
    """Build the recognizer ``cfg`` names (weights random; see ``load_pretrained``)."""
    cfg = cfg or RecognizerConfig()
    backbone = BACKBONES.get(cfg.name)(cfg)
    head = create_embedding_head(cfg.head, backbone.feature_dim, cfg.embedding_dim, cfg.dropout)
    adapt_head = getattr(backbone, "adapt_head", None)
    if adapt_head is not None:
        adapt_head(head)
    return Recognizer(backbone, head, cfg.embedding_dim, name=cfg.name)


def reject_timm_options(cfg: RecognizerConfig) -> None:
    """For backbones that are not timm models: a timm-only knob set in a config is a mistake, not a no-op."""
    if cfg.drop_path_rate or cfg.timm_kwargs:
        raise ConfigError(f"recognizer.drop_path_rate / recognizer.timm_kwargs apply to EdgeFace backbones "
                          f"only; remove them for {cfg.name}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
