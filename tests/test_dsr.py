"""DSR training: each loss against hand-computed values, the frozen recognizer, training pairs made
from augmented HR faces by the dataset's own degradation, train steps at both VLR sizes, and exact
resume after SIGKILL through ``faceops train dsr``."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import kill_at_first_checkpoint

from faceops.config import ConfigError, to_dict
from faceops.data.augment import AugmentConfig
from faceops.data.degrade import DegradeConfig, degrade
from faceops.data.manifest import DatasetError, load_manifest
from faceops.data.reader import LoaderConfig, load_split
from faceops.data.tensors import to_uint8
from faceops.models import DSRNet, RecognizerConfig, create_recognizer
from faceops.models.contract import ContractConflictError
from faceops.train.checkpoint import load_checkpoint, load_model, save_checkpoint
from faceops.train.dsr import (
    DSRTrainConfig,
    check_reproduces,
    dsr_recipe,
    train_dsr,
    training_batches,
    training_degradation,
)
from faceops.train.losses import (
    DSRLoss,
    DSRLossConfig,
    FeatureMatchingLoss,
    Frozen,
    IdentityLoss,
    LossError,
    PerceptualLoss,
    PixelL1Loss,
    TotalVariationLoss,
    VGGFeatures,
)

SIZES = {"32x32": (32, 32), "14x16": (16, 14)}  # VLR size -> (H, W)


def tiny_recognizer(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_recognizer(RecognizerConfig(name="edgeface_xxs", embedding_dim=64))


@pytest.fixture(scope="module")
def recognizer_ckpt(tmp_path_factory) -> str:
    """A faceops recognizer checkpoint (random edgeface_xxs) for the DSR losses."""
    model = tiny_recognizer()
    uri = str(tmp_path_factory.mktemp("rec") / "rec.pt")
    cfg = RecognizerConfig(name="edgeface_xxs", embedding_dim=64)
    return save_checkpoint(uri, {"kind": "recognizer", "model": model.state_dict(), "model_config": to_dict(cfg)})


def tiny_dsr_cfg(data: str, out: Path, recognizer: str, size: str = "32x32", **engine) -> DSRTrainConfig:
    cfg = dsr_recipe(size)
    cfg.data, cfg.out, cfg.recognizer = data, str(out), recognizer
    cfg.model.base_channels, cfg.model.residual_blocks = 16, 2
    cfg.loader.batch_size = 4
    cfg.engine.progress, cfg.engine.amp, cfg.engine.log_every_steps = False, "off", 1
    cfg.engine.schedule.warmup_steps = 2
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


# -- each loss against a hand-computed value -------------------------------------------------------
def test_pixel_l1_by_hand():
    sr = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    hr = torch.tensor([[[[1.0, 1.0], [0.0, 0.5]]]])
    assert PixelL1Loss()(sr, hr).item() == pytest.approx((1 + 0 + 2 + 2.5) / 4)


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [1.0, 1.0, 0.0]]]])  # 1 x 1 x 2 x 3
    # vertical |1-0| + |1-1| + |0-3| = 4; horizontal |1-0| + |3-1| + |1-1| + |0-1| = 4
    assert TotalVariationLoss()(x).item() == pytest.approx(8.0)
    two = torch.cat([x, torch.zeros_like(x)])  # mean over the batch of per-image sums
    assert TotalVariationLoss()(two).item() == pytest.approx(4.0)


def test_identity_by_hand():
    sr = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    hr = torch.tensor([[0.0, 2.0], [3.0, 4.0]])
    # cosines 0 and 1 -> (1 - 0 + 1 - 1) / 2
    assert IdentityLoss()(sr, hr).item() == pytest.approx(0.5)


def test_perceptual_and_feature_matching_by_hand():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0], [0.0, 4.0]])]
    b = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    # MSE per layer: (0 + 4) / 2 = 2 and (1 + 1 + 1 + 9) / 4 = 3 -> mean 2.5
    assert PerceptualLoss()(a, b).item() == pytest.approx(2.5)
    # L1 per layer: 2 / 2 = 1 and (1 + 1 + 1 + 3) / 4 = 1.5 -> mean 1.25
    assert FeatureMatchingLoss()(a, b).item() == pytest.approx(1.25)


def test_dsr_loss_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    rec = tiny_recognizer()
    cfg = DSRLossConfig(pixel=1.0, perceptual=0.5, identity=2.0, feature_match=0.25, tv=1e-3)
    loss = DSRLoss(cfg, rec)
    sr, hr = torch.rand(2, 3, 112, 112) * 2 - 1, torch.rand(2, 3, 112, 112) * 2 - 1
    total, parts = loss(sr, hr)
    parts = {k: v.item() for k, v in parts.items()}  # the figures stay tensors until a log step reads them
    with torch.no_grad():
        s_sr, s_hr = rec.forward_stages(sr, 3), rec.forward_stages(hr, 3)
        expected = {"l1": (sr - hr).abs().mean(),
                    "perceptual": torch.nn.functional.mse_loss(s_sr[0], s_hr[0]),
                    "identity": 1 - torch.nn.functional.cosine_similarity(rec(sr), rec(hr)).mean(),
                    "feature_match": ((s_sr[1] - s_hr[1]).abs().mean() + (s_sr[2] - s_hr[2]).abs().mean()) / 2,
                    "tv": TotalVariationLoss()(sr)}
    for k, v in expected.items():
        assert parts[k] == pytest.approx(v.item(), rel=1e-5), k
    weighted = 1.0 * parts["l1"] + 0.5 * parts["perceptual"] + 2.0 * parts["identity"] + \
        0.25 * parts["feature_match"] + 1e-3 * parts["tv"]
    assert total.item() == pytest.approx(weighted, rel=1e-5)


def test_seed_weights_for_both_sizes():
    r32, r14 = dsr_recipe("32x32"), dsr_recipe("14x16")
    a, b = r32.losses, r14.losses
    assert (a.pixel, a.perceptual, a.identity, a.feature_match, a.tv) == (1.0, 0.025, 0.60, 0.18, 2e-6)
    assert (b.perceptual, b.identity, b.feature_match, b.tv) == (0.02, 0.50, 0.15, 3e-6)
    assert (r32.loader.batch_size, r32.engine.optim.lr, r32.model.base_channels) == (14, 1.3e-4, 128)
    assert (r14.loader.batch_size, r14.engine.optim.lr, r14.model.base_channels) == (16, 1.5e-4, 112)
    aug = r32.loader.augment
    assert (aug.rotate_p, aug.rotate_deg, aug.jitter_p) == (0.65, 6.0, 0.3)
    assert aug.noise_std == r14.loader.augment.noise_std == 0.0  # a DSR input's noise is the degradation's
    assert (r32.engine.monitor, r32.engine.monitor_mode) == ("val_identity_cosine", "max")
    assert r14.model.vlr_size == r14.loader.vlr_view == "14x16"


# -- VGG perceptual features from a local file ------------------------------------------------------
def test_vgg_features_load_from_a_local_file_only(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    ref = make_layers(cfgs["D"])[:9]  # up to relu2_2, the vgg16().features layout
    path = tmp_path / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in ref.state_dict().items()} | {"classifier.0.bias": torch.zeros(2)},
               path)
    vgg = VGGFeatures(path, ["relu1_2", "relu2_2"])
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    feats = vgg(x)
    norm = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(feats[0], ref[:4](norm), atol=1e-6)
        assert torch.allclose(feats[1], ref(norm), atol=1e-6)
    assert not any(p.requires_grad for p in vgg.parameters())
    cfg = DSRLossConfig(vgg_weights=str(path), vgg_layers=["relu1_2"])
    _, parts = DSRLoss(cfg, tiny_recognizer())(torch.rand(1, 3, 112, 112) * 2 - 1, torch.zeros(1, 3, 112, 112))
    assert math.isfinite(parts["perceptual"]) and parts["perceptual"] > 0
    with pytest.raises(LossError, match="no file at"):
        VGGFeatures(tmp_path / "missing.pth", ["relu1_2"])


# -- gradients reach only the DSR network -----------------------------------------------------------
def test_recognizer_frozen_and_in_eval_mode():
    from faceops.models import DSRConfig, create_dsr

    rec = tiny_recognizer()
    before = {k: v.clone() for k, v in rec.state_dict().items()}
    dsr = create_dsr(DSRConfig(base_channels=8, residual_blocks=1))
    torch.nn.init.normal_(dsr.tail.weight, std=0.01)  # the tail starts at zero; give the DSR a gradient path
    loss = DSRLoss(DSRLossConfig(), rec)
    loss.train()  # what a training loop does to modules: the frozen recognizer must ignore it
    assert isinstance(loss.recognizer, Frozen) and not rec.training and not loss.recognizer.training
    opt = torch.optim.SGD(dsr.parameters(), lr=0.1)
    total, _ = loss(dsr(torch.rand(2, 3, 32, 32) * 2 - 1), torch.rand(2, 3, 112, 112) * 2 - 1)
    total.backward()
    opt.step()
    assert all(p.grad is None and not p.requires_grad for p in rec.parameters())
    assert all(p.grad is not None for p in dsr.parameters())
    assert all(torch.equal(v, before[k]) for k, v in rec.state_dict().items())


# -- training pairs: the augmented HR face, degraded as the dataset's VLR view was (issue 11) ----------
IDENTITY_GEOMETRY = AugmentConfig(flip_p=0.0, rotate_p=0.0, translate=0.0, jitter_p=0.0, noise_std=0.0)


@pytest.fixture(scope="module")
def blurred_dataset(tmp_path_factory) -> str:
    """A small dataset whose 32x32 view was blurred and JPEG-compressed at ingest."""
    from faceops.data.ingest import IngestConfig, TrainClassConfig, ingest
    from faceops.data.synth import synthesize

    root = tmp_path_factory.mktemp("blurred")
    faces = synthesize(root / "faces", identities=8, images_per_identity=4, seed=3, progress=False)
    cfg = IngestConfig(train_classes=TrainClassConfig(rule="all"), pairs_per_split=10, workers=1,
                       degrade=DegradeConfig(sizes=["32x32"], blur_sigma=(0.8, 0.8), jpeg_quality=(80, 80)))
    return ingest(str(faces), "blurred", str(root / "store"), cfg, progress=False).uri


def first_batch(cfg: DSRTrainConfig) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Training batch 0 as the engine receives it, with the stored HR and VLR faces it was made from."""
    train = load_split(cfg.data, "train", views=["hr", f"vlr_{cfg.vlr_size}"])
    ds = training_batches(cfg, train, load_manifest(cfg.data))
    idx = ds.order[:cfg.loader.batch_size]
    return ds.to_device(ds[0], torch.device("cpu")), train.hr[idx], train.vlr[cfg.vlr_size][idx]


