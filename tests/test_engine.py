"""The training engine: NaN guard, exact resume after SIGKILL, DDP equivalence, schedules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import kill_at_first_checkpoint

from faceops import config
from faceops.train.checkpoint import first_non_finite, load_checkpoint
from faceops.train.recognizer import RecognizerTrainConfig, train_recognizer

TINY = ["model.name=edgeface_xxs", "loader.batch_size=8", "engine.progress=false", "engine.log_every_steps=1",
        "engine.amp=off"]


def tiny_cfg(data: str, out: Path, *sets: str) -> RecognizerTrainConfig:
    return config.load(RecognizerTrainConfig, overrides=[*TINY, f"data={data}", f"out={out}", *sets])


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(data: str, out: Path, *sets: str) -> list[str]:
    args = [a for s in (*TINY, *sets) for a in ("--set", s)]
    return [sys.executable, "-m", "faceops", "train", "recognizer", "--data", data, "--out", str(out),
            *args]


def test_injected_nans_are_skipped_counted_and_rolled_back(tiny_dataset, tmp_path):
    torch.set_num_threads(1)
    # step 1: one poisoned loss; step 3: three in a row -> a rollback (max_consecutive 3)
    cfg = tiny_cfg(tiny_dataset, tmp_path, "engine.epochs=4", "engine.checkpoint_every_steps=2",
                   "engine.nan_guard.inject_steps=[1, 3, 4, 5]", "engine.nan_guard.snapshot_every=1")
    result = train_recognizer(cfg)
    assert result.nan_events == {"loss": 4, "grad": 0, "param": 0}
    assert result.rollbacks == 1
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert first_non_finite({k: v for k, v in ckpt.items() if k != "rng"}) is None
    assert ckpt["nan_events"]["loss"] == 4 and ckpt["lr_scale"] == pytest.approx(0.5)


def test_injected_grad_nans_and_budget(tiny_dataset, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_cfg(tiny_dataset, tmp_path / "a", "engine.epochs=1", "engine.nan_guard.inject_kind=grad",
                   "engine.nan_guard.inject_steps=[1]")
    assert train_recognizer(cfg).nan_events["grad"] == 1
    cfg = tiny_cfg(tiny_dataset, tmp_path / "b", "engine.epochs=3", "engine.nan_guard.budget=2",
                   "engine.nan_guard.inject_steps=[1, 2, 3]", "engine.nan_guard.max_consecutive=10")
    with pytest.raises(Exception, match=r"NaN budget exceeded .* at step 4 .*loss"):
        train_recognizer(cfg)


def test_metrics_count_nan_events(tiny_dataset, tmp_path):
    from prometheus_client import generate_latest

    from faceops.data.reader import BatchDataset, load_split
    from faceops.train.engine import Engine
    from faceops.train.recognizer import RecognizerTask

    cfg = tiny_cfg(tiny_dataset, tmp_path, "engine.epochs=2", "engine.nan_guard.inject_steps=[0, 2]")
    train = load_split(tiny_dataset, "train")
    task = RecognizerTask(cfg, train, None, torch.device("cpu"))
    engine = Engine(task, BatchDataset(train, cfg.loader, 0), cfg.engine, str(tmp_path), run_id="t1",
                    model_name="edgeface_xxs")
    registry = engine.metrics.registry
    engine.fit()
    labels = {"stage": "train_recognizer", "run_id": "t1", "model": "edgeface_xxs"}
    assert registry.get_sample_value("faceops_nan_events_total", {**labels, "kind": "loss"}) == 2.0
    assert registry.get_sample_value("faceops_nan_events_total", {**labels, "kind": "grad"}) == 0.0
    assert registry.get_sample_value("faceops_train_loss", labels) > 0
    assert "faceops_train_images_per_second" in generate_latest(registry).decode()


def _weights(path: Path) -> dict:
    return load_checkpoint(str(path))["model"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tiny_dataset, tmp_path):
    sets = ("engine.epochs=3", "engine.checkpoint_every_steps=2", "engine.max_steps=9")
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(tiny_dataset, ref, *sets), check=True, env=_env(), capture_output=True)
    run = tmp_path / "run"
    kill_at_first_checkpoint(_train_cmd(tiny_dataset, run, *sets), run, _env())
    killed_at = load_checkpoint(str(run / "last.pt"))["step"]
    assert killed_at < 9
    subprocess.run([*_train_cmd(tiny_dataset, run, *sets), "--resume"], check=True, env=_env(),
                   capture_output=True)
    a, b = _weights(ref / "last.pt"), _weights(run / "last.pt")
    assert load_checkpoint(str(run / "last.pt"))["step"] == 9
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step {killed_at}"


def _one_and_two_processes(data: str, tmp_path: Path, *sets: str) -> tuple[dict, dict]:
    one = tmp_path / "one"
    subprocess.run(_train_cmd(data, one, *sets), check=True, env=_env(), capture_output=True)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "faceops", *_train_cmd(data, two, *sets)[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_checkpoint(str(one / "last.pt")), load_checkpoint(str(two / "last.pt"))


@pytest.mark.slow
def test_ddp_two_processes_equal_one(tiny_dataset, tmp_path):
    sets = ("engine.epochs=1", "engine.max_steps=3", "model.head=linear", "engine.clip_grad_norm=null",
            "engine.optim.name=sgd", "engine.optim.lr=0.05")
    one, two = _one_and_two_processes(tiny_dataset, tmp_path, *sets)
    a, b = one["model"], two["model"]
    assert one["step"] == 3
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")


@pytest.mark.slow
def test_ddp_accumulation_equals_one_process_and_a_batchnorm_model_trains(tiny_dataset, tmp_path):
    """2 micro-batches per step (DDP all-reduces only on the last, no_sync on the first): 2 ranks train
    what 1 process does. A BatchNorm head under 2 ranks trains too (statistics per rank, as DDP has them
    without SyncBatchNorm, which torch runs on GPUs only)."""
    sets = ("engine.epochs=1", "engine.max_steps=2", "engine.clip_grad_norm=null", "engine.optim.name=sgd",
            "engine.optim.lr=0.05", "engine.grad_accum=2")
    one, two = _one_and_two_processes(tiny_dataset, tmp_path / "linear", *sets, "model.head=linear")
    assert one["step"] == two["step"] == 2
    for k, v in one["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, two["model"][k], rtol=1e-4, atol=1e-5, msg=f"{k} differs")
    one, two = _one_and_two_processes(tiny_dataset, tmp_path / "bn", *sets, "model.head=linear_bn")
    stats = [k for k in two["model"] if k.endswith("running_mean")]
    assert stats and two["step"] == 2
    assert all(torch.isfinite(two["model"][k]).all() and two["model"][k].abs().sum() > 0 for k in stats)


def test_sync_bn_is_refused_where_torch_cannot_run_it():
    from faceops.train import ddp
    from faceops.train.engine import TrainingError

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(TrainingError, match=r"engine.sync_bn.*CUDA"):
        ddp.wrap({"model": model}, ddp.DistInfo(0, 2, 0), torch.device("cpu"), sync_bn=True, find_unused=False)


def _lrs(opt: torch.optim.Optimizer, sched, steps: int, group: int = 0) -> list[float]:
    """The LR each of ``steps`` optimiser steps runs at."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[group]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_and_groups():
    from faceops.train.config import OptimConfig, ScheduleConfig
    from faceops.train.optim import build_optimizer, build_scheduler

    p = [torch.nn.Parameter(torch.zeros(2))]
    q = [torch.nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, backbone_lr=0.01), {"backbone": p, "head": q})
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    sched = build_scheduler(ScheduleConfig(name="cosine", warmup_steps=10, warmup_start_factor=0.01,
                                           min_lr=0.0), opt, total_steps=110, steps_per_epoch=10)
    assert isinstance(sched, torch.optim.lr_scheduler.SequentialLR)
    lrs = _lrs(opt, sched, 110, group=1)
    assert lrs[0] == pytest.approx(0.001) and lrs[10] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.05, rel=0.05)
    assert lrs[-1] < 0.001
    step = build_scheduler(ScheduleConfig(name="step", step_epochs=1, gamma=0.5), opt, 30, 10)
    for _ in range(25):
        opt.step()
        step.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.25)


