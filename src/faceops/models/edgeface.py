"""EdgeFace: efficient face recognition for edge devices.

Paper: A. George, C. Ecabert, H. O. Shahreza, K. Kotwal, S. Marcel, "EdgeFace: Efficient Face
Recognition Model for Edge Devices", IEEE T-BIOM 2024 (arXiv:2307.01838). Design as in the official
code (github.com/otroshi/edgeface, Idiap, ``backbones/timmfr.py``): timm's EdgeNeXt (Maaz et al. 2022,
timm Apache-2.0) with the classifier reset to a 512-d embedding and, for the ``gamma`` variants, every
Linear of the network replaced by a low-rank pair ``Linear(in->r, no bias) + Linear(r->out)`` with
``r = max(2, int(min(in, out) * gamma))`` -- the embedding Linear (timm's ``head.fc``) included, which
:meth:`EdgeFaceTrunk.adapt_head` applies to our embedding head. Reimplemented here (no code copied);
weights start random or come from a user's file via :func:`~faceops.models.pretrained.load_pretrained`,
official checkpoints as they are.

Sizes with the official ``linear`` head (512-d), equal to the official models': xxs 1,244,744,
xs_gamma_06 1,770,492, s_gamma_05 3,652,520, base 18,225,812 parameters (published: 1.24M, 1.77M,
3.65M, 18.23M).
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from faceops.config import ConfigError
from faceops.models.recognizer import BACKBONES, RecognizerConfig, StagedTrunk, register_backbone

TIMM_PARTS = ("stem.", "stages.", "norm_pre.", "head.")  # top-level names of a timm EdgeNeXt state dict


class LowRankLinear(nn.Module):
    """``Linear(in, out)`` factorised as ``Linear(in, rank, bias=False) -> Linear(rank, out)``.

    Sub-module names match the official EdgeFace ``LoRaLin`` so its checkpoints load unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.linear1 = nn.Linear(in_features, rank, bias=False)
        self.linear2 = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x))


def low_rank(in_features: int, out_features: int, gamma: float) -> int:
    return max(2, int(min(in_features, out_features) * gamma))


def replace_linear_with_low_rank(module: nn.Module, gamma: float) -> int:
    """Replace every ``nn.Linear`` below ``module`` in place; returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            rank = low_rank(child.in_features, child.out_features, gamma)
            setattr(module, name, LowRankLinear(child.in_features, child.out_features, rank,
                                                bias=child.bias is not None))
            replaced += 1
        else:
            replaced += replace_linear_with_low_rank(child, gamma)
    return replaced


class EdgeFaceTrunk(StagedTrunk):
    """timm EdgeNeXt without its classifier: stem -> 4 stages -> pool + LayerNorm -> [N, C].

    The timm model's parts are held directly (``stem``, ``stages``, ``norm_pre``, ``head``) so state-dict
    keys read ``backbone.stages.2.blocks.5...``, i.e. timm's own names under ``backbone.``."""

    def __init__(self, timm_name: str, gamma: float | None = None, drop_path_rate: float = 0.0,
                 **timm_kwargs) -> None:
        super().__init__()
        try:
            net = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                    drop_path_rate=drop_path_rate, **timm_kwargs)
        except TypeError as exc:
            raise ConfigError(f"recognizer.timm_kwargs {timm_kwargs} rejected by timm {timm_name}: "
                              f"{exc}") from None
        if gamma is not None:
            replace_linear_with_low_rank(net, gamma)
        self.timm_name = timm_name
        self.gamma = gamma
        self.stem, self.stages, self.norm_pre, self.head = net.stem, net.stages, net.norm_pre, net.head
        self.feature_dim = net.num_features

    def adapt_head(self, head: nn.Module) -> None:
        """Gamma variants: the embedding head's Linears become low-rank too, as the official model's
        ``head.fc`` is, so official checkpoints load without a remap of the head's shapes."""
        if self.gamma is not None:
            replace_linear_with_low_rank(head, self.gamma)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_pre(x))

    @staticmethod
    def remap_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official EdgeFace (``model.*``) or bare timm keys -> ``backbone.*`` / ``embedding.fc.*``
        (``head.fc.linear1/2`` of a gamma variant -> ``embedding.fc.linear1/2``).

        Keys already in recognizer form, and keys it does not recognise, pass through unchanged (the
        load report then lists the latter as unexpected)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("model.")
            if key.startswith(("backbone.", "embedding.")):
                out[key] = value
            elif name.startswith("head.fc."):
                out["embedding.fc." + name.removeprefix("head.fc.")] = value
            elif name.startswith(TIMM_PARTS):
                out["backbone." + name] = value
            else:
                out[key] = value
        return out


def _create_edgeface(timm_name: str, gamma: float | None, cfg: RecognizerConfig) -> EdgeFaceTrunk:
    return EdgeFaceTrunk(timm_name, gamma, cfg.drop_path_rate, **cfg.timm_kwargs)


@register_backbone
def edgeface_xxs(cfg: RecognizerConfig) -> EdgeFaceTrunk:
    return _create_edgeface("edgenext_xx_small", None, cfg)


@register_backbone
def edgeface_xs_gamma_06(cfg: RecognizerConfig) -> EdgeFaceTrunk:
    return _create_edgeface("edgenext_x_small", 0.6, cfg)


@register_backbone
def edgeface_s_gamma_05(cfg: RecognizerConfig) -> EdgeFaceTrunk:
    return _create_edgeface("edgenext_small", 0.5, cfg)


@register_backbone
def edgeface_base(cfg: RecognizerConfig) -> EdgeFaceTrunk:
    return _create_edgeface("edgenext_base", None, cfg)


BACKBONES.alias("edgeface_xs", "edgeface_xs_gamma_06")
