"""GPU paths of the engine (skipped without CUDA; run on the GPU machine): AMP bf16 and fp16 with
GradScaler, the NaN guard under AMP, and a DSR step with AMP."""

import pytest
import torch

from faceops import config
from faceops.train.checkpoint import first_non_finite, load_checkpoint, load_model
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_with_nan_guard(tiny_dataset, tmp_path, amp):
    cfg = config.load(RecognizerTrainConfig, overrides=[
        f"data={tiny_dataset}", f"out={tmp_path}", "model.name=edgeface_xs_gamma_06", "loader.batch_size=8",
        "engine.epochs=10", "engine.progress=false", f"engine.amp={amp}", "engine.device=cuda",
        "engine.nan_guard.inject_steps=[1, 3, 4, 5]", "engine.nan_guard.snapshot_every=1"])
    result = train_recognizer(cfg)
    assert result.nan_events["loss"] == 4 and result.rollbacks == 1
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert first_non_finite({k: v for k, v in ckpt.items() if k != "rng"}) is None
    if amp == "fp16":
        assert ckpt["scaler"]["scale"] > 0  # GradScaler state is checkpointed
    model, meta = load_model(str(tmp_path / "last.pt"))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    e = model(x)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-4)


def test_dsr_training_step_with_amp(tiny_dataset, tmp_path):
    from faceops.train.dsr import DSRTrainConfig, train_dsr

    rec = config.load(RecognizerTrainConfig, overrides=[
        f"data={tiny_dataset}", f"out={tmp_path / 'rec'}", "model.name=edgeface_xxs", "loader.batch_size=8",
        "engine.epochs=1", "engine.progress=false", "engine.device=cuda"])
    r = train_recognizer(rec)
    dsr = config.load(DSRTrainConfig, overrides=[
        f"data={tiny_dataset}", f"out={tmp_path / 'dsr'}", f"recognizer={r.checkpoint}", "vlr_size=32x32",
        "loader.batch_size=8", "engine.epochs=1", "engine.progress=false", "engine.amp=bf16",
        "engine.device=cuda"])
    result = train_dsr(dsr)
    assert result.steps > 0 and sum(result.nan_events.values()) == 0
