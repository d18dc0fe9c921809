"""A model's input contract (issue 11): recorded at training from the dataset's manifest, read back by
``faceops evaluate --images`` so no ingest config is needed, contradictions named, old checkpoints
assumed with a warning; its three encodings round-trip."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faceops.cli import main
from faceops.data.degrade import DegradeConfig
from faceops.data.ingest import IngestConfig, SplitConfig, ingest
from faceops.data.prepare import PrepareConfig
from faceops.data.synth import synthesize
from faceops.data.tensors import to_input
from faceops.models import DSRConfig, RecognizerConfig, create_recognizer
from faceops.models.contract import (
    ContractConflictError,
    ContractError,
    InputContract,
    check_agrees,
    dataset_contract,
    from_checkpoint,
    shared_preparation,
    vlr_size_of,
)
from faceops.train.checkpoint import load_checkpoint, save_checkpoint
from faceops.train.dsr import DSRTask, DSRTrainConfig
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer

DATA = Path(os.environ.get("FACEOPS_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LFW_IMAGES, LFW_PAIRS = DATA / "lfw_devtrain", DATA / "lfw_meta" / "pairsDevTrain.txt"
CROP = 96  # the synthetic faces are 160 px: a 96 px centre crop is far from the default centre square


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the dataclass and its encodings ---------------------------------------------------------------
def test_encodings_round_trip_and_bad_metadata_is_named():
    hr = InputContract(center_crop=120)
    vlr = hr.for_vlr("14x16", DegradeConfig(blur_sigma=(0.5, 1.0), noise_std=(1.0, 3.0), jpeg_quality=(60, 90)))
    for c in (hr, vlr):
        assert InputContract.from_dict(c.to_dict()) == c
        props = c.to_properties()
        assert all(isinstance(v, str) for v in props.values())  # ONNX metadata / Triton string_value
        assert InputContract.from_properties(props, "m.onnx") == c
        assert json.loads(json.dumps(c.to_dict())) == c.to_dict()  # plain types in the checkpoint
    assert vlr.hr_part() == hr and vlr.degrade_config().noise_std == (1.0, 3.0)
    assert InputContract.from_properties({"other": "x"}, "m.onnx") is None  # a model without one
    bad = {**hr.to_properties(), "faceops_input_center_crop": "wide"}
    with pytest.raises(ContractError, match="center_crop.*wide"):
        InputContract.from_properties(bad, "m.onnx")
    with pytest.raises(ContractError, match="version '9'"):
        InputContract.from_properties({**hr.to_properties(), "faceops_input_contract": "9"}, "m.onnx")


def test_to_input_is_trainings_conversion_by_default_and_follows_the_contract_otherwise():
    faces = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(InputContract().to_input(faces), to_input(faces).numpy())
    bgr = InputContract(channel_order="BGR", mean=0.0, std=1.0).to_input(faces)
    np.testing.assert_allclose(bgr, faces[..., ::-1].transpose(0, 3, 1, 2) / 255.0, atol=1e-6)


def test_conflicts_name_both_values_and_models_must_agree():
    c = InputContract(center_crop=120)
    check_agrees(c, {"center_crop": 120, "hr_size": 112}, "rec.pt", "--config")
    with pytest.raises(ContractConflictError, match=r"center_crop = 100.*rec\.pt.*center_crop = 120"):
        check_agrees(c, {"center_crop": 100}, "rec.pt", "--config")
    with pytest.raises(ContractConflictError, match=r"a\.pt was trained with center_crop = 120 but b\.pt.*null"):
        shared_preparation([("a.pt", c), ("b.pt", InputContract())])


def test_vlr_size_of_reads_either_place_a_checkpoint_records_it():
    assert vlr_size_of({"vlr_size": "16x16", "model_config": {"vlr_size": "32x32"}}) == "16x16"
    assert vlr_size_of({"model_config": {"vlr_size": "24x24"}}) == "24x24"
    assert vlr_size_of({"kind": "recognizer", "model_config": {"name": "edgeface_s"}}) is None
    assert vlr_size_of({"vlr_size": None, "model_config": None}) is None


def test_a_model_without_a_contract_is_assumed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="faceops.models.contract"):
        got = shared_preparation([("new.pt", InputContract(center_crop=120)), ("old.pt", None)])
        assert got[1] == InputContract(center_crop=120)
        assert "old.pt records no input contract" in caplog.text and "center_crop=120" in caplog.text
        caplog.clear()
        alone = shared_preparation([("old.pt", None)], {"center_crop": 90}, "--config")
        assert alone[0].center_crop == 90 and "--config over ingest's defaults" in caplog.text


# -- recorded at training --------------------------------------------------------------------------
def lfw_layout(src: Path, dest: Path) -> Path:
    """``src/<id>/<k>.png`` -> ``dest/<id>/<id>_<k+1:04d>.jpg`` (the layout LFW pairs files name)."""
    for person in sorted(p for p in src.iterdir() if p.is_dir()):
        (dest / person.name).mkdir(parents=True)
        for k, f in enumerate(sorted(person.iterdir()), 1):
            with Image.open(f) as img:
                img.convert("RGB").save(dest / person.name / f"{person.name}_{k:04d}.jpg", quality=95)
    return dest


def pairs_file(path: Path, people: list[str], per_person: int, folds: int = 2, n: int = 6) -> Path:
    """An LFW-format pairs file over ``people`` (``folds`` x ``n`` genuine + ``n`` impostor lines)."""
    rng = np.random.default_rng(0)
    lines = [f"{folds}\t{n}"]
    for _ in range(folds):
        for _ in range(n):
            p = people[rng.integers(len(people))]
            i, j = rng.choice(per_person, 2, replace=False) + 1
            lines.append(f"{p}\t{i}\t{j}")
        for _ in range(n):
            a, b = rng.choice(len(people), 2, replace=False)
            lines.append(f"{people[a]}\t{rng.integers(per_person) + 1}\t{people[b]}\t{rng.integers(per_person) + 1}")
    path.write_text("\n".join(lines) + "\n")
    return path


def train_tiny(source: Path, crop: int, root: Path) -> tuple[str, str]:
    """Ingest ``source`` with a ``crop`` px centre crop, train a recognizer for one epoch; returns
    (dataset URI, checkpoint URI)."""
    cfg = IngestConfig(prepare=PrepareConfig(center_crop=crop), degrade=DegradeConfig(sizes=["32x32"]),
                       splits=SplitConfig(train=0.6, val=0.2, test=0.2), pairs_per_split=20, workers=1)
    data = ingest(str(source), "faces", str(root / "store"), cfg, progress=False).uri
    rc = RecognizerTrainConfig(data=data, out=str(root / "rec"), model=RecognizerConfig(name="edgeface_xxs"))
    rc.loader.batch_size, rc.engine.epochs, rc.engine.progress = 16, 1, False
    result = train_recognizer(rc)
    return data, result.best_checkpoint or result.checkpoint


def evaluate_images(model: str, images: Path, pairs: Path, out: Path, config_text: str | None = None) -> int:
    args = ["evaluate", "--model", model, "--images", str(images), "--pairs", str(pairs), "--out", str(out)]
    if config_text is not None:
        (out.parent / f"{out.name}.yaml").write_text(config_text)
        args += ["--config", str(out.parent / f"{out.name}.yaml")]
    return main(args)


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def crop_config(crop: int) -> str:
    return f"ingest:\n  prepare:\n    center_crop: {crop}\nevaluate:\n  n_folds: 2\n"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """Synthetic 160 px faces in LFW layout, a recognizer trained on them with a 96 px crop, pairs."""
    root = tmp_path_factory.mktemp("contract")
    faces = lfw_layout(synthesize(root / "synth", 10, 8, seed=3, size=160, progress=False), root / "lfw")
    data, ckpt = train_tiny(faces, CROP, root)
    people = sorted(p.name for p in faces.iterdir())
    return {"root": root, "images": faces, "data": data, "ckpt": ckpt,
            "pairs": pairs_file(root / "pairs.txt", people, 8)}


def test_training_records_the_datasets_preparation(synthetic):
    ckpt = load_checkpoint(synthetic["ckpt"])
    assert from_checkpoint(ckpt, "ckpt") == InputContract(center_crop=CROP) == dataset_contract(synthetic["data"])


def test_dsr_checkpoint_records_its_vlr_size_and_degradation(synthetic):
    cfg = DSRTrainConfig(data=synthetic["data"], vlr_size="32x32", model=DSRConfig(base_channels=8, residual_blocks=1))
    recognizer = create_recognizer(RecognizerConfig(name="edgeface_xxs"))
    meta = DSRTask(cfg, recognizer, None, torch.device("cpu")).checkpoint_meta()
    expected = InputContract(center_crop=CROP).for_vlr("32x32", DegradeConfig(sizes=["32x32"]))
    assert from_checkpoint(meta, "dsr") == expected and expected.blur_sigma == (0.0, 0.0)


def test_images_mode_needs_no_config_and_a_contradiction_names_both_values(synthetic, tmp_path, capsys):
    """Issue 11's acceptance: the same scores with and without the ingest config."""
    ckpt, images, pairs = synthetic["ckpt"], synthetic["images"], synthetic["pairs"]
    assert evaluate_images(ckpt, images, pairs, tmp_path / "bare", "evaluate:\n  n_folds: 2\n") == 0
    assert evaluate_images(ckpt, images, pairs, tmp_path / "config", crop_config(CROP)) == 0
    assert metrics(tmp_path / "bare") == metrics(tmp_path / "config")
    assert f"center_crop={CROP}" in (tmp_path / "bare" / "report.html").read_text()
    capsys.readouterr()
    assert evaluate_images(ckpt, images, pairs, tmp_path / "wrong", crop_config(80)) == 2
    err = capsys.readouterr().err
    assert "center_crop = 80" in err and f"center_crop = {CROP}" in err, err


