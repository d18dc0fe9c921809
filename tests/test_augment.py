"""Batched degradation and DSR training pairs: :func:`degrade_batch` is ingest's :func:`degrade` byte
for byte, and :class:`SRPairAugment` augments the HR face alone (whole-pixel shifts and flips exact)
before degrading it into the VLR input (issue 11: resampling both views blurred them)."""

import numpy as np
import pytest
import torch

from faceops.config import ConfigError
from faceops.data.augment import AugmentConfig, SRPairAugment, from_levels, to_levels
from faceops.data.degrade import DegradeConfig, degrade, degrade_batch
from faceops.data.tensors import to_input

GEOMETRY_OFF = {"flip_p": 0.0, "rotate_p": 0.0, "translate": 0.0, "jitter_p": 0.0, "noise_std": 0.0}


def faces(n: int = 4, size: int = 112, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: smooth shapes plus fine texture and one face of pure noise (sharp
    edges everywhere), so resampling and rounding differences show."""
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 12, 12, generator=gen), size=(size, size),
                                             mode="bicubic", align_corners=False)
    x = (smooth * 200 + torch.rand(n, 3, size, size, generator=gen) * 55).clamp(0, 255).round()
    x[0] = torch.randint(0, 256, (3, size, size), generator=gen)
    return x.to(torch.uint8)


def pil_degrade(hr: torch.Tensor, size: str, cfg: DegradeConfig) -> np.ndarray:
    """Ingest's degradation, one face at a time, as uint8 NHWC."""
    return np.stack([degrade(np.ascontiguousarray(x.permute(1, 2, 0).numpy()), size, cfg, seed=0) for x in hr])


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


# -- degrade_batch is ingest's degradation -----------------------------------------------------------
@pytest.mark.parametrize("size", ["32x32", "14x16", "20x24"])
@pytest.mark.parametrize("cfg", [DegradeConfig(), DegradeConfig(blur_sigma=(0.8, 0.8)),
                                 DegradeConfig(blur_sigma=(3.0, 3.0)), DegradeConfig(jpeg_quality=(70, 70)),
                                 DegradeConfig(blur_sigma=(1.2, 1.2), jpeg_quality=(40, 40))],
                         ids=["bicubic", "blur0.8", "blur3", "jpeg70", "blur1.2+jpeg40"])
def test_degrade_batch_gives_ingests_bytes(size, cfg):
    hr = faces()
    assert np.array_equal(nhwc(degrade_batch(hr, size, cfg, torch.Generator())), pil_degrade(hr, size, cfg))


def test_degrade_batch_draws_its_random_parameters_like_ingest():
    hr = faces(8)
    clean = degrade_batch(hr, "32x32", DegradeConfig(), torch.Generator()).double()
    noisy_cfg = DegradeConfig(noise_std=(2.0, 2.0))
    noisy = degrade_batch(hr, "32x32", noisy_cfg, torch.Generator().manual_seed(1)).double()
    assert (noisy - clean).std().item() == pytest.approx(2.0, rel=0.1)  # ingest's noise, drawn per batch
    again = degrade_batch(hr, "32x32", noisy_cfg, torch.Generator().manual_seed(1))
    assert torch.equal(again, noisy.to(torch.uint8))  # seeded: resuming re-makes the same inputs
    # DDP: rows 4..7 of a global batch of 8 are degraded as the whole batch's rows 4..7
    part = degrade_batch(hr[4:], "32x32", noisy_cfg, torch.Generator().manual_seed(1), start=4, total=8)
    assert torch.equal(part, again[4:])
    blurred = DegradeConfig(blur_sigma=(0.5, 2.5))  # sigma drawn per face: each face one of ingest's
    out = nhwc(degrade_batch(hr[:2], "14x16", blurred, torch.Generator().manual_seed(3)))
    options = {s: pil_degrade(hr[:2], "14x16", DegradeConfig(blur_sigma=(s, s))) for s in (0.5, 2.5)}
    sharpness = [np.abs(np.diff(x.astype(int), axis=1)).mean() for x in (out, options[0.5], options[2.5])]
    assert sharpness[2] < sharpness[0] < sharpness[1]


# -- SR pairs: the HR face augmented, then degraded ---------------------------------------------------
def pair_batch(n: int = 6, size: str = "32x32", cfg: DegradeConfig | None = None) -> tuple[dict, np.ndarray]:
    hr = faces(n)
    stored_vlr = pil_degrade(hr, size, cfg or DegradeConfig())
    return {"hr": to_input(nhwc(hr)), "label": torch.arange(n)}, stored_vlr


def test_identity_geometry_gives_the_stored_pair():
    batch, stored_vlr = pair_batch(size="14x16")
    for cfg in (AugmentConfig(**GEOMETRY_OFF), AugmentConfig(enabled=False)):
        out = SRPairAugment(cfg, "14x16", DegradeConfig())(batch, torch.Generator().manual_seed(0))
        assert torch.equal(out["hr"], batch["hr"])
        assert torch.equal(out["vlr"], to_input(stored_vlr))
        assert torch.equal(out["label"], batch["label"])


def test_flips_and_shifts_move_the_hr_face_by_whole_pixels():
    """Today's paired augmentation shifted by fractions of a pixel (bilinear: a blur on every face)."""
    src = faces(8, size=48)  # small faces: few candidate shifts to try
    batch = {"hr": from_levels(src)}
    cfg = AugmentConfig(flip_p=0.5, rotate_p=0.0, translate=0.05, jitter_p=0.0, noise_std=0.0)
    out = SRPairAugment(cfg, "12x12", DegradeConfig())(batch, torch.Generator().manual_seed(2))
    got = to_levels(out["hr"])
    reach = round(0.05 * 48)
    moved = 0
    for x, y in zip(src, got, strict=True):
        candidates = [_shifted(x.flip(2) if flip else x, dx, dy) for flip in (False, True)
                      for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)]
        assert any(torch.equal(y, c) for c in candidates), "not a whole-pixel shift/flip of the stored face"
        moved += not torch.equal(x, y)
    assert moved >= 6  # the shifts were drawn, not skipped
    assert torch.equal(out["vlr"], from_levels(degrade_batch(got, "12x12", DegradeConfig(), torch.Generator())))


