"""Triton client for faces: ``FaceClient.embed / verify / identify`` over gRPC (or HTTP).

Faces are prepared as the served model's input contract says (:mod:`faceops.models.contract`, read
from its ``config.pbtxt`` parameters): ingest's own :func:`~faceops.data.prepare.prepare_face` with the
crop and size the model was trained with, then its normalisation, so served embeddings match
evaluated ones. Images whose both sides are below the HR size (e.g. 32x32 crops; ORL's 92x112 is HR)
are VLR and go to the VLR ensemble, resized to its input size: ``vlr_model``, or else the one the
server has (``vlr_face``, or a pipeline's single ``vlr_face_<WxH>``; with several sizes served the
client asks which); ``vlr=True`` degrades HR faces
the way the DSR model's training faces were. Server errors become :class:`ClientError` subclasses
that name the URL, model and what was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from PIL import Image

from faceops.data.degrade import degrade
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.errors import FaceopsError
from faceops.models.contract import InputContract, assume, explicit_fields, resolve, triton_contract
from faceops.models.embed import embed_faces
from faceops.retry import Backoff, retry_call
from faceops.serve.gallery import Gallery, Match

ImageLike = str | Path | Image.Image | np.ndarray
T = TypeVar("T")

RECOGNIZER = "recognizer"
VLR_MODEL = "vlr_face"  # `faceops export` with one DSR model; pipelines serve vlr_face_<WxH> per VLR size


class ClientError(FaceopsError):
    """A request to the Triton server failed; the message names the URL and model."""


class ServerUnavailableError(ClientError):
    """The server cannot be reached (down, wrong URL) even after retries."""


class ModelNotFoundError(ClientError):
    """The server does not serve the requested model."""


class InvalidInputError(ClientError):
    """The server rejected the input (shape or dtype differs from the model's)."""


class RequestTimeoutError(ClientError):
    """The server did not answer within the client timeout."""


@dataclass(frozen=True)
class VerifyResult:
    score: float  # cosine similarity of the two embeddings
    same: bool  # score >= threshold
    threshold: float


class FaceClient:
    """Embeds, verifies and identifies faces against a Triton server (local or cluster).

    ``prepare`` states the preparation the caller expects (a config: every field; a mapping: the keys
    given): a served model whose input contract contradicts it is an error naming both values, and a
    model serving without a contract is assumed to take it (ingest's defaults when not given).
    Thread-safe: each thread gets its own underlying tritonclient connection.
    """

    def __init__(self, url: str = "127.0.0.1:8001", protocol: Literal["grpc", "http"] = "grpc",
                 timeout: float = 10.0, retries: int = 3, retry_backoff_s: float = 0.25,
                 batch_size: int = 32, prepare: PrepareConfig | Mapping[str, Any] | None = None,
                 recognizer: str = RECOGNIZER, vlr_model: str | None = None):
        if protocol not in ("grpc", "http"):
            raise ClientError(f"protocol {protocol!r} is not one of grpc, http")
        if retries < 0 or retry_backoff_s < 0:
            raise ClientError(f"retries ({retries}) and retry_backoff_s ({retry_backoff_s}) must be >= 0")
        self.url, self.protocol, self.timeout = url, protocol, timeout
        self.retries, self.retry_backoff_s, self.batch_size = retries, retry_backoff_s, batch_size
        self.stated = explicit_fields(prepare)
        self.recognizer, self._vlr_model = recognizer, vlr_model
        self._local = threading.local()
        self._vlr_size: tuple[int, int] | None = None
        self._contracts: dict[str, InputContract] = {}

    # -- transport ----------------------------------------------------------------------------
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc

                client = tc.InferenceServerClient(self.url)
            else:
                import tritonclient.http as tc

                client = tc.InferenceServerClient(self.url, connection_timeout=self.timeout,
                                                  network_timeout=self.timeout)
            self._local.client = client
        return client

    def _call(self, what: str, model: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on UNAVAILABLE; translate failures into ClientError subclasses."""
        from tritonclient.utils import InferenceServerException

        def attempt() -> T:
            try:
                return fn()
            except InferenceServerException as exc:
                raise self._translate(exc, what, model) from None
            except OSError as exc:  # HTTP transport: connection refused / reset
                raise ServerUnavailableError(f"Triton server at {self.url} ({self.protocol}) is "
                                             f"unreachable for {what}: {exc}") from None

        def give_up(error: Exception, attempts: int) -> None:
            if isinstance(error, ServerUnavailableError):
                raise ServerUnavailableError(f"{error} (after {attempts} attempts; is the server "
                                             f"running? start one with 'faceops serve')") from None

        backoff = Backoff(self.retries + 1, self.retry_backoff_s)
        return retry_call(attempt, backoff, retry_on=lambda error: isinstance(error, ServerUnavailableError),
                          give_up=give_up)

    def _translate(self, exc, what: str, model: str | None) -> ClientError:
        status, message = str(exc.status() or ""), str(exc.message() or exc)
        where = f"Triton {self.url} ({self.protocol}), {what}"
        low = message.lower()
        if model and ("unknown model" in low or "not found" in low or "is not ready" in low):
            return ModelNotFoundError(f"{where}: model '{model}' is not served ({message.strip()}); "
                                      f"check the name or export it with 'faceops export'")
        if "UNAVAILABLE" in status or "failed to connect" in low or "connection refused" in low:
            return ServerUnavailableError(f"{where}: server unreachable ({message.strip()})")
        if "DEADLINE_EXCEEDED" in status or "deadline exceeded" in low or "timed out" in low:
            return RequestTimeoutError(f"{where}: no answer within {self.timeout} s")
        if "INVALID_ARGUMENT" in status or "unexpected shape" in low or "data-type" in low or "400" in status:
            return InvalidInputError(f"{where}: input rejected: {message.strip()}")
        return ClientError(f"{where}: {status} {message.strip()}")

    def infer(self, model: str, x: np.ndarray, input_name: str = "input",
              output_name: str = "embedding") -> np.ndarray:
        """One raw request: ``x`` is sent as-is (float32 NCHW expected); returns ``output_name``."""
        from tritonclient.utils import np_to_triton_dtype

        tc = self._module()
        try:
            datatype = np_to_triton_dtype(x.dtype)
        except (KeyError, TypeError):
            datatype = None
        if datatype is None:
            raise InvalidInputError(f"{model}: numpy dtype {x.dtype} has no Triton equivalent; send float32")
        inp = tc.InferInput(input_name, list(x.shape), datatype)
        inp.set_data_from_numpy(np.ascontiguousarray(x))
        out = tc.InferRequestedOutput(output_name)
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        what = f"infer {model} {list(x.shape)} {datatype}"
        result = self._call(what, model, lambda: self._client().infer(model, [inp], outputs=[out], **kwargs))
        return result.as_numpy(output_name)

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        return tc

    def ready(self) -> bool:
        return bool(self._call("server ready", None, lambda: self._client().is_server_ready()))

    def model_metadata(self, model: str) -> dict:
        """The server's metadata of ``model`` (inputs/outputs with names, dtypes and shapes)."""
        return self._call(f"metadata of {model}", model,
                          lambda: self._client().get_model_metadata(model, as_json=True)
                          if self.protocol == "grpc" else self._client().get_model_metadata(model))

    @property
    def vlr_model(self) -> str:
        """The VLR ensemble to use: the one given, else the server's only one (read once)."""
        if self._vlr_model is None:
            def fetch():
                index = self._client().get_model_repository_index(**({"as_json": True} if self.protocol == "grpc"
                                                                      else {}))
                return index.get("models", []) if isinstance(index, dict) else index

            names = sorted({m["name"] for m in self._call("model index", None, fetch)
                            if m["name"] == VLR_MODEL or m["name"].startswith(f"{VLR_MODEL}_")})
            if VLR_MODEL in names or len(names) != 1:
                if len(names) > 1 and VLR_MODEL not in names:
                    raise ClientError(f"{self.url} serves several VLR ensembles ({', '.join(names)}): choose one "
                                      "with vlr_model= (CLI: --vlr-model)")
                self._vlr_model = VLR_MODEL  # absent: the request names it, and its error says so
            else:
                self._vlr_model = names[0]
        return self._vlr_model

    def model_input_shape(self, model: str) -> list[int]:
        """Input shape of ``model`` from the server's metadata (batch dim as -1)."""
        return [int(d) for d in self.model_metadata(model)["inputs"][0]["shape"]]

    def embedding_dim(self) -> int:
        """Width D of the recognizer's embedding, from the server's metadata."""
        return int(self.model_metadata(self.recognizer)["outputs"][0]["shape"][-1])

    def model_config(self, model: str) -> dict:
        """The server's config of ``model`` as JSON (``parameters`` hold its input contract)."""
        def fetch() -> dict:
            if self.protocol == "grpc":
                return self._client().get_model_config(model, as_json=True)["config"]
            return self._client().get_model_config(model)

        return self._call(f"config of {model}", model, fetch)

    def contract(self, model: str | None = None) -> InputContract:
        """The input contract of ``model`` (default: the recognizer), read once from the server;
        checked against ``prepare``. The ``vlr_face`` model without one is assumed to take the
        recognizer's faces, degraded by ingest's defaults to its input size."""
        model = model or self.recognizer
        if model not in self._contracts:
            where = f"Triton model '{model}' at {self.url}"
            params = self.model_config(model).get("parameters") or {}
            recorded = triton_contract(params, where)
            option = "the client's prepare option (--dataset)"
            if recorded is None and model == self.vlr_model:
                w, h = self.vlr_size()
                found = assume(where, None, option, base=self.contract(), vlr_size=f"{w}x{h}")
            else:
                found = resolve(recorded, where, self.stated, option)
            self._contracts[model] = found
        return self._contracts[model]

    @property
    def prepare(self) -> PrepareConfig:
        """The face preparation of the served recognizer (from its input contract)."""
        return self.contract().prepare_config()

    # -- faces --------------------------------------------------------------------------------
    def vlr_size(self) -> tuple[int, int]:
        """(w, h) of the ``vlr_face`` ensemble's input, read once from the server."""
        if self._vlr_size is None:
            _, _, h, w = self.model_input_shape(self.vlr_model)
            self._vlr_size = (w, h)
        return self._vlr_size

    def embed(self, images: Sequence[ImageLike] | np.ndarray, vlr: bool | None = None,
              prepared: bool = False) -> np.ndarray:
        """L2-normalised float32 [N, D] embeddings of ``images`` (paths, PIL images, uint8 arrays).

        ``vlr``: None routes each image by size; True sends every image through ``vlr_face``
        (degrading HR faces like the DSR model's training faces); False sends every image to the
        recognizer. Images are prepared per the model's input contract, unless ``prepared``: then HR
        ones are taken as already prepared faces (a dataset's, say) and must be of the contract's size.
        """
        items = [_load(item) for item in images]  # every file read before the server is asked anything
        if not items:
            return np.zeros((0, self.embedding_dim()), np.float32)
        hr_idx, hr_faces, vlr_idx, vlr_faces = [], [], [], []
        for i, item in enumerate(items):
            face, is_vlr = self._prepare(item, vlr, prepared)
            (vlr_idx if is_vlr else hr_idx).append(i)
            (vlr_faces if is_vlr else hr_faces).append(face)
        out: np.ndarray | None = None
        for idx, faces, model in ((hr_idx, hr_faces, self.recognizer), (vlr_idx, vlr_faces, self.vlr_model)):
            if not idx:
                continue
            emb = self._embed_batches(model, np.stack(faces))
            if out is None:
                out = np.zeros((len(items), emb.shape[1]), np.float32)
            out[idx] = emb
        return out

    def _embed_batches(self, model: str, faces: np.ndarray) -> np.ndarray:
        return embed_faces(lambda x: self.infer(model, x), faces, self.contract(model), batch_size=self.batch_size)

    def _prepare(self, img: Image.Image, vlr: bool | None, prepared: bool = False) -> tuple[np.ndarray, bool]:
        w, h = img.size
        contract = self.contract()
        hr = contract.hr_size
        is_vlr = (w < hr and h < hr) if vlr is None else vlr
        if prepared and (w >= hr or h >= hr) and (w, h) != (hr, hr):
            raise InvalidInputError(f"prepared faces must be {hr}x{hr} (the input contract of '{self.recognizer}' "
                                    f"at {self.url}: {contract.describe()}), got {w}x{h}")
        if not is_vlr:
            return (np.asarray(img.convert("RGB"), dtype=np.uint8) if prepared and (w, h) == (hr, hr)
                    else prepare_face(img, contract.prepare_config())), False
        vw, vh = self.vlr_size()
        size = f"{vw}x{vh}"
        if w >= hr or h >= hr:  # an HR face asked to go VLR: degrade it as the DSR model's faces were
            vlr_contract = self.contract(self.vlr_model)
            face = (np.asarray(img.convert("RGB"), dtype=np.uint8) if prepared
                    else prepare_face(img, vlr_contract.prepare_config()))
            return degrade(face, size, vlr_contract.degrade_config([size]), seed=0), True
        img = img.convert("RGB")
        if img.size != (vw, vh):
            img = img.resize((vw, vh), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8), True

    def verify(self, a: ImageLike, b: ImageLike, threshold: float, vlr: bool | None = None) -> VerifyResult:
        ea, eb = self.embed([a, b], vlr=vlr)
        score = float(np.dot(ea, eb))
        return VerifyResult(score, score >= threshold, float(threshold))

    def identify(self, image: ImageLike, gallery: Gallery | str, top_k: int = 5,
                 vlr: bool | None = None) -> list[Match]:
        """Top-``top_k`` gallery identities for ``image`` (a :class:`~faceops.serve.gallery.Gallery`
        or its URI)."""
        if not isinstance(gallery, Gallery):
            gallery = Gallery.load(str(gallery))
        gallery.check_contract(self.contract(), f"Triton model '{self.recognizer}' at {self.url}")
        return gallery.search(self.embed([image], vlr=vlr)[0], top_k)


def _load(item: ImageLike) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise InvalidInputError(f"image arrays must be uint8 HxW or HxWx3, got {item.dtype} {item.shape}")
        return Image.fromarray(item)
    path = Path(item)
    if not path.is_file():
        raise FaceopsError(f"image not found: {path} (check the path; nothing was sent to the server)")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises all three for broken files
        raise FaceopsError(f"{path} is not a readable image ({exc}): pass a face image file "
                           f"(JPEG, PNG, PGM, …); nothing was sent to the server") from None
