"""Embedding heads: pooled backbone features -> ``embedding_dim`` vector (L2 normalisation is done by
:class:`~faceops.models.recognizer.Recognizer`, not here).

- ``linear``: one Linear, the official EdgeFace head (timm's classifier reset to 512 outputs), so
  published EdgeFace weights load without a remap of the head.
- ``linear_bn``: Dropout -> Linear -> BatchNorm1d, the insightface/iresnet head (default).
- ``two_layer``: Dropout -> Linear -> BN -> ReLU -> Dropout/2 -> Linear -> BN, the head of seed 000
  ("two-layer embedding head, progressive dropout").

Every head names its first Linear ``fc`` so checkpoint remaps can target ``embedding.fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from faceops.models.registry import Registry

EMBEDDING_HEADS: Registry = Registry("embedding head")


@EMBEDDING_HEADS.register(name="linear")
class LinearHead(nn.Module):
    def __init__(self, in_dim: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


@EMBEDDING_HEADS.register(name="linear_bn")
class LinearBNHead(nn.Module):
    def __init__(self, in_dim: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.drop(x)))


@EMBEDDING_HEADS.register(name="two_layer")
class TwoLayerHead(nn.Module):
    def __init__(self, in_dim: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)
        self.act = nn.ReLU(inplace=True)
        self.drop2 = nn.Dropout(dropout * 0.5)  # seed 000: progressive dropout, half in the second layer
        self.fc2 = nn.Linear(embedding_dim, embedding_dim)
        self.bn2 = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.fc(self.drop(x))))
        return self.bn2(self.fc2(self.drop2(x)))


def create_embedding_head(name: str, in_dim: int, embedding_dim: int, dropout: float = 0.0) -> nn.Module:
    return EMBEDDING_HEADS.get(name)(in_dim, embedding_dim, dropout)
