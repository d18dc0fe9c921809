"""Cluster settings applied to pipeline tasks at compile time (the local runner ignores them).

GPU placement is configurable and off by default for CPU-only clusters; MinIO credentials come from
a Kubernetes Secret as environment variables (never pipeline parameters); DataLoader workers get a
memory-backed /dev/shm; ingest is cached, training is not (unless asked); steps retry on transient
failures.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from kfp import dsl

from faceops.config import check
from faceops.images import TRAINER_IMAGE_ENV, image
from faceops.train.cluster_job import BACKENDS, CLUSTER_ENV, TRAINING_BACKEND_ENV, cluster_settings_json

# Defaults that match the Helm chart (charts/faceops values s3.buckets and triton.modelRepository):
# datasets, checkpoints and reports go to the data bucket; exports go where the chart's Triton reads.
DATA_URI = "s3://faceops-data"
MODEL_REPO_URI = "s3://faceops-models/triton"


@dataclass
class ClusterConfig:
    gpu: bool = False  # request GPUs for GPU tasks (training, evaluation, export)
    accelerator_type: str = "nvidia.com/gpu"
    gpus_per_task: int = 1  # accelerator limit of each GPU task
    gpu_node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {"nvidia.com/gpu.present": "true"}
    gpu_toleration: bool = False  # tolerate the nvidia.com/gpu NoSchedule taint on GPU nodes
    toleration_key: str = "nvidia.com/gpu"
    s3_secret: str = "faceops-s3"  # Secret whose keys become env vars (FACEOPS_S3_*)
    env_configmap: str = "faceops-env"  # the chart's ConfigMap: FACEOPS_PUSHGATEWAY, _TRITON_URL, _TRITON_GPUS
    shm_size: str = "2Gi"  # /dev/shm emptyDir (medium Memory) for DataLoader workers
    cache_training: bool = False  # KFP caching of training steps (ingest is always cached)
    size_parallelism: int = 0  # VLR sizes trained at once (vlr_face's ParallelFor; 0: all); locally 1
    retries: int = 2  # retries of each task on transient failure
    cpu_request: str = "2"
    memory_request: str = "8G"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "32G"
    image_registry: str | None = None  # e.g. registry.example.com/ml: `make images push REGISTRY=...`
    image_tag: str | None = None  # default: the faceops version (`make images push TAG=...`)
    # "pod": a training step trains in its own pod (one node, the GPUs it requests); "trainjob": it is a
    # launcher requesting no GPU that trains as a Kubeflow Trainer TrainJob of nodes x gpus_per_node
    # (needed for nodes > 1; docs/cluster.md)
    training_backend: str = "pod"

    def __post_init__(self) -> None:
        check(self.gpus_per_task >= 1, "cluster.gpus_per_task must be >= 1")
        check(self.retries >= 0, "cluster.retries must be >= 0")
        check(self.size_parallelism >= 0, "cluster.size_parallelism must be >= 0 (0: every size at once)")
        check(self.training_backend in BACKENDS, f"cluster.training_backend must be one of "
              f"{', '.join(BACKENDS)}, got {self.training_backend!r}")


def trainjob_settings(cfg: ClusterConfig) -> str:
    """What a training step's TrainJob takes from the cluster config (FACEOPS_TRAINJOB_CLUSTER)."""
    toleration = {"key": cfg.toleration_key, "operator": "Exists", "effect": "NoSchedule"}
    return cluster_settings_json(
        node_selector=cfg.gpu_node_selector if cfg.gpu else None,
        tolerations=[toleration] if cfg.gpu and cfg.gpu_toleration else None,
        gpu_resource=cfg.accelerator_type, s3_secret=cfg.s3_secret, env_configmap=cfg.env_configmap)


def config_document(name: str, config_yaml: str | None = None) -> dict:
    """The config a pipeline is built with: ``config_yaml`` (a run's config text), else packaged
    config ``name``."""
    from faceops.config import packaged_config, parse_yaml, read_yaml

    return parse_yaml(config_yaml, "<pipeline config>") if config_yaml else read_yaml(packaged_config(name))


def default_config_text(name: str, config_yaml: str | None = None) -> str:
    """A packaged config (or ``config_yaml``) as one-line JSON (valid YAML): KFP writes parameter
    defaults into the compiled file's header comment, where a multi-line default would break the YAML."""
    import json

    return json.dumps(config_document(name, config_yaml), separators=(",", ":"))


