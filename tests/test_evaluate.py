"""``faceops evaluate`` end to end: a tiny ingested synthetic dataset, tiny recognizer and DSR
checkpoints (and their ONNX exports), through ``faceops.cli.main``; plus the real-LFW --images path."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from faceops.cli import main
from faceops.config import to_dict
from faceops.data.degrade import DegradeConfig
from faceops.data.ingest import IngestConfig, SplitConfig, _decode, ingest
from faceops.data.prepare import PrepareConfig
from faceops.data.synth import synthesize
from faceops.data.tensors import to_input
from faceops.evaluate import FAR_TARGETS, SETTINGS, Embedder, evaluate, load_embedder
from faceops.evaluate.data import load_face
from faceops.evaluate.models import torch_forward
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.storage import sha256_bytes
from faceops.train.checkpoint import save_checkpoint

DATA = Path(os.environ.get("FACEOPS_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LFW_PAIRS = DATA / "lfw_meta" / "pairsDevTrain.txt"
LFW_IMAGES = DATA / "lfw_devtrain"
SIZES = ("32x32", "14x16")
VERIFICATION_KEYS = {"accuracy", "eer", "auc", "tar_at_far", "threshold"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _recognizer_ckpt(path: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    cfg = RecognizerConfig(name="edgeface_xxs")
    model = create_recognizer(cfg).eval()
    save_checkpoint(str(path), {"kind": "recognizer", "model_config": to_dict(cfg),
                                "model": model.state_dict(), "config": {}})
    return path, model


def _dsr_ckpt(path: Path, size: str, seed: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    cfg = DSRConfig(vlr_size=size, base_channels=8, residual_blocks=1)
    model = create_dsr(cfg).eval()
    save_checkpoint(str(path), {"kind": "dsr", "model_config": to_dict(cfg), "model": model.state_dict(),
                                "config": {}, "vlr_size": size})
    return path, model


def _export(model: torch.nn.Module, path: Path, hw: tuple[int, int], output: str) -> Path:
    """ONNX with the serving contract's names and a dynamic batch (as `faceops export` writes it)."""
    torch.onnx.export(model.eval(), (torch.zeros(2, 3, *hw),), str(path), input_names=["input"],
                      output_names=[output], dynamic_axes={"input": {0: "batch"}, output: {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny dataset (12 identities x 4 faces) and tiny models, shared by the tests below."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    src = synthesize(root / "faces", 12, 4, 0, 112)
    cfg = IngestConfig(splits=SplitConfig(train=0.34, val=0.33, test=0.33), min_images_per_identity=2,
                       pairs_per_split=40, workers=1, degrade=DegradeConfig(sizes=list(SIZES)))
    dataset = ingest(str(src), "tiny", str(root / "store"), cfg, progress=False).uri
    rec, rec_model = _recognizer_ckpt(root / "rec.pt", 0)
    ft, _ = _recognizer_ckpt(root / "ft.pt", 1)
    dsr32, _ = _dsr_ckpt(root / "dsr32.pt", "32x32", 2)
    _, dsr14_model = _dsr_ckpt(root / "dsr14.pt", "14x16", 3)
    dsr14_onnx = _export(dsr14_model, root / "dsr14.onnx", (16, 14), "output")
    rec_onnx = _export(rec_model, root / "rec.onnx", (112, 112), "embedding")
    return {"root": root, "dataset": dataset, "rec": rec, "ft": ft, "dsr32": dsr32, "dsr14_onnx": dsr14_onnx,
            "rec_onnx": rec_onnx}


def _check_blocks(block: dict, with_sr: bool) -> None:
    assert set(block) == ({"verification", "identification", "super_resolution"} if with_sr
                          else {"verification", "identification"})
    v = block["verification"]
    assert set(v) >= VERIFICATION_KEYS and set(v["tar_at_far"]) == set(FAR_TARGETS)  # the contract's keys, at least
    assert 0 <= v["eer"] <= 1 and 0 <= v["auc"] <= 1 and 0 <= v["accuracy"] <= 1
    assert {"rank1", "rank5"} <= set(block["identification"])
    assert block["identification"]["rank1"] <= block["identification"]["rank5"]
    if with_sr:
        sr = block["super_resolution"]
        assert set(sr) == {"psnr", "ssim", "identity_cosine"}
        assert 5 < sr["psnr"] < 100 and -1 <= sr["ssim"] <= 1 and -1 <= sr["identity_cosine"] <= 1


def test_cli_vlr_run_writes_metrics_and_report(world: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(world["rec"]), "--data", world["dataset"], "--out", str(out),
               "--dsr", f"{world['dsr32']},{world['dsr14_onnx']}", "--finetuned", str(world["ft"]),
               "--vlr", ",".join(SIZES), "--flip"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"verification", "identification", "vlr"}
    _check_blocks({k: metrics[k] for k in ("verification", "identification")}, with_sr=False)
    assert set(metrics["vlr"]) == set(SIZES)
    for size in SIZES:
        per_size = metrics["vlr"][size]
        assert tuple(per_size) == SETTINGS
        assert per_size["hr"] == {k: metrics[k] for k in ("verification", "identification")}
        _check_blocks(per_size["hr"], with_sr=False)
        for kind in SETTINGS[1:]:
            _check_blocks(per_size[kind], with_sr=True)
        # same SR images for dsr and dsr_finetuned; only the recognizer differs
        sr, sr_ft = per_size["dsr"]["super_resolution"], per_size["dsr_finetuned"]["super_resolution"]
        assert sr["psnr"] == sr_ft["psnr"] and sr["ssim"] == sr_ft["ssim"]
    page = (out / "report.html").read_text()
    pngs = re.findall(r"src='([^']+\.png)'", page)
    assert {"roc.png", "det.png", "samples_32x32.png", "samples_14x16.png"} <= set(pngs)
    assert len([p for p in pngs if p.startswith("hist_")]) == 1 + 2 * 3
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "32x32 dsr_finetuned" in page
    printed = capsys.readouterr().out
    assert "setting" in printed and "14x16 dsr_finetuned" in printed


def test_checkpoint_and_onnx_give_the_same_figures(world: dict, tmp_path: Path) -> None:
    a = evaluate(str(world["rec"]), tmp_path / "ckpt", data=world["dataset"])
    b = evaluate(str(world["rec_onnx"]), tmp_path / "onnx", data=world["dataset"])
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key] == pytest.approx(flat_b[key], abs=1e-4), key


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_flip_averaged_embedding_is_mirror_invariant(world: dict) -> None:
    emb = load_embedder(str(world["rec"]), batch_size=3, flip=True)
    faces = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    e, e_mirror = emb.embed(faces), emb.embed(faces[:, :, ::-1])
    np.testing.assert_allclose(e, e_mirror, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    plain = Embedder(torch_forward(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 112 * 112, 8)),
                                   "cpu"), batch_size=2)
    assert not np.allclose(plain.embed(faces), plain.embed(faces[:, :, ::-1]), atol=1e-3)


def test_flip_sums_raw_embeddings_then_normalises_as_insightface() -> None:
    """A confident view (a long raw embedding) weighs more than a doubtful one: insightface's flip
    test adds the two raw embeddings and L2-normalises the sum once."""
    def forward(x: np.ndarray) -> np.ndarray:  # unnormalised output whose length depends on the view
        left = x[:, 0, :, :4].reshape(len(x), -1).mean(1, keepdims=True)
        return np.concatenate([np.full_like(left, 3.0) + left, 0.1 * left], axis=1) * (1 + 5 * (left > 0))

    faces = np.zeros((1, 8, 8, 3), np.uint8)
    faces[:, :, :4] = 255  # bright on the left: the mirror is dark on the left
    x = to_input(faces).numpy()
    a, b = forward(x), forward(np.ascontiguousarray(x[..., ::-1]))
    got = Embedder(forward, flip=True).embed(faces)
    expected = (a + b) / np.linalg.norm(a + b)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    per_view = a / np.linalg.norm(a) + b / np.linalg.norm(b)
    assert not np.allclose(got, per_view / np.linalg.norm(per_view), atol=1e-3)  # the old rule


def test_user_errors_are_one_line(world: dict, tmp_path: Path, capsys) -> None:
    base = ["evaluate", "--model", str(world["rec"]), "--data", world["dataset"], "--out", str(tmp_path)]
    assert main([*base, "--finetuned", str(world["ft"])]) == 1
    assert "needs --dsr" in capsys.readouterr().err
    assert main([*base, "--dsr", str(world["dsr32"]), "--vlr", "32x32,14x16"]) == 1
    assert "no DSR model for VLR size(s) 14x16" in capsys.readouterr().err
    assert main([*base, "--model", str(world["dsr32"])]) == 1
    assert "'dsr' checkpoint, expected a 'recognizer'" in capsys.readouterr().err
    assert main([*base, "--vlr", "20x20"]) == 1
    assert "no VLR view 20x20" in capsys.readouterr().err


needs_lfw = pytest.mark.skipif(not LFW_PAIRS.is_file() or not LFW_IMAGES.is_dir(),
                               reason=f"needs real data: LFW not found under {DATA} (set FACEOPS_DATA)")


@needs_lfw
def test_images_are_prepared_exactly_as_at_ingest() -> None:
    path = LFW_IMAGES / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    prep, deg = PrepareConfig(center_crop=120), DegradeConfig(sizes=["32x32", "14x16"], noise_std=(1.0, 3.0))
    hr, vlr = load_face(path, prep, deg, list(deg.sizes))
    raw = path.read_bytes()
    ingested = _decode(("x", sha256_bytes(raw), raw, prep, deg, 16))
    np.testing.assert_array_equal(hr, ingested.hr)
    for size in deg.sizes:
        np.testing.assert_array_equal(vlr[size], ingested.vlr[size])


@needs_lfw
def test_cli_images_mode_on_real_lfw_pairs(world: dict, tmp_path: Path) -> None:
    """A folded 2x(10+10) subset of the real View 1 pairs, resolved against the real images."""
    lines = LFW_PAIRS.read_text().splitlines()[1:]
    genuine, impostor = lines[:1100], lines[1100:]
    body = genuine[:10] + impostor[:10] + genuine[500:510] + impostor[500:510]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t10\n" + "\n".join(body) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("ingest:\n  prepare:\n    center_crop: 120\nevaluate:\n  batch_size: 16\n  n_folds: 3\n")
    out = tmp_path / "lfw"
    rc = main(["evaluate", "--model", str(world["rec_onnx"]), "--images", str(LFW_IMAGES),
               "--pairs", str(pairs), "--out", str(out), "--vlr", "32x32", "--config", str(cfg)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["vlr"]["32x32"]) == {"hr", "bicubic"}
    _check_blocks(metrics["vlr"]["32x32"]["bicubic"], with_sr=True)
    assert "2-fold" in (out / "report.html").read_text()
