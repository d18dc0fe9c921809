"""insightface's IResNet family: layout, 7x7 map, parameter counts, insightface checkpoints, ONNX parity.

Forward and backward of every registered backbone (iresnet34/50/100 included) at 112x112 are in
``tests/test_models.py::test_every_backbone_embeds_trains_and_exposes_stages``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_faces
from torch import nn

from faceops.config import ConfigError
from faceops.errors import FaceopsError
from faceops.export import ExportConfig, check_parity, export_onnx
from faceops.models import (
    IBasicBlock,
    RecognizerConfig,
    count_parameters,
    create_recognizer,
    load_pretrained,
)

DEPTHS = {"iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
CHANNELS = (64, 128, 256, 512)
EMBEDDING = 512

# Parameters of insightface's iresnet{34,50,100}(num_features=512), counted from the definition in
# deepinsight/insightface recognition/arcface_torch/backbones/iresnet.py (IResNet + IBasicBlock, fc on
# the 512x7x7 map, BatchNorm1d `features`) by insightface_param_count below; iresnet50 is the "43.6M"
# usually quoted for ArcFace-R50.
INSIGHTFACE_PARAMS = {"iresnet34": 34_139_328, "iresnet50": 43_590_848, "iresnet100": 65_156_160}


pytestmark = pytest.mark.usefixtures("one_thread")


faces = random_faces


def iresnet(name: str = "iresnet34", **kw) -> nn.Module:
    return create_recognizer(RecognizerConfig(name=name, head="linear_bn", **kw))


def insightface_shapes(depths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an insightface IResNet state dict, by its insightface name, from the definition:
    stem conv1/bn1/prelu; layerK.B.{bn1, conv1, bn2, prelu, conv2, bn3} (+ downsample.{0,1} in each
    stage's first block, which strides by 2); bn2 on the 7x7 map; fc; BatchNorm1d features."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{leaf}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    in_chs = 64
    for k, (depth, out_chs) in enumerate(zip(depths, CHANNELS, strict=True), start=1):
        for b in range(depth):
            p, cin = f"layer{k}.{b}", in_chs if b == 0 else out_chs
            bn(f"{p}.bn1", cin)
            shapes[f"{p}.conv1.weight"] = (out_chs, cin, 3, 3)
            bn(f"{p}.bn2", out_chs)
            shapes[f"{p}.prelu.weight"] = (out_chs,)
            shapes[f"{p}.conv2.weight"] = (out_chs, out_chs, 3, 3)
            bn(f"{p}.bn3", out_chs)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (out_chs, cin, 1, 1)
                bn(f"{p}.downsample.1", out_chs)
        in_chs = out_chs
    bn("bn2", 512)
    shapes["fc.weight"], shapes["fc.bias"] = (EMBEDDING, 512 * 7 * 7), (EMBEDDING,)
    bn("features", EMBEDDING)
    return shapes


def insightface_param_count(depths: tuple[int, ...]) -> int:
    """Learnable tensors only (running statistics are buffers); ``features.weight`` counts although
    insightface freezes it, as ``sum(p.numel() for p in model.parameters())`` does."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(torch.Size(s).numel() for k, s in insightface_shapes(depths).items() if not k.endswith(buffers))


def insightface_state(depths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A random insightface-layout checkpoint with plausible statistics (finite, non-trivial outputs)."""
    state = {}
    for key, shape in insightface_shapes(depths).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(shape) * 0.1
        elif len(shape) > 1:  # conv / fc: He init
            state[key] = torch.randn(shape) * (2.0 / torch.Size(shape[1:]).numel()) ** 0.5
        elif "prelu" in key:
            state[key] = torch.full(shape, 0.25)
        else:  # BN scales
            state[key] = 1.0 + torch.randn(shape) * 0.1
    return state


def insightface_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """insightface's IResNet.forward in eval mode, written out with torch.nn.functional, then L2 norm."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for k, depth in enumerate(depths, start=1):
        for b in range(depth):
            p, stride = f"layer{k}.{b}", 2 if b == 0 else 1
            out = F.conv2d(bn(x, f"{p}.bn1"), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), sd[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            if b == 0:
                x = bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = out + x
    x = F.linear(torch.flatten(bn(x, "bn2"), 1), sd["fc.weight"], sd["fc.bias"])
    return F.normalize(bn(x[:, :, None, None], "features").flatten(1), dim=1)


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_parameter_counts_match_insightface(name):
    assert insightface_param_count(DEPTHS[name]) == INSIGHTFACE_PARAMS[name]
    assert count_parameters(iresnet(name)) == INSIGHTFACE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_112_faces_give_a_7x7_map_and_a_unit_embedding(name):
    model = iresnet(name).eval()
    x = faces(1)
    with torch.no_grad():
        stages = model.forward_stages(x)
        emb = model(x)
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
    assert model.backbone.feature_dim == 512 * 7 * 7
    assert emb.shape == (1, EMBEDDING)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1))
    assert [len(stage) for stage in model.backbone.stages] == list(DEPTHS[name])


def test_blocks_are_insightface_ir_units():
    model = iresnet("iresnet34")
    stem = [type(m).__name__ for m in model.backbone.stem]
    assert stem == ["Conv2d", "BatchNorm2d", "PReLU"] and model.backbone.stem[0].stride == (1, 1)
    first, second = model.backbone.stages[1][0], model.backbone.stages[1][1]
    assert isinstance(first, IBasicBlock)
    assert [n for n, _ in first.named_children()] == ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3", "downsample"]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)  # stride on the second conv
    assert first.downsample[0].kernel_size == (1, 1) and first.downsample[0].stride == (2, 2)
    assert second.downsample is None and second.conv2.stride == (1, 1)
    assert not first.bn3.weight.any()  # zero-init last BN: a fresh block is its shortcut
    head = [type(m).__name__ for m in model.embedding.children()]
    assert head == ["Dropout", "Linear", "BatchNorm1d"]
    bn = model.embedding.bn  # insightface: features.weight fixed at 1, not trained
    assert not bn.weight.requires_grad and torch.equal(bn.weight, torch.ones(EMBEDDING))
    assert bn.bias.requires_grad


def test_insightface_checkpoint_loads_strictly_and_computes_the_same(tmp_path):
    depths = DEPTHS["iresnet34"]
    state = insightface_state(depths)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "backbone.pth")  # DDP-saved
    model = iresnet("iresnet34").eval()
    report = load_pretrained(model, tmp_path / "backbone.pth")
    assert report.ok and len(report.loaded) == len(state) == len(model.state_dict())
    x = faces(2)
    with torch.no_grad():
        ours, reference = model(x), insightface_forward(state, x, depths)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_other_input_sizes_and_timm_options_are_refused():
    model = iresnet("iresnet34").eval()
    with torch.no_grad(), pytest.raises(FaceopsError, match="112x112"):
        model(torch.zeros(1, 3, 96, 96))
    with pytest.raises(ConfigError, match="iresnet50"):
        iresnet("iresnet50", drop_path_rate=0.1)


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_onnx_export_passes_the_parity_gate(name, tmp_path):
    model = iresnet(name).eval()
    batch = faces(4)
    path = export_onnx(model, tmp_path / f"{name}.onnx", batch[:1], "recognizer", ExportConfig())
    report = check_parity(name, path, model, batch, ExportConfig())  # raises ParityError past tolerance
    assert report.batch == 4 and report.min_cosine >= ExportConfig().parity_min_cosine
