"""Cross-checks of the evaluation maths against scikit-learn, scikit-image and SciPy (test-only deps).

The references get the same inputs and, where faceops documents a convention that a library does not
share (conservative TAR@FAR, midpoint thresholds, ties in favour of the true identity, SSIM without
the border), the reference applies that convention on top of the library's own figures. Everything
is counts divided by totals or the same filtering, so tolerances sit at floating-point rounding.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, sem
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve, top_k_accuracy_score
from sklearn.model_selection import StratifiedKFold

from faceops.evaluate import identification as ident
from faceops.evaluate import verification as ver

# ``faceops.evaluate.sr_metrics`` is the re-exported function, which hides the submodule of that name
srm = importlib.import_module("faceops.evaluate.sr_metrics")

ROUNDING = 1e-12  # summation order differs between the implementations; nothing else may


# -- verification --------------------------------------------------------------------------------
def _pairs(case: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores, genuine): 2,000 genuine and 8,000 impostor cosine-like scores."""
    rng = np.random.default_rng(seed)
    genuine = rng.permutation(np.r_[np.ones(2000, bool), np.zeros(8000, bool)])
    if case == "all_same":
        return np.full(genuine.size, 0.5), genuine
    # realistic overlap: d' = 2.7, EER near 9 %, TAR@FAR=1e-3 well below 1
    scores = np.where(genuine, rng.normal(0.45, 0.15, genuine.size), rng.normal(0.05, 0.15, genuine.size))
    if case == "ties":
        scores = np.round(scores, 2)  # ~100 distinct values: every operating point is a tie
    elif case == "perfect":
        scores = np.where(genuine, 0.6 + np.abs(scores) / 10, 0.4 - np.abs(scores) / 10)
    return scores, genuine


CASES = ("separated", "ties", "perfect", "all_same")


