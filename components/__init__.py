"""KFP v2 components, one per stage: thin typed wrappers that call :mod:`faceops.stages`.

Each component runs the same function as the CLI and the tests; artifacts carry the store URI of
what a stage produced in ``metadata['uri']``. Images come from :func:`faceops.images.image`.
"""

from faceops.components.stages import (
    deploy,
    evaluate,
    evaluate_vlr,
    export,
    export_vlr,
    finetune_bicubic,
    finetune_edgeface,
    ingest,
    promote,
    promotion_gate,
    run_root,
    train_dsr,
    train_recognizer,
    vlr_roc,
)

__all__ = ["deploy", "evaluate", "evaluate_vlr", "export", "export_vlr", "finetune_bicubic", "finetune_edgeface",
           "ingest", "promote", "promotion_gate", "run_root", "train_dsr", "train_recognizer", "vlr_roc"]
