"""Promotion: the gate, staged exports served with provenance, and one pipeline's promotion never
changing what another pipeline's ensemble answers (checked over gRPC on a REAL local Triton)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from faceops.errors import FaceopsError
from faceops.export import ExportConfig, export_modules
from faceops.export.promote import (
    PromoteConfig,
    clear,
    gate,
    headline,
    promote,
    staging_uri,
)
from faceops.export.triton_repo import parse_config, version_provenance
from faceops.metrics import run_id_for
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.models.contract import InputContract
from faceops.stages import run_root_stage
from faceops.storage import LocalStore

torch.set_num_threads(1)
CFG = ExportConfig(instance_kind="KIND_CPU", parity_batch=2)
METRICS = {"verification.accuracy": 0.91, "verification.accuracy_se": 0.01, "verification.eer": 0.1,
           "identification.rank1": 0.8, "vlr.32x32.dsr_finetuned.verification.accuracy": 0.88,
           "vlr.32x32.dsr.verification.accuracy": 0.85, "vlr.32x32.dsr.super_resolution.psnr": 30.5}


def _config(repo: Path, model: str):
    return parse_config((repo / model / "config.pbtxt").read_text())


# -- the gate ---------------------------------------------------------------------------------------
def test_gate_passes_fails_and_names_each_check():
    passed = gate(METRICS, PromoteConfig(min={"verification.accuracy": 0.9}, max={"verification.eer": 0.2}))
    assert passed.passed and "promoted" in passed.describe() and "verification.eer 0.1000 <= 0.2: ok" in \
        passed.describe()
    failed = gate(METRICS, PromoteConfig(min={"vlr.32x32.dsr_finetuned.verification.accuracy": 0.9}))
    assert not failed.passed
    assert "NOT promoted" in failed.describe() and "0.8800 >= 0.9: FAILS" in failed.describe()


def test_a_nan_figure_never_passes():
    assert not gate({**METRICS, "verification.accuracy": math.nan}, PromoteConfig()).passed


def test_a_threshold_on_a_figure_the_evaluation_lacks_is_an_error_with_the_closest_name():
    with pytest.raises(FaceopsError, match=r"promote.min.verification.acuracy.*did you mean verification.accuracy"):
        gate(METRICS, PromoteConfig(min={"verification.acuracy": 0.5}))


def test_promote_config_refuses_a_non_number():
    from faceops.config import ConfigError, load

    with pytest.raises(ConfigError, match="promote.min.verification.accuracy"):
        load(PromoteConfig, text="promote: {min: {verification.accuracy: .nan}}", section="promote")


# -- run folders ------------------------------------------------------------------------------------
def test_run_folder_is_the_kfp_run_id_unless_a_run_id_is_given():
    assert run_root_stage("s3://faceops-data", "", "0f1e-uuid") == "s3://faceops-data/runs/0f1e-uuid"
    assert run_root_stage("s3://faceops-data/", "exp-7", "0f1e-uuid") == "s3://faceops-data/runs/exp-7"
    with pytest.raises(FaceopsError, match="run_id"):
        run_root_stage("s3://faceops-data", "../other", "uuid")
    assert run_id_for("s3://faceops-data/runs/exp-7") == "exp-7"  # the one reader of that layout
    assert staging_uri("s3://faceops-data/runs/exp-7/") == "s3://faceops-data/runs/exp-7/staging"


def test_headline_figures_follow_the_models_role():
    assert headline("recognizer", METRICS) == {"verification.accuracy": 0.91, "verification.accuracy_se": 0.01,
                                               "identification.rank1": 0.8}
    assert headline("vlr_face_32x32", METRICS) == {"vlr.32x32.dsr_finetuned.verification.accuracy": 0.88}
    assert headline("dsr_32x32", METRICS) == {"vlr.32x32.dsr.verification.accuracy": 0.85,
                                              "vlr.32x32.dsr.super_resolution.psnr": 30.5}


# -- staged -> served -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    rec = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()
    other = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()  # "arcface_resnet34"'s recognizer
    dsr = create_dsr(DSRConfig(vlr_size="32x32", base_channels=8, residual_blocks=1)).eval()
    return rec, other, dsr


def _stage(tmp: Path, name: str, recognizer, dsrs=None) -> str:
    staged = str(tmp / "runs" / name / "staging")
    export_modules(recognizer, staged, dsrs, CFG, contract=InputContract())
    return staged


def test_promotion_serves_new_versions_with_provenance_and_keeps_the_served_ones(models, tmp_path):
    rec, other, dsr = models
    live = tmp_path / "triton"
    first = promote(_stage(tmp_path, "a", rec, {"32x32": dsr}), str(live), run_id="a", dataset_hash="h1",
                    metrics=METRICS)
    assert first == {"recognizer": 1, "dsr": 1, "vlr_face": 1, "vlr_fused": 1}
    assert version_provenance(_config(live, "recognizer"), 1) == {
        "run_id": "a", "dataset_content_hash": "h1", "verification.accuracy": "0.91",
        "verification.accuracy_se": "0.01", "identification.rank1": "0.8"}
    second = promote(_stage(tmp_path, "b", other), str(live), run_id="b", dataset_hash="h2", metrics=METRICS,
                     keep=2)
    assert second == {"recognizer": 2}
    config = _config(live, "recognizer")
    assert list(config.version_policy.specific.versions) == [1, 2]
    assert version_provenance(config, 1)["run_id"] == "a" and version_provenance(config, 2)["run_id"] == "b"


def test_a_staging_folder_is_emptied_before_a_retried_export(models, tmp_path):
    staged = _stage(tmp_path, "a", models[0])
    clear(staged)
    assert not list(LocalStore(staged).list())
    export_modules(models[0], staged, cfg=CFG, contract=InputContract())
    assert [p.name for p in (Path(staged) / "recognizer").iterdir() if p.is_dir()] == ["1"]


def test_only_the_gated_promote_step_is_given_the_served_repository(tmp_path):
    """The pipelines serve only inside ``dsl.If(gate)``: the compiled IR runs ``promote`` (the only step
    given the served repository) under the gate's condition, and export writes to the run's staging."""
    import yaml

    from faceops.run import compile_pipeline

    for name in ("vlr_face", "arcface_resnet34"):
        spec = next(yaml.safe_load_all(compile_pipeline(name, str(tmp_path / f"{name}.yaml")).read_text()))
        root = spec["root"]["dag"]["tasks"]
        condition = [t for t in root.values() if "triggerPolicy" in t]
        assert len(condition) == 1
        assert "promotion-gate" in condition[0]["triggerPolicy"]["condition"]
        inner = spec["components"][condition[0]["componentRef"]["name"]]["dag"]["tasks"]
        assert inner["promote"]["inputs"]["parameters"]["repo_uri"]["componentInputParameter"] == \
            "pipelinechannel--model_repo_uri"
        given_repo = [t for t in root.values() if "model_repo_uri" in str(t.get("inputs", {}).get("parameters", {}))]
        assert given_repo == condition, "only the promotion branch may write to the served repository"
        run_root = root["run-root"]["inputs"]["parameters"]["job_id"]["runtimeValue"]["constant"]
        assert run_root == "{{$.pipeline_job_uuid}}"


# -- another pipeline's ensemble, over gRPC ---------------------------------------------------------
@pytest.mark.slow
def test_promoting_another_pipelines_recognizer_leaves_the_vlr_ensembles_answers_unchanged(models, tmp_path):
    """vlr_face's single-size export serves ``vlr_face`` = ``dsr`` -> ``recognizer`` (v1); an
    arcface_resnet34 run then promotes ``recognizer`` v2. The ensemble still answers with v1's
    embeddings, and ``recognizer`` itself answers with v2."""
    pytest.importorskip("pytriton", reason="the local Triton needs nvidia-pytriton: pip install 'faceops[serve]'")
    from faceops.serve import FaceClient, LocalTriton

    rec, other, dsr = models
    live = tmp_path / "triton"
    promote(_stage(tmp_path, "vlr", rec, {"32x32": dsr}), str(live), run_id="vlr", dataset_hash="h",
            metrics=METRICS)
    vlr = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    hr = np.random.default_rng(1).uniform(-1, 1, (4, 3, 112, 112)).astype(np.float32)

    def answers() -> tuple[np.ndarray, np.ndarray]:
        with LocalTriton(str(live)) as server:
            client = FaceClient(server.grpc_url)
            return client.infer("vlr_face", vlr), client.infer("recognizer", hr)

    ensemble_before, recognizer_before = answers()
    ensemble_config = (live / "vlr_face" / "config.pbtxt").read_bytes()
    promote(_stage(tmp_path, "arcface", other), str(live), run_id="arcface", dataset_hash="h", metrics=METRICS)
    assert (live / "vlr_face" / "config.pbtxt").read_bytes() == ensemble_config
    assert list(_config(live, "recognizer").version_policy.specific.versions) == [1, 2]  # v1: pinned
    ensemble_after, recognizer_after = answers()
    np.testing.assert_array_equal(ensemble_after, ensemble_before)
    assert np.abs(recognizer_after - recognizer_before).max() > 1e-3  # the new recognizer is served


# -- one publish at a time, retries, and no moment with a dangling pin -----------------------------
def test_a_retried_promotion_serves_nothing_twice(models, tmp_path):
    live = tmp_path / "triton"
    staged = _stage(tmp_path, "a", models[0], {"32x32": models[2]})
    first = promote(staged, str(live), run_id="a", dataset_hash="h", metrics=METRICS)
    before = {p: p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    assert promote(staged, str(live), run_id="a", dataset_hash="h", metrics=METRICS) == first
    assert {p: p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()} == before
    assert promote(staged, str(live), run_id="b", dataset_hash="h", metrics=METRICS)["recognizer"] == 2


def test_two_promotions_at_once_get_distinct_versions_each_recorded(models, tmp_path):
    import threading

    live = tmp_path / "triton"
    staged = {run: _stage(tmp_path, run, models[0]) for run in ("a", "b")}
    plans: dict[str, dict[str, int]] = {}
    threads = [threading.Thread(target=lambda r=r: plans.update({r: promote(
        staged[r], str(live), run_id=r, dataset_hash="h", metrics=METRICS, keep=2)})) for r in staged]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p["recognizer"] for p in plans.values()) == [1, 2]
    config = _config(live, "recognizer")
    assert list(config.version_policy.specific.versions) == [1, 2]
    for run, plan in plans.items():
        assert version_provenance(config, plan["recognizer"])["run_id"] == run
    assert not (live / ".faceops-publish.lock").exists()  # released


def test_a_held_lock_makes_a_publish_wait_then_fail_naming_the_holder_and_a_stale_one_is_broken(tmp_path):
    import json
    import socket
    import subprocess
    import time

    from faceops.export.triton_repo import LOCK, repository_lock

    store = LocalStore(tmp_path / "triton")
    with (repository_lock(store, "run a"),
          pytest.raises(FaceopsError, match=r"another publish \(run a\).*delete the lock"),
          repository_lock(store, "run b", wait_s=0.2, poll_s=0.05)):
        pass
    assert not store.exists(LOCK)
    store.put_bytes(LOCK, json.dumps({"holder": "run dead", "since": time.time() - 7200}).encode())
    with repository_lock(store, "run c", wait_s=0.2, poll_s=0.05):
        assert b"run c" in store.get_bytes(LOCK)
    # a fresh lock whose process on this host has exited (a publish killed, or unable to release it)
    exited = subprocess.Popen(["true"])
    exited.wait()
    store.put_bytes(LOCK, json.dumps({"holder": "run killed", "since": time.time(), "host": socket.gethostname(),
                                      "pid": exited.pid}).encode())
    with repository_lock(store, "run d", wait_s=0.2, poll_s=0.05):
        assert b"run d" in store.get_bytes(LOCK)


def test_no_moment_of_a_promotion_leaves_an_ensemble_pinning_an_unserved_version(models, tmp_path, monkeypatch):
    """Triton polls the repository: after every config write, each ensemble's pinned versions are served."""
    from faceops.export.triton_repo import CONFIG, parse_config, served_versions

    class Watched(LocalStore):
        checks = 0

        def put_bytes(self, key, data):
            info = super().put_bytes(key, data)
            if key.endswith(CONFIG):
                configs = {k.split("/")[0]: parse_config(self.get_bytes(k).decode())
                           for k in self.list() if k.endswith(f"/{CONFIG}")}
                for config in configs.values():
                    for step in config.ensemble_scheduling.step:
                        served = served_versions(self, step.model_name, configs[step.model_name])
                        assert step.model_version in served, (config.name, step.model_name, served)
                Watched.checks += 1
            return info

    import faceops.export.promote as promote_module

    rec, _, dsr = models
    live = tmp_path / "triton"
    real = promote_module.open_store
    monkeypatch.setattr(promote_module, "open_store", lambda uri: Watched(uri) if uri == str(live) else real(uri))
    for run in ("a", "b"):
        promote(_stage(tmp_path, run, rec, {"32x32": dsr}), str(live), run_id=run, dataset_hash="h", metrics=METRICS)
    assert Watched.checks >= 8
    assert list(_config(live, "recognizer").version_policy.specific.versions) == [2]  # v1 no longer pinned