@pytest.mark.parametrize("case", CASES)
def test_roc_points_match_sklearn(case: str) -> None:
    """Every operating point: thresholds, FAR and TAR equal sklearn's unpruned ROC exactly."""
    s, g = _pairs(case)
    roc = ver.roc_curve(s, g)
    fpr, tpr, thresholds = roc_curve(g, s, drop_intermediate=False)
    np.testing.assert_array_equal(roc.thresholds, thresholds)  # both start at +inf (reject all)
    np.testing.assert_allclose(roc.far, fpr, rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(roc.tar, tpr, rtol=0, atol=ROUNDING)


@pytest.mark.parametrize("case", CASES)
def test_auc_matches_sklearn_and_mann_whitney(case: str) -> None:
    """AUC = sklearn's ROC AUC = P(genuine > impostor) + P(tie) / 2 (Mann-Whitney U / n1 n0)."""
    s, g = _pairs(case)
    got = ver.auc(ver.roc_curve(s, g))
    assert got == pytest.approx(roc_auc_score(g, s), abs=ROUNDING)
    u = mannwhitneyu(s[g], s[~g]).statistic
    assert got == pytest.approx(u / (g.sum() * (~g).sum()), abs=ROUNDING)


def _eer_reference(scores: np.ndarray, genuine: np.ndarray) -> float:
    """Where sklearn's ROC polyline crosses FPR = 1 - TPR, by linear interpolation along the curve.

    Along the curve FPR + TPR - 1 strictly increases (each point accepts at least one more pair), so
    it parametrises the polyline and ``np.interp`` at 0 gives the crossing's FPR, vertical segments
    included (where interpolating TPR as a function of FPR, the usual brentq/interp1d recipe, is
    ill-defined). sklearn's default pruning drops only collinear points, which leaves the polyline.
    """
    fpr, tpr, _ = roc_curve(genuine, scores)
    return float(np.interp(0.0, fpr + tpr - 1.0, fpr))


@pytest.mark.parametrize("case", CASES)
def test_eer_matches_sklearn_roc(case: str) -> None:
    """Both interpolate linearly between the two operating points around FAR = FRR: equal to rounding.

    A non-interpolated EER (the nearest operating point) would differ by up to one ROC step, about
    1/8000 here and 0.5 for constant scores, which this tolerance rejects.
    """
    s, g = _pairs(case)
    assert ver.eer(ver.roc_curve(s, g)) == pytest.approx(_eer_reference(s, g), abs=ROUNDING)


@pytest.mark.parametrize("case", CASES)
def test_tar_at_far_matches_sklearn_roc(case: str) -> None:
    """Conservative TAR@FAR: the best TPR of sklearn's points with at most target x impostors accepted.

    Exact: no interpolation on either side. The unpruned ROC is used because sklearn's pruning can drop
    the last admissible point of a collinear run (interpolated TAR@FAR, as some papers report it, would
    be at least this figure).
    """
    s, g = _pairs(case)
    roc = ver.roc_curve(s, g)
    fpr, tpr, _ = roc_curve(g, s, drop_intermediate=False)
    impostors = int((~g).sum())
    false_accepts = np.rint(fpr * impostors)
    for key, target in ver.FAR_TARGETS.items():
        expected = tpr[false_accepts <= np.floor(target * impostors + 1e-9)].max()
        assert ver.tar_at_far(roc, target) == expected, key
    if case == "separated":  # the targets land on distinct, non-trivial points of the curve
        got = [ver.tar_at_far(roc, t) for t in ver.FAR_TARGETS.values()]
        assert 0.0 < got[2] < got[1] < got[0] < 1.0


def _threshold_reference(scores: np.ndarray, genuine: np.ndarray) -> float:
    """The accuracy-maximising threshold on these pairs, from sklearn's ROC counts.

    faceops's conventions on top: ties in accuracy go to the lowest threshold, and the threshold sits
    midway between the lowest accepted score and the next lower score (one below the minimum when all
    are accepted, one above the maximum when none is).
    """
    fpr, tpr, thresholds = roc_curve(genuine, scores, drop_intermediate=False)
    n_gen, n_imp = int(genuine.sum()), int((~genuine).sum())
    correct = np.rint(tpr * n_gen) + n_imp - np.rint(fpr * n_imp)  # integer counts: exact ties
    j = int(np.flatnonzero(correct == correct.max())[-1])  # thresholds descend: last = lowest
    if j == 0:
        return float(scores.max() + 1.0)
    below = thresholds[j + 1] if j + 1 < thresholds.size else thresholds[j] - 2.0
    return float((thresholds[j] + below) / 2.0)


@pytest.mark.parametrize("case", CASES)
def test_kfold_accuracy_matches_sklearn_reference(case: str) -> None:
    """LFW protocol on sklearn's stratified folds: per-fold accuracy, threshold and the standard error."""
    s, g = _pairs(case)
    folds = np.empty(s.size, dtype=np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(10, shuffle=True, random_state=0).split(s, g)):
        folds[test] = k
    accs, thresholds = [], []
    for k in range(10):
        t = _threshold_reference(s[folds != k], g[folds != k])
        accs.append(accuracy_score(g[folds == k], s[folds == k] >= t))
        thresholds.append(t)
    got_accs, got_thresholds = ver.fold_accuracies(s, g, folds)
    np.testing.assert_allclose(got_accs, accs, rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(got_thresholds, thresholds, rtol=0, atol=ROUNDING)
    m = ver.verification_metrics(s, g, folds=folds)
    assert m["accuracy"] == pytest.approx(np.mean(accs), abs=ROUNDING)
    assert m["threshold"] == pytest.approx(np.mean(thresholds), abs=ROUNDING)
    assert m["accuracy_se"] == pytest.approx(sem(accs), abs=ROUNDING)  # sample std (ddof 1) / sqrt(10)
    assert m["folds"] == 10 and m["pairs"] == s.size


def test_validation_threshold_matches_sklearn_reference() -> None:
    """Threshold from a separate validation set, applied unchanged to the test pairs."""
    s, g = _pairs("ties", seed=1)
    val_s, val_g = _pairs("ties", seed=2)
    t = _threshold_reference(val_s, val_g)
    assert ver.best_threshold(val_s, val_g) == pytest.approx(
        (t, accuracy_score(val_g, val_s >= t)), abs=ROUNDING)
    s, g = np.r_[s, t], np.r_[g, True]  # a genuine pair scoring exactly the threshold is accepted
    m = ver.verification_metrics(s, g, val_scores=val_s, val_genuine=val_g)
    assert m["threshold"] == pytest.approx(t, abs=ROUNDING)
    assert m["accuracy"] == pytest.approx(accuracy_score(g, s >= t), abs=ROUNDING)


# -- identification ------------------------------------------------------------------------------
def _faces(identities: int, seed: int, signs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised 64-d embeddings, labels): 1-6 images per identity, some single-image distractors.

    ``signs`` keeps only the signs of the embeddings: cosines become multiples of 1/64 and often tie.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, identities)
    labels = np.repeat(np.arange(identities) * 3 + 7, counts)  # sparse, unordered-looking ids
    centres = rng.normal(size=(identities, 64))
    emb = np.repeat(centres, counts, axis=0) + rng.normal(scale=1.1, size=(labels.size, 64))
    if signs:
        emb = np.sign(emb)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def _identity_scores(emb: np.ndarray, labels: np.ndarray, split: ident.GallerySplit) -> tuple[np.ndarray,
                                                                                               np.ndarray]:
    """(gallery identities, [probes, identities] best cosine per identity), one identity at a time."""
    ids = np.unique(labels[split.gallery])
    scores = np.empty((split.probes.size, ids.size))
    for j, identity in enumerate(ids):
        members = split.gallery[labels[split.gallery] == identity]
        scores[:, j] = (emb[split.probes] @ emb[members].T).max(axis=1)
    return ids, scores


@pytest.mark.parametrize("gallery_per_identity", [1, 2])
def test_rank_k_matches_sklearn_top_k(gallery_per_identity: int) -> None:
    """Rank-1/5 = sklearn's top-k accuracy over per-identity best cosines (no ties in these scores)."""
    emb, labels = _faces(300, seed=0)
    split = ident.gallery_probe_split(labels, gallery_per_identity, seed=0)
    ids, scores = _identity_scores(emb, labels, split)
    assert all(np.unique(row).size == row.size for row in scores)  # sklearn breaks ties by column order
    m = ident.identification_metrics(emb, labels, gallery_per_identity, seed=0)
    for k in ident.RANKS:
        expected = top_k_accuracy_score(labels[split.probes], scores, k=k, labels=ids)
        assert m[f"rank{k}"] == pytest.approx(expected, abs=ROUNDING), k
    assert 0.2 < m["rank1"] < m["rank5"] < 1.0  # neither trivial nor saturated
    assert m["probes"] == split.probes.size and m["gallery_identities"] == ids.size
    assert m["distractors"] == np.setdiff1d(ids, labels[split.probes]).size > 0


def test_rank_ties_go_to_the_true_identity() -> None:
    """With tied identity scores: a brute-force rank (1 + identities strictly above) matches, and
    sklearn, which breaks ties by column order, can only come out lower."""
    emb, labels = _faces(60, seed=3, signs=True)
    split = ident.gallery_probe_split(labels, 1, seed=0)
    ids, scores = _identity_scores(emb, labels, split)
    truth = labels[split.probes]
    ranks = []
    for row, identity in zip(scores, truth, strict=True):
        mine = row[np.flatnonzero(ids == identity)[0]]
        ranks.append(1 + sum(other > mine for other in row))
    tied = sum(np.sum(row == row[ids == t]) > 1 for row, t in zip(scores, truth, strict=True))
    assert tied > 0  # the case under test occurs
    got = ident.rank_accuracies(emb, labels, split)
    for k in ident.RANKS:
        assert got[k] == pytest.approx(np.mean(np.asarray(ranks) <= k), abs=ROUNDING)
        assert got[k] >= top_k_accuracy_score(truth, scores, k=k, labels=ids)


# -- super-resolution ----------------------------------------------------------------------------
def _images(seed: int, shape: tuple[int, ...] = (3, 40, 36, 3)) -> tuple[np.ndarray, np.ndarray]:
    """(hr, sr) uint8: smooth structure plus texture, and a noisy, slightly shifted reconstruction."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.3 * np.sin(6 * xx + 4 * yy)[None, ..., None] * rng.uniform(0.5, 1.0, (n, 1, 1, c))
    hr = np.clip(base + rng.normal(0, 0.08, shape), 0, 1)
    sr = np.clip(np.roll(hr, 1, axis=2) * 0.9 + 0.05 + rng.normal(0, 0.05, shape), 0, 1)
    return np.rint(hr * 255).astype(np.uint8), np.rint(sr * 255).astype(np.uint8)


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 settings; skimage's mean already leaves out the (win - 1) / 2 = 5 px border."""
    return float(np.mean([structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False, data_range=data_range,
                                                channel_axis=-1) for x, y in zip(a, b, strict=True)]))