@pytest.mark.parametrize("size", ["32x32", "14x16"])
def test_identity_geometry_trains_on_the_stored_pairs(size, tiny_dataset, tmp_path):
    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, "", size)
    cfg.loader.augment = IDENTITY_GEOMETRY
    batch, hr, vlr = first_batch(cfg)
    assert np.array_equal(to_uint8(batch["vlr"]), vlr)  # the VLR faces evaluation feeds, byte for byte
    assert np.array_equal(to_uint8(batch["hr"]), hr)


def test_augmented_inputs_are_the_augmented_targets_degraded(tiny_dataset, tmp_path):
    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, "")  # the 32x32 recipe's augmentation
    batch, hr, _ = first_batch(cfg)
    target = to_uint8(batch["hr"])
    assert not np.array_equal(target, hr)
    expected = np.stack([degrade(x, "32x32", DegradeConfig(), seed=0) for x in target])  # ingest's own code
    assert np.array_equal(to_uint8(batch["vlr"]), expected)


def test_training_degrades_as_the_manifest_says(blurred_dataset, recognizer_ckpt, tmp_path):
    cfg = tiny_dsr_cfg(blurred_dataset, tmp_path, recognizer_ckpt)
    deg = training_degradation(cfg, load_manifest(blurred_dataset))
    assert (deg.blur_sigma, deg.noise_std, deg.jpeg_quality) == ((0.8, 0.8), (0.0, 0.0), (80, 80))
    cfg.loader.augment = IDENTITY_GEOMETRY
    batch, _, vlr = first_batch(cfg)
    assert np.array_equal(to_uint8(batch["vlr"]), vlr)  # blurred and JPEG-compressed as stored
    cfg.degrade = DegradeConfig(blur_sigma=(0.8, 0.8), jpeg_quality=(80, 80))  # stating it is fine
    first_batch(cfg)
    cfg.degrade = DegradeConfig(blur_sigma=(0.5, 0.5), jpeg_quality=(80, 80))
    with pytest.raises(ContractConflictError, match=r"blur_sigma = \[0.5, 0.5\].*blur_sigma = \[0.8, 0.8\]"):
        train_dsr(cfg)


