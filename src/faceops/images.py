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


TRAINER_IMAGE_ENV = "FACEOPS_TRAINER_IMAGE"  # set on GPU steps: the image a multi-node job runs


def image(role: str, registry: str | None = None, tag: str | None = None) -> str:
    """Full image reference for ``role`` (e.g. ``ghcr.io/faceops/faceops-trainer:0.1.0``).

    ``registry``/``tag`` come from the cluster config (``cluster.image_registry``/``image_tag``, what
    compile and submit use); without them ``FACEOPS_IMAGE_REGISTRY``/``FACEOPS_IMAGE_TAG``, then the
    defaults. The chart's ``image.registry``/``image.tag`` must name the same (`make images push`).
    """
    if role not in IMAGES:
        raise KeyError(f"unknown image role {role!r} (known: {', '.join(IMAGES)})")
    registry = (registry or os.environ.get("FACEOPS_IMAGE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")
    tag = tag or os.environ.get("FACEOPS_IMAGE_TAG") or __version__
    return f"{registry}/{IMAGES[role]}:{tag}"