def test_psnr_matches_skimage() -> None:
    """Mean per-image PSNR, on uint8 (data range 255) and on [0, 1] floats (data range 1)."""
    hr, sr = _images(0)
    expected = np.mean([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(hr, sr, strict=True)])
    assert srm.psnr(sr, hr) == pytest.approx(expected, abs=1e-10)
    f_hr, f_sr = hr / 255.0, sr / 255.0
    expected = np.mean([peak_signal_noise_ratio(x, y, data_range=1) for x, y in zip(f_hr, f_sr, strict=True)])
    assert srm.psnr(f_sr, f_hr) == pytest.approx(expected, abs=1e-10)


def test_luma_matches_skimage_rgb2ycbcr() -> None:
    """Y of BT.601 as skimage computes it (16-235 on the 0-255 scale), unrounded, over 255."""
    hr, _ = _images(1)
    np.testing.assert_allclose(srm.luma(hr)[..., 0], rgb2ycbcr(hr)[..., 0] / 255.0, rtol=0, atol=ROUNDING)


@pytest.mark.parametrize("shape", [(3, 40, 36, 3), (2, 11, 11, 3), (4, 24, 20, 1)])
def test_ssim_matches_skimage(shape: tuple[int, ...]) -> None:
    """Gaussian window sigma 1.5, population statistics: equal to skimage's mean over the valid region,
    on uint8 (data range 255) and [0, 1] floats, including the minimal 11x11 size (one valid pixel)."""
    hr, sr = _images(2, shape)
    assert srm.ssim(sr, hr) == pytest.approx(_skimage_ssim(sr, hr, 255), abs=ROUNDING)
    assert srm.ssim(sr / 255.0, hr / 255.0) == pytest.approx(_skimage_ssim(sr / 255.0, hr / 255.0, 1),
                                                             abs=ROUNDING)