def test_each_pipeline_serves_its_own_recognizer_so_promotions_never_replace_anothers(models, tmp_path):
    """vlr_face serves `recognizer` (the contract name), arcface_resnet34 its own `arcface_resnet34`:
    promoting one leaves every model of the other untouched."""
    from faceops.config import load, packaged_config

    names = {p: load(ExportConfig, str(packaged_config(p)), section="export").name
             for p in ("vlr_face", "demo", "arcface_resnet34")}
    assert names == {"vlr_face": "recognizer", "demo": "recognizer", "arcface_resnet34": "arcface_resnet34"}
    live = tmp_path / "triton"
    promote(_stage(tmp_path, "vlr", models[0], {"32x32": models[2]}), str(live), run_id="vlr", dataset_hash="h",
            metrics=METRICS)
    before = {p: p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    staged = str(tmp_path / "runs" / "arc" / "staging")
    export_modules(models[1], staged, cfg=ExportConfig(name="arcface_resnet34", instance_kind="KIND_CPU",
                                                       parity_batch=2), contract=InputContract())
    assert promote(staged, str(live), run_id="arc", dataset_hash="h", metrics=METRICS) == {"arcface_resnet34": 1}
    after = {p: p.read_bytes() for p in sorted(live.rglob("*")) if p.is_file()}
    assert {p: b for p, b in after.items() if "arcface_resnet34" not in str(p)} == before


def test_a_nan_figure_stays_off_the_metrics_artifact_and_never_passes_the_gate(tmp_path):
    """KFP's backend refuses NaN in an executor output: the evaluation lists such figures apart, and the
    gate reads them back as NaN, so the run is not promoted (rather than failing or passing)."""
    from types import SimpleNamespace

    from kfp.dsl import Metrics

    from faceops.stages import gate_stage, log_evaluation

    report_dir = tmp_path / "evaluation"
    report_dir.mkdir()
    (report_dir / "report.html").write_text("<html></html>")
    (report_dir / "roc.json").write_text("{}")
    metrics = Metrics(name="metrics", uri=str(tmp_path / "m"))
    result = {"verification": {"accuracy": math.nan, "eer": 0.2}, "report_dir": str(report_dir)}
    log_evaluation(result, metrics, SimpleNamespace(path=str(tmp_path / "r.html"), metadata={}))
    assert metrics.metadata["verification.eer"] == 0.2 and "verification.accuracy" not in metrics.metadata
    decision = gate_stage(dict(metrics.metadata))
    assert not decision["passed"] and "verification.accuracy nan >= 0.6: FAILS" in decision["summary"]


def test_rollback_serves_an_earlier_version_and_says_where_it_came_from(models, tmp_path, capsys):
    from faceops.cli import main

    live = tmp_path / "triton"
    for run, rec in (("a", models[0]), ("b", models[1])):
        promote(_stage(tmp_path, run, rec, {"32x32": models[2]}), str(live), run_id=run, dataset_hash="h",
                metrics=METRICS)
    assert list(_config(live, "recognizer").version_policy.specific.versions) == [2]

    def refused(*argv: str) -> str:
        assert main(["rollback", *argv, "--repo", str(live)]) != 0
        return capsys.readouterr().err

    assert "an ensemble pins recognizer version(s) [2]" in refused("recognizer", "1")  # vlr_face v2 pins it
    assert "vlr_face is an ensemble" in refused("vlr_face", "1")
    assert "no version 9" in refused("recognizer", "9")
    promote(_stage(tmp_path, "c", models[0]), str(live), run_id="c", dataset_hash="h", metrics=METRICS)  # v3
    assert main(["rollback", "recognizer", "2", "--repo", str(live)]) == 0  # back from run c's to run b's
    out = capsys.readouterr().out
    assert "recognizer: now serving version 2" in out and re.search(r"run_id\s+b\n", out)
    assert list(_config(live, "recognizer").version_policy.specific.versions) == [2]
    assert version_provenance(_config(live, "recognizer"), 1)["run_id"] == "a"  # every present version's record