def _shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``x`` [3, H, W] moved by (dx, dy) pixels, edges repeated (grid_sample's border padding)."""
    h, w = x.shape[1:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[:, rows][:, :, cols]


@pytest.mark.parametrize("size", ["32x32", "14x16"])
def test_augmented_pairs_are_the_degraded_augmented_face(size):
    deg = DegradeConfig(blur_sigma=(0.6, 0.6))
    batch, stored_vlr = pair_batch(size=size, cfg=deg)
    cfg = AugmentConfig(rotate_p=1.0, rotate_deg=6.0, jitter_p=1.0, noise_std=0.0)
    out = SRPairAugment(cfg, size, deg)(batch, torch.Generator().manual_seed(0))
    target = to_levels(out["hr"])
    assert not torch.equal(target, to_levels(batch["hr"]))  # augmented
    assert torch.equal(out["hr"], from_levels(target))  # an 8-bit face, as stored ones are
    assert np.array_equal(nhwc(to_levels(out["vlr"])), pil_degrade(target, size, deg))  # Pillow, independently
    assert not np.array_equal(nhwc(to_levels(out["vlr"])), stored_vlr)


def test_rotation_keeps_the_detail_bilinear_resampling_lost():
    from faceops.data.augment import Augment

    hr = to_input(nhwc(faces(8)[1:]))  # textured faces (no pure-noise one: no resampler keeps that)
    cfg = AugmentConfig(flip_p=0.0, rotate_p=1.0, rotate_deg=6.0, translate=0.0, jitter_p=0.0, noise_std=0.0)
    ours = SRPairAugment(cfg, "32x32", DegradeConfig())({"hr": hr}, torch.Generator().manual_seed(0))
    paired = Augment(cfg)({"hr": hr}, torch.Generator().manual_seed(0))  # the same rotations, bilinear

    def detail(x: torch.Tensor) -> float:  # mean horizontal gradient, borders left out
        return (x[:, :, 8:-8, 9:-8] - x[:, :, 8:-8, 8:-9]).abs().mean().item()

    assert detail(ours["hr"]) > 1.15 * detail(paired["hr"])  # measured: 1.27


def test_sr_pairs_take_no_input_noise():
    with pytest.raises(ConfigError, match="noise_std"):
        SRPairAugment(AugmentConfig(noise_std=0.01), "32x32", DegradeConfig(noise_std=(1.0, 2.0)))
    SRPairAugment(AugmentConfig(enabled=False, noise_std=0.01), "32x32", DegradeConfig())  # off: nothing added