def test_onecycle_is_torchs():
    from faceops.train.config import OptimConfig, ScheduleConfig
    from faceops.train.optim import build_optimizer, build_scheduler

    opt = build_optimizer(OptimConfig(lr=0.1), {"head": [torch.nn.Parameter(torch.zeros(2))]})
    sched = build_scheduler(ScheduleConfig(name="onecycle", pct_start=0.25), opt, total_steps=100, steps_per_epoch=10)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)
    lrs = _lrs(opt, sched, 100)
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=1e-3)
    assert lrs.index(max(lrs)) in (24, 25) and lrs[-1] < 1e-4


def test_collapse_metric():
    from faceops.train.task import mean_inter_identity_cosine

    labels = torch.tensor([0, 0, 1, 1])
    collapsed = torch.ones(4, 3)
    spread = torch.tensor([[1.0, 0, 0], [1, 0.1, 0], [-1, 0, 0], [-1, 0, 0.1]])
    assert mean_inter_identity_cosine(collapsed, labels) == pytest.approx(1.0)
    assert mean_inter_identity_cosine(spread, labels) < -0.9


# -- checkpoints: the last K good states, corrupt ones skipped, never a silent restart ------------
def _fit(data: str, out: Path, *sets: str, resume: bool = False):
    from faceops.data.reader import BatchDataset, load_split
    from faceops.train.engine import Engine
    from faceops.train.recognizer import RecognizerTask

    torch.set_num_threads(1)
    cfg = tiny_cfg(data, out, "engine.epochs=2", "engine.checkpoint_every_steps=1", *sets)
    train = load_split(data, "train")
    task = RecognizerTask(cfg, train, None, torch.device("cpu"))
    engine = Engine(task, BatchDataset(train, cfg.loader, 0), cfg.engine, str(out), run_id="ck",
                    model_name="edgeface_xxs")
    registry = engine.metrics.registry
    return engine, engine.fit(resume=resume), registry


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_keeps_the_last_k_good_checkpoints(tiny_dataset, tmp_path):
    _fit(tiny_dataset, tmp_path, "engine.max_steps=5", "engine.keep_checkpoints=2")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert kept == ["step-00000004.pt", "step-00000005.pt"]
    assert load_checkpoint(str(tmp_path / "checkpoints" / kept[-1]))["step"] == 5


