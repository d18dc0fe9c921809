"""Evaluation: verification, identification and super-resolution metrics, LFW pairs, the report.

``evaluate(...)`` is the one entry point the CLI, the KFP component and tests call; the metric
functions are pure NumPy and usable on their own.
"""

from faceops.evaluate.identification import (
    GallerySplit,
    gallery_probe_split,
    identification_metrics,
    rank_accuracies,
)
from faceops.evaluate.models import (
    Embedder,
    ModelError,
    SuperResolver,
    load_embedder,
    load_super_resolver,
    super_resolvers_by_size,
)
from faceops.evaluate.pairs import (
    Pair,
    PairList,
    PairsError,
    ResolvedPairs,
    image_path,
    parse_pairs,
    resolve_pairs,
)
from faceops.evaluate.runner import (
    METRICS_FILE,
    SETTINGS,
    EvalConfig,
    evaluate,
    flatten_metrics,
    summary_table,
)
from faceops.evaluate.sr_metrics import identity_cosine, psnr, sr_metrics, ssim
from faceops.evaluate.verification import (
    FAR_TARGETS,
    Roc,
    auc,
    best_threshold,
    eer,
    kfold_accuracy,
    make_folds,
    roc_curve,
    tar_at_far,
    verification_metrics,
)

__all__ = [
    "FAR_TARGETS", "METRICS_FILE", "SETTINGS", "Embedder", "EvalConfig", "GallerySplit", "ModelError", "Pair",
    "PairList", "PairsError", "ResolvedPairs", "Roc", "SuperResolver", "auc", "best_threshold", "eer",
    "evaluate", "flatten_metrics", "gallery_probe_split", "identification_metrics", "identity_cosine",
    "image_path", "kfold_accuracy", "load_embedder", "load_super_resolver", "make_folds", "parse_pairs",
    "psnr", "rank_accuracies", "resolve_pairs", "roc_curve", "sr_metrics", "ssim", "summary_table",
    "super_resolvers_by_size", "tar_at_far", "verification_metrics",
]
