"""Pipelines: compiled IR carries the cluster settings, the checked-in YAML is current, and both
pipelines run end to end through kfp's local runner (the README's main job included)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faceops.cli import main
from faceops.images import IMAGES, image
from faceops.run import compile_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny_pipeline.yaml"
GPU_CLUSTER = REPO / "configs" / "cluster_gpu.yaml"
GPUS_PER_NODE = "{{$.inputs.parameters['pipelinechannel--gpus_per_node']}}"  # the run's parameter
TRAINING_TASKS = {"train-recognizer", "train-dsr", "finetune-edgeface", "finetune-bicubic"}
GPU_TASKS = {"vlr_face": {"train-recognizer", "train-dsr", "finetune-edgeface", "finetune-bicubic", "evaluate-vlr",
                          "export-vlr"},
             "arcface_resnet34": {"train-recognizer", "evaluate", "export"}}


def _load(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _leaf_tasks(spec: dict, dag: dict | None = None):
    """(name, task) of every container task, those inside ParallelFor loops (sub-DAGs) included."""
    for name, task in (dag or spec["root"]["dag"])["tasks"].items():
        component = spec["components"][task["componentRef"]["name"]]
        if "dag" in component:
            yield from _leaf_tasks(spec, component["dag"])
        else:
            yield name, task


@pytest.mark.parametrize("name", sorted(GPU_TASKS))
def test_checked_in_yaml_equals_fresh_compile(name, tmp_path, monkeypatch):
    monkeypatch.delenv("FACEOPS_IMAGE_REGISTRY", raising=False)
    monkeypatch.delenv("FACEOPS_IMAGE_TAG", raising=False)
    fresh = compile_pipeline(name, str(tmp_path / f"{name}.yaml"), str(GPU_CLUSTER))
    assert fresh.read_text() == (REPO / "pipelines" / f"{name}.yaml").read_text(), (
        f"pipelines/{name}.yaml is stale: faceops compile {name} --cluster configs/cluster_gpu.yaml "
        f"-o pipelines/{name}.yaml")


@pytest.mark.parametrize("name", sorted(GPU_TASKS))
def test_ir_cluster_settings(name):
    spec, platform = _load(REPO / "pipelines" / f"{name}.yaml")
    tasks = dict(_leaf_tasks(spec))
    assert GPU_TASKS[name] <= set(tasks)
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    images = {image(role) for role in IMAGES}
    for task_name, task in tasks.items():
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        assert container["image"] in images, f"{task_name} names an image outside faceops.images"
        k8s = execs[executor]
        env = {e["secretNameParameter"]["runtimeValue"]["constant"] if "secretNameParameter" in e
               else e.get("secretName") for e in k8s["secretAsEnv"]}
        assert env == {"faceops-s3"}
        keys = {m["envVar"] for e in k8s["secretAsEnv"] for m in e["keyToEnv"]}
        assert {"FACEOPS_S3_ENDPOINT", "FACEOPS_S3_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY"} <= keys
        assert task["retryPolicy"]["maxRetryCount"] == 2
        gpu = task_name in GPU_TASKS[name]
        if gpu:
            res = container["resources"]
            if task_name in TRAINING_TASKS:  # the pod requests the run's gpus_per_node, as torchrun then uses
                assert res["accelerator"]["resourceCount"] == GPUS_PER_NODE
            else:
                assert res["accelerator"]["resourceCount"] == "1"
            assert "nvidia.com/gpu" in str(res["accelerator"])
            assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
            assert not task.get("cachingOptions", {}).get("enableCache", False)
        else:
            assert "accelerator" not in container.get("resources", {})
            assert "nodeSelector" not in k8s
    assert tasks["ingest"]["cachingOptions"]["enableCache"] is True
    text = (REPO / "pipelines" / f"{name}.yaml").read_text()
    assert "SECRET_KEY:" not in text.replace("FACEOPS_S3_SECRET_KEY", "")  # no credential values


def _outputs(spec: dict, task: str) -> dict[str, str]:
    """A task's output artifacts -> their schema titles."""
    component = spec["components"][dict(_leaf_tasks(spec))[task]["componentRef"]["name"]]
    return {k: v["artifactType"]["schemaTitle"] for k, v in component["outputDefinitions"]["artifacts"].items()}


