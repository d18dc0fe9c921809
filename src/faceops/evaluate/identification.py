"""Closed-set identification (rank-k) with a gallery/probe split per identity.

Per identity with at least two images, a seeded permutation puts the first ``gallery_per_identity``
images in the gallery and the rest become probes. Identities with a single image are gallery-only
distractors: they cannot be probed but make the search harder (a held-out split holds its
single-image people for this). A probe is correct at rank k when its identity is among the k
gallery identities most similar to it (an identity scores the best cosine of its gallery images).
Each rank-k rate comes with its binomial standard error, sqrt(p (1 - p) / probes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RANKS = (1, 5)


@dataclass(frozen=True)
class GallerySplit:
    gallery: np.ndarray  # indices of gallery images
    probes: np.ndarray  # indices of probe images


def gallery_probe_split(labels: np.ndarray | Sequence[int], gallery_per_identity: int = 1,
                        seed: int = 0) -> GallerySplit:
    """Seeded split; identities with <= ``gallery_per_identity`` images stay wholly in the gallery."""
    if gallery_per_identity < 1:
        raise ValueError(f"gallery_per_identity must be >= 1, got {gallery_per_identity}")
    y = np.asarray(labels).ravel()
    rng = np.random.default_rng(seed)
    gallery, probes = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        gallery.extend(idx[:gallery_per_identity])
        probes.extend(idx[gallery_per_identity:])
    return GallerySplit(np.sort(np.asarray(gallery, dtype=np.int64)),
                        np.sort(np.asarray(probes, dtype=np.int64)))


def rank_accuracies(embeddings: np.ndarray, labels: np.ndarray | Sequence[int], split: GallerySplit,
                    ranks: Sequence[int] = RANKS) -> dict[int, float]:
    """{k: fraction of probes whose identity is in the top k} on L2-normalised embeddings."""
    y = np.asarray(labels).ravel()
    if split.probes.size == 0:
        raise ValueError("identification needs probes: no identity has more than one image")
    emb = np.asarray(embeddings, dtype=np.float64)
    sim = emb[split.probes] @ emb[split.gallery].T  # [P, G]
    ids, gal_id = np.unique(y[split.gallery], return_inverse=True)
    per_id = np.full((split.probes.size, ids.size), -np.inf)
    np.maximum.at(per_id.T, gal_id, sim.T)  # best gallery image per identity
    probe_pos = np.searchsorted(ids, y[split.probes])
    true_score = per_id[np.arange(split.probes.size), probe_pos]
    # rank of the true identity = 1 + identities scoring strictly higher (ties in its favour)
    rank = 1 + (per_id > true_score[:, None]).sum(axis=1)
    return {k: float(np.mean(rank <= k)) for k in ranks}


def binomial_se(p: float, n: int) -> float:
    """Standard error of a rate ``p`` measured on ``n`` independent trials."""
    if n < 1:
        raise ValueError(f"a standard error needs at least one trial, got {n}")
    return float(np.sqrt(p * (1.0 - p) / n))


def identification_metrics(embeddings: np.ndarray, labels: np.ndarray | Sequence[int],
                           gallery_per_identity: int = 1, seed: int = 0) -> dict:
    """The ``identification`` block of metrics.json: rank-1/5 with standard errors, and the protocol's
    size (probes, gallery identities, of which ``distractors`` have no probe)."""
    y = np.asarray(labels).ravel()
    split = gallery_probe_split(y, gallery_per_identity, seed)
    r = rank_accuracies(embeddings, y, split, RANKS)
    n = int(split.probes.size)
    gallery_ids = np.unique(y[split.gallery])
    return {
        "rank1": r[1],
        "rank1_se": binomial_se(r[1], n),
        "rank5": r[5],
        "rank5_se": binomial_se(r[5], n),
        "probes": n,
        "gallery_identities": int(gallery_ids.size),
        "distractors": int(np.setdiff1d(gallery_ids, y[split.probes]).size),
    }
