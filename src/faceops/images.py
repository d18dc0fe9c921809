"""The one place that names the container images and tags.

Components (``faceops.components``), the pipelines and the Helm chart read the image of each role
from here; ``images/<role>/Dockerfile`` builds it. Override the registry and tag for a deployment
with ``FACEOPS_IMAGE_REGISTRY`` / ``FACEOPS_IMAGE_TAG`` at compile time.
"""

from __future__ import annotations

import os

from faceops import __version__

#: role -> (image name, Dockerfile folder under images/)
IMAGES: dict[str, str] = {
    "trainer": "faceops-trainer",  # CUDA PyTorch + faceops: GPU training, evaluation, export
    "slim": "faceops-slim",  # CPU-only faceops: ingest, deploy and other light steps
    "triton": "faceops-triton",  # tritonserver with ONNX Runtime and TensorRT backends
}

DEFAULT_REGISTRY = "ghcr.io/faceops"


def image(role: str) -> str:
    """Full image reference for ``role`` (e.g. ``ghcr.io/faceops/faceops-trainer:0.1.0``)."""
    if role not in IMAGES:
        raise KeyError(f"unknown image role {role!r} (known: {', '.join(IMAGES)})")
    registry = os.environ.get("FACEOPS_IMAGE_REGISTRY", DEFAULT_REGISTRY).rstrip("/")
    tag = os.environ.get("FACEOPS_IMAGE_TAG", __version__)
    return f"{registry}/{IMAGES[role]}:{tag}"
