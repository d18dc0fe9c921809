"""Metric maths against hand-computed and closed-form answers (pure NumPy, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from faceops.evaluate import (
    GallerySplit,
    auc,
    best_threshold,
    eer,
    gallery_probe_split,
    identification_metrics,
    identity_cosine,
    kfold_accuracy,
    make_folds,
    psnr,
    rank_accuracies,
    roc_curve,
    ssim,
    tar_at_far,
    verification_metrics,
)
from faceops.evaluate.identification import binomial_se
from faceops.evaluate.sr_metrics import SSIM_K1, SSIM_K2, gaussian_kernel
from faceops.evaluate.verification import standard_error


def phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# -- verification --------------------------------------------------------------------------------
# genuine 0.2 0.6 0.7 0.8 / impostor 0.1 0.3 0.4 0.9: FRR = FAR = 1/4 at threshold 0.6,
# AUC = P(genuine > impostor) = 10/16, best split between 0.4 and 0.6 gets 6/8 right.
OVERLAP_SCORES = np.array([0.2, 0.6, 0.7, 0.8, 0.1, 0.3, 0.4, 0.9])
OVERLAP_GENUINE = np.array([True] * 4 + [False] * 4)


def test_perfectly_separable() -> None:
    scores = np.r_[np.linspace(0.6, 1.0, 20), np.linspace(-0.2, 0.2, 20)]
    genuine = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    m = verification_metrics(scores, genuine)
    assert m["eer"] == 0.0
    assert m["auc"] == 1.0
    assert m["accuracy"] == 1.0
    assert m["tar_at_far"] == {"1e-2": 1.0, "1e-3": 1.0, "1e-4": 1.0}
    assert 0.2 < m["threshold"] < 0.6


def test_known_overlap() -> None:
    roc = roc_curve(OVERLAP_SCORES, OVERLAP_GENUINE)
    assert eer(roc) == pytest.approx(0.25)
    assert auc(roc) == pytest.approx(10 / 16)
    assert tar_at_far(roc, 1e-2) == 0.0  # the top impostor (0.9) outscores every genuine pair
    assert tar_at_far(roc, 0.25) == 0.75
    t, acc = best_threshold(OVERLAP_SCORES, OVERLAP_GENUINE)
    assert t == pytest.approx(0.5)
    assert acc == 0.75


def test_eer_interpolates_between_operating_points() -> None:
    # ROC points (FAR, FRR): (1/3, 1/2) then (2/3, 1/2): the FAR = FRR crossing is at 1/2
    roc = roc_curve([0.4, 0.8, 0.2, 0.6, 0.9], [True, True, False, False, False])
    assert eer(roc) == pytest.approx(0.5)


def test_ties_are_accepted_together() -> None:
    roc = roc_curve([0.5, 0.5], [True, False])
    np.testing.assert_array_equal(roc.far, [0.0, 1.0])
    np.testing.assert_array_equal(roc.tar, [0.0, 1.0])
    assert auc(roc) == 0.5


def test_gaussian_scores_match_closed_form() -> None:
    # genuine ~ N(2, 1), impostor ~ N(0, 1): EER = Phi(-1), AUC = Phi(2/sqrt 2), TAR@1% = Phi(2 - z_0.99)
    rng = np.random.default_rng(0)
    n = 200_000
    scores = np.r_[rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)]
    genuine = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    m = verification_metrics(scores, genuine)
    assert m["eer"] == pytest.approx(phi(-1.0), abs=3e-3)
    assert m["auc"] == pytest.approx(phi(2.0 / math.sqrt(2.0)), abs=3e-3)
    assert m["tar_at_far"]["1e-2"] == pytest.approx(phi(2.0 - 2.3263), abs=6e-3)
    assert m["accuracy"] == pytest.approx(phi(1.0), abs=3e-3)  # optimal threshold at 1
    assert m["threshold"] == pytest.approx(1.0, abs=0.05)


def test_tar_at_far_is_conservative() -> None:
    # 100 impostors: FAR can only be a multiple of 1/100, so FAR <= 1e-3 means FAR = 0
    rng = np.random.default_rng(1)
    imp = rng.uniform(0, 1, 100)
    gen = np.r_[np.full(30, imp.max() + 0.1), np.full(70, imp.max() - 0.05)]
    roc = roc_curve(np.r_[gen, imp], np.r_[np.ones(100, bool), np.zeros(100, bool)])
    assert tar_at_far(roc, 1e-3) == pytest.approx(0.30)
    assert tar_at_far(roc, 1e-2) >= 0.30


def test_kfold_thresholds_come_from_other_folds() -> None:
    # fold 0 alone would pick a threshold near 0.5, but the others say 0.15: fold 0 scores 50%
    scores = np.array([0.6, 0.4, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1])
    genuine = np.array([True, False, True, False, True, False, True, False])
    folds = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    acc, threshold = kfold_accuracy(scores, genuine, folds)
    assert acc == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    t0, _ = best_threshold(scores[folds != 0], genuine[folds != 0])
    assert t0 == pytest.approx(0.15)
    per_fold = [best_threshold(scores[folds != k], genuine[folds != k])[0] for k in range(4)]
    assert threshold == pytest.approx(np.mean(per_fold))


def test_validation_threshold_is_applied_unchanged() -> None:
    m = verification_metrics(OVERLAP_SCORES, OVERLAP_GENUINE, val_scores=[0.95, 0.05],
                             val_genuine=[True, False])
    assert m["threshold"] == pytest.approx(0.5)  # midpoint of the val gap
    assert m["accuracy"] == 0.75


def test_accuracy_standard_error_is_fold_std_over_sqrt_folds() -> None:
    # the folds of test_kfold_thresholds_come_from_other_folds: accuracies 0.5, 1, 1, 1
    scores = np.array([0.6, 0.4, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1])
    genuine = np.array([True, False, True, False, True, False, True, False])
    m = verification_metrics(scores, genuine, folds=[0, 0, 1, 1, 2, 2, 3, 3])
    assert m["accuracy"] == pytest.approx(0.875)
    assert m["accuracy_se"] == pytest.approx(0.25 / 2)  # sample std 0.25 over sqrt(4)
    assert (m["pairs"], m["folds"]) == (8, 4)
    assert standard_error([0.5, 1, 1, 1]) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="two folds"):
        standard_error([0.9])


def test_seeded_folds_standard_error_matches_the_binomial() -> None:
    # 10 folds of N pairs at accuracy p: the SE of the mean is about sqrt(p (1 - p) / N)
    rng = np.random.default_rng(2)
    n = 2000
    scores = np.r_[rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)]
    genuine = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    m = verification_metrics(scores, genuine)
    expected = math.sqrt(m["accuracy"] * (1 - m["accuracy"]) / (2 * n))
    assert m["folds"] == 10 and m["accuracy_se"] == pytest.approx(expected, rel=0.5)
    val = verification_metrics(scores, genuine, val_scores=[0.9, 0.1], val_genuine=[True, False])
    assert val["accuracy_se"] == pytest.approx(expected, rel=0.5) and val["threshold"] == pytest.approx(0.5)


def test_seeded_folds_never_outnumber_either_kind_of_pair() -> None:
    m = verification_metrics([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.4, 0.5], [True] * 3 + [False] * 5)
    assert m["folds"] == 3 and m["accuracy"] == 1.0 and m["accuracy_se"] == 0.0


def test_make_folds_balanced_and_seeded() -> None:
    genuine = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    f = make_folds(genuine, 10, seed=3)
    for k in range(10):
        assert (genuine[f == k]).sum() == 5 and (~genuine[f == k]).sum() == 5
    np.testing.assert_array_equal(f, make_folds(genuine, 10, seed=3))
    assert not np.array_equal(f, make_folds(genuine, 10, seed=4))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="genuine and impostor"):
        verification_metrics([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        verification_metrics([np.nan, 0.2], [True, False])
    with pytest.raises(ValueError, match="differ in length"):
        roc_curve([0.1, 0.2, 0.3], [True, False])


# -- identification ------------------------------------------------------------------------------
def test_rank_k_hand_computed() -> None:
    # gallery: id0 (1,0), id1 (0,1), distractor id2 (-1,0); probe of id0 at (.6,.8) ranks id1 first
    emb = np.array([[1, 0], [0.6, 0.8], [0, 1], [0, 1], [-1, 0]], dtype=np.float64)
    labels = np.array([0, 0, 1, 1, 2])
    split = GallerySplit(gallery=np.array([0, 2, 4]), probes=np.array([1, 3]))
    r = rank_accuracies(emb, labels, split, ranks=(1, 2, 5))
    assert r == {1: 0.5, 2: 1.0, 5: 1.0}


def test_gallery_probe_split_singletons_are_distractors() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2, 3])
    s = gallery_probe_split(labels, gallery_per_identity=1, seed=0)
    assert sorted(np.r_[s.gallery, s.probes].tolist()) == list(range(7))
    assert sorted(labels[s.gallery].tolist()) == [0, 1, 2, 3]  # one per identity, singletons included
    assert sorted(labels[s.probes].tolist()) == [0, 0, 2]
    s2 = gallery_probe_split(labels, gallery_per_identity=1, seed=0)
    np.testing.assert_array_equal(s.gallery, s2.gallery)


def test_identification_counts_distractors_in_the_gallery() -> None:
    # id0: A (1,0) and B (.6,.8); id1: two images at (-1,0); distractor D (.8,.6) is closer to each of
    # A and B than they are to each other, so it takes rank 1 from both id0 probes
    emb = np.array([[1, 0], [0.6, 0.8], [-1, 0], [-1, 0], [0.8, 0.6]], dtype=np.float64)
    labels = np.array([0, 0, 1, 1, 2])
    with_d = identification_metrics(emb, labels)
    assert (with_d["rank1"], with_d["rank5"]) == (0.5, 1.0)
    assert with_d["rank1_se"] == pytest.approx(math.sqrt(0.25 / 2)) and with_d["rank5_se"] == 0.0
    assert (with_d["probes"], with_d["gallery_identities"], with_d["distractors"]) == (2, 3, 1)
    without = identification_metrics(emb[:4], labels[:4])
    assert without["rank1"] == 1.0 and without["distractors"] == 0
    assert binomial_se(0.9, 100) == pytest.approx(0.03)


def test_identification_perfect_and_random() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 64))
    labels = np.repeat(np.arange(20), 3)
    emb = centres[labels] + 0.01 * rng.normal(size=(60, 64))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    m = identification_metrics(emb, labels)
    assert (m["rank1"], m["rank5"], m["rank1_se"], m["probes"], m["distractors"]) == (1.0, 1.0, 0.0, 40, 0)
    noise = rng.normal(size=(60, 64))
    m = identification_metrics(noise / np.linalg.norm(noise, axis=1, keepdims=True), labels)
    assert m["rank1"] < 0.3 and m["rank1"] <= m["rank5"]


# -- super-resolution ----------------------------------------------------------------------------
def test_psnr_known_values() -> None:
    a = np.zeros((2, 16, 16, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = np.full_like(a, 51)  # |difference| 0.2 everywhere: MSE 0.04
    assert psnr(a, b) == pytest.approx(-10 * math.log10(0.04))
    assert psnr(np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.1)) == pytest.approx(20.0)


def test_ssim_constant_images_closed_form() -> None:
    # constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = SSIM_K1**2
    got = ssim(np.full((1, 20, 20, 3), a), np.full((1, 20, 20, 3), b))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def _ssim_torch_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Independent implementation (2-D conv per channel) of the same definition."""
    k1 = torch.from_numpy(gaussian_kernel())
    w = (k1[:, None] * k1[None, :])[None, None].repeat(3, 1, 1, 1)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    ty = torch.from_numpy(y).permute(0, 3, 1, 2)

    def f(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=3)

    mx, my = f(tx), f(ty)
    vx, vy, cxy = f(tx * tx) - mx**2, f(ty * ty) - my**2, f(tx * ty) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_ssim_matches_reference_and_behaves() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 32, 24, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    assert ssim(x, x) == pytest.approx(1.0)
    assert ssim(x, y) == pytest.approx(_ssim_torch_reference(x, y), abs=1e-10)
    assert ssim(x, y) == pytest.approx(ssim(y, x))
    noisier = np.clip(x + rng.normal(0, 0.3, x.shape), 0, 1)
    assert ssim(x, noisier) < ssim(x, y) < 1.0
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :8, :8], y[:, :8, :8])


def test_identity_cosine() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    b = np.array([[1.0, 1.0], [0.0, -1.0]])
    assert identity_cosine(a, b) == pytest.approx((1 / math.sqrt(2) - 1) / 2)