def test_corrupt_last_falls_back_to_the_newest_good_one_and_says_so(tiny_dataset, tmp_path, caplog):
    _fit(tiny_dataset, tmp_path, "engine.max_steps=4")
    _truncate(tmp_path / "last.pt")
    _truncate(tmp_path / "checkpoints" / "step-00000004.pt")
    caplog.set_level("INFO", logger="faceops.train.engine")
    engine, result, registry = _fit(tiny_dataset, tmp_path, "engine.max_steps=5", resume=True)
    assert "resumed from " + str(tmp_path / "checkpoints" / "step-00000003.pt") + " at step 3" in caplog.text
    assert f"{tmp_path}/last.pt is unreadable (checksum mismatch" in caplog.text
    assert "step-00000004.pt is unreadable (checksum mismatch" in caplog.text
    labels = {"stage": "train_recognizer", "run_id": "ck", "model": "edgeface_xxs"}
    for name in ("last.pt", "step-00000004.pt"):
        assert registry.get_sample_value("faceops_checkpoint_corrupt_total", {**labels, "checkpoint": name}) == 1
    assert result.steps == 5 and load_checkpoint(str(tmp_path / "last.pt"))["step"] == 5


def test_all_checkpoints_corrupt_is_an_error_naming_them(tiny_dataset, tmp_path):
    from faceops.train.engine import TrainingError

    _fit(tiny_dataset, tmp_path, "engine.max_steps=2", "engine.keep_checkpoints=1")
    before = {p: p.read_bytes() for p in [tmp_path / "last.pt", *(tmp_path / "checkpoints").glob("*.pt")]}
    for p in before:
        _truncate(p)
    with pytest.raises(TrainingError, match=r"cannot resume: no readable checkpoint .*last\.pt.*step-00000002\.pt"):
        _fit(tiny_dataset, tmp_path, "engine.max_steps=3", resume=True)
    assert all(p.stat().st_size == len(b) // 2 for p, b in before.items()), "a corrupt checkpoint was overwritten"


def test_only_a_missing_checkpoint_starts_from_scratch(tiny_dataset, tmp_path, caplog):
    caplog.set_level("INFO", logger="faceops.train.engine")
    _, result, _ = _fit(tiny_dataset, tmp_path, "engine.max_steps=1", resume=True)
    assert "no checkpoint in" in caplog.text and result.steps == 1


def test_step_and_image_counters_at_default_log_interval(tiny_dataset, tmp_path):
    """Default log_every_steps (10): the counters are exact per step, and NaN-skipped batches add nothing
    (a skipped step still advances the step count and the schedule, as under torch's GradScaler)."""
    engine, result, registry = _fit(tiny_dataset, tmp_path, "engine.epochs=20", "engine.max_steps=12",
                                    "engine.log_every_steps=10",
                                    "engine.nan_guard.inject_steps=[3]")
    labels = {"stage": "train_recognizer", "run_id": "ck", "model": "edgeface_xxs"}
    assert result.steps == 12 and result.nan_events["loss"] == 1
    assert registry.get_sample_value("faceops_train_steps_total", labels) == 11
    assert registry.get_sample_value("faceops_train_images_total", labels) == 11 * 8


@pytest.mark.slow
def test_ddp_nan_loss_on_one_rank_skips_on_all_without_hanging(tiny_dataset, tmp_path):
    """A non-finite loss on rank 1 alone: every rank skips that batch (no DDP all-reduce left waiting)."""
    sets = ("engine.epochs=6", "engine.max_steps=3", "engine.nan_guard.inject_steps=[1]",
            "engine.nan_guard.inject_ranks=[1]")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "faceops", *_train_cmd(tiny_dataset, tmp_path, *sets)[3:]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["step"] == 3 and ckpt["nan_events"]["loss"] == 1


# -- review findings (model-contract issue, item 4): each failed on the code before its fix --------
def test_rollback_keeps_best_patience_and_the_schedule_position(tiny_dataset, tmp_path):
    """A snapshot from step 0 and a rollback at step 7: best/bad_epochs are not reset, LR follows the step."""
    from faceops.data.reader import BatchDataset, load_split
    from faceops.train.engine import Engine
    from faceops.train.hooks import Hook
    from faceops.train.recognizer import RecognizerTask

    torch.set_num_threads(1)
    cfg = tiny_cfg(tiny_dataset, tmp_path, "engine.epochs=4", "engine.nan_guard.snapshot_every=1000",
                   "engine.nan_guard.inject_steps=[7, 8, 9]")
    train = load_split(tiny_dataset, "train")
    val = load_split(tiny_dataset, "val")
    task = RecognizerTask(cfg, train, val, torch.device("cpu"))
    seen: list = []

    class SeeBest(Hook):
        def on_epoch_start(self, engine):
            seen.append(engine.best)

    engine = Engine(task, BatchDataset(train, cfg.loader, 0), cfg.engine, str(tmp_path), hooks=[SeeBest()])
    result = engine.fit()
    assert result.rollbacks == 1
    assert all(b is not None for b in seen[1:]), f"best was reset by the rollback: {seen}"
    assert engine.best == max(h["val_accuracy"] for h in result.history)
    assert engine.scheduler.last_epoch == engine.step


def test_ema_warms_up_and_is_what_validation_scores(tiny_dataset, tmp_path):
    from faceops.data.reader import BatchDataset, load_split
    from faceops.train.ema import EMA
    from faceops.train.engine import Engine
    from faceops.train.recognizer import RecognizerTask

    torch.set_num_threads(1)
    cfg = tiny_cfg(tiny_dataset, tmp_path, "engine.epochs=1", "engine.max_steps=3", "engine.ema_decay=0.999")
    train, val = load_split(tiny_dataset, "train"), load_split(tiny_dataset, "val")
    task = RecognizerTask(cfg, train, val, torch.device("cpu"))
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    engine = Engine(task, BatchDataset(train, cfg.loader, 0), cfg.engine, str(tmp_path))
    result = engine.fit()
    raw = task.model.state_dict()
    ema = next(h for h in engine.hooks if isinstance(h, EMA)).state_dict()
    moved = [k for k, v in init.items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    ema_part = sum((ema[k] - init[k]).norm() for k in moved) / sum((raw[k] - init[k]).norm() for k in moved)
    assert ema_part > 0.2, f"the EMA stayed at the initialisation ({ema_part:.4f} of the way; no warm-up)"
    task.model.load_state_dict(ema)
    with torch.no_grad():
        task.model.eval()
        figures = task.validate()
    assert result.history[-1]["mean_cosine"] == pytest.approx(figures["mean_cosine"], abs=1e-6)


def test_a_follow_up_phase_continues_with_the_trained_margin_head(tiny_dataset, tmp_path):
    sets = ["engine.epochs=1", "engine.max_steps=2",
            "phases=[{epochs: 1, optim: {name: sgd, lr: 1.0e-12, weight_decay: 0.0}}]"]
    train_recognizer(tiny_cfg(tiny_dataset, tmp_path, *sets))
    first = load_checkpoint(str(tmp_path / "best.pt" if (tmp_path / "best.pt").exists() else tmp_path / "last.pt"))
    phase = load_checkpoint(str(tmp_path / "phase1" / "last.pt"))
    for k, v in first["head"].items():  # an LR of 1e-12: the phase ends where it started
        torch.testing.assert_close(phase["head"][k], v, msg=f"head.{k} was re-initialised for the phase")


def test_a_checkpoint_that_no_longer_fits_its_architecture_is_a_clear_error(tmp_path):
    from faceops.models import RecognizerConfig, create_recognizer
    from faceops.train.checkpoint import CheckpointError, load_model, save_checkpoint

    model = create_recognizer(RecognizerConfig(name="edgeface_xxs"))
    weights = model.state_dict()
    weights["extra.weight"] = torch.zeros(1)  # as an older layout's key would be
    save_checkpoint(str(tmp_path / "old.pt"), {"kind": "recognizer", "model": weights,
                                               "model_config": {"name": "edgeface_xxs"}})
    with pytest.raises(CheckpointError, match=r"old\.pt: its weights do not fit the edgeface_xxs .*older faceops"):
        load_model(str(tmp_path / "old.pt"))


def test_resume_is_exact_with_randomness_in_the_model(tiny_dataset, tmp_path):
    """Stochastic depth draws from the global RNG every step: a resumed run must draw what an uninterrupted
    one does (a DataLoader iterator drawing its base seed from that RNG put the resumed run one draw ahead)."""
    from faceops.data.reader import BatchDataset, load_split
    from faceops.train.engine import Engine
    from faceops.train.hooks import Hook
    from faceops.train.recognizer import RecognizerTask

    torch.set_num_threads(1)

    class CrashAt(Hook):
        def on_step_end(self, engine):
            if engine.step == 2:  # mid-epoch (3 batches per epoch): resume re-creates the epoch's DataLoader
                raise KeyboardInterrupt("simulated crash after the step-1 checkpoint")

    def fit(out: Path, hooks=(), resume=False):
        cfg = tiny_cfg(tiny_dataset, out, "engine.epochs=2", "engine.max_steps=6", "engine.checkpoint_every_steps=1",
                       "model.drop_path_rate=0.2")
        train = load_split(tiny_dataset, "train")
        torch.manual_seed(0)
        task = RecognizerTask(cfg, train, None, torch.device("cpu"))
        return Engine(task, BatchDataset(train, cfg.loader, 0), cfg.engine, str(out), hooks=hooks).fit(resume=resume)

    fit(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "run", hooks=[CrashAt()])
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["batch_in_epoch"] == 1
    fit(tmp_path / "run", resume=True)
    a, b = _weights(tmp_path / "ref" / "last.pt"), _weights(tmp_path / "run" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from step 1"
