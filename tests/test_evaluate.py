"""``faceops evaluate`` end to end: a tiny ingested synthetic dataset, tiny recognizer and DSR
checkpoints (and their ONNX exports), through ``faceops.cli.main``; the threshold protocol, the
Y-channel SR figures, and the real-LFW --images path."""

from __future__ import annotations

import json
import math
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
from faceops.data.reader import load_split
from faceops.data.synth import synthesize
from faceops.data.tensors import to_input
from faceops.errors import FaceopsError
from faceops.evaluate import FAR_TARGETS, SETTINGS, Embedder, evaluate, load_embedder, summary_table
from faceops.evaluate.data import PairSet, load_face
from faceops.evaluate.models import torch_forward
from faceops.evaluate.runner import EvalConfig
from faceops.evaluate.sr_metrics import luma, sr_metrics
from faceops.evaluate.verification import best_threshold, verification_metrics
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.storage import sha256_bytes
from faceops.train.checkpoint import save_checkpoint

DATA = Path(os.environ.get("FACEOPS_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LFW_PAIRS = DATA / "lfw_meta" / "pairsDevTrain.txt"
LFW_IMAGES = DATA / "lfw_devtrain"
SIZES = ("32x32", "14x16")
VERIFICATION_KEYS = {"accuracy", "accuracy_se", "eer", "auc", "tar_at_far", "threshold", "pairs", "folds"}
SR_KEYS = {"psnr", "ssim", "psnr_y", "ssim_y", "identity_cosine"}


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
    ft_bicubic, _ = _recognizer_ckpt(root / "ft_bicubic.pt", 4)
    dsr32, _ = _dsr_ckpt(root / "dsr32.pt", "32x32", 2)
    _, dsr14_model = _dsr_ckpt(root / "dsr14.pt", "14x16", 3)
    dsr14_onnx = _export(dsr14_model, root / "dsr14.onnx", (16, 14), "output")
    rec_onnx = _export(rec_model, root / "rec.onnx", (112, 112), "embedding")
    return {"root": root, "dataset": dataset, "rec": rec, "ft": ft, "ft_bicubic": ft_bicubic, "dsr32": dsr32,
            "dsr14_onnx": dsr14_onnx, "rec_onnx": rec_onnx}


def _check_blocks(block: dict, with_sr: bool) -> None:
    assert set(block) == ({"verification", "identification", "super_resolution"} if with_sr
                          else {"verification", "identification"})
    v = block["verification"]
    assert set(v) >= VERIFICATION_KEYS and set(v["tar_at_far"]) == set(FAR_TARGETS)  # the contract's keys, at least
    assert 0 <= v["eer"] <= 1 and 0 <= v["auc"] <= 1 and 0 <= v["accuracy"] <= 1
    assert {"rank1", "rank1_se", "rank5"} <= set(block["identification"])
    assert block["identification"]["rank1"] <= block["identification"]["rank5"]
    if with_sr:
        sr = block["super_resolution"]
        assert set(sr) == SR_KEYS
        assert 5 < sr["psnr"] < 100 and -1 <= sr["ssim"] <= 1 and -1 <= sr["identity_cosine"] <= 1
        assert 5 < sr["psnr_y"] < 100 and -1 <= sr["ssim_y"] <= 1


def test_cli_vlr_run_writes_metrics_and_report(world: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(world["rec"]), "--data", world["dataset"], "--out", str(out),
               "--dsr", f"{world['dsr32']},{world['dsr14_onnx']}", "--finetuned", str(world["ft"]),
               "--finetuned-bicubic", str(world["ft_bicubic"]), "--vlr", ",".join(SIZES), "--flip"])
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
        # a fine-tuned setting sees its images' setting's faces; only the recognizer differs
        for images in ("bicubic", "dsr"):
            sr, sr_ft = per_size[images]["super_resolution"], per_size[f"{images}_finetuned"]["super_resolution"]
            assert {k: sr[k] for k in SR_KEYS - {"identity_cosine"}} == \
                {k: sr_ft[k] for k in SR_KEYS - {"identity_cosine"}}
            assert per_size[images]["verification"] != per_size[f"{images}_finetuned"]["verification"]
    page = (out / "report.html").read_text()
    pngs = re.findall(r"src=[\"']([^\"']+\.png)[\"']", page)
    assert {"roc.png", "det.png", "samples_32x32.png", "samples_14x16.png"} <= set(pngs)
    assert len([p for p in pngs if p.startswith("hist_")]) == 1 + 2 * 4
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "32x32 dsr_finetuned" in page and "32x32 bicubic_finetuned" in page
    assert "bicubic_finetuned is the control for dsr_finetuned" in page
    control = metrics["vlr"]["32x32"]["bicubic_finetuned"]
    acc = f"{control['verification']['accuracy']:.4f} ± {control['verification']['accuracy_se']:.4f}"
    assert f"<td>32x32 bicubic_finetuned</td><td>{acc}</td>" in page
    printed = capsys.readouterr().out
    assert "setting" in printed and "14x16 dsr_finetuned" in printed and "14x16 bicubic_finetuned" in printed


def test_each_size_its_own_fine_tuned_recognizers_and_the_kfp_views(world: dict, tmp_path: Path) -> None:
    """A pipeline's evaluation: per size its own fine-tuned pair ({size: URI}); roc.json holds every
    setting's ROC curve in at most ROC_POINTS points, and the Markdown table has a row per setting."""
    from faceops.evaluate.runner import ROC_FILE, ROC_POINTS, headline_markdown, roc_points

    dsr14, _ = _dsr_ckpt(world["root"] / "dsr14.pt", "14x16", 3)
    out = tmp_path / "eval"
    metrics = evaluate(str(world["rec"]), out, data=world["dataset"], dsr=[str(world["dsr32"]), str(dsr14)],
                       finetuned={"32x32": str(world["ft"]), "14x16": str(world["ft_bicubic"])},
                       finetuned_bicubic={"32x32": str(world["ft_bicubic"])}, cfg=EvalConfig(batch_size=16))
    assert tuple(metrics["vlr"]["32x32"]) == SETTINGS
    assert tuple(metrics["vlr"]["14x16"]) == ("hr", "bicubic", "dsr", "dsr_finetuned")  # no 14x16 control given
    rocs = json.loads((out / ROC_FILE).read_text())
    assert set(rocs) == {"hr", "vlr"} and set(rocs["vlr"]["14x16"]) == {"bicubic", "dsr", "dsr_finetuned"}
    for points in (rocs["hr"], *rocs["vlr"]["32x32"].values()):
        assert len(points["fpr"]) == len(points["tpr"]) == len(points["threshold"]) <= ROC_POINTS
        assert (points["fpr"][0], points["tpr"][0], points["fpr"][-1], points["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
        assert all(math.isfinite(t) for t in points["threshold"]) and points["threshold"] == sorted(
            points["threshold"], reverse=True)
    many = roc_points(np.linspace(0, 1, 5000), np.arange(5000) % 2 == 0)
    assert len(many["fpr"]) == ROC_POINTS and many["fpr"][-1] == 1.0
    table = headline_markdown(metrics).splitlines()
    assert table[0].startswith("| setting |") and table[1].startswith("|---")
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "HR", "32x32 bicubic", "32x32 bicubic_finetuned", "32x32 dsr", "32x32 dsr_finetuned", "14x16 bicubic",
        "14x16 dsr", "14x16 dsr_finetuned"]
    with pytest.raises(FaceopsError, match=r"VLR size\(s\) \['16x16'\], which are not evaluated"):
        evaluate(str(world["rec"]), tmp_path / "bad", data=world["dataset"], dsr=[str(world["dsr32"])],
                 finetuned={"16x16": str(world["ft"])})


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
    assert main([*base, "--finetuned-bicubic", str(world["ft"])]) == 1
    assert "--finetuned-bicubic evaluates VLR -> bicubic" in capsys.readouterr().err
    assert main([*base, "--split", "val", "--set", "threshold=val"]) == 1
    assert "evaluate.threshold=val would choose the threshold on the pairs it scores" in capsys.readouterr().err


def _hr_scores(world: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and genuine flags of a split's pairs under the base recognizer (HR faces)."""
    data = load_split(world["dataset"], split, ["hr"])
    pairs = PairSet.from_list(data.pairs)
    return pairs.scores(load_embedder(str(world["rec"])).embed(data.hr)), pairs.genuine


def test_threshold_is_cross_validated_on_the_test_pairs_by_default(world: dict, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Default: 10 seeded folds of the test pairs (each pair scored once, threshold from the other
    folds), val never read; the standard errors reach metrics.json, the summary and the report."""
    import faceops.data.reader as reader

    read = []
    monkeypatch.setattr(reader, "load_split", lambda uri, split, views: read.append(split) or load_split(
        uri, split, views))
    metrics = evaluate(str(world["rec"]), tmp_path / "folds", data=world["dataset"])
    assert read == ["test"]
    scores, genuine = _hr_scores(world, "test")
    v = metrics["verification"]
    assert v == verification_metrics(scores, genuine, n_folds=10, seed=0)
    assert (v["folds"], v["pairs"]) == (10, len(genuine)) and v["accuracy_se"] > 0
    on_disk = json.loads((tmp_path / "folds" / "metrics.json").read_text())
    assert on_disk["verification"]["accuracy_se"] == v["accuracy_se"]
    assert "rank1_se" in on_disk["identification"]
    page = (tmp_path / "folds" / "report.html").read_text()
    assert f"10-fold (seeded, balanced) on {len(genuine)} pairs" in page and "val split" not in page
    table = summary_table(metrics)
    i = metrics["identification"]
    assert f"{v['accuracy']:.4f}±{v['accuracy_se']:.4f}" in table and f"{i['rank1']:.4f}±{i['rank1_se']:.4f}" in table


def test_val_threshold_stays_available(world: dict, tmp_path: Path) -> None:
    """``threshold: val``: the best threshold on the val split's pairs, applied to the test pairs."""
    metrics = evaluate(str(world["rec"]), tmp_path / "val", data=world["dataset"], cfg=EvalConfig(threshold="val"))
    val_scores, val_genuine = _hr_scores(world, "val")
    scores, genuine = _hr_scores(world, "test")
    threshold, _ = best_threshold(val_scores, val_genuine)
    v = metrics["verification"]
    assert v["threshold"] == threshold and v["accuracy"] == pytest.approx(np.mean((scores >= threshold) == genuine))
    page = (tmp_path / "val" / "report.html").read_text()
    assert f"threshold chosen on {len(val_genuine)} pairs of the val split, applied to {len(genuine)} pairs" in page


def test_y_channel_psnr_and_ssim_by_hand() -> None:
    """One pure-red pixel in a 12x12 black image: only luma 65.481/255 (BT.601) changes, at 1 of 144
    pixels, so PSNR-Y = 10 log10(144 / (65.481/255)^2); RGB PSNR = 10 log10(144 * 3) (one channel
    off by 1 of 432 values)."""
    hr = np.zeros((1, 12, 12, 3), np.uint8)
    sr = hr.copy()
    sr[0, 5, 7] = (255, 0, 0)
    emb = np.ones((1, 4))
    got = sr_metrics(sr, hr, emb, emb)
    assert got["psnr_y"] == pytest.approx(10 * math.log10(144 / (65.481 / 255) ** 2)) == pytest.approx(33.39, abs=0.01)
    assert got["psnr"] == pytest.approx(10 * math.log10(144 * 3))
    assert sr_metrics(hr, hr, emb, emb)["ssim_y"] == pytest.approx(1.0) and got["ssim_y"] < 1.0
    np.testing.assert_allclose(luma(np.array([[[[0, 0, 0], [255, 255, 255]]]], np.uint8)).ravel(),
                               [16 / 255, 235 / 255])


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
