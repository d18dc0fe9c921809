"""Loading users' recognizer weights: formats, prefixes, key reports, and seed 004's missing keys."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from faceops.models import (
    PretrainedLoadError,
    RecognizerConfig,
    create_recognizer,
    load_pretrained,
)

SEED_004_MISSING = [  # the four keys seed 004's EdgeFace-XXS file lacked
    "stages.2.blocks.5.pos_embd.token_projection.weight",
    "stages.2.blocks.5.pos_embd.token_projection.bias",
    "stages.3.blocks.1.pos_embd.token_projection.weight",
    "stages.3.blocks.1.pos_embd.token_projection.bias",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def xxs(**kw):
    return create_recognizer(RecognizerConfig(name="edgeface_xxs", head="linear", **kw)).eval()


def same_outputs(a, b):
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-4)


def test_state_dict_round_trip(tmp_path):
    src, dst = xxs(), xxs()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    report = load_pretrained(dst, tmp_path / "w.pt")
    assert report.ok and len(report.loaded) == len(src.state_dict())
    same_outputs(src, dst)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_wrapped_and_ddp_prefixed_checkpoints(tmp_path, wrap):
    src, dst = xxs(), xxs()
    ddp = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({wrap: ddp, "epoch": 3}, tmp_path / "ckpt.pt")
    assert load_pretrained(dst, f"file://{tmp_path}/ckpt.pt").ok
    same_outputs(src, dst)


def test_prefix_selects_and_strips(tmp_path):
    src, dst = xxs(), xxs()
    state = {"recognizer." + k: v for k, v in src.state_dict().items()}
    state["margin.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "w.pt")
    report = load_pretrained(dst, tmp_path / "w.pt", prefix="recognizer.")
    assert report.ok and report.ignored == ["margin.weight"]
    same_outputs(src, dst)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated upstream; users still hold such files
def test_torchscript_file(tmp_path):
    src, dst = xxs(), xxs()
    traced = torch.jit.trace(src, torch.zeros(1, 3, 112, 112), check_trace=False)
    torch.jit.save(traced, str(tmp_path / "edgeface.ts"))
    assert load_pretrained(dst, tmp_path / "edgeface.ts").ok
    same_outputs(src, dst)


class LoRaLin(nn.Module):
    """The official EdgeFace low-rank pair, as otroshi/edgeface ``backbones/timmfr.py`` defines it."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(in_features, rank, bias=False)
        self.linear2 = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(x))


