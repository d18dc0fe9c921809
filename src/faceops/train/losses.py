"""DSR training losses: pixel L1, perceptual, identity, feature matching and total variation.

Each loss is a small module on tensors (images in [-1, 1], feature lists, embeddings), so it can be
checked against a hand-computed value; :class:`DSRLoss` combines them with the weights of
:class:`DSRLossConfig` and runs the frozen networks once per batch. The frozen networks (the
recognizer, optionally VGG16) are wrapped in :class:`Frozen`: no parameter takes a gradient and the
network stays in eval mode even when a training loop calls ``.train()``, so gradients reach only the
DSR network and BatchNorm statistics never move.

Weights default to seed 003's 32x32 recipe (perceptual 0.025, identity 0.60, feature matching 0.18,
TV 2e-6, pixel 1.0); the 14x16 numbers (0.02, 0.50, 0.15, 3e-6) are in ``configs/vlr_14x16.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceops.config import check
from faceops.errors import FaceopsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}  # index in vgg16().features


class LossError(FaceopsError):
    pass


@dataclass
class DSRLossConfig:
    """Loss weights (seed 003, 32x32) and the frozen-feature choices; every knob is a field."""

    pixel: float = 1.0  # L1 between SR and HR
    perceptual: float = 0.025  # seed 003 32x32 (14x16: 0.02)
    identity: float = 0.60  # 1 - cos(recognizer(SR), recognizer(HR)); seed 003 32x32 (14x16: 0.50)
    feature_match: float = 0.18  # recognizer intermediate maps; seed 003 32x32 (14x16: 0.15)
    tv: float = 2e-6  # total variation, summed per image; seed 003 32x32 (14x16: 3e-6)
    vgg_weights: str | None = None  # local torchvision VGG16 state_dict file; None = recognizer stages
    vgg_layers: list[str] = field(default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3"])  # VGG taps
    perceptual_stages: list[int] = field(default_factory=lambda: [0])  # recognizer stages (0-based) used
    #   for the perceptual loss when no VGG file is given: the early, texture-like ones
    feature_stages: list[int] = field(default_factory=lambda: [1, 2])  # recognizer stages matched by the
    #   feature-matching loss: the intermediate, identity-bearing ones

    def __post_init__(self) -> None:
        for name in ("pixel", "perceptual", "identity", "feature_match", "tv"):
            v = getattr(self, name)
            check(v >= 0, f"losses.{name} must be >= 0, got {v}")
        unknown = [n for n in self.vgg_layers if n not in VGG16_LAYERS]
        check(not unknown, f"losses.vgg_layers: unknown {unknown}; choose from {sorted(VGG16_LAYERS)}")
        for name in ("perceptual_stages", "feature_stages"):
            stages = getattr(self, name)
            check(all(s >= 0 for s in stages), f"losses.{name} must be stage indices >= 0, got {stages}")


# -- frozen networks --------------------------------------------------------------------------------
class Frozen(nn.Module):
    """A network that never trains: parameters without gradients, eval mode whatever ``train()`` says."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Frozen:  # noqa: ARG002 - always eval, by design
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RecognizerStages(Frozen):
    """The frozen recognizer's embedding (``forward``) and its stage feature maps (``stages``)."""

    def stages(self, x: torch.Tensor, num_stages: int) -> list[torch.Tensor]:
        return self.net.forward_stages(x, num_stages)

    def stages_and_embedding(self, x: torch.Tensor, num_stages: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.net.forward_with_stages(x, num_stages)


class VGGFeatures(Frozen):
    """Frozen VGG16 feature taps from a local weights file (torchvision layout; never downloaded)."""

    def __init__(self, weights: str | Path, layers: Sequence[str]) -> None:
        from torchvision.models.vgg import cfgs, make_layers

        taps = sorted(VGG16_LAYERS[n] for n in layers)
        features = make_layers(cfgs["D"])[: taps[-1] + 1]  # vgg16(weights=None).features, truncated
        features.load_state_dict(_read_vgg_state(Path(weights), len(features)))
        super().__init__(features)
        self.taps = taps
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) * 0.5 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        out = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def _read_vgg_state(path: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """``features.*`` tensors of a torchvision VGG16 state_dict (full model or features only)."""
    if not path.is_file():
        raise LossError(f"losses.vgg_weights: no file at {path}; give a local torchvision VGG16 state_dict "
                        "(vgg16-397923af.pth) or leave it empty to use the recognizer's early stages")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign/corrupt files
        raise LossError(f"losses.vgg_weights: {path} is not a torch state_dict ({exc})") from None
    out = {}
    for key, value in state.items():
        index, _, rest = key.removeprefix("features.").partition(".")
        if not key.startswith("classifier.") and index.isdigit() and int(index) < n_layers:
            out[f"{index}.{rest}"] = value
    if not out:
        raise LossError(f"losses.vgg_weights: {path} holds no VGG16 'features.*' weights")
    return out


# -- the losses -------------------------------------------------------------------------------------
class PixelL1Loss(nn.Module):
    """Mean absolute difference between SR and HR."""

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return (sr - hr).abs().mean()


class PerceptualLoss(nn.Module):
    """Mean over layers of the MSE between frozen-network features of SR and HR (Johnson et al. 2016)."""

    def forward(self, sr_feats: Sequence[torch.Tensor], hr_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([F.mse_loss(a, b) for a, b in zip(sr_feats, hr_feats, strict=True)]).mean()


class FeatureMatchingLoss(nn.Module):
    """Mean over layers of the L1 distance between the recognizer's intermediate maps of SR and HR."""

    def forward(self, sr_feats: Sequence[torch.Tensor], hr_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([(a - b).abs().mean() for a, b in zip(sr_feats, hr_feats, strict=True)]).mean()


class IdentityLoss(nn.Module):
    """1 - cosine between the recognizer's embeddings of SR and HR, averaged over the batch."""

    def forward(self, sr_emb: torch.Tensor, hr_emb: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(sr_emb, hr_emb, dim=1)).mean()


class TotalVariationLoss(nn.Module):
    """Anisotropic TV: absolute neighbour differences summed over each image, mean over the batch.

    Summed rather than averaged because the seed's weights (2e-6 / 3e-6) are set for that scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(dim=(1, 2, 3))
        dw = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(dim=(1, 2, 3))
        return (dh + dw).mean()


class DSRLoss(nn.Module):
    """The weighted sum; the frozen networks run once per image (stage maps and embedding in one pass),
    HR features without a graph."""

    def __init__(self, cfg: DSRLossConfig, recognizer: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        if not isinstance(recognizer, RecognizerStages):
            recognizer = RecognizerStages(recognizer)
        self.recognizer = recognizer
        self.vgg = VGGFeatures(cfg.vgg_weights, cfg.vgg_layers) if cfg.vgg_weights else None
        self.pixel, self.perceptual, self.identity = PixelL1Loss(), PerceptualLoss(), IdentityLoss()
        self.feature_match, self.tv = FeatureMatchingLoss(), TotalVariationLoss()
        rec_stages = list(cfg.feature_stages) if cfg.feature_match > 0 else []
        if self.vgg is None and cfg.perceptual > 0:
            rec_stages += list(cfg.perceptual_stages)
        self.num_stages = max(rec_stages) + 1 if rec_stages else 0

    def _features(self, x: torch.Tensor) -> dict[str, object]:
        """The frozen recognizer's stage maps and embedding of ``x``, its stages run once."""
        cfg = self.cfg
        out: dict[str, object] = {}
        stages: list[torch.Tensor] = []
        if self.num_stages and cfg.identity > 0:
            stages, out["emb"] = self.recognizer.stages_and_embedding(x, self.num_stages)
        elif self.num_stages:
            stages = self.recognizer.stages(x, self.num_stages)
        elif cfg.identity > 0:
            out["emb"] = self.recognizer(x)
        if self.num_stages and len(stages) < self.num_stages:
            raise LossError(f"the recognizer has {len(stages)} stages; losses.perceptual_stages/"
                            f"feature_stages ask for stage index {self.num_stages - 1}")
        if cfg.feature_match > 0:
            out["fm"] = [stages[i] for i in cfg.feature_stages]
        if cfg.perceptual > 0:
            out["perc"] = self.vgg(x) if self.vgg is not None else [stages[i] for i in cfg.perceptual_stages]
        return out

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted parts (for logging)."""
        cfg = self.cfg
        with torch.no_grad():
            target = self._features(hr)
        pred = self._features(sr)
        parts = {"l1": self.pixel(sr, hr)}
        if cfg.perceptual > 0:
            parts["perceptual"] = self.perceptual(pred["perc"], target["perc"])
        if cfg.identity > 0:
            parts["identity"] = self.identity(pred["emb"], target["emb"])
        if cfg.feature_match > 0:
            parts["feature_match"] = self.feature_match(pred["fm"], target["fm"])
        if cfg.tv > 0:
            parts["tv"] = self.tv(sr)
        weights = {"l1": cfg.pixel, "perceptual": cfg.perceptual, "identity": cfg.identity,
                   "feature_match": cfg.feature_match, "tv": cfg.tv}
        total = sum(weights[k] * v.float() for k, v in parts.items())
        return total, {k: v.detach() for k, v in parts.items()}  # tensors: read only when logged
