"""The components. Imports live inside the functions: KFP ships each function's source to its pod.

``run_root`` is the store URI of this run (``<store>/runs/<run_id>``, the ``run_root`` step's output);
each step writes below it. The per-size steps of vlr_face (``train_dsr``, ``finetune_edgeface``,
``finetune_bicubic``, ``vlr_roc``) run once per VLR size inside a ``dsl.ParallelFor`` and read the run
folder from the recognizer's ``run_root`` metadata: kfp's local runner (2.17) replaces every task-output
parameter a loop receives with the loop item, so a ``run_root`` parameter would arrive there as
"14x16". The steps after the loop take their models as ``list[Model]`` (``dsl.Collected``), each
model's size in its ``vlr_size`` metadata.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from faceops.images import image

TRAINER = image("trainer")  # GPU work: training, evaluation, export
SLIM = image("slim")  # light steps
# The images carry kfp at the lock's version (the one that compiles the pipelines): no step installs
# anything at pod start, so steps run on egress-restricted clusters.
INSTALL_KFP = False


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def run_root(store_uri: str, run_id: str, job_id: str) -> str:
    """This run's folder in the store: ``run_id`` when given, else the KFP run's id (``job_id``)."""
    from faceops.stages import run_root_stage

    return run_root_stage(store_uri, run_id, job_id)


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def ingest(
    source: str,
    name: str,
    store_uri: str,
    config_yaml: str,
    pairs_file: str,
    log_dir: str,
    dataset: Output[Dataset],
):
    """Folder / s3:// prefix / synth:// -> checksummed dataset in the store."""
    import json

    from faceops.stages import ingest_stage

    r = ingest_stage(source, name, store_uri, config_yaml, pairs_file, log_dir)
    dataset.metadata.update({"uri": r["uri"], "content_hash": r["content_hash"]})
    with open(dataset.path, "w") as f:
        json.dump(r, f, indent=1)


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def train_recognizer(
    dataset: Input[Dataset],
    config_yaml: str,
    run_root: str,
    gpus_per_node: int,
    nodes: int,
    log_dir: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """ArcFace/CosFace training of the configured backbone."""
    from faceops.stages import log_training, train_stage

    r = train_stage(
        "recognizer",
        dataset.metadata["uri"],
        f"{run_root}/recognizer",
        config_yaml,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        log_dir=log_dir,
    )
    log_training(r, model, metrics, "recognizer")
    model.metadata["run_root"] = run_root  # what the per-size steps write below (see the module docstring)


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def train_dsr(
    dataset: Input[Dataset],
    recognizer: Input[Model],
    config_yaml: str,
    vlr_size: str,
    gpus_per_node: int,
    nodes: int,
    log_dir: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """DSR super-resolution VLR -> HR (one VLR size) with losses from the frozen recognizer."""
    from faceops.stages import dsr_stage, log_training

    r = dsr_stage(
        dataset.metadata["uri"],
        recognizer.metadata["uri"],
        recognizer.metadata["run_root"],
        config_yaml,
        vlr_size,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        log_dir=log_dir,
    )
    log_training(r, model, metrics, "dsr")


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def finetune_edgeface(
    dataset: Input[Dataset],
    recognizer: Input[Model],
    dsr: Input[Model],
    config_yaml: str,
    gpus_per_node: int,
    nodes: int,
    log_dir: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Two-stage fine-tuning of the recognizer on DSR outputs."""
    from faceops.stages import finetune_stage, log_training

    r = finetune_stage(
        dataset.metadata["uri"],
        recognizer.metadata["uri"],
        recognizer.metadata["run_root"],
        config_yaml,
        dsr.metadata["vlr_size"],
        dsr_uri=dsr.metadata["uri"],
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        log_dir=log_dir,
    )
    log_training(r, model, metrics, "recognizer")


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def finetune_bicubic(
    dataset: Input[Dataset],
    recognizer: Input[Model],
    config_yaml: str,
    vlr_size: str,
    gpus_per_node: int,
    nodes: int,
    log_dir: str,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """The control for finetune_edgeface: the same fine-tune on bicubic-upsampled VLR faces, no DSR."""
    from faceops.stages import finetune_stage, log_training

    r = finetune_stage(
        dataset.metadata["uri"],
        recognizer.metadata["uri"],
        recognizer.metadata["run_root"],
        config_yaml,
        vlr_size,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        log_dir=log_dir,
    )
    log_training(r, model, metrics, "recognizer")


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def evaluate(
    dataset: Input[Dataset],
    recognizer: Input[Model],
    config_yaml: str,
    run_root: str,
    log_dir: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    headline: Output[Markdown],
    roc_hr: Output[ClassificationMetrics],
):
    """Verification + identification on the test split; report.html with ROC/DET/histograms."""
    from faceops.stages import evaluate_stage, log_evaluation

    r = evaluate_stage(
        recognizer.metadata["uri"],
        dataset.metadata["uri"],
        f"{run_root}/evaluation",
        config_yaml,
        log_dir=log_dir,
    )
    log_evaluation(r, metrics, report, headline, roc_hr)


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def evaluate_vlr(
    dataset: Input[Dataset],
    recognizer: Input[Model],
    dsr: Input[list[Model]],
    finetuned: Input[list[Model]],
    finetuned_bicubic: Input[list[Model]],
    config_yaml: str,
    run_root: str,
    log_dir: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    headline: Output[Markdown],
    roc_hr: Output[ClassificationMetrics],
    curves: Output[Artifact],
):
    """Every VLR size at once: HR / VLR-bicubic (+ fine-tuned: the control) / VLR-DSR (+ fine-tuned),
    SR metrics and sample grids; ``curves``: every setting's ROC curve, for ``vlr_roc``."""
    from faceops.stages import evaluate_stage, log_evaluation

    def by_size(models) -> dict:
        return {m.metadata["vlr_size"]: m.metadata["uri"] for m in models}

    r = evaluate_stage(
        recognizer.metadata["uri"],
        dataset.metadata["uri"],
        f"{run_root}/evaluation",
        config_yaml,
        dsr_uris=[m.metadata["uri"] for m in dsr],
        finetuned_uri=by_size(finetuned),
        finetuned_bicubic_uri=by_size(finetuned_bicubic),
        vlr_sizes=[m.metadata["vlr_size"] for m in dsr],
        log_dir=log_dir,
    )
    log_evaluation(r, metrics, report, headline, roc_hr, curves)


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def vlr_roc(
    curves: Input[Artifact],
    vlr_size: str,
    bicubic: Output[ClassificationMetrics],
    bicubic_finetuned: Output[ClassificationMetrics],
    dsr: Output[ClassificationMetrics],
    dsr_finetuned: Output[ClassificationMetrics],
):
    """One VLR size's ROC curves from the evaluation, one ClassificationMetrics per setting."""
    from faceops.stages import log_vlr_rocs

    log_vlr_rocs(curves.path, vlr_size, {"bicubic": bicubic, "bicubic_finetuned": bicubic_finetuned, "dsr": dsr,
                                         "dsr_finetuned": dsr_finetuned})


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def export(
    recognizer: Input[Model],
    dataset: Input[Dataset],
    config_yaml: str,
    run_root: str,
    int8: bool,
    trt: bool,
    log_dir: str,
    repo: Output[Model],
):
    """Recognizer -> ONNX (+ INT8, + TensorRT on GPU nodes) with parity gates -> the run's staged repository."""
    from faceops.export.promote import staging_uri
    from faceops.stages import export_stage, log_export

    staged = staging_uri(run_root)
    r = export_stage(
        recognizer.metadata["uri"],
        staged,
        config_yaml,
        dataset_uri=dataset.metadata["uri"],
        int8=int8,
        trt=trt,
        log_dir=log_dir,
        staged=True,
    )
    log_export(r, staged, repo)


@dsl.component(base_image=TRAINER, install_kfp_package=INSTALL_KFP)
def export_vlr(
    recognizer: Input[Model],
    dsr: Input[list[Model]],
    finetuned: Input[list[Model]],
    dataset: Input[Dataset],
    config_yaml: str,
    run_root: str,
    int8: bool,
    trt: bool,
    log_dir: str,
    repo: Output[Model],
):
    """The HR recognizer as `recognizer`; per VLR size `dsr_<size>`, `recognizer_<size>` (fine-tuned on
    that size's DSR outputs) and the `vlr_face_<size>` ensemble of the two -> ONNX -> the run's staged
    repository."""
    from faceops.export.promote import staging_uri
    from faceops.stages import export_stage, log_export

    staged = staging_uri(run_root)
    r = export_stage(
        recognizer.metadata["uri"],
        staged,
        config_yaml,
        dsr_uris=[m.metadata["uri"] for m in dsr],
        dataset_uri=dataset.metadata["uri"],
        int8=int8,
        trt=trt,
        log_dir=log_dir,
        finetuned_uris={m.metadata["vlr_size"]: m.metadata["uri"] for m in finetuned},
        staged=True,
    )
    log_export(r, staged, repo)


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def promotion_gate(evaluation: Input[Metrics], config_yaml: str, log_dir: str, decision: Output[Metrics]) -> bool:
    """Whether the evaluation meets the config's ``promote`` thresholds (the pipeline's ``dsl.If``)."""
    from faceops.stages import gate_stage

    r = gate_stage(dict(evaluation.metadata), config_yaml, log_dir)
    decision.log_metric("promoted", float(r["passed"]))
    decision.metadata["summary"] = r["summary"]
    return r["passed"]


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def promote(
    staged: Input[Model],
    evaluation: Input[Metrics],
    dataset: Input[Dataset],
    config_yaml: str,
    repo_uri: str,
    run_root: str,
    log_dir: str,
    repo: Output[Model],
):
    """The staged export becomes new served versions in ``repo_uri``, each with its provenance."""
    from faceops.stages import log_export, promote_stage

    r = promote_stage(staged.metadata["uri"], repo_uri, run_root, dataset.metadata["content_hash"],
                      dict(evaluation.metadata), config_yaml, log_dir)
    log_export(r, repo_uri, repo)


@dsl.component(base_image=SLIM, install_kfp_package=INSTALL_KFP)
def deploy(
    repo: Input[Model], dataset: Input[Dataset], triton_url: str, log_dir: str, metrics: Output[Metrics]
):
    """Serve the repository (cluster: Triton polls it in MinIO) and check it answers correctly."""
    from faceops.stages import deploy_stage

    r = deploy_stage(repo.metadata["uri"], dataset.metadata["uri"], triton_url, log_dir)
    for k, v in r.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            metrics.log_metric(k, v)
