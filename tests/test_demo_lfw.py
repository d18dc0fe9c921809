"""Real faces in one command (issue 13): `bash scripts/demo.sh --data DIR` runs `faceops run vlr_face` with
configs/demo_lfw.yaml (LFW's centre crop, the seeds training-class rule, both VLR sizes) and writes the
same report as the synthetic demo. Here on a tiny LFW-style folder of real people from
../shared/data/lfw_devtrain, with the budgets cut to a few steps."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from faceops import config
from faceops.data.ingest import IngestConfig, assign_roles
from faceops.run import config_yaml

pytestmark = pytest.mark.realdata

REPO = Path(__file__).resolve().parents[1]
LFW_CONFIG = REPO / "configs" / "demo_lfw.yaml"
SIZES = ("32x32", "14x16")
SETTINGS = ["hr", "bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned"]
TINY = [  # budgets of a smoke run: a few steps of every training step, small models and batches
    "recognizer.engine.epochs=1", "recognizer.engine.max_steps=2", "recognizer.loader.batch_size=8",
    "recognizer.engine.progress=false",
    "dsr.model.base_channels=8", "dsr.model.residual_blocks=1", "dsr.loader.batch_size=8",
    "dsr.engine.max_steps=2", "dsr.engine.progress=false",
    "finetune.loader.batch_size=8", "finetune.engine.max_steps=2", "finetune.engine.progress=false",
    "ingest.pairs_per_split=60", "evaluate.grid_samples=4", "export.parity_batch=4",
    "promote.min={verification.accuracy: 0.0}",  # the gate runs and passes: a few steps leave models near chance
]


@pytest.fixture(scope="module")
def lfw(data_dir: Path) -> Path:
    path = data_dir / "lfw_devtrain"
    if not path.is_dir():
        pytest.skip(f"needs real data: no LFW-style folder at {path}")
    return path


def _people(lfw: Path) -> dict[str, list[Path]]:
    return {p.name: sorted(p.glob("*.jpg")) for p in sorted(lfw.iterdir()) if p.is_dir()}


def tiny_lfw(lfw: Path, dest: Path) -> Path:
    """3 people with 8 images (training classes under the seeds rule), 4 with 2 (held out), 4 with 1
    (distractors): real 250x250 LFW files in the same <person>/<file> layout."""
    people = _people(lfw)
    pick = ([(n, f[:8]) for n, f in people.items() if len(f) >= 8][:3]
            + [(n, f) for n, f in people.items() if len(f) == 2][:4]
            + [(n, f) for n, f in people.items() if len(f) == 1][:4])
    for name, files in pick:
        (dest / name).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, dest / name / f.name)
    return dest


def test_lfw_config_trains_the_people_with_enough_images_and_holds_out_the_rest(lfw):
    """What the config's ingest rules make of the whole LFW folder (names and counts only, no pixels)."""
    cfg = config.load(IngestConfig, LFW_CONFIG, section="ingest")
    assert cfg.prepare.center_crop and 100 <= cfg.prepare.center_crop <= 150 and cfg.prepare.hr_size == 112
    assert cfg.degrade.sizes == list(SIZES)
    counts = {name: len(files) for name, files in _people(lfw).items()}
    roles = assign_roles(counts, cfg)
    trained = [i for i, (_, role) in roles.items() if role == "train_class"]
    assert len(roles) == len(counts)  # nobody is dropped
    assert trained and all(counts[i] >= 8 for i in trained)
    assert all(roles[i][1] == "distractor" for i, n in counts.items() if n == 1)
    held = {s: sum(1 for split, role in roles.values() if (split, role) == (s, "eval")) for s in ("val", "test")}
    assert held["test"] > held["val"] >= 2


@pytest.mark.slow
def test_demo_with_data_runs_vlr_face_on_real_faces_at_both_sizes(lfw, tmp_path):
    from test_run_view import check_clean_view

    data = tiny_lfw(lfw, tmp_path / "lfw")
    out = tmp_path / "out"
    sets = [a for s in TINY for a in ("--set", s)]
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--data", str(data), *sets, "--out", str(out)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # demo.sh --data without --config ran `faceops run vlr_face --config configs/demo_lfw.yaml`
    assert (out / "config.yaml").read_text() == config_yaml("vlr_face", str(LFW_CONFIG), TINY)
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["ingest"]["prepare"]["center_crop"] == yaml.safe_load(LFW_CONFIG.read_text())["ingest"]["prepare"][
        "center_crop"]

    root = next((out / "kfp").iterdir())
    tasks = sorted(p.name for p in root.iterdir() if not p.name.startswith("for-loop"))
    steps = tasks + [f"{step}[{size}]" for step in ("train-dsr", "finetune-edgeface", "finetune-bicubic")
                     for size in SIZES]
    view = "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if ln.split()[1:2] != ["running"])
    check_clean_view(view, steps, out)  # the demo's view: a start and an end line per step (a loaded machine
    #                                     also shows a step's 'running' lines after a minute)
    assert "ingest" in r.stdout and "11 people" in r.stdout

    evaluation = next((out / "store" / "runs").iterdir()) / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert list(metrics["vlr"]) == list(SIZES)
    for table in metrics["vlr"].values():
        assert list(table) == SETTINGS
        for setting in SETTINGS:
            assert {"accuracy", "accuracy_se"} <= set(table[setting]["verification"])
    for size in SIZES:
        assert f"{size} dsr_finetuned" in r.stdout  # the summary table, per size
    html = (evaluation / "report.html").read_text()
    assert all(size in html for size in SIZES)
    images = re.findall(r"src=[\"']([^\"']+\.png)[\"']", html)
    assert images and all((evaluation / p).is_file() for p in images)
    assert any(SIZES[0] in p for p in images) and any(SIZES[1] in p for p in images)
