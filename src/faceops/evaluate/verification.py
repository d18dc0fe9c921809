"""Face verification metrics in pure NumPy: ROC, EER, AUC, TAR@FAR and fold-wise accuracy.

Scores are similarities (higher = more likely the same person, e.g. cosine); ``genuine`` flags the
same-person pairs. Modelled on insightface ``eval/verification.py`` (thresholds are chosen on the
training folds only), without its image decoding or printing.

Conventions (documented because they change the figures):

* a pair is accepted when ``score >= threshold``;
* TAR at FAR is **conservative**: the highest TAR among thresholds whose FAR is <= the target (no
  interpolation), so with fewer than ``1/target`` impostor pairs it is the TAR at FAR = 0;
* EER is interpolated linearly between the two operating points where FRR - FAR changes sign;
* accuracy is k-fold (LFW protocol): for each fold the threshold maximising accuracy on the other
  folds is applied to it; the reported accuracy and threshold are the means over folds. Without
  folds, the threshold comes from a separate validation score set when one is given;
* ``accuracy_se`` is the standard error of that mean, the sample standard deviation of the fold
  accuracies over sqrt(folds), as LFW's README (section 4) defines it; with a validation threshold
  the same threshold is scored on seeded folds to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: FAR targets reported under ``tar_at_far``; the keys are the strings in metrics.json.
FAR_TARGETS: dict[str, float] = {"1e-2": 1e-2, "1e-3": 1e-3, "1e-4": 1e-4}


@dataclass(frozen=True)
class Roc:
    """Operating points, thresholds descending (the first accepts nothing: FAR = TAR = 0)."""

    thresholds: np.ndarray
    far: np.ndarray  # false accept rate: impostor pairs with score >= threshold / impostor pairs
    tar: np.ndarray  # true accept rate: genuine pairs with score >= threshold / genuine pairs

    @property
    def frr(self) -> np.ndarray:
        return 1.0 - self.tar


def _check(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool]) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(genuine, dtype=bool).ravel()
    if s.shape != g.shape:
        raise ValueError(f"scores ({s.size}) and genuine flags ({g.size}) differ in length")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or Inf (a collapsed or broken model?)")
    if g.all() or not g.any():
        raise ValueError(f"verification needs genuine and impostor pairs; got {int(g.sum())} genuine of "
                         f"{g.size}")
    return s, g


def roc_curve(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool]) -> Roc:
    """One operating point per distinct score (plus the reject-all point)."""
    s, g = _check(scores, genuine)
    order = np.argsort(-s, kind="stable")
    s, g = s[order], g[order]
    last_of_value = np.r_[np.diff(s) != 0, True]  # ties are accepted together
    tp = np.cumsum(g)[last_of_value]
    fp = np.cumsum(~g)[last_of_value]
    thresholds = np.r_[np.inf, s[last_of_value]]
    return Roc(thresholds=thresholds, far=np.r_[0.0, fp / (~g).sum()], tar=np.r_[0.0, tp / g.sum()])


def auc(roc: Roc) -> float:
    """Area under TAR(FAR) by the trapezoid rule (FAR ascends along the curve)."""
    return float(np.sum(np.diff(roc.far) * (roc.tar[1:] + roc.tar[:-1]) / 2.0))


def eer(roc: Roc) -> float:
    """Equal error rate: where FAR = FRR, linearly interpolated between operating points."""
    diff = roc.frr - roc.far  # starts at 1 (accept nothing), ends at -1 (accept everything)
    i = int(np.argmax(diff <= 0))  # first point where FRR <= FAR
    if diff[i] == 0 or i == 0:
        return float(roc.far[i])
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1)
    return float(roc.far[i - 1] + t * (roc.far[i] - roc.far[i - 1]))


def tar_at_far(roc: Roc, target: float) -> float:
    """Conservative TAR at FAR <= ``target`` (see the module docstring)."""
    ok = roc.far <= target + 1e-12
    return float(roc.tar[ok].max())


def accuracy_at(scores: np.ndarray, genuine: np.ndarray, threshold: float) -> float:
    return float(np.mean((scores >= threshold) == genuine))


def best_threshold(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool]) -> tuple[float,
                                                                                                       float]:
    """(threshold, accuracy) maximising accuracy on these pairs.

    Candidates are midpoints between consecutive distinct scores (and one beyond each end), so the
    threshold sits in a gap rather than on a sample; ties go to the lowest candidate.
    """
    s, g = _check(scores, genuine)
    u = np.unique(s)
    candidates = np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2.0, u[-1] + 1.0]
    # accepted(t) = score >= t: count genuine above and impostors below each candidate
    order = np.sort(s[g])
    imp = np.sort(s[~g])
    tp = order.size - np.searchsorted(order, candidates, side="left")
    tn = np.searchsorted(imp, candidates, side="left")
    acc = (tp + tn) / s.size
    i = int(np.argmax(acc))
    return float(candidates[i]), float(acc[i])


def make_folds(genuine: np.ndarray | Sequence[bool], n_folds: int, seed: int = 0) -> np.ndarray:
    """Fold id per pair: genuine and impostor pairs spread evenly over ``n_folds`` (seeded)."""
    g = np.asarray(genuine, dtype=bool)
    rng = np.random.default_rng(seed)
    folds = np.empty(g.size, dtype=np.int64)
    for mask in (g, ~g):
        idx = np.flatnonzero(mask)
        folds[rng.permutation(idx)] = np.arange(idx.size) % n_folds
    return folds


def fold_accuracies(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool],
                    folds: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, threshold) of each fold, each fold's threshold chosen on the other folds."""
    s, g = _check(scores, genuine)
    f = np.asarray(folds).ravel()
    if f.shape != s.shape:
        raise ValueError(f"fold ids ({f.size}) and scores ({s.size}) differ in length")
    accs, thresholds = [], []
    for fold in np.unique(f):
        test, train = f == fold, f != fold
        if not train.any():
            raise ValueError("k-fold accuracy needs at least two folds")
        t, _ = best_threshold(s[train], g[train])
        accs.append(accuracy_at(s[test], g[test], t))
        thresholds.append(t)
    return np.asarray(accs), np.asarray(thresholds)


