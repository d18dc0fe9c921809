"""What the fast training reader keeps (issue 14, item 6): :class:`Augment` takes the reader's uint8
bytes and warps, colours and noises them chunk by chunk, yet means what it did as separate passes:
``grid_sample``'s bilinear warp, :meth:`Augment._colour`'s jitter and Gaussian noise of the recipe's
std, deterministic per (seed, epoch, batch) whatever the chunking or DDP slicing. No timings here:
the speed is ``python -m bench.ingest``'s figure."""

from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceops.data import augment
from faceops.data.augment import Augment, AugmentConfig, affine, draw
from faceops.data.reader import BatchDataset, LoaderConfig, SplitData
from faceops.data.tensors import to_input

REPO = Path(__file__).resolve().parents[1]
RECIPE = AugmentConfig(rotate_p=0.5, rotate_deg=10.0, jitter_p=0.8, brightness=0.2, contrast=0.2,
                       saturation=0.2, noise_std=0.01)  # the recognizer's (train/recognizer.py)
QUIET = AugmentConfig(rotate_p=1.0, rotate_deg=10.0, jitter_p=1.0, brightness=0.2, contrast=0.2,
                      saturation=0.2, noise_std=0.0)  # every transform on, no noise


def levels(n: int = 6, size: int = 40, seed: int = 0) -> torch.Tensor:
    """uint8 NHWC faces as the reader gathers them: smooth shapes plus texture."""
    gen = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 6, 6, generator=gen), size=(size, size), mode="bicubic")
    x = (smooth * 200 + torch.rand(n, 3, size, size, generator=gen) * 55).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def reference(x: torch.Tensor, cfg: AugmentConfig, seed: int) -> torch.Tensor:
    """The augmentation's definition as separate passes: affine_grid + bilinear grid_sample (border
    padding), then the colour jitter, on float input; no noise."""
    d = draw(cfg, torch.Generator().manual_seed(seed), x.shape[0], 0, x.shape[0])
    grid = F.affine_grid(affine(d, d.shift), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return Augment._colour(warped, d.bright, d.contr, d.sat).clamp(-1, 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fused_pass_is_grid_sample_then_colour(seed):
    x = levels()
    want = reference(to_input(x), QUIET, seed)
    for batch in (x, to_input(x)):  # the reader's bytes, or float input
        got = Augment(QUIET)({"hr": batch}, torch.Generator().manual_seed(seed))["hr"]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4)


def test_views_stay_aligned_and_only_the_input_view_is_noised():
    x = to_input(levels(4, size=64))
    vlr = F.interpolate(x, size=(16, 16), mode="area")
    cfg = AugmentConfig(**{**vars(QUIET), "noise_std": 0.01})
    out = Augment(cfg)({"hr": x, "vlr": vlr, "label": torch.arange(4)}, torch.Generator().manual_seed(3))
    assert torch.allclose(out["hr"], reference(x, cfg, 3), atol=1e-4)  # the same draws, no noise on hr
    assert not torch.allclose(out["vlr"], reference(vlr, cfg, 3), atol=1e-3)  # vlr (the input) is noised
    assert torch.equal(out["label"], torch.arange(4))


def test_noise_is_the_recipes_gaussian_and_differs_per_sample():
    x = levels(16, size=48)
    cfg = AugmentConfig(flip_p=0.0, rotate_p=0.0, translate=0.0, jitter_p=0.0, noise_std=0.01)
    noise = Augment(cfg)({"hr": x}, torch.Generator().manual_seed(0))["hr"] - to_input(x)
    inside = noise[to_input(x).abs() < 0.95]  # clamping at +-1 trims the noise of saturated pixels
    assert inside.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(inside.mean().item()) < 1e-3
    per_sample = noise.flatten(1)
    corr = torch.corrcoef(per_sample)
    assert corr.fill_diagonal_(0).abs().max() < 0.2  # each sample its own window of the bank


def test_output_does_not_depend_on_chunking_or_ddp_slicing(monkeypatch):
    x = levels(11)
    whole = Augment(RECIPE)({"hr": x}, torch.Generator().manual_seed(5))["hr"]
    monkeypatch.setattr(augment, "CPU_CHUNK", 3)
    aug = Augment(RECIPE)
    assert torch.equal(aug({"hr": x}, torch.Generator().manual_seed(5))["hr"], whole)
    parts = [aug({"hr": x[a:b]}, torch.Generator().manual_seed(5), a, 11)["hr"] for a, b in ((0, 4), (4, 11))]
    assert torch.equal(torch.cat(parts), whole)
    again = aug({"hr": x}, torch.Generator().manual_seed(5))["hr"]  # scratch reused: same result
    assert torch.equal(again, whole)
    assert not torch.equal(aug({"hr": x}, torch.Generator().manual_seed(6))["hr"], whole)


def test_disabled_augmentation_gives_the_plain_conversion():
    x = levels(3)
    out = Augment(AugmentConfig(enabled=False))({"hr": x}, torch.Generator())
    assert torch.equal(out["hr"], to_input(x))


def test_workers_get_the_config_without_scratch():
    aug = Augment(RECIPE)
    aug({"hr": levels(2)}, torch.Generator().manual_seed(0))
    assert aug._buffers  # the noise bank and chunk buffers
    copy = pickle.loads(pickle.dumps(aug))
    assert copy.cfg == RECIPE and not copy._buffers
    assert torch.equal(copy({"hr": levels(2)}, torch.Generator().manual_seed(0))["hr"],
                       aug({"hr": levels(2)}, torch.Generator().manual_seed(0))["hr"])


def test_to_device_feeds_augment_the_bytes_and_means_the_float_path():
    data = SplitData(hr=levels(8).numpy(), vlr={}, labels=np.arange(8) % 2, identities=["a", "b"],
                     image_ids=[str(i) for i in range(8)])
    noiseless = LoaderConfig(batch_size=4, augment=AugmentConfig(**{**vars(RECIPE), "noise_std": 0.0}))
    ds = BatchDataset(data, noiseless, seed=0)
    cpu = torch.device("cpu")
    batch = ds[1]
    got = ds.to_device(batch, cpu)
    seed = int(batch["aug"][0])
    want = reference(to_input(batch["hr"]), noiseless.augment, seed)
    assert torch.allclose(got["hr"], want, atol=1e-4)
    plain = BatchDataset(data, LoaderConfig(batch_size=4, augment=AugmentConfig(enabled=False)), seed=0)
    assert torch.equal(plain.to_device(plain[1], cpu)["hr"], to_input(plain[1]["hr"]))


def test_bench_falls_back_to_synthetic_jpegs(tmp_path):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    bench = importlib.import_module("bench.ingest")
    from PIL import Image

    folder = bench.synthetic_source(tmp_path / "faces", identities=2, images_per_identity=2)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 4 and len({f.parent for f in files}) == 2
    with Image.open(files[0]) as img:
        assert img.format == "JPEG" and img.size == (bench.LFW_SIZE, bench.LFW_SIZE)
