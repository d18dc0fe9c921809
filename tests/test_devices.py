"""The one reading of a device setting (faceops.devices); CUDA's presence is faked, so every case
runs on every machine."""

from __future__ import annotations

import pytest
import torch

from faceops.config import ConfigError
from faceops.devices import DeviceError, resolve_device
from faceops.errors import FaceopsError


def fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("count", [0, 2])
def test_auto_takes_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    fake_cuda(monkeypatch, count)
    assert resolve_device("auto") == torch.device("cuda" if count else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    fake_cuda(monkeypatch, 0)
    with pytest.raises(DeviceError, match=rf"engine.device='{name}' but no CUDA device.*use 'auto' or 'cpu'"):
        resolve_device(name, "engine.device")


def test_cuda_index_past_the_devices_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"evaluate.device='cuda:2' but this machine has 2 CUDA device.*cuda:1"):
        resolve_device("cuda:2", "evaluate.device")


def test_nonsense_is_a_config_error() -> None:
    with pytest.raises(DeviceError, match="evaluate.device='gpu0' is not a device") as err:
        resolve_device("gpu0", "evaluate.device")
    assert isinstance(err.value, ConfigError) and isinstance(err.value, FaceopsError)