def run_folder(cluster: ClusterConfig, *, store_uri, run_id):
    """This run's folder in the store (``<store>/runs/<id>``): the ``run_id`` parameter when set, else
    KFP's own run id, so a new run never resumes another's checkpoints (a retried step resumes its own)."""
    from faceops.components import run_root

    task = run_root(store_uri=store_uri, run_id=run_id, job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    apply(task, cluster, gpu_task=False, cache=False)
    return task.output


@contextmanager
def promoted(cluster: ClusterConfig, *, evaluation, staged, data, config_yaml, repo_uri, run_root, log_dir):
    """The promotion gate: the staged export is served (``promote``) only when the evaluation meets the
    config's ``promote`` thresholds; otherwise the served repository is left as it is. Yields the
    ``promote`` task inside the condition, where steps that check what it served belong."""
    from faceops.components import promote, promotion_gate

    gate = promotion_gate(evaluation=evaluation, config_yaml=config_yaml, log_dir=log_dir)
    apply(gate, cluster, gpu_task=False, cache=False)
    with dsl.If(gate.outputs["Output"] == True, name="evaluation-meets-thresholds"):  # noqa: E712 (KFP condition)
        task = promote(staged=staged, evaluation=evaluation, dataset=data, config_yaml=config_yaml,
                       repo_uri=repo_uri, run_root=run_root, log_dir=log_dir)
        apply(task, cluster, gpu_task=False, cache=False)
        yield task


def ingest_and_train(cluster: ClusterConfig, *, config_yaml, source, dataset_name, store_uri, run_root,
                     pairs_file, gpus_per_node, nodes, log_dir):
    """The head every pipeline shares: the dataset, then a recognizer trained on it."""
    from faceops.components import ingest, train_recognizer

    ing = ingest(source=source, name=dataset_name, store_uri=store_uri, config_yaml=config_yaml,
                 pairs_file=pairs_file, log_dir=log_dir)
    apply(ing, cluster, gpu_task=False, cache=True)
    data = ing.outputs["dataset"]
    rec = train_recognizer(dataset=data, config_yaml=config_yaml, run_root=run_root,
                           gpus_per_node=gpus_per_node, nodes=nodes, log_dir=log_dir)
    apply(rec, cluster, gpu_task=True, cache=cluster.cache_training, gpus=gpus_per_node)
    return data, rec


def apply(task, cfg: ClusterConfig, *, gpu_task: bool, cache: bool, gpus=None) -> None:
    """Resources, GPU placement, Secret env, /dev/shm, caching and retries on one task. ``gpus``: a
    training task's GPU count, the run's ``gpus_per_node`` parameter (the pod requests what torchrun
    then starts one process per; KFP resolves the placeholder when it creates the pod), else
    ``cluster.gpus_per_task``. With ``cluster.training_backend: trainjob`` a training task only
    launches and waits for a TrainJob: it requests no GPU and no /dev/shm."""
    from kfp import kubernetes

    launcher = gpus is not None and cfg.training_backend == "trainjob"

    task.set_caching_options(cache)
    trainer = image("trainer", cfg.image_registry, cfg.image_tag)
    task.set_container_image(trainer if gpu_task else image("slim", cfg.image_registry, cfg.image_tag))
    task.set_env_variable(TRAINER_IMAGE_ENV, trainer)  # what a multi-node training job runs
    task.set_retry(num_retries=cfg.retries, backoff_duration="30s", backoff_factor=2.0)
    if gpus is not None:  # a training task
        task.set_env_variable(TRAINING_BACKEND_ENV, cfg.training_backend)
    if launcher:
        task.set_env_variable(CLUSTER_ENV, trainjob_settings(cfg))
    if gpu_task and cfg.gpu and not launcher:
        task.set_cpu_request(cfg.gpu_cpu_request).set_memory_request(cfg.gpu_memory_request)
        task.set_accelerator_type(cfg.accelerator_type)
        task.set_accelerator_limit(cfg.gpus_per_task if gpus is None else gpus)
        for key, value in cfg.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if cfg.gpu_toleration:
            kubernetes.add_toleration(task, key=cfg.toleration_key, operator="Exists", effect="NoSchedule")
    else:
        task.set_cpu_request(cfg.cpu_request).set_memory_request(cfg.memory_request)
    kubernetes.use_secret_as_env(task, secret_name=cfg.s3_secret, secret_key_to_env={
        k: k for k in ("FACEOPS_S3_ENDPOINT", "FACEOPS_S3_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY",
                       "FACEOPS_S3_SECURE", "FACEOPS_S3_REGION")})
    kubernetes.use_config_map_as_env(task, config_map_name=cfg.env_configmap, config_map_key_to_env={
        k: k for k in ("FACEOPS_PUSHGATEWAY", "FACEOPS_TRITON_URL", "FACEOPS_TRITON_GPUS")},
        optional=True)
    if gpu_task and not launcher:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=cfg.shm_size)