def test_a_vlr_view_its_manifest_does_not_explain_is_refused(tiny_dataset):
    train = load_split(tiny_dataset, "train", views=["hr", "vlr_32x32"])
    check_reproduces(train, DegradeConfig(), "32x32", "tiny")  # ingest's default degradation: as stored
    with pytest.raises(DatasetError, match="not its HR faces degraded as its manifest says"):
        check_reproduces(train, DegradeConfig(blur_sigma=(1.0, 1.0)), "32x32", "tiny")


def test_dsr_inputs_take_no_noise_beyond_the_degradation():
    with pytest.raises(ConfigError, match="dsr.loader.augment.noise_std must be 0"):
        DSRTrainConfig(loader=LoaderConfig(augment=AugmentConfig(noise_std=0.01)))


# -- training through the engine --------------------------------------------------------------------
@pytest.mark.parametrize("size", ["32x32", "14x16"])
def test_train_steps_shapes_dtypes_and_checkpoint(size, tiny_dataset, recognizer_ckpt, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, recognizer_ckpt, size, epochs=1, max_steps=2)
    result = train_dsr(cfg)
    assert result.steps == 2 and result.best_checkpoint
    fig = result.history[-1]
    for k in ("val_psnr", "val_ssim", "val_identity_cosine", "val_bicubic_psnr"):
        assert math.isfinite(fig[k]), k
    model, meta = load_model(result.best_checkpoint)
    assert isinstance(model, DSRNet) and meta["kind"] == "dsr" and meta["vlr_size"] == size
    h, w = SIZES[size]
    out = model(torch.rand(3, 3, h, w) * 2 - 1)
    assert out.shape == (3, 3, 112, 112) and out.dtype == torch.float32
    assert out.abs().max() <= 1.0
    # the frozen recognizer did not move: the checkpoint holds only the DSR
    ckpt = load_checkpoint(result.checkpoint)
    assert set(ckpt["model"]) == set(model.state_dict()) and "head" not in ckpt
    rec, _ = load_model(recognizer_ckpt)
    assert all(torch.equal(v, tiny_recognizer().state_dict()[k]) for k, v in rec.state_dict().items())


