"""``faceops export``: checkpoints -> ONNX (+INT8, +TensorRT) -> parity gate -> Triton repository.

Instances are KIND_GPU only for a Triton with GPUs: export.instance_kind=auto (the default) follows
FACEOPS_TRITON_GPUS, which the chart's ConfigMap sets from triton.gpu.count (unset: KIND_CPU). GPU
configs let Triton build TensorRT engines itself (export.gpu_accelerator); every model warms up on load.
"""

from __future__ import annotations

import argparse
import json

from faceops.cli._common import add_config_args


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export models to ONNX/INT8/TensorRT and a Triton repository",
                              description=__doc__)
    p.add_argument("--model", required=True, metavar="MODEL", help="recognizer checkpoint (path or URI)")
    p.add_argument("--dsr", action="append", default=[], metavar="DSR_MODEL",
                   help="DSR checkpoint (repeatable, one per VLR size); adds dsr + the vlr_face ensemble")
    p.add_argument("--format", dest="formats", action="append", choices=["onnx"], default=None,
                   help="export format (onnx; INT8 and TensorRT are --int8 / --trt on top of it)")
    p.add_argument("--int8", action="store_true", help="also an INT8 model, calibrated on --dataset")
    p.add_argument("--trt", action="store_true",
                   help="also offline TensorRT engines (tensorrt_plan), parity-gated; needs a CUDA device and "
                        "the tensorrt package, else an error. Not needed for GPU serving: GPU configs let "
                        "Triton build the engines itself (export.gpu_accelerator=tensorrt)")
    p.add_argument("--dataset", metavar="URI", help="dataset whose val split gives parity/calibration faces; "
                   "it must be prepared as the model was trained (its input contract), else an error names both")
    p.add_argument("--repo", required=True, metavar="URI", help="Triton model repository (path or s3://)")
    add_config_args(p, "export", "export.opset=18")
    p.set_defaults(func=main)

    r = subparsers.add_parser(
        "rollback", help="serve an earlier version of a model in a Triton repository",
        description="Serve VERSION of MODEL (a version the repository still holds) instead of its newest: its "
        "config.pbtxt's version policy is set to it (versions an ensemble pins stay served), under the same "
        "lock as publishing; a Triton polling the repository switches at its next poll. Prints where the "
        "version came from (its provenance: run id, dataset content hash, headline figures).")
    r.add_argument("model", metavar="MODEL", help="served model name, e.g. recognizer")
    r.add_argument("version", type=int, metavar="VERSION")
    r.add_argument("--repo", required=True, metavar="URI", help="Triton model repository (path or s3://)")
    r.set_defaults(func=run_rollback)


def run_rollback(args: argparse.Namespace) -> int:
    from faceops.export.triton_repo import rollback
    from faceops.storage import open_store

    provenance = rollback(open_store(args.repo), args.model, args.version)
    print(f"{args.model}: now serving version {args.version} from {args.repo}")
    for key, value in sorted(provenance.items()):
        print(f"  {key:<32} {value}")
    if not provenance:
        print("  (no provenance recorded for this version: published before faceops recorded it)")
    return 0


def main(args: argparse.Namespace) -> int:
    from faceops.config import load
    from faceops.export import ExportConfig, export_model

    cfg = load(ExportConfig, args.config, args.overrides, section="export")
    report = export_model(args.model, args.repo, formats=args.formats or ["onnx"], int8=args.int8,
                          trt=args.trt, dsr_uri=args.dsr or None, calib_dataset=args.dataset, cfg=cfg)
    print(json.dumps(report, indent=2))
    return 0
