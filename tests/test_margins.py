"""Margin heads against hand-computed logits, at the numerically nasty points, and with Partial FC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from faceops.config import ConfigError, from_dict
from faceops.models import MARGIN_HEADS, MarginHeadConfig, create_margin_head


def head_with_cosines(cfg: MarginHeadConfig, cosines: list[float]):
    """A 2-d head whose class centres sit at the given cosines from the embedding e = (1, 0)."""
    head = create_margin_head(cfg, embedding_dim=2, num_classes=len(cosines))
    with torch.no_grad():
        c = torch.tensor(cosines, dtype=torch.float64)
        head.weight.copy_(torch.stack([c, torch.sqrt(1 - c * c)], dim=1).float())
    return head


def logits_for(cfg: MarginHeadConfig, cosines: list[float], target: int) -> torch.Tensor:
    head = head_with_cosines(cfg, cosines)
    logits, labels = head(torch.tensor([[1.0, 0.0]]), torch.tensor([target]))
    assert labels.tolist() == [target]
    return logits[0]


def test_arcface_adds_the_angle_to_the_target_only():
    cfg = MarginHeadConfig(name="arcface", s=64.0, m=0.5)
    logits = logits_for(cfg, [0.6, 0.2, -0.4], target=0)
    # theta = acos(0.6) = 0.927295 rad; cos(theta + 0.5) = 0.6*cos(.5) - 0.8*sin(.5) = 0.143009
    expected = torch.tensor([64 * 0.143009, 64 * 0.2, 64 * -0.4])
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=0)
    assert math.isclose(0.143009, math.cos(math.acos(0.6) + 0.5), abs_tol=1e-6)


def test_arcface_falls_back_past_pi():
    cfg = MarginHeadConfig(name="arcface", s=64.0, m=0.5)
    # acos(-0.95) = 2.82 rad > pi - 0.5: logit = cos - sin(pi - m) * m = -0.95 - 0.5 * 0.479426
    logits = logits_for(cfg, [-0.95, 0.1], target=0)
    assert logits[0].item() == pytest.approx(64 * (-0.95 - 0.239713), abs=2e-4)


def test_arcface_easy_margin_leaves_obtuse_angles_alone():
    cfg = MarginHeadConfig(name="arcface", s=10.0, m=0.5, easy_margin=True)
    assert logits_for(cfg, [-0.3, 0.1], target=0)[0].item() == pytest.approx(-3.0, abs=1e-5)
    assert logits_for(cfg, [0.6, 0.1], target=0)[0].item() == pytest.approx(1.43009, abs=1e-4)


def test_cosface_subtracts_from_the_cosine():
    cfg = MarginHeadConfig(name="cosface", s=30.0, m=0.35)
    torch.testing.assert_close(logits_for(cfg, [0.1, 0.7, 0.0], target=1),
                               torch.tensor([3.0, 30 * 0.35, 0.0]), atol=1e-5, rtol=0)


def test_combined_margin_formula_and_its_fallback():
    cfg = MarginHeadConfig(name="combined", s=1.0, m1=1.2, m2=0.3, m3=0.2)
    # cos(1.2 * acos(0.5) + 0.3) - 0.2 = cos(1.2 * 1.047198 + 0.3) - 0.2 = cos(1.556637) - 0.2
    assert logits_for(cfg, [0.5, 0.0], 0)[0].item() == pytest.approx(0.014159 - 0.2, abs=1e-5)
    # past theta* = (pi - 0.3) / 1.2 = 2.367994, th = cos(theta*) = -0.715401: cos - (1 + th) - m3
    assert logits_for(cfg, [-0.99, 0.0], 0)[0].item() == pytest.approx(-0.99 - 0.284599 - 0.2, abs=1e-5)
    # continuous at the switch: both branches give -1 - m3 there
    for c in (-0.715401 + 1e-4, -0.715401 - 1e-4):
        assert logits_for(cfg, [c, 0.0], 0)[0].item() == pytest.approx(-1.2, abs=2e-3)


def test_combined_reduces_to_arcface_and_cosface():
    cos = [0.8, 0.3, -0.2, 0.05]
    arc = logits_for(MarginHeadConfig(name="arcface", s=16.0, m=0.4), cos, 0)
    comb = logits_for(MarginHeadConfig(name="combined", s=16.0, m1=1.0, m2=0.4, m3=0.0), cos, 0)
    torch.testing.assert_close(arc, comb, atol=1e-4, rtol=0)
    cosf = logits_for(MarginHeadConfig(name="cosface", s=16.0, m=0.35), cos, 2)
    comb = logits_for(MarginHeadConfig(name="combined", s=16.0, m1=1.0, m2=0.0, m3=0.35), cos, 2)
    torch.testing.assert_close(cosf, comb, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MARGIN_HEADS.names())
@pytest.mark.parametrize("target_cos", [1.0, -1.0])
@pytest.mark.parametrize("scale", [64.0, 1e4])
def test_loss_and_grads_finite_at_the_poles(name, target_cos, scale):
    cfg = MarginHeadConfig(name=name, s=scale, m=0.5, m2=0.5, m3=0.1)
    head = create_margin_head(cfg, embedding_dim=4, num_classes=3)
    with torch.no_grad():  # class 0 exactly along (target_cos = 1) or against (-1) the embedding
        head.weight.copy_(torch.tensor([[target_cos, 0, 0, 0], [0, 1.0, 0, 0], [-1.0, 0, 0, 0]]))
    emb = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]], requires_grad=True)
    logits, labels = head(emb, torch.tensor([0, 2]))  # sample 2: target exactly opposite
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_logits_are_float32_under_autocast():
    head = create_margin_head(MarginHeadConfig(), embedding_dim=8, num_classes=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = head(torch.randn(3, 8, dtype=torch.bfloat16), torch.tensor([0, 1, 4]))
    assert logits.dtype == torch.float32


def test_partial_fc_keeps_positives_and_bounds_the_classes():
    torch.manual_seed(0)
    head = create_margin_head(MarginHeadConfig(sample_rate=0.1), embedding_dim=16, num_classes=1000)
    emb = F.normalize(torch.randn(32, 16), dim=1)
    labels = torch.randint(0, 1000, (32,))

    head.eval()
    full, _ = head(emb, labels)
    assert full.shape == (32, 1000)

    head.train()
    logits, sampled = head(emb, labels)
    assert logits.shape == (32, 100)
    rows = torch.arange(32)
    torch.testing.assert_close(logits[rows, sampled], full[rows, labels])  # same target logit
    F.cross_entropy(logits, sampled).backward()
    touched = (head.weight.grad.abs().sum(dim=1) > 0).sum().item()
    assert touched == 100  # only sampled centres get gradient

    many = torch.arange(0, 1000, 5)[:150]  # more positives than the 100 sampled: keep them all
    logits, sampled = head(F.normalize(torch.randn(150, 16), dim=1), many)
    assert logits.shape == (150, 150) and sampled.tolist() == list(range(150))


def test_margin_config_checks():
    with pytest.raises(ConfigError, match="arcface"):
        from_dict(MarginHeadConfig, {"name": "sphereface"})
    with pytest.raises(ConfigError, match="sample_rate"):
        MarginHeadConfig(sample_rate=0.0)
    with pytest.raises(ConfigError, match="margin.s"):
        MarginHeadConfig(s=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MARGIN_HEADS.names())
def test_fp16_autocast_training_step_on_gpu(name):
    from faceops.models import RecognizerConfig, create_recognizer

    model = create_recognizer(RecognizerConfig(name="edgeface_xs")).cuda()
    head = create_margin_head(MarginHeadConfig(name=name, s=64.0, m=0.5), 512, 1000).cuda()
    x = torch.rand(8, 3, 112, 112, device="cuda") * 2 - 1
    labels = torch.randint(0, 1000, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        logits, labels = head(model(x), labels)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
