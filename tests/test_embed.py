"""The one embedding path (faceops.models.embed): the numbers each former copy computed, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from faceops.data.tensors import to_input
from faceops.models.contract import InputContract
from faceops.models.embed import EmbeddingError, embed_faces, module_forward

FACES = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)


def linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))


def numpy_forward(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1)[:, :6] * np.arange(1, 7, dtype=np.float32)


@pytest.mark.parametrize("contract", [None, InputContract(channel_order="BGR", mean=0.4, std=0.3)])
def test_raw_embeddings_are_the_backend_outputs_per_batch(contract: InputContract | None) -> None:
    """What the Triton client and the INT8 gate computed: the backend on each prepared batch, concatenated."""
    prepare = contract or InputContract()
    expected = np.concatenate([numpy_forward(prepare.to_input(FACES[i:i + 3])) for i in range(0, len(FACES), 3)])
    got = embed_faces(numpy_forward, FACES, contract, batch_size=3)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(embed_faces(numpy_forward, FACES, contract, batch_size=100), expected)


def test_normalised_flip_embeddings_sum_then_normalise_in_float64() -> None:
    """What evaluation computed: raw embeddings of a face and its mirror summed in float64, then L2-normalised."""
    x = to_input(FACES).numpy()
    total = numpy_forward(x).astype(np.float64) + numpy_forward(np.ascontiguousarray(x[..., ::-1])).astype(np.float64)
    expected = (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)
    got = embed_faces(numpy_forward, FACES, batch_size=2, flip=True, normalise=True)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_module_forward_matches_training_validation_exactly() -> None:
    """Training's ``embed_arrays``: to_input, the optional input map, the model, float32 on the CPU."""
    model, input_fn = linear_net(), nn.Tanh()
    with torch.no_grad():
        expected = torch.cat([model(input_fn(to_input(FACES[i:i + 4]))).float() for i in range(0, len(FACES), 4)])
    forward = module_forward(model, torch.device("cpu"), input_fn=input_fn, exact_fp32=False)
    got = torch.from_numpy(embed_faces(forward, FACES, batch_size=4))
    assert torch.equal(got, expected)
    assert model.training, "the caller's train/eval mode is left alone"
    assert not got.requires_grad


def test_non_finite_embeddings_are_an_error_only_when_normalised() -> None:
    def diverged(x: np.ndarray) -> np.ndarray:
        return np.full((len(x), 4), np.nan, np.float32)

    with pytest.raises(EmbeddingError, match="ckpt.pt produced NaN/Inf embeddings"):
        embed_faces(diverged, FACES, normalise=True, model="ckpt.pt")
    assert np.isnan(embed_faces(diverged, FACES)).all()


def test_no_faces_is_an_error() -> None:
    with pytest.raises(ValueError, match="no images to embed"):
        embed_faces(numpy_forward, FACES[:0])