def official_low_rank(module: nn.Module, ratio: float) -> None:
    """The official rule (``replace_linear_with_lowrank_recursive_2``): every nn.Linear child whose
    name lacks "head" becomes a LoRaLin; anything else is searched recursively, so the Linear
    ``fc`` inside timm's ``head`` is factorised too."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear) and "head" not in name:
            rank = max(2, int(min(child.in_features, child.out_features) * ratio))
            setattr(module, name, LoRaLin(child.in_features, child.out_features, rank, child.bias is not None))
        else:
            official_low_rank(child, ratio)


@pytest.mark.parametrize(("name", "timm_name", "gamma", "rank"), [
    ("edgeface_xs_gamma_06", "edgenext_x_small", 0.6, 115),  # head.fc: 192 -> 115 -> 512
    ("edgeface_s_gamma_05", "edgenext_small", 0.5, 152),  # head.fc: 304 -> 152 -> 512
])
def test_official_edgeface_gamma_checkpoint_loads_strictly(tmp_path, name, timm_name, gamma, rank):
    """An official-layout file (TimmFRWrapperV2: the timm model as ``model.*``, classifier reset to 512,
    every Linear factorised) loads strictly, tensor for tensor, and computes the same embedding."""
    official = timm.create_model(timm_name, pretrained=False)
    official.reset_classifier(512)
    official_low_rank(official, gamma)
    official.eval()
    state = {"model." + k: v for k, v in official.state_dict().items()}
    assert state["model.head.fc.linear1.weight"].shape == (rank, official.num_features)
    assert state["model.head.fc.linear2.weight"].shape == (512, rank) and "model.head.fc.weight" not in state
    torch.save(state, tmp_path / f"{name}.pt")

    ours = create_recognizer(RecognizerConfig(name=name, head="linear")).eval()
    report = load_pretrained(ours, tmp_path / f"{name}.pt")
    assert report.ok and len(report.loaded) == len(state) == len(ours.state_dict())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), F.normalize(official(x), dim=1), atol=1e-5, rtol=1e-4)


def seed_004_file(tmp_path):
    """An EdgeFace-XXS file in bare timm names; the model below has positional encodings in stages
    2-3 as well (as seed 004's fallback architecture did), so exactly four keys are missing."""
    src = xxs()
    bare = {k.removeprefix("backbone.").replace("embedding.fc.", "head.fc."): v
            for k, v in src.state_dict().items()}
    torch.save(bare, tmp_path / "edgeface_xxs.pt")
    dst = xxs(timm_kwargs={"use_pos_emb": [False, True, True, True]})
    return src, dst, tmp_path / "edgeface_xxs.pt"


def test_seed_004_missing_keys_are_an_error_by_default(tmp_path):
    _, dst, path = seed_004_file(tmp_path)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(PretrainedLoadError) as err:
        load_pretrained(dst, path)
    for key in SEED_004_MISSING:
        assert key in str(err.value)
    assert "init_missing" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # untouched


def test_seed_004_missing_keys_initialised_on_request(tmp_path):
    src, dst, path = seed_004_file(tmp_path)
    with torch.no_grad():
        for key in SEED_004_MISSING:
            dst.state_dict()["backbone." + key].fill_(7.0)  # so the init is visible
    report = load_pretrained(dst, path, init_missing=True)
    expected = ["backbone." + k for k in SEED_004_MISSING]
    assert sorted(report.missing) == sorted(expected) == sorted(report.initialized)
    assert not report.unexpected and not report.mismatched
    state = dst.state_dict()
    for key in expected:
        value = state[key]
        if key.endswith("bias"):
            assert torch.count_nonzero(value) == 0
        else:
            fan_out, fan_in = value.shape[0], value[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform range
            assert value.abs().max() <= bound and value.std() > bound / 4
    src_state = src.state_dict()
    assert all(torch.equal(state[k], src_state[k]) for k in report.loaded)


def test_unexpected_and_mismatched_keys_are_named(tmp_path):
    src = xxs()
    state = dict(src.state_dict())
    state["extra.weight"] = torch.ones(3)
    torch.save(state, tmp_path / "w.pt")
    dst = xxs(embedding_dim=256)
    with pytest.raises(PretrainedLoadError, match=r"extra\.weight") as err:
        load_pretrained(dst, tmp_path / "w.pt")
    assert "embedding.fc.weight: (512, 168) -> (256, 168)" in str(err.value)

    report = load_pretrained(dst, tmp_path / "w.pt", strict=False)
    assert report.unexpected == ["extra.weight"]
    assert sorted(report.mismatched) == ["embedding.fc.bias: (512,) -> (256,)",
                                         "embedding.fc.weight: (512, 168) -> (256, 168)"]
    assert torch.equal(dst.state_dict()["backbone.stem.0.weight"], src.state_dict()["backbone.stem.0.weight"])


class NotWeights:
    pass


@pytest.mark.parametrize("content", ["garbage", "pickle", "strings", "missing"])
def test_unreadable_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "w.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif content == "pickle":  # weights_only refuses arbitrary objects: nothing from the file runs
        torch.save({"obj": NotWeights()}, path)
    elif content == "strings":
        torch.save({"a": "b"}, path)
    with pytest.raises(PretrainedLoadError, match="w.pt"):
        load_pretrained(xxs(), path)
