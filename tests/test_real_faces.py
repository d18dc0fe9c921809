"""Real faces (ORL): a recognizer trained for a few CPU-minutes separates held-out people, and
`faceops verify` over a real local Triton gives the right answers with it."""

import json
import time

import pytest

from faceops import config
from faceops.cli import main
from faceops.data.ingest import IngestConfig, ingest
from faceops.evaluate.runner import evaluate
from faceops.export.api import export_model
from faceops.serve.local import LocalTriton
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def test_edgeface_xs_on_orl_then_verify_over_triton(tmp_path, data_dir, capsys):
    orl = data_dir / "orl"
    ds = ingest(str(orl), "orl", str(tmp_path / "store"),
                config.from_dict(IngestConfig, {"splits": {"train": 0.6, "val": 0.2, "test": 0.2}}),
                progress=False).uri
    cfg = config.load(RecognizerTrainConfig, overrides=[
        f"data={ds}", f"out={tmp_path / 'rec'}", "model.name=edgeface_xs_gamma_06", "loader.batch_size=32",
        "engine.epochs=12", "engine.progress=false", "engine.optim.lr=2e-3", "engine.schedule.warmup_steps=10"])
    t0 = time.time()
    result = train_recognizer(cfg)
    minutes = (time.time() - t0) / 60
    model = result.best_checkpoint or result.checkpoint
    metrics = evaluate(model, tmp_path / "eval", data=ds, split="test")
    acc = metrics["verification"]["accuracy"]
    with capsys.disabled():
        print(f"\nORL held-out identities: verification accuracy {acc:.3f}, EER "
              f"{metrics['verification']['eer']:.3f}, rank-1 {metrics['identification']['rank1']:.3f} after "
              f"{minutes:.1f} CPU-min of edgeface_xs training")
    assert acc > 0.65  # chance is 0.5 on balanced pairs (measured: 0.728 after 1 CPU-minute)

    export_model(model, str(tmp_path / "repo"))
    manifest = json.loads((tmp_path / "store" / "datasets" / "orl" / "manifest.json").read_text())
    train_ids = sorted({im["identity"] for im in manifest["images"] if im["split"] == "train"})
    a, b = train_ids[0], train_ids[1]
    capsys.readouterr()
    with LocalTriton(str(tmp_path / "repo")) as server:
        common = ["--url", server.grpc_url, "--metrics", str(tmp_path / "eval" / "metrics.json")]
        assert main(["verify", str(orl / a / "1.pgm"), str(orl / a / "2.pgm"), *common]) == 0
        same = capsys.readouterr().out
        assert main(["verify", str(orl / a / "1.pgm"), str(orl / b / "1.pgm"), *common]) == 0
        different = capsys.readouterr().out
    assert same.lower().startswith("same"), same
    assert different.lower().startswith("different"), different