def test_ssim_flat_and_identical_images_match_skimage() -> None:
    """Zero-variance images (only C1 and C2 keep the ratio finite) and identical images (SSIM 1)."""
    flat_a, flat_b = np.full((1, 16, 16, 3), 0.2), np.full((1, 16, 16, 3), 0.7)
    assert srm.ssim(flat_a, flat_b) == pytest.approx(_skimage_ssim(flat_a, flat_b, 1), abs=ROUNDING)
    c1 = (0.01 * 1) ** 2  # flat: SSIM = luminance term (2 a b + C1) / (a^2 + b^2 + C1), structure term 1
    assert srm.ssim(flat_a, flat_b) == pytest.approx((2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1), abs=ROUNDING)
    hr, _ = _images(3)
    assert srm.ssim(hr, hr) == pytest.approx(_skimage_ssim(hr, hr, 255), abs=ROUNDING)
    assert srm.ssim(hr, hr) == pytest.approx(1.0, abs=ROUNDING)


def test_sr_metrics_y_channel_matches_skimage() -> None:
    """``psnr_y`` and ``ssim_y`` of the metrics block: skimage on rgb2ycbcr's Y with data range 255."""
    hr, sr = _images(4)
    y_hr, y_sr = rgb2ycbcr(hr)[..., 0], rgb2ycbcr(sr)[..., 0]
    emb = np.eye(3)
    m = srm.sr_metrics(sr, hr, emb, emb)
    expected = np.mean([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(y_hr, y_sr, strict=True)])
    assert m["psnr_y"] == pytest.approx(expected, abs=1e-10)
    assert m["ssim_y"] == pytest.approx(_skimage_ssim(y_sr[..., None], y_hr[..., None], 255), abs=ROUNDING)
    assert m["psnr"] == pytest.approx(srm.psnr(sr, hr)) and m["identity_cosine"] == pytest.approx(1.0)
