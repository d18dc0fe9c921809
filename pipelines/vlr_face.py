"""vlr_face: ingest -> recognizer -> DSR -> fine-tune on DSR outputs -> evaluate -> export -> deploy.

Beside the fine-tune on DSR outputs runs its control, the same fine-tune on bicubic faces: the
evaluation then tells what DSR adds from what the extra training adds.
"""

from faceops.components.stages import (
    deploy,
    evaluate_vlr,
    export_vlr,
    finetune_bicubic,
    finetune_edgeface,
    train_dsr,
)
from faceops.pipelines.platform import (
    DATA_URI,
    MODEL_REPO_URI,
    ClusterConfig,
    apply,
    default_config_text,
    ingest_and_train,
)
from kfp import dsl

DEFAULT_CONFIG = "vlr_face"


def build(cluster: ClusterConfig | None = None):
    cluster = cluster or ClusterConfig()
    default_yaml = default_config_text(DEFAULT_CONFIG)

    @dsl.pipeline(
        name="vlr-face",
        description="Very-low-resolution face recognition: a recognizer, a DSR "
        "super-resolver and a recognizer fine-tuned on DSR outputs (beside its control, fine-tuned on bicubic faces), "
        "evaluated, exported and served.",
    )
    def vlr_face(
        config_yaml: str = default_yaml,
        source: str = "synth://",
        dataset_name: str = "faces",
        store_uri: str = DATA_URI,
        model_repo_uri: str = MODEL_REPO_URI,
        run_id: str = "vlr-face",
        vlr_size: str = "32x32",
        pairs_file: str = "",
        gpus_per_node: int = 1,
        nodes: int = 1,
        int8: bool = False,
        trt: bool = False,
        triton_url: str = "",
        log_dir: str = "",
    ):
        run_root = f"{store_uri}/runs/{run_id}"
        data, rec = ingest_and_train(
            cluster, config_yaml=config_yaml, source=source, dataset_name=dataset_name, store_uri=store_uri,
            run_root=run_root, pairs_file=pairs_file, gpus_per_node=gpus_per_node, nodes=nodes, log_dir=log_dir)
        dsr = train_dsr(
            dataset=data,
            recognizer=rec.outputs["model"],
            config_yaml=config_yaml,
            run_root=run_root,
            vlr_size=vlr_size,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            log_dir=log_dir,
        )
        ft = finetune_edgeface(
            dataset=data,
            recognizer=rec.outputs["model"],
            dsr=dsr.outputs["model"],
            config_yaml=config_yaml,
            run_root=run_root,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            log_dir=log_dir,
        )
        ft_bicubic = finetune_bicubic(
            dataset=data,
            recognizer=rec.outputs["model"],
            config_yaml=config_yaml,
            run_root=run_root,
            vlr_size=vlr_size,
            gpus_per_node=gpus_per_node,
            nodes=nodes,
            log_dir=log_dir,
        )
        ev = evaluate_vlr(
            dataset=data,
            recognizer=rec.outputs["model"],
            dsr=dsr.outputs["model"],
            finetuned=ft.outputs["model"],
            finetuned_bicubic=ft_bicubic.outputs["model"],
            config_yaml=config_yaml,
            run_root=run_root,
            log_dir=log_dir,
        )
        ex = export_vlr(
            recognizer=ft.outputs["model"],
            dsr=dsr.outputs["model"],
            dataset=data,
            config_yaml=config_yaml,
            repo_uri=model_repo_uri,
            int8=int8,
            trt=trt,
            log_dir=log_dir,
        )
        dep = deploy(repo=ex.outputs["repo"], dataset=data, triton_url=triton_url, log_dir=log_dir)
        dep.after(ev)
        for task in (dsr, ft, ft_bicubic, ev, ex):
            apply(task, cluster, gpu_task=True, cache=cluster.cache_training)
        apply(dep, cluster, gpu_task=False, cache=False)

    return vlr_face