def test_ir_trains_every_vlr_size_in_a_loop_and_shows_the_evaluation_in_kfp_ui():
    """vlr_face: the per-size steps run in a ParallelFor over `vlr_sizes` (the config's ingest sizes),
    their models reach evaluation and export collected; the evaluation publishes Metrics, a Markdown
    table and ROC curves (ClassificationMetrics: HR there, each VLR setting in the per-size vlr-roc)."""
    spec, _ = _load(REPO / "pipelines" / "vlr_face.yaml")
    assert spec["root"]["inputDefinitions"]["parameters"]["vlr_sizes"]["defaultValue"] == ["32x32", "14x16"]
    loops = {name: task for name, task in spec["root"]["dag"]["tasks"].items() if "parameterIterator" in task}
    bodies = {frozenset(spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]) for t in loops.values()}
    assert bodies == {frozenset({"train-dsr", "finetune-edgeface", "finetune-bicubic"}), frozenset({"vlr-roc"})}
    for task in loops.values():
        assert task["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--vlr_sizes"
        assert "parallelismLimit" not in task.get("iteratorPolicy", {})  # a cluster runs every size at once
    evaluate = spec["root"]["dag"]["tasks"]["evaluate-vlr"]["inputs"]["artifacts"]
    for name in ("dsr", "finetuned", "finetuned_bicubic"):
        assert "taskOutputArtifact" in evaluate[name], name  # collected from the loop
    assert _outputs(spec, "evaluate-vlr") == {
        "metrics": "system.Metrics", "report": "system.HTML", "headline": "system.Markdown",
        "roc_hr": "system.ClassificationMetrics", "curves": "system.Artifact"}
    assert _outputs(spec, "vlr-roc") == dict.fromkeys(
        ("bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned"), "system.ClassificationMetrics")
    arcface, _ = _load(REPO / "pipelines" / "arcface_resnet34.yaml")
    assert {"system.Metrics", "system.Markdown", "system.ClassificationMetrics"} <= set(
        _outputs(arcface, "evaluate").values())


def test_trainjob_backend_training_steps_are_launchers_holding_no_gpu(tmp_path):
    """cluster.training_backend: trainjob -> each training step launches a TrainJob and waits: no GPU, no
    /dev/shm, and the placement of the cluster config handed over in its environment; evaluation and export
    keep their GPU."""
    cluster = yaml.safe_load(GPU_CLUSTER.read_text())
    cluster["cluster"]["training_backend"] = "trainjob"
    config = tmp_path / "cluster_trainjob.yaml"
    config.write_text(yaml.safe_dump(cluster))
    spec, platform = _load(compile_pipeline("vlr_face", str(tmp_path / "vlr_face.yaml"), str(config)))
    execs = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task_name, task in _leaf_tasks(spec):
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if task_name in TRAINING_TASKS:
            assert "accelerator" not in container.get("resources", {}), task_name
            assert "emptyDirMounts" not in execs[executor] and "nodeSelector" not in execs[executor]
            assert env["FACEOPS_TRAINING_BACKEND"] == "trainjob"
            placement = json.loads(env["FACEOPS_TRAINJOB_CLUSTER"])
            assert placement["node_selector"] == {"nvidia.com/gpu.present": "true"}
            assert placement["tolerations"][0]["key"] == "nvidia.com/gpu"
        elif task_name in GPU_TASKS["vlr_face"]:
            assert container["resources"]["accelerator"]["resourceCount"] == "1", task_name


def test_cpu_cluster_has_no_gpu_settings(tmp_path):
    out = compile_pipeline("arcface_resnet34", str(tmp_path / "cpu.yaml"))
    spec, platform = _load(out)
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in ex["container"].get("resources", {})
    assert "nodeSelector" not in str(platform)


def run_folder(out: Path) -> Path:
    """The one run folder a local run left in ``<out>/store/runs`` (named by its run id)."""
    (run,) = (out / "store" / "runs").iterdir()
    return run


def _tree(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_run_arcface_resnet34_local_then_a_run_below_the_threshold_serves_nothing(tmp_path, capsys):
    """A run that meets the promote thresholds serves its recognizer with provenance; a second run into the
    same store whose evaluation misses them (a threshold no model can meet) is a run of its own (its own
    run folder: nothing resumed) and leaves the served repository byte for byte as it was."""
    from faceops.export.triton_repo import parse_config, version_provenance

    out = tmp_path / "out"
    assert main(["run", "arcface_resnet34", "--config", str(TINY), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    run = run_folder(out)
    assert (out / "store" / "datasets" / "synthetic" / "manifest.json").is_file()
    assert (run / "recognizer" / "last.pt").is_file()
    assert (run / "evaluation" / "metrics.json").is_file() and (run / "evaluation" / "report.html").is_file()
    repo = out / "store" / "triton"
    assert (repo / "recognizer" / "1" / "model.onnx").is_file()
    assert "report" in printed and str(out / "logs") in printed and "promoted: verification.accuracy" in printed
    provenance = version_provenance(parse_config((repo / "recognizer" / "config.pbtxt").read_text()), 1)
    manifest = json.loads((out / "store" / "datasets" / "synthetic" / "manifest.json").read_text())
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert provenance["run_id"] == run.name
    assert provenance["dataset_content_hash"] == manifest["content_hash"]
    assert float(provenance["verification.accuracy"]) == pytest.approx(metrics["verification"]["accuracy"])
    served = _tree(repo)

    strict = yaml.safe_load(TINY.read_text())
    strict["promote"] = {"min": {"verification.accuracy": 1.01}}
    config = tmp_path / "strict.yaml"
    config.write_text(yaml.safe_dump(strict))
    assert main(["run", "arcface_resnet34", "--config", str(config), "--out", str(out), "--param",
                 "run_id=second"]) == 0
    printed = capsys.readouterr().out
    assert "NOT promoted" in printed and "FAILS" in printed and "unchanged: the evaluation missed" in printed
    assert _tree(repo) == served
    second = out / "store" / "runs" / "second"
    assert (second / "staging" / "recognizer" / "1" / "model.onnx").is_file()  # staged, never served
    assert (second / "recognizer" / "last.pt").is_file()  # trained in its own folder: nothing resumed
    assert "resumed from" not in (out / "logs" / "train_recognizer.log").read_text()


SIZES = ("32x32", "14x16")
PER_SIZE_STEPS = ("train-dsr", "finetune-edgeface", "finetune-bicubic", "vlr-roc")


@pytest.mark.slow
def test_main_job_from_readme_runs_vlr_face(tmp_path):
    """The README's main-job command (scripts/demo.sh -> faceops run vlr_face), tiny settings at both VLR
    sizes: each size's table has five rows, the control (recognizer fine-tuned on bicubic faces) among
    them; each size is served as vlr_face_<size>; the KFP UI's outputs (ROC curves, Markdown) parse."""
    from test_run_view import check_clean_view

    from faceops.train.checkpoint import load_checkpoint

    cfg = yaml.safe_load(TINY.read_text())
    cfg["ingest"]["degrade"]["sizes"] = list(SIZES)
    config = tmp_path / "tiny_two_sizes.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--config", str(config), "--out", str(out)],
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = next((out / "kfp").iterdir())
    tasks = sorted(p.name for p in root.iterdir() if not p.name.startswith("for-loop"))
    assert {"ingest", "train-recognizer", "evaluate-vlr", "export-vlr", "deploy"} <= set(tasks)
    steps = tasks + [f"{step}[{size}]" for step in PER_SIZE_STEPS for size in SIZES]
    check_clean_view(r.stdout + r.stderr, steps, out)  # one line per step start and end, <= 60 lines
    run = run_folder(out)
    for size in SIZES:
        for rel in (f"dsr_{size}/best.pt", f"recognizer_finetuned_{size}/last.pt",
                    f"recognizer_finetuned_bicubic_{size}/last.pt"):
            assert (run / rel).is_file(), rel
        for log in ("train_dsr", "finetune_edgeface", "finetune_bicubic"):
            assert (out / "logs" / f"{log}_{size}.log").is_file(), (log, size)
        assert load_checkpoint(str(run / f"recognizer_finetuned_{size}" / "last.pt"))["vlr_size"] == size
    for rel in ("recognizer/last.pt", "evaluation/metrics.json", "evaluation/report.html"):
        assert (run / rel).is_file(), rel
    metrics = yaml.safe_load((run / "evaluation" / "metrics.json").read_text())
    assert list(metrics["vlr"]) == list(SIZES)
    for table in metrics["vlr"].values():
        assert list(table) == ["hr", "bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned"]
        for kind in ("bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned"):
            assert {"accuracy", "accuracy_se", "tar_at_far"} <= set(table[kind]["verification"])
            assert {"rank1", "rank1_se"} <= set(table[kind]["identification"])
            assert {"psnr", "ssim", "psnr_y", "ssim_y"} <= set(table[kind]["super_resolution"])
    control = load_checkpoint(str(run / "recognizer_finetuned_bicubic_14x16" / "last.pt"))
    assert (control["upsample"], control["dsr"], control["vlr_size"]) == ("bicubic", None, "14x16")
    assert "32x32 bicubic_finetuned" in r.stdout and "14x16 dsr_finetuned" in r.stdout  # the summary table
    repo = out / "store" / "triton"
    served = {f"{m}_{s}" for m in ("dsr", "recognizer", "vlr_face", "vlr_fused") for s in SIZES} | {"recognizer"}
    assert {p.name for p in repo.iterdir()} == served
    assert f"{len(served)} models ready on Triton" in r.stdout  # the deploy step checked every one
    assert "faceops run vlr_face: done" in r.stdout
    check_kfp_ui_outputs(root, metrics)


def _artifacts(task_dir: Path) -> dict[str, dict]:
    """What a local task published: output name -> {uri, metadata} (executor_output.json)."""
    output = json.loads((task_dir / "executor_output.json").read_text())
    return {name: entry["artifacts"][0] for name, entry in output["artifacts"].items()}


def check_kfp_ui_outputs(root: Path, metrics: dict) -> None:
    """The evaluation as the KFP UI shows it: scalar Metrics, a Markdown table, ROC curves per setting."""
    evaluation = _artifacts(root / "evaluate-vlr")
    assert evaluation["metrics"]["metadata"]["vlr.14x16.dsr_finetuned.verification.accuracy"] == \
        metrics["vlr"]["14x16"]["dsr_finetuned"]["verification"]["accuracy"]
    table = Path(evaluation["headline"]["uri"]).read_text().splitlines()
    assert table[0].startswith("| setting |") and len(table) == 2 + 1 + 4 * len(SIZES)
    rocs = [evaluation["roc_hr"]]
    for iteration, size in enumerate(SIZES):
        per_size = _artifacts(next(root.glob(f"for-loop-*-iteration-{iteration}/vlr-roc")))
        assert {a["metadata"]["setting"] for a in per_size.values()} == {
            f"{size} {kind}" for kind in ("bicubic", "bicubic_finetuned", "dsr", "dsr_finetuned")}
        rocs += per_size.values()
    for roc in rocs:
        points = roc["metadata"]["confidenceMetrics"]
        assert 2 <= len(points) <= 200
        assert {"confidenceThreshold", "recall", "falsePositiveRate"} == set(points[0])


@pytest.mark.slow
def test_failing_step_is_named_with_its_log(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "someone").mkdir(parents=True)
    (empty / "someone" / "notes.txt").write_text("no faces here")
    rc = main(["run", "arcface_resnet34", "--config", str(TINY), "--data", str(empty), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "step 'ingest' failed" in err and "no images found" in err
    assert str(tmp_path / "o" / "logs" / "ingest.log") in err


def test_run_help_explains():
    r = subprocess.run([sys.executable, "-m", "faceops", "run", "--help"], capture_output=True, text=True)
    assert "synthetic" in r.stdout and "--data" in r.stdout


@pytest.mark.slow
def test_sigkilled_faceops_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL `faceops run` mid-training; the same command resumes from the last good checkpoint and
    ends with the weights of an uninterrupted run (CPU, seeded)."""
    import os

    import torch
    from conftest import kill_at_first_checkpoint

    from faceops.train.checkpoint import load_checkpoint

    cfg = yaml.safe_load(TINY.read_text())
    cfg["recognizer"]["engine"].update(epochs=4, max_steps=8, checkpoint_every_steps=2)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def cmd(out: Path) -> list[str]:  # the same run id: the second command resumes the killed run
        return [sys.executable, "-m", "faceops", "run", "arcface_resnet34", "--config", str(cfg_file),
                "--out", str(out), "--param", "run_id=resumable"]

    def recognizer(out: Path) -> Path:
        return out / "store" / "runs" / "resumable" / "recognizer"

    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, capture_output=True, timeout=900)
    run = tmp_path / "run"
    kill_at_first_checkpoint(cmd(run), recognizer(run), env, timeout_s=600)
    killed_at = load_checkpoint(str(recognizer(run) / "last.pt"))["step"]
    assert killed_at < 8
    r = subprocess.run(cmd(run), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (run / "logs" / "train_recognizer.log").read_text()
    assert f"at step {killed_at}" in log and "resumed from" in log
    a, b = (load_checkpoint(str(recognizer(o) / "last.pt")) for o in (tmp_path / "ref", run))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after a resume from step {killed_at}"


@pytest.mark.parametrize("name", sorted(GPU_TASKS))
def test_params_take_the_pipelines_own_input_types(name):
    """KFP refuses the text "4" for an Integer input: --param values are converted by the pipeline's types."""
    from faceops.config import ConfigError
    from faceops.run import pipeline_module, typed_params

    pipeline = pipeline_module(name).build()
    got = typed_params(pipeline, {"gpus_per_node": "4", "nodes": "2", "source": "s3://faces/lfw"})
    assert got == {"gpus_per_node": 4, "nodes": 2, "source": "s3://faces/lfw"}
    with pytest.raises(ConfigError, match=r"gpus_per_node=four: gpus_per_node is integer"):
        typed_params(pipeline, {"gpus_per_node": "four"})
    with pytest.raises(ConfigError, match=r"no parameter 'gpu_per_node'"):
        typed_params(pipeline, {"gpu_per_node": "4"})
    if "vlr_sizes" in pipeline.component_spec.inputs:
        for text in ('["32x32", "14x16"]', "32x32,14x16"):
            assert typed_params(pipeline, {"vlr_sizes": text}) == {"vlr_sizes": ["32x32", "14x16"]}
        with pytest.raises(ConfigError, match="vlr_sizes is list"):
            typed_params(pipeline, {"vlr_sizes": '["32x32"'})
    if "int8" in pipeline.component_spec.inputs:
        assert typed_params(pipeline, {"int8": "true"}) == {"int8": True}
        with pytest.raises(ConfigError, match="int8 is boolean"):
            typed_params(pipeline, {"int8": "maybe"})
