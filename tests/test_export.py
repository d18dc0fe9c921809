"""Export: ONNX contract + parity gate, INT8 accuracy change, TensorRT path, Triton repository.

Faces come from faceops.data.synth (never skipped); one INT8 test runs on the real ORL faces, where the
calibration ranges of real photographs matter.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import numpy_helper
from PIL import Image
from torch import nn
from tritonclient.grpc import model_config_pb2 as mc

from faceops.config import to_dict
from faceops.data import synth
from faceops.data.degrade import DegradeConfig
from faceops.data.prepare import PrepareConfig, prepare_face
from faceops.data.tensors import to_input
from faceops.errors import FaceopsError
from faceops.evaluate import load_embedder, load_super_resolver
from faceops.export import (
    TRITON_GPUS_ENV,
    CalibData,
    ExportConfig,
    Int8AccuracyError,
    ModelConfigError,
    ParityError,
    TensorRTUnavailableError,
    check_parity,
    export_model,
    export_modules,
    export_onnx,
    int8_accuracy_change,
    parse_config,
    quantize_int8,
    resolve_instance_kind,
    run_onnx,
    validate_repository,
    versions,
)
from faceops.export import tensorrt as trt_mod
from faceops.models import DSRConfig, RecognizerConfig, create_dsr, create_recognizer
from faceops.models.contract import ContractConflictError, InputContract, onnx_file_contract, triton_contract
from faceops.storage import open_store

torch.set_num_threads(1)


def tiny_recognizer() -> nn.Module:
    torch.manual_seed(0)
    return create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()


def tiny_dsr(size: str = "32x32") -> nn.Module:
    torch.manual_seed(1)
    return create_dsr(DSRConfig(vlr_size=size, base_channels=16, residual_blocks=2)).eval()


def orl_faces(data_dir: Path, people: int, per_person: int) -> tuple[np.ndarray, np.ndarray]:
    """Real ORL faces prepared exactly like ingest: uint8 [N,112,112,3] and labels."""
    faces, labels = [], []
    for person in range(1, people + 1):
        for k in range(1, per_person + 1):
            with Image.open(data_dir / "orl" / f"s{person}" / f"{k}.pgm") as img:
                faces.append(prepare_face(img, PrepareConfig()))
            labels.append(person)
    return np.stack(faces), np.asarray(labels)


def synth_faces(people: int, per_person: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic faces as ingest stores them (uint8 [N,112,112,3]) and labels; deterministic."""
    faces, labels = [], []
    for person in range(people):
        ident = synth.make_identity(np.random.default_rng([seed, person]))
        for k in range(per_person):
            faces.append(np.asarray(synth.render(ident, np.random.default_rng([seed, person, k + 1]))))
            labels.append(person)
    return np.stack(faces), np.asarray(labels)


def all_pairs(labels: np.ndarray) -> list[tuple[int, int, bool]]:
    n = len(labels)
    return [(a, b, bool(labels[a] == labels[b])) for a in range(n) for b in range(a + 1, n)]


def vlr_of(faces: np.ndarray, w: int = 32, h: int = 32) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in faces])


