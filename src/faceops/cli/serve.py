"""Serving commands: ``serve`` (local Triton), ``embed``, ``verify``, ``identify``, ``gallery build``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from faceops.errors import FaceopsError

DEFAULT_URL = "127.0.0.1:8001"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a Triton model repository with the local Triton server",
                              description="Start the Triton bundled in nvidia-pytriton on a faceops model "
                              "repository (each ONNX model served through ONNX Runtime), wait until ready, "
                              "print the endpoints and run until Ctrl-C / SIGTERM.")
    p.add_argument("--repo", default=os.environ.get("FACEOPS_MODEL_REPO"), metavar="URI",
                   help="model repository written by 'faceops export' (default: $FACEOPS_MODEL_REPO)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime threads per model instance")
    p.add_argument("--instances", type=int, default=1, help="CPU instances per model")
    p.set_defaults(func=serve_main)

    p = subparsers.add_parser("embed", help="embed face images through the Triton server")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", metavar="FILE.npy", help="save the [N,512] embeddings here instead of printing")
    _client_args(p)
    p.set_defaults(func=embed_main)

    p = subparsers.add_parser("verify", help="are two face images the same person?")
    p.add_argument("image1", metavar="IMAGE1")
    p.add_argument("image2", metavar="IMAGE2")
    p.add_argument("--threshold", type=float, help="cosine threshold (default: from --metrics)")
    p.add_argument("--metrics", metavar="FILE", help="an evaluation's metrics.json (verification.threshold)")
    _client_args(p)
    p.set_defaults(func=verify_main)

    p = subparsers.add_parser("identify", help="who is this? top-k identities of a gallery")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--gallery", required=True, metavar="URI", help="gallery npz from 'faceops gallery build'")
    p.add_argument("--top-k", type=int, default=5)
    _client_args(p)
    p.set_defaults(func=identify_main)

    p = subparsers.add_parser("gallery", help="identification galleries")
    sub = p.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="embed a dataset split and store embeddings + labels (npz)")
    b.add_argument("dataset", metavar="DATASET_URI")
    b.add_argument("--out", required=True, metavar="URI", help="where to store the gallery npz")
    b.add_argument("--split", default="test", help="dataset split to enrol (default test)")
    _client_args(b)
    b.set_defaults(func=gallery_build_main)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("FACEOPS_TRITON_URL", DEFAULT_URL),
                   help=f"Triton endpoint host:port (default $FACEOPS_TRITON_URL or {DEFAULT_URL})")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries while the server is unavailable")
    p.add_argument("--model", default="recognizer", metavar="NAME",
                   help="the served HR recognizer (default recognizer, vlr_face's; arcface_resnet34 serves its own)")
    p.add_argument("--vlr", action="store_true", help="treat the images as very-low-resolution (the VLR model)")
    p.add_argument("--vlr-model", metavar="NAME",
                   help="the served VLR ensemble to use (pipelines serve one per size: vlr_face_32x32, "
                   "vlr_face_14x16, ...); default: the server's only one")
    p.add_argument("--dataset", metavar="URI", help="expect the served model to take faces prepared as this "
                   "dataset's were (its manifest's crop/size): an error names both if it does not. Faces are "
                   "always prepared as the served model's input contract says; for a model serving without "
                   "one, this is what it is assumed to take (default: ingest's defaults)")


def _client(args: argparse.Namespace):
    from faceops.serve import FaceClient

    return FaceClient(args.url, protocol=args.protocol, timeout=args.timeout, retries=args.retries,
                      prepare=_prepare_config(args.dataset), recognizer=args.model, vlr_model=args.vlr_model)


def _prepare_config(dataset: str | None):
    """The preparation ``--dataset`` states (None: none stated; the served model's contract decides)."""
    if not dataset:
        return None
    from faceops.models.contract import dataset_contract

    return dataset_contract(dataset).prepare_config()


def _vlr(args) -> bool | None:
    return True if args.vlr else None


def serve_main(args: argparse.Namespace) -> int:
    from faceops.serve import LocalServeConfig, LocalTriton, ServerError

    if not args.repo:
        raise FaceopsError("faceops serve needs --repo URI (or $FACEOPS_MODEL_REPO): the repository "
                           "written by 'faceops export'")
    cfg = LocalServeConfig(host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                           metrics_port=args.metrics_port, ort_threads=args.ort_threads,
                           instance_count=args.instances)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalTriton(args.repo, cfg) as server:
        print(f"serving {args.repo}: models {', '.join(server.models)}")
        print(f"  gRPC    {server.grpc_url}\n  HTTP    http://{server.http_url}\n"
              f"  metrics {server.metrics_url}")
        print("Ctrl-C or SIGTERM stops the server", flush=True)
        while not stop.is_set() and server.running():
            stop.wait(0.5)
        if not stop.is_set():
            raise ServerError(f"tritonserver exited unexpectedly:\n{server.log_tail()}")
    print("server stopped")
    return 0


def embed_main(args: argparse.Namespace) -> int:
    import numpy as np

    embeddings = _client(args).embed(args.images, vlr=_vlr(args))
    if args.out:
        np.save(args.out, embeddings)
        print(f"saved {embeddings.shape[0]} embeddings [{embeddings.shape[1]}] to {args.out}")
        return 0
    for path, e in zip(args.images, embeddings, strict=True):
        print(json.dumps({"image": path, "embedding": [round(float(v), 6) for v in e]}))
    return 0


def verify_main(args: argparse.Namespace) -> int:
    from faceops.serve import threshold_from_metrics

    if args.threshold is None and not args.metrics:
        raise FaceopsError("verify needs a threshold: --threshold T, or --metrics METRICS.json from "
                           "'faceops evaluate' (verification.threshold)")
    threshold = args.threshold if args.threshold is not None else threshold_from_metrics(args.metrics)
    result = _client(args).verify(args.image1, args.image2, threshold, vlr=_vlr(args))
    verdict = "same person" if result.same else "different people"
    op = ">=" if result.same else "<"
    print(f"{verdict}: score {result.score:.4f} {op} threshold {result.threshold:.4f}")
    return 0


def identify_main(args: argparse.Namespace) -> int:
    matches = _client(args).identify(args.image, args.gallery, top_k=args.top_k, vlr=_vlr(args))
    for rank, m in enumerate(matches, 1):
        print(f"{rank}. {m.identity}  score {m.score:.4f}  ({m.image_id})")
    return 0


def gallery_build_main(args: argparse.Namespace) -> int:
    from faceops.serve import build_gallery

    gallery = build_gallery(_client(args), args.dataset, split=args.split, vlr=_vlr(args))
    uri = gallery.save(args.out)
    print(f"gallery of {len(gallery.labels)} images, {len(gallery.identities)} identities -> {uri}")
    return 0