def test_dsr_needs_the_vlr_view_and_a_recognizer(tiny_dataset, recognizer_ckpt, tmp_path):
    from faceops.errors import FaceopsError

    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, None)
    with pytest.raises(FaceopsError, match="frozen recognizer"):
        train_dsr(cfg)
    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, recognizer_ckpt, "24x24")
    with pytest.raises(FaceopsError, match="no VLR view 24x24"):
        train_dsr(cfg)


# -- exact resume after SIGKILL through the CLI ------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(config_file: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "faceops", "train", "dsr", "--config", str(config_file),
            "--out", str(out)]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tiny_dataset, recognizer_ckpt, tmp_path):
    cfg = tiny_dsr_cfg(tiny_dataset, tmp_path, recognizer_ckpt, epochs=2, max_steps=10, checkpoint_every_steps=2)
    config_file = tmp_path / "dsr.yaml"  # the whole resolved config: no default depends on the loader
    config_file.write_text(yaml.safe_dump({"dsr": to_dict(cfg)}))
    ref = tmp_path / "ref"
    subprocess.run(_cmd(config_file, ref), check=True, env=_env(), capture_output=True)
    run = tmp_path / "run"
    kill_at_first_checkpoint(_cmd(config_file, run), run, _env())
    killed_at = load_checkpoint(str(run / "last.pt"))["step"]
    assert killed_at < 10
    subprocess.run([*_cmd(config_file, run), "--resume"], check=True, env=_env(), capture_output=True)
    a, b = load_checkpoint(str(ref / "last.pt")), load_checkpoint(str(run / "last.pt"))
    assert a["step"] == b["step"] == 10 and b["vlr_size"] == "32x32"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume from step {killed_at}"
