"""vlr_face: ingest -> recognizer -> per VLR size: DSR -> fine-tune on DSR outputs -> evaluate -> export
(staged) -> promotion gate -> promote -> deploy.

Every VLR size the config's ingest makes (``ingest.degrade.sizes``, the ``vlr_sizes`` parameter) gets
its own DSR model, its own fine-tune on that DSR's outputs and, beside it, the control: the same
fine-tune on bicubic faces, so the evaluation tells what DSR adds from what the extra training adds.
The sizes run in a ``dsl.ParallelFor`` (at most ``cluster.size_parallelism`` at once); one evaluation
then scores them all (``dsl.Collected``), one export stages ``vlr_face_<size>`` = ``dsr_<size>`` ->
``recognizer_<size>`` per size beside the HR ``recognizer``; when the evaluation meets the config's
``promote`` thresholds they become served versions (with provenance) and the deploy step checks them all.
Each size's training takes the config's ``dsr`` / ``finetune`` sections with ``vlr_size`` set to it.
"""

from faceops.components.stages import (
    deploy,
    evaluate_vlr,
    export_vlr,
    finetune_bicubic,
    finetune_edgeface,
    train_dsr,
    vlr_roc,
)
from faceops.pipelines.platform import (
    DATA_URI,
    MODEL_REPO_URI,
    ClusterConfig,
    apply,
    config_document,
    default_config_text,
    ingest_and_train,
    promoted,
    run_folder,
)
from kfp import dsl

DEFAULT_CONFIG = "vlr_face"


def vlr_sizes(document: dict) -> list[str]:
    """The VLR sizes a config's ingest makes (``ingest.degrade.sizes``, checked)."""
    from faceops.config import from_dict
    from faceops.data.ingest import IngestConfig

    return list(from_dict(IngestConfig, document.get("ingest") or {}, "<pipeline config>, section 'ingest'")
                .degrade.sizes)


def build(cluster: ClusterConfig | None = None, config_yaml: str | None = None):
    """The pipeline; ``config_yaml`` (default: the packaged config) gives the defaults of its
    ``config_yaml`` and ``vlr_sizes`` parameters."""
    cluster = cluster or ClusterConfig()
    default_yaml = default_config_text(DEFAULT_CONFIG, config_yaml)
    default_sizes = vlr_sizes(config_document(DEFAULT_CONFIG, config_yaml))

    @dsl.pipeline(
        name="vlr-face",
        description="Very-low-resolution face recognition: a recognizer and, per VLR size, a DSR "
        "super-resolver and a recognizer fine-tuned on DSR outputs (beside its control, fine-tuned on bicubic "
        "faces), evaluated together, exported and served.",
    )
    def vlr_face(
        config_yaml: str = default_yaml,
        source: str = "synth://",
        dataset_name: str = "faces",
        store_uri: str = DATA_URI,
        model_repo_uri: str = MODEL_REPO_URI,
        run_id: str = "",
        vlr_sizes: list = default_sizes,
        pairs_file: str = "",
        gpus_per_node: int = 1,
        nodes: int = 1,
        int8: bool = False,
        trt: bool = False,
        triton_url: str = "",
        log_dir: str = "",
    ):
        run_root = run_folder(cluster, store_uri=store_uri, run_id=run_id)
        data, rec = ingest_and_train(
            cluster, config_yaml=config_yaml, source=source, dataset_name=dataset_name, store_uri=store_uri,
            run_root=run_root, pairs_file=pairs_file, gpus_per_node=gpus_per_node, nodes=nodes, log_dir=log_dir)
        with dsl.ParallelFor(vlr_sizes, parallelism=cluster.size_parallelism) as size:
            per_size = {"dataset": data, "recognizer": rec.outputs["model"], "config_yaml": config_yaml,
                        "gpus_per_node": gpus_per_node, "nodes": nodes, "log_dir": log_dir}
            dsr = train_dsr(vlr_size=size, **per_size)
            ft = finetune_edgeface(dsr=dsr.outputs["model"], **per_size)
            ft_bicubic = finetune_bicubic(vlr_size=size, **per_size)
            for task in (dsr, ft, ft_bicubic):
                apply(task, cluster, gpu_task=True, cache=cluster.cache_training, gpus=gpus_per_node)
        ev = evaluate_vlr(
            dataset=data,
            recognizer=rec.outputs["model"],
            dsr=dsl.Collected(dsr.outputs["model"]),
            finetuned=dsl.Collected(ft.outputs["model"]),
            finetuned_bicubic=dsl.Collected(ft_bicubic.outputs["model"]),
            config_yaml=config_yaml,
            run_root=run_root,
            log_dir=log_dir,
        )
        with dsl.ParallelFor(vlr_sizes, parallelism=cluster.size_parallelism) as size:
            apply(vlr_roc(curves=ev.outputs["curves"], vlr_size=size), cluster, gpu_task=False, cache=False)
        ex = export_vlr(
            recognizer=rec.outputs["model"],
            dsr=dsl.Collected(dsr.outputs["model"]),
            finetuned=dsl.Collected(ft.outputs["model"]),
            dataset=data,
            config_yaml=config_yaml,
            run_root=run_root,
            int8=int8,
            trt=trt,
            log_dir=log_dir,
        )
        for task in (ev, ex):
            apply(task, cluster, gpu_task=True, cache=cluster.cache_training)
        with promoted(cluster, evaluation=ev.outputs["metrics"], staged=ex.outputs["repo"], data=data,
                      config_yaml=config_yaml, repo_uri=model_repo_uri, run_root=run_root, log_dir=log_dir) as pr:
            dep = deploy(repo=pr.outputs["repo"], dataset=data, triton_url=triton_url, log_dir=log_dir)
            apply(dep, cluster, gpu_task=False, cache=False)

    return vlr_face