def kfold_accuracy(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool],
                   folds: np.ndarray | Sequence[int]) -> tuple[float, float]:
    """(mean accuracy, mean threshold) over folds, each fold's threshold chosen on the others."""
    accs, thresholds = fold_accuracies(scores, genuine, folds)
    return float(np.mean(accs)), float(np.mean(thresholds))


def standard_error(fold_values: np.ndarray | Sequence[float]) -> float:
    """Standard error of the mean of per-fold figures: sample std / sqrt(folds) (LFW README, 4)."""
    v = np.asarray(fold_values, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"a standard error needs at least two folds, got {v.size}")
    return float(np.std(v, ddof=1) / np.sqrt(v.size))


def seeded_folds(genuine: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """:func:`make_folds` with no more folds than either kind has pairs, so each fold holds both."""
    k = max(2, min(n_folds, int(genuine.sum()), int((~genuine).sum())))
    return make_folds(genuine, k, seed)


def verification_metrics(scores: np.ndarray | Sequence[float], genuine: np.ndarray | Sequence[bool], *,
                         folds: np.ndarray | Sequence[int] | None = None,
                         val_scores: np.ndarray | Sequence[float] | None = None,
                         val_genuine: np.ndarray | Sequence[bool] | None = None,
                         n_folds: int = 10, seed: int = 0) -> dict:
    """The ``verification`` block of metrics.json.

    Accuracy protocol, first that applies: the given ``folds`` (an LFW pairs file's own); else the
    best threshold on ``val_scores``/``val_genuine`` applied to these pairs; else ``n_folds`` seeded,
    balanced folds (the held-out protocol). ``accuracy_se`` is the standard error of ``accuracy``,
    ``pairs`` and ``folds`` say how many pairs and folds it rests on.
    """
    s, g = _check(scores, genuine)
    roc = roc_curve(s, g)
    if folds is not None:
        accs, thresholds = fold_accuracies(s, g, folds)
        acc, threshold = float(np.mean(accs)), float(np.mean(thresholds))
    elif val_scores is not None and val_genuine is not None:
        threshold, _ = best_threshold(val_scores, val_genuine)
        acc = accuracy_at(s, g, threshold)
        f = seeded_folds(g, n_folds, seed)
        accs = np.array([accuracy_at(s[f == k], g[f == k], threshold) for k in np.unique(f)])
    else:
        f = seeded_folds(g, n_folds, seed)
        accs, thresholds = fold_accuracies(s, g, f)
        acc, threshold = float(np.mean(accs)), float(np.mean(thresholds))
    return {
        "accuracy": acc,
        "accuracy_se": standard_error(accs),
        "eer": eer(roc),
        "auc": auc(roc),
        "tar_at_far": {key: tar_at_far(roc, far) for key, far in FAR_TARGETS.items()},
        "threshold": threshold,
        "pairs": int(s.size),
        "folds": int(accs.size),
    }