def test_an_old_checkpoint_is_assumed_to_take_ingests_defaults_with_a_warning(synthetic, tmp_path, caplog):
    state = load_checkpoint(synthetic["ckpt"])
    old = save_checkpoint(str(tmp_path / "old.pt"), {k: v for k, v in state.items()
                                                     if k not in ("format", "input_contract")})
    images, pairs = synthetic["images"], synthetic["pairs"]
    with caplog.at_level(logging.WARNING):
        assert evaluate_images(old, images, pairs, tmp_path / "old", "evaluate:\n  n_folds: 2\n") == 0
    assert "old.pt records no input contract" in caplog.text and "center_crop=None" in caplog.text
    assert evaluate_images(old, images, pairs, tmp_path / "told", crop_config(CROP)) == 0  # the config is taken
    assert evaluate_images(synthetic["ckpt"], images, pairs, tmp_path / "new", "evaluate:\n  n_folds: 2\n") == 0
    assert metrics(tmp_path / "told") == metrics(tmp_path / "new")


def test_a_dataset_prepared_unlike_the_model_is_refused(synthetic, tmp_path, capsys):
    other = ingest(str(synthetic["images"]), "uncropped", str(tmp_path / "store"),
                   IngestConfig(degrade=DegradeConfig(sizes=["32x32"]), pairs_per_split=20, workers=1,
                                splits=SplitConfig(train=0.6, val=0.2, test=0.2)), progress=False).uri
    rc = main(["evaluate", "--model", synthetic["ckpt"], "--data", other, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "prepare.center_crop = null" in err and f"center_crop = {CROP}" in err, err


# -- real faces ------------------------------------------------------------------------------------
needs_lfw = pytest.mark.skipif(not LFW_PAIRS.is_file() or not LFW_IMAGES.is_dir(),
                               reason=f"needs real data: LFW not found under {DATA} (set FACEOPS_DATA)")


@needs_lfw
def test_real_lfw_images_mode_scores_as_with_the_ingest_config(tmp_path):
    """A recognizer trained on 12 LFW people (120 px crop), evaluated on View 1 pairs of others."""
    source = tmp_path / "lfw12"
    source.mkdir()
    people = [p for p in sorted(LFW_IMAGES.iterdir()) if len(list(p.glob("*.jpg"))) >= 8][:12]
    for p in people:
        (source / p.name).symlink_to(p)
    _, ckpt = train_tiny(source, 120, tmp_path)
    lines = LFW_PAIRS.read_text().splitlines()[1:]
    genuine, impostor = lines[:1100], lines[1100:]
    body = genuine[:15] + impostor[:15] + genuine[600:615] + impostor[600:615]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t15\n" + "\n".join(body) + "\n")
    assert evaluate_images(ckpt, LFW_IMAGES, pairs, tmp_path / "bare", "evaluate:\n  n_folds: 2\n") == 0
    assert evaluate_images(ckpt, LFW_IMAGES, pairs, tmp_path / "config", crop_config(120)) == 0
    assert metrics(tmp_path / "bare") == metrics(tmp_path / "config")


def test_a_dataset_prepared_unlike_the_model_is_refused_naming_both():
    """Evaluation and gallery enrolment send a dataset's faces as ingest prepared them: the one check
    both use names the dataset, the field, both values and what to do."""
    from faceops.models.contract import check_prepared_alike

    check_prepared_alike("ds", InputContract(center_crop=120), InputContract(center_crop=120), "m.pt", "x")
    with pytest.raises(ContractConflictError, match=r"^file:///d was ingested with prepare\.center_crop = 100, "
                       r"but m\.pt was trained with center_crop = 120 .*ingest\.prepare\.center_crop=120$"):
        check_prepared_alike("file:///d", InputContract(center_crop=100), InputContract(center_crop=120), "m.pt",
                             "re-ingest with ingest.prepare.{name}={want}")