# -- ONNX + parity gate ---------------------------------------------------------------------------
def test_onnx_export_has_contract_names_dynamic_batch_and_passes_parity(tmp_path):
    model = tiny_recognizer()
    faces, _ = synth_faces(people=2, per_person=4)
    batch = to_input(faces)
    path = export_onnx(model, tmp_path / "r.onnx", batch[:1], "recognizer", ExportConfig())
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    report = check_parity("recognizer", path, model, batch, ExportConfig())  # batch of 8 though traced on 1
    assert report.max_abs <= 1e-4 and report.min_cosine >= 0.9999
    emb = run_onnx(path, batch[:3].numpy())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_parity_gate_fails_on_perturbed_graph(tmp_path):
    model = tiny_recognizer()
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    path = export_onnx(model, tmp_path / "r.onnx", x[:1], "recognizer", ExportConfig())
    proto = onnx.load(str(path))
    fc = next(t for t in proto.graph.initializer if t.name.endswith("fc.weight"))  # the embedding layer
    weights = numpy_helper.to_array(fc).copy()
    weights[:, : weights.shape[1] // 4] *= 1.2  # a small edit of one initializer
    fc.CopyFrom(numpy_helper.from_array(weights, fc.name))
    onnx.save(proto, str(path))
    with pytest.raises(ParityError, match=r"parity gate failed for recognizer .*max abs diff .*min cosine"):
        check_parity("recognizer", path, model, x, ExportConfig())


class TracesDifferently(nn.Module):
    """A recognizer whose traced graph is not the eager model (what the gate exists to catch)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_recognizer()

    def forward(self, x):
        out = self.inner(x)
        return out.flip(1) if torch.jit.is_tracing() else out


def test_export_refuses_a_divergent_graph_and_publishes_nothing(tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(ParityError, match="recognizer"):
        export_modules(TracesDifferently(), str(repo))
    assert not repo.exists() or not list(open_store(str(repo)).list())


# -- Triton repository ----------------------------------------------------------------------------
def test_repository_layout_configs_and_new_versions(tmp_path):
    repo = str(tmp_path / "repo")
    cfg = ExportConfig(max_batch_size=16, preferred_batch_sizes=[4, 16], max_queue_delay_us=500,
                       instance_kind="KIND_CPU", instance_count=2, num_versions=2)
    first = export_modules(tiny_recognizer(), repo, {"32x32": tiny_dsr()}, cfg)
    second = export_modules(tiny_recognizer(), repo, {"32x32": tiny_dsr()}, cfg)
    assert {m: r["version"] for m, r in first["models"].items()} == {
        "recognizer": 1, "dsr": 1, "vlr_fused": 1, "vlr_face": 1}
    assert all(r["version"] == 2 for r in second["models"].values())
    store = open_store(repo)
    assert versions(store, "recognizer") == [1, 2]
    assert store.exists("recognizer/2/model.onnx") and store.exists("dsr/2/model.onnx")
    configs = validate_repository(store)
    for name in configs:  # each file parses with Triton's own protobuf, independently of our writer
        text_format.Parse(store.get_bytes(f"{name}/config.pbtxt").decode(), mc.ModelConfig())
    rec = configs["recognizer"]
    assert rec.platform == "onnxruntime_onnx" and rec.max_batch_size == 16
    assert [(t.name, t.data_type, list(t.dims)) for t in rec.input] == [
        ("input", mc.TYPE_FP32, [3, 112, 112])]
    assert [(t.name, list(t.dims)) for t in rec.output] == [("embedding", [512])]
    assert list(rec.dynamic_batching.preferred_batch_size) == [4, 16]
    assert rec.dynamic_batching.max_queue_delay_microseconds == 500
    assert rec.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and rec.instance_group[0].count == 2
    assert list(rec.version_policy.specific.versions) == [1, 2]
    assert [s.model_version for s in configs["vlr_face"].ensemble_scheduling.step] == [2, 2]  # pinned
    dsr = configs["dsr"]
    assert list(dsr.input[0].dims) == [3, 32, 32] and (dsr.output[0].name, list(dsr.output[0].dims)) == (
        "output", [3, 112, 112])
    ens = configs["vlr_face"]
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["dsr", "recognizer"]
    assert list(ens.input[0].dims) == [3, 32, 32] and ens.output[0].name == "embedding"


def test_embedding_width_is_taken_from_the_model(tmp_path):
    """recognizer.embedding_dim is configurable: the ONNX graphs and every Triton config that serves
    an embedding (recognizer, INT8, fused, ensemble) carry the model's width, not a fixed 512."""
    torch.manual_seed(0)
    model = create_recognizer(RecognizerConfig(name="edgeface_xxs", embedding_dim=128)).eval()
    faces, labels = synth_faces(people=4, per_person=3)
    calib = CalibData(hr=faces, vlr={"32x32": vlr_of(faces)}, pairs=all_pairs(labels))
    repo = tmp_path / "repo"
    export_modules(model, str(repo), {"32x32": tiny_dsr()}, calib=calib, int8=True,
                   cfg=ExportConfig(int8_max_accuracy_drop=1.0))
    configs = validate_repository(open_store(str(repo)))
    for name in ("recognizer", "recognizer_int8", "vlr_fused", "vlr_face"):
        assert [(t.name, list(t.dims)) for t in configs[name].output] == [("embedding", [128])], name
    inputs = {"recognizer": faces[:3], "recognizer_int8": faces[:3], "vlr_fused": vlr_of(faces[:3])}
    for name, images in inputs.items():  # what Triton would return for these configs
        assert run_onnx(repo / name / "1" / "model.onnx", to_input(images).numpy()).shape == (3, 128), name


def test_two_vlr_sizes_get_size_specific_names(tmp_path):
    report = export_modules(tiny_recognizer(), str(tmp_path / "repo"),
                            {"32x32": tiny_dsr("32x32"), "14x16": tiny_dsr("14x16")})
    expected = {"dsr_32x32", "dsr_14x16", "vlr_face_32x32", "vlr_face_14x16", "recognizer"}
    assert expected <= set(report["models"])
    config = parse_config((tmp_path / "repo" / "vlr_face_14x16" / "config.pbtxt").read_text())
    assert list(config.input[0].dims) == [3, 16, 14]


def test_each_size_serves_its_own_recognizer_behind_its_ensemble(tmp_path):
    """The pipeline's export: `recognizer` is the HR one; per size `recognizer_<size>` (fine-tuned on that
    size's DSR outputs) behind `vlr_face_<size>`, pinned to the versions written with it (one size too)."""
    hr, tuned = tiny_recognizer(), {s: tiny_recognizer() for s in ("32x32", "14x16")}
    torch.manual_seed(5)
    for module in tuned.values():  # distinct weights: the served graphs must be the size's own
        for p in module.parameters():
            p.data.add_(0.01 * torch.randn_like(p))
    repo = tmp_path / "repo"
    cfg = ExportConfig(parity_batch=2)
    dsrs = {"32x32": tiny_dsr("32x32"), "14x16": tiny_dsr("14x16")}
    export_modules(hr, str(repo), dsrs, cfg)  # an earlier export: the ensembles then pin version 2
    report = export_modules(hr, str(repo), dsrs, cfg, finetuned=tuned)
    assert {"recognizer", "recognizer_32x32", "recognizer_14x16", "dsr_32x32", "dsr_14x16", "vlr_face_32x32",
            "vlr_face_14x16", "vlr_fused_32x32", "vlr_fused_14x16"} == set(report["models"])
    configs = validate_repository(open_store(str(repo)))
    for size in ("32x32", "14x16"):
        steps = configs[f"vlr_face_{size}"].ensemble_scheduling.step
        assert [(s.model_name, s.model_version) for s in steps] == [(f"dsr_{size}", 2), (f"recognizer_{size}", 1)]
    faces = to_input(synth_faces(people=2, per_person=1)[0]).numpy()
    served = run_onnx(repo / "recognizer_14x16" / "1" / "model.onnx", faces)
    with torch.no_grad():
        assert np.abs(served - tuned["14x16"](torch.from_numpy(faces)).numpy()).max() < 1e-4
        assert np.abs(served - hr(torch.from_numpy(faces)).numpy()).max() > 1e-3
    one = export_modules(hr, str(tmp_path / "one"), {"32x32": tiny_dsr()}, cfg, finetuned={"32x32": tuned["32x32"]})
    assert {"recognizer", "recognizer_32x32", "vlr_face_32x32"} <= set(one["models"])
    assert "vlr_face" not in one["models"]  # a size with its own recognizer is named by size, even alone
    with pytest.raises(FaceopsError, match=r"\['14x16'\] without a DSR model"):
        export_modules(hr, str(tmp_path / "stray"), {"32x32": tiny_dsr()}, cfg, finetuned={"14x16": hr})


def test_repository_written_to_s3_store(s3_bucket):
    repo = f"{s3_bucket}/models"
    export_modules(tiny_recognizer(), repo, {"32x32": tiny_dsr()})
    store = open_store(repo)
    assert set(validate_repository(store)) == {"recognizer", "dsr", "vlr_fused", "vlr_face"}
    assert store.exists("vlr_face/1/ENSEMBLE")  # an ensemble's version folder exists in S3 too


def test_parse_config_rejects_invalid_text():
    with pytest.raises(ModelConfigError, match="bad.pbtxt"):
        parse_config('name: "x"\nmax_batch_size: "many"\n', "bad.pbtxt")
    with pytest.raises(ModelConfigError, match="no platform or backend"):
        parse_config('name: "x"\n', "x/config.pbtxt")


def test_export_model_from_checkpoints_and_cli(tmp_path, capsys):
    from faceops.cli import main
    from faceops.train.checkpoint import save_checkpoint

    rec, dsr = tiny_recognizer(), tiny_dsr()
    save_checkpoint(str(tmp_path / "rec.pt"), {"kind": "recognizer", "model_config": to_dict(
        RecognizerConfig(name="edgeface_xxs")), "model": rec.state_dict()})
    dsr_cfg = DSRConfig(vlr_size="32x32", base_channels=16, residual_blocks=2)
    save_checkpoint(str(tmp_path / "dsr.pt"), {"kind": "dsr", "model_config": to_dict(dsr_cfg),
                                               "vlr_size": "32x32", "model": dsr.state_dict()})
    report = export_model(str(tmp_path / "rec.pt"), str(tmp_path / "repo"), dsr_uri=str(tmp_path / "dsr.pt"))
    assert report["models"]["recognizer"]["parity"]["max_abs"] <= 1e-4
    code = main(["export", "--model", str(tmp_path / "rec.pt"), "--format", "onnx", "--repo",
                 str(tmp_path / "repo"), "--set", "export.max_batch_size=8", "--set",
                 "preferred_batch_sizes=[8]"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["models"]["recognizer"]["version"] == 2
    assert parse_config((tmp_path / "repo" / "recognizer" / "config.pbtxt").read_text()).max_batch_size == 8
    code = main(["export", "--model", str(tmp_path / "dsr.pt"), "--repo", str(tmp_path / "repo")])
    assert code == 1 and "needs a recognizer" in capsys.readouterr().err


# -- the input contract ---------------------------------------------------------------------------
REC_CONTRACT = InputContract(center_crop=120)
DSR_CONTRACT = REC_CONTRACT.for_vlr("32x32", DegradeConfig(noise_std=(1.0, 3.0), jpeg_quality=(70, 95)))


def contract_checkpoints(tmp_path: Path) -> tuple[str, str]:
    """Recognizer and DSR checkpoints trained (as their contracts say) on 120 px crops."""
    from faceops.train.checkpoint import save_checkpoint

    rec = save_checkpoint(str(tmp_path / "rec.pt"), {
        "kind": "recognizer", "model_config": to_dict(RecognizerConfig(name="edgeface_xxs")),
        "model": tiny_recognizer().state_dict(), "input_contract": REC_CONTRACT.to_dict()})
    dsr = save_checkpoint(str(tmp_path / "dsr.pt"), {
        "kind": "dsr", "model_config": to_dict(DSRConfig(vlr_size="32x32", base_channels=16, residual_blocks=2)),
        "vlr_size": "32x32", "model": tiny_dsr().state_dict(), "input_contract": DSR_CONTRACT.to_dict()})
    return rec, dsr


def test_onnx_files_and_triton_configs_carry_the_checkpoints_contract(tmp_path):
    rec, dsr = contract_checkpoints(tmp_path)
    repo = tmp_path / "repo"
    export_model(rec, str(repo), dsr_uri=dsr)
    expected = {"recognizer": REC_CONTRACT, "dsr": DSR_CONTRACT, "vlr_fused": DSR_CONTRACT, "vlr_face": DSR_CONTRACT}
    for name, contract in expected.items():
        config = mc.ModelConfig()  # Triton's own protobuf, parsed from the file Triton reads
        text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
        assert triton_contract(config.parameters, name) == contract, name
        if name != "vlr_face":  # an ensemble has no model file
            assert onnx_file_contract(repo / name / "1" / "model.onnx") == contract, name
    # evaluation reads it from the ONNX file as from the checkpoint
    assert load_embedder(str(repo / "recognizer" / "1" / "model.onnx")).contract == REC_CONTRACT
    onnx_dsr = str(tmp_path / "dsr.onnx")
    (tmp_path / "dsr.onnx").write_bytes((repo / "dsr" / "1" / "model.onnx").read_bytes())
    assert load_super_resolver(onnx_dsr).contract == DSR_CONTRACT


def test_calibration_faces_prepared_unlike_the_model_are_refused(tmp_path, tiny_dataset):
    rec, _ = contract_checkpoints(tmp_path)
    with pytest.raises(ContractConflictError, match=r"center_crop = null.*center_crop = 120"):
        export_model(rec, str(tmp_path / "repo"), calib_dataset=tiny_dataset)
    assert not (tmp_path / "repo").exists()


def test_models_trained_on_different_faces_are_not_exported_together(tmp_path):
    other = InputContract(center_crop=100).for_vlr("32x32", DegradeConfig())
    with pytest.raises(ContractConflictError, match="center_crop = 120 but the 32x32 DSR model with center_crop = 100"):
        export_modules(tiny_recognizer(), str(tmp_path / "repo"), {"32x32": tiny_dsr()}, contract=REC_CONTRACT,
                       dsr_contracts={"32x32": other})


def check_int8_report(report: dict, calib: CalibData, repo: Path) -> None:
    """The INT8 report's figures are consistent and the model is a QDQ graph."""
    int8 = report["int8"]
    assert int8["pairs"] == len(calib.pairs) and int8["calib_images"] == len(calib.hr)
    assert 0.0 <= int8["int8_accuracy"] <= 1.0 and 0.5 <= int8["fp32_accuracy"] <= 1.0
    assert int8["accuracy_change"] == pytest.approx(int8["int8_accuracy"] - int8["fp32_accuracy"])
    graph = onnx.load(str(repo / "recognizer_int8" / "1" / "model.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)  # QDQ format


# -- INT8 -----------------------------------------------------------------------------------------
def test_int8_export_reports_accuracy_change_and_serves_in_int8(tmp_path, monkeypatch):
    """The INT8 gate's figures, a QDQ graph, and for a GPU Triton a TensorRT accelerator in INT8 (the
    QDQ graph's explicit quantization) while the FP32 models get FP16."""
    monkeypatch.setenv(TRITON_GPUS_ENV, "1")
    faces, labels = synth_faces(people=6, per_person=4)
    calib = CalibData(hr=faces, pairs=all_pairs(labels))
    report = export_modules(tiny_recognizer(), str(tmp_path / "repo"), calib=calib, int8=True,
                            cfg=ExportConfig(int8_max_accuracy_drop=1.0))
    check_int8_report(report, calib, tmp_path / "repo")
    precision = {name: accelerator(tmp_path / "repo", name).parameters["precision_mode"]
                 for name in ("recognizer", "recognizer_int8")}
    assert precision == {"recognizer": "FP16", "recognizer_int8": "INT8"}


def test_int8_export_reports_accuracy_change_on_real_faces(tmp_path, data_dir):
    faces, labels = orl_faces(data_dir, people=6, per_person=4)
    calib = CalibData(hr=faces, vlr={"32x32": vlr_of(faces)}, pairs=all_pairs(labels))
    report = export_modules(tiny_recognizer(), str(tmp_path / "repo"), calib=calib, int8=True,
                            cfg=ExportConfig(int8_max_accuracy_drop=1.0))
    check_int8_report(report, calib, tmp_path / "repo")
    assert onnx_file_contract(tmp_path / "repo" / "recognizer_int8" / "1" / "model.onnx") == onnx_file_contract(
        tmp_path / "repo" / "recognizer" / "1" / "model.onnx") == InputContract()  # assumed: none was given
    assert report["models"]["recognizer"]["parity"]["max_abs"] <= 1e-4  # parity ran on real faces


def test_int8_gate_fails_when_accuracy_collapses(tmp_path):
    faces, labels = synth_faces(people=4, per_person=3)
    model = tiny_recognizer()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", to_input(faces[:1]), "recognizer", ExportConfig())
    proto = onnx.load(str(fp32))  # a "quantized" model that lost everything: all weights zero
    for init in proto.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    with pytest.raises(Int8AccuracyError, match="int8_max_accuracy_drop"):
        int8_accuracy_change(fp32, tmp_path / "broken.onnx", faces, all_pairs(labels), len(faces),
                             ExportConfig(int8_max_accuracy_drop=0.0))


def test_int8_needs_calibration_faces(tmp_path):
    with pytest.raises(FaceopsError, match="calibration"):
        export_modules(tiny_recognizer(), str(tmp_path / "repo"), int8=True)
    assert not (tmp_path / "repo" / "recognizer").exists()


def test_quantize_int8_rejects_float_calibration(tmp_path):
    path = export_onnx(tiny_recognizer(), tmp_path / "r.onnx", torch.zeros(1, 3, 112, 112), "recognizer",
                       ExportConfig())
    with pytest.raises(FaceopsError, match="uint8 NHWC"):
        quantize_int8(path, tmp_path / "q.onnx", np.zeros((2, 3, 112, 112), np.float32), ExportConfig())


# -- Triton configs: instance kind, TensorRT accelerator, warm-up --------------------------------
def read_config(repo: Path, name: str) -> mc.ModelConfig:
    """config.pbtxt parsed with Triton's own ModelConfig protobuf, independently of our writer."""
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())


def accelerator(repo: Path, name: str):
    (found,) = read_config(repo, name).optimization.execution_accelerators.gpu_execution_accelerator
    return found


@pytest.mark.parametrize(("asked", "gpus", "kind"), [
    ("auto", None, "KIND_CPU"), ("auto", "0", "KIND_CPU"), ("auto", "2", "KIND_GPU"),
    ("KIND_CPU", "2", "KIND_CPU"), ("KIND_GPU", None, "KIND_GPU"), ("KIND_GPU", "0", None), ("auto", "two", None),
])
def test_instance_kind_follows_the_target_triton(asked, gpus, kind):
    """export.instance_kind=auto: KIND_GPU only for a Triton reporting GPUs (FACEOPS_TRITON_GPUS, from
    the chart's triton.gpu.count); KIND_GPU for a Triton without GPUs could never load, so it is refused."""
    environ = {} if gpus is None else {TRITON_GPUS_ENV: gpus}
    cfg = ExportConfig(instance_kind=asked)
    if kind is None:
        with pytest.raises(FaceopsError, match=TRITON_GPUS_ENV):
            resolve_instance_kind(cfg, environ)
    else:
        assert resolve_instance_kind(cfg, environ) == kind


def test_export_writes_no_kind_gpu_unless_the_target_has_gpus(tmp_path, monkeypatch):
    """The default export (no target told) is loadable by every Triton, a CPU one included."""
    monkeypatch.delenv(TRITON_GPUS_ENV, raising=False)
    repo = tmp_path / "repo"
    report = export_modules(tiny_recognizer(), str(repo), {"32x32": tiny_dsr()}, cfg=ExportConfig(parity_batch=2))
    assert report["instance_kind"] == "KIND_CPU"
    for name in ("recognizer", "dsr", "vlr_fused"):
        config = read_config(repo, name)
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU], name
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator, name
        assert len(config.model_warmup) == 1, name


def test_gpu_configs_carry_the_tensorrt_accelerator_and_warmup(tmp_path, monkeypatch):
    """For a GPU Triton every ONNX model asks ONNX Runtime's TensorRT provider for FP16 engines with a
    cache and one profile spanning batch 1..max_batch_size, and warms up on a zero batch of its own input
    shape, which the model file accepts; the ensemble gets neither (it runs no model of its own)."""
    monkeypatch.setenv(TRITON_GPUS_ENV, "1")
    repo = tmp_path / "repo"
    cfg = ExportConfig(parity_batch=2, max_batch_size=16, preferred_batch_sizes=[4, 8], trt_workspace_mb=512)
    export_modules(tiny_recognizer(), str(repo), {"32x32": tiny_dsr()}, cfg=cfg)
    for name, dims in {"recognizer": [3, 112, 112], "dsr": [3, 32, 32], "vlr_fused": [3, 32, 32]}.items():
        config = read_config(repo, name)
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU], name
        trt = accelerator(repo, name)
        assert trt.name == "tensorrt"
        shape = "x".join(map(str, dims))
        assert dict(trt.parameters) == {
            "precision_mode": "FP16", "max_workspace_size_bytes": str(512 << 20),
            "trt_engine_cache_enable": "true", "trt_engine_cache_path": cfg.trt_engine_cache_path,
            "trt_profile_min_shapes": f"input:1x{shape}", "trt_profile_opt_shapes": f"input:8x{shape}",
            "trt_profile_max_shapes": f"input:16x{shape}"}, name
        (warmup,) = config.model_warmup
        assert warmup.batch_size == 1 and set(warmup.inputs) == {"input"}, name
        sample = warmup.inputs["input"]
        assert (sample.data_type, list(sample.dims), sample.zero_data) == (mc.TYPE_FP32, dims, True), name
        assert list(config.input[0].dims) == dims
        zeros = np.zeros((warmup.batch_size, *dims), np.float32)  # what Triton sends at load
        assert run_onnx(repo / name / "1" / "model.onnx", zeros).shape[0] == 1, name
    ensemble = read_config(repo, "vlr_face")
    assert not ensemble.model_warmup and not ensemble.instance_group
    assert not ensemble.optimization.execution_accelerators.gpu_execution_accelerator


def test_accelerator_and_warmup_follow_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv(TRITON_GPUS_ENV, "1")
    repo = tmp_path / "repo"
    export_modules(tiny_recognizer(), str(repo), cfg=ExportConfig(
        parity_batch=2, gpu_accelerator="none", warmup=False, trt_fp16=False))
    config = read_config(repo, "recognizer")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU  # plain CUDA
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert not config.model_warmup
    export_modules(tiny_recognizer(), str(repo), cfg=ExportConfig(parity_batch=2, trt_fp16=False,
                                                                  trt_engine_cache=False))
    assert dict(accelerator(repo, "recognizer").parameters)["precision_mode"] == "FP32"
    assert "trt_engine_cache_enable" not in accelerator(repo, "recognizer").parameters


# -- TensorRT offline engines --------------------------------------------------------------------
def test_trt_without_a_cuda_device_is_an_error_not_a_skip(tmp_path, monkeypatch, capsys):
    """--trt asks for parity-gated engines: where none can be built the export fails, before any work
    and without touching the repository, and the CLI exits non-zero naming why and what to do."""
    from faceops.cli import main
    from faceops.train.checkpoint import save_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailableError, match=r"--trt .*no CUDA device.*Drop --trt"):
        export_modules(tiny_recognizer(), str(tmp_path / "repo"), trt=True)
    assert not (tmp_path / "repo").exists()
    save_checkpoint(str(tmp_path / "rec.pt"), {"kind": "recognizer", "model_config": to_dict(
        RecognizerConfig(name="edgeface_xxs")), "model": tiny_recognizer().state_dict()})
    code = main(["export", "--model", str(tmp_path / "rec.pt"), "--repo", str(tmp_path / "repo"), "--trt"])
    assert code != 0
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "export.gpu_accelerator=tensorrt" in err
    assert not (tmp_path / "repo").exists()


def test_trt_without_the_tensorrt_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTUnavailableError, match="tensorrt Python package is not installed"):
        export_modules(tiny_recognizer(), str(tmp_path / "repo"), trt=True)
    assert not (tmp_path / "repo").exists()


