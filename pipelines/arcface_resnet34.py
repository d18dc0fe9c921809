"""arcface_resnet34: ingest -> IResNet-34 ArcFace training (seed 002's three phases) -> evaluate -> export
(staged) -> promotion gate -> promote."""

from faceops.components import evaluate, export
from faceops.pipelines.platform import (
    DATA_URI,
    MODEL_REPO_URI,
    ClusterConfig,
    apply,
    default_config_text,
    ingest_and_train,
    promoted,
    run_folder,
)
from kfp import dsl

DEFAULT_CONFIG = "arcface_resnet34"


def build(cluster: ClusterConfig | None = None, config_yaml: str | None = None):
    """The pipeline; ``config_yaml`` (default: the packaged config) is its ``config_yaml`` default."""
    cluster = cluster or ClusterConfig()
    default_yaml = default_config_text(DEFAULT_CONFIG, config_yaml)

    @dsl.pipeline(
        name="arcface-resnet34",
        description="IResNet-34 + ArcFace (s=30, m=0.35) trained from scratch in three phases "
        "(SGD 1e-3, SGD 5e-4, Adam 1e-4 cosine); verification/identification; ONNX for Triton.",
    )
    def arcface_resnet34(
        config_yaml: str = default_yaml,
        source: str = "synth://",
        dataset_name: str = "faces",
        store_uri: str = DATA_URI,
        model_repo_uri: str = MODEL_REPO_URI,
        run_id: str = "",
        pairs_file: str = "",
        gpus_per_node: int = 1,
        nodes: int = 1,
        int8: bool = False,
        trt: bool = False,
        log_dir: str = "",
    ):
        run_root = run_folder(cluster, store_uri=store_uri, run_id=run_id)
        data, rec = ingest_and_train(
            cluster, config_yaml=config_yaml, source=source, dataset_name=dataset_name, store_uri=store_uri,
            run_root=run_root, pairs_file=pairs_file, gpus_per_node=gpus_per_node, nodes=nodes, log_dir=log_dir)
        ev = evaluate(
            dataset=data,
            recognizer=rec.outputs["model"],
            config_yaml=config_yaml,
            run_root=run_root,
            log_dir=log_dir,
        )
        ex = export(
            recognizer=rec.outputs["model"],
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
                      config_yaml=config_yaml, repo_uri=model_repo_uri, run_root=run_root, log_dir=log_dir):
            pass  # served; no deploy check here (vlr_face's checks the whole repository)

    return arcface_resnet34
