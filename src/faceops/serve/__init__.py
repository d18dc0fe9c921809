"""Serving: the local Triton launcher, the face client (embed / verify / identify) and galleries."""

from faceops.serve.client import (
    ClientError,
    FaceClient,
    InvalidInputError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServerUnavailableError,
    VerifyResult,
)
from faceops.serve.gallery import Gallery, Match, build_gallery, threshold_from_metrics
from faceops.serve.local import LocalServeConfig, LocalTriton, ServerError, materialise

__all__ = [
    "ClientError", "FaceClient", "Gallery", "InvalidInputError", "LocalServeConfig", "LocalTriton", "Match",
    "ModelNotFoundError", "RequestTimeoutError", "ServerError", "ServerUnavailableError", "VerifyResult",
    "build_gallery", "materialise", "threshold_from_metrics",
]