def test_trt_engines_for_a_triton_without_gpus_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_mod, "unavailable_reason", lambda: None)  # as if on a GPU node with TensorRT
    monkeypatch.setenv(TRITON_GPUS_ENV, "0")
    with pytest.raises(TensorRTUnavailableError, match="no GPU"):
        export_modules(tiny_recognizer(), str(tmp_path / "repo"), trt=True)


def _need_tensorrt():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if trt_mod.unavailable_reason():
        pytest.skip("needs a CUDA device with the tensorrt Python package (pip install tensorrt)")


@pytest.mark.gpu
def test_tensorrt_fp16_engine_passes_parity_and_is_published(tmp_path):
    _need_tensorrt()
    faces, labels = synth_faces(people=4, per_person=4)
    calib = CalibData(hr=faces, pairs=all_pairs(labels))
    report = export_modules(tiny_recognizer(), str(tmp_path / "repo"), calib=calib, trt=True)
    assert report["tensorrt"]["status"] == "built"
    parity = report["models"]["recognizer_trt"]["parity"]
    assert parity["backend"] == "tensorrt" and parity["min_cosine"] >= 0.999
    config = parse_config((tmp_path / "repo" / "recognizer_trt" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # already an engine
    assert (tmp_path / "repo" / "recognizer_trt" / "1" / "model.plan").stat().st_size > 0


@pytest.mark.gpu
def test_tensorrt_int8_engine_from_qdq_model(tmp_path):
    _need_tensorrt()
    faces, labels = synth_faces(people=4, per_person=4)
    calib = CalibData(hr=faces, pairs=all_pairs(labels))
    report = export_modules(tiny_recognizer(), str(tmp_path / "repo"), calib=calib, int8=True, trt=True,
                            cfg=ExportConfig(int8_max_accuracy_drop=1.0, trt_parity_min_cosine=0.98,
                                             trt_parity_max_abs=0.1))
    assert report["models"]["recognizer_trt_int8"]["parity"]["backend"] == "tensorrt"
