"""Super-resolution quality: PSNR, SSIM and identity cosine, on images scaled to [0, 1].

PSNR and SSIM are given on RGB and, as face-SR papers report them, on the luma channel Y of
ITU-R BT.601 (MATLAB's ``rgb2ycbcr``, BasicSR's ``test_y_channel``): ``Y = (16 + 65.481 R + 128.553 G
+ 24.966 B) / 255`` with R, G, B in [0, 1], unrounded, data range 1, no border crop.

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to structural
similarity"): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, population
statistics, 'valid' filtering (no padding); colour images average the per-channel maps. This
matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)`` away from the border.
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: BT.601 luma from RGB in [0, 1], and its offset, both on the 0-255 scale (MATLAB ``rgb2ycbcr``)
Y_WEIGHTS = np.array([65.481, 128.553, 24.966])
Y_OFFSET = 16.0
CHUNK = 64  # images converted to float at a time (bounded memory for large test sets)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] -> float64 [0, 1]."""
    x = np.asarray(images)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape-checked batches [N, H, W, C] (a single [H, W, C] image becomes a batch of one)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"expected images [N, H, W, C] or [H, W, C], got shape {a.shape}")
    return a, b


def _per_image(fn, a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """``fn`` on [0, 1] float chunks (bounded memory for large test sets), concatenated."""
    return np.concatenate([fn(to_unit(a[i : i + chunk]), to_unit(b[i : i + chunk]))
                           for i in range(0, a.shape[0], chunk)])


def psnr(a: np.ndarray, b: np.ndarray, max_db: float = 100.0) -> float:
    """Mean over images of 10 log10(1 / MSE); identical images count as ``max_db``."""
    a, b = _pair(a, b)
    mse = _per_image(lambda x, y: ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1), a, b)
    with np.errstate(divide="ignore"):
        db = np.where(mse > 0, -10.0 * np.log10(np.maximum(mse, 1e-300)), max_db)
    return float(np.minimum(db, max_db).mean())


def gaussian_kernel(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    k = np.exp(-(x**2) / (2.0 * sigma**2))
    return k / k.sum()


def _filter_valid(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [N, H, W, C] over H and W."""
    n = k.size
    h = sum(k[i] * x[:, i : x.shape[1] - n + 1 + i] for i in range(n))
    return sum(k[i] * h[:, :, i : h.shape[2] - n + 1 + i] for i in range(n))


def _ssim_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    k = gaussian_kernel()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a**2
    var_b = _filter_valid(b * b, k) - mu_b**2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).reshape(a.shape[0], -1).mean(axis=1)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over images, pixels and channels (Gaussian window, standard constants)."""
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape[1:3]}")
    return float(_per_image(_ssim_per_image, a, b).mean())


def luma(images: np.ndarray) -> np.ndarray:
    """RGB images [N, H, W, 3] (uint8 or [0, 1]) -> BT.601 Y in [0, 1], one channel [N, H, W, 1]."""
    x = np.asarray(images)
    return np.concatenate([((to_unit(x[i : i + CHUNK]) @ Y_WEIGHTS + Y_OFFSET) / 255.0)[..., None]
                           for i in range(0, x.shape[0], CHUNK)])


def identity_cosine(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """Mean cosine between matching rows (e.g. recognizer(SR image) vs recognizer(HR image))."""
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {a.shape} vs {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)))


def sr_metrics(sr: np.ndarray, hr: np.ndarray, sr_emb: np.ndarray, hr_emb: np.ndarray) -> dict:
    """The ``super_resolution`` block of metrics.json (SR images against the HR originals)."""
    sr_y, hr_y = luma(sr), luma(hr)
    return {"psnr": psnr(sr, hr), "ssim": ssim(sr, hr), "psnr_y": psnr(sr_y, hr_y), "ssim_y": ssim(sr_y, hr_y),
            "identity_cosine": identity_cosine(sr_emb, hr_emb)}
