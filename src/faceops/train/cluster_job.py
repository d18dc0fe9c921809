"""Training on several nodes: a Kubeflow ``PyTorchJob`` (``kubeflow.org/v1``) running ``faceops train``.

One Master and nodes-1 Workers, each running ``torchrun`` (:mod:`faceops.train.torchrun`), created
through the ``kubernetes`` client and waited for (:mod:`faceops.train.pytorchjob_api`). The manifest
is a pure function (:func:`pytorchjob_manifest`), tested offline.

``runPolicy.activeDeadlineSeconds`` equals the wait's timeout, so the training operator stops a job
that nobody waits for any more at the same deadline and no GPU stays held; the timed-out job itself
is left in place for its logs. Finished jobs are removed by the operator after
``JobConfig.ttl_s_after_finished``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from faceops import config
from faceops.config import check
from faceops.images import TRAINER_IMAGE_ENV, image
from faceops.train.pytorchjob_api import (
    PYTORCHJOB_GROUP,
    PYTORCHJOB_VERSION,
    PyTorchJobs,
    kube_client,
    logs_command,
    wait_for_job,
)
from faceops.train.registry import get_task
from faceops.train.torchrun import ENTRY_MODULE, LaunchError, train_argv

log = logging.getLogger(__name__)

CONTAINER_NAME = "pytorch"  # the training operator finds the container (and its port) by this name
MASTER_PORT_NAME = "pytorchjob-port"  # ... and the rendezvous port by this name
CONFIG_ENV = "FACEOPS_TRAIN_CONFIG"  # the run's config YAML, written to CONFIG_PATH in each pod
CONFIG_DIR = "/tmp/faceops"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
# In each pod: write the config from the environment, then become torchrun with the container's args
# ("$@", so no argument is ever re-parsed by the shell).
POD_SCRIPT = f'mkdir -p {CONFIG_DIR} && printf "%s" "${CONFIG_ENV}" > {CONFIG_PATH} && exec torchrun "$@"'
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class JobConfig:
    """How a multi-node run becomes a PyTorchJob (config section ``launch:``). No secrets here: pods
    read the S3 credentials from the Secret ``secret_name``."""

    namespace: str | None = None  # None: this pod's namespace in a cluster, else the kubeconfig's
    # CUDA PyTorch + faceops: the image of the step that launches the job (set at compile time)
    image: str = field(default_factory=lambda: os.environ.get(TRAINER_IMAGE_ENV) or image("trainer"))
    secret_name: str = "faceops-s3"  # Secret with FACEOPS_S3_* (envFrom)
    env_configmap: str = "faceops-env"  # ConfigMap with FACEOPS_PUSHGATEWAY (optional)
    cpu: str = "4"  # CPU request per node (pod)
    memory: str = "16Gi"  # memory request per node
    memory_limit: str | None = None  # memory limit per node; None = no limit
    shm_size: str = "8Gi"  # /dev/shm (RAM-backed emptyDir) for DataLoader workers and NCCL
    gpu_resource: str = "nvidia.com/gpu"  # extended resource name of a GPU
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. {"nvidia.com/gpu.present": "true"}
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # e.g. [{key: nvidia.com/gpu, ...}]
    service_account: str | None = None  # pods' service account; None = the namespace default
    pod_annotations: dict[str, str] = field(  # Istio sidecars keep finished pods alive and block rendezvous
        default_factory=lambda: {"sidecar.istio.io/inject": "false"})
    master_port: int = 23456  # torchrun rendezvous port on the Master pod
    backoff_limit: int = 3  # pod restarts (restartPolicy OnFailure) before the job fails
    clean_pod_policy: Literal["None", "Running", "All"] = "None"  # "None" keeps pods (and logs) after the end
    ttl_s_after_finished: int | None = 86400  # the operator deletes a finished job after this
    timeout_s: float = 48 * 3600.0  # wait this long; also the job's activeDeadlineSeconds
    poll_s: float = 30.0  # status polling interval
    run_id: str | None = None  # names the job faceops-<task>-<run_id>; None = time + random suffix

    def __post_init__(self) -> None:
        check(self.timeout_s > 0, f"launch.timeout_s must be > 0, got {self.timeout_s}")
        check(self.poll_s > 0, f"launch.poll_s must be > 0, got {self.poll_s}")
        check(self.backoff_limit >= 0, f"launch.backoff_limit must be >= 0, got {self.backoff_limit}")
        check(1 <= self.master_port <= 65535, f"launch.master_port must be a port, got {self.master_port}")
        check(self.run_id is None or bool(DNS_LABEL.match(self.run_id)),
              f"launch.run_id={self.run_id!r} must be lowercase letters, digits and '-' (a DNS label)")


def job_config_from_yaml(config_yaml: str) -> JobConfig:
    """The ``launch:`` section of a run's config (defaults where it has none)."""
    return config.load(JobConfig, text=config_yaml or "", section="launch", source="<config>")


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def job_name(task: str, run_id: str) -> str:
    name = f"faceops-{task}-{run_id}".lower()[:52].rstrip("-")  # + "-worker-NN" stays a DNS label
    if not DNS_LABEL.match(name):
        raise LaunchError(f"job name {name!r} is not a DNS label: use lowercase letters, digits and '-'")
    return name


def _escape_kube_vars(arg: str) -> str:
    """Kubernetes expands ``$(VAR)`` in args; ``$$`` keeps a user's ``$(`` literal."""
    return arg.replace("$(", "$$(")


def pytorchjob_manifest(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int, nodes: int,
                        resume: bool = False, job: JobConfig | None = None, name: str | None = None,
                        namespace: str = "default") -> dict:
    """The ``kubeflow.org/v1`` PyTorchJob running ``faceops train TASK`` on ``nodes`` pods.

    Each pod runs ``torchrun --nnodes=N --nproc_per_node=G --node_rank=$(RANK)`` against the Master
    pod; the operator sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK`` (the pod's node rank) per pod.
    """
    job = job or JobConfig()
    run_id = job.run_id or new_run_id()
    name = name or job_name(task, run_id)
    nproc = max(1, gpus_per_node)
    labels = {"app.kubernetes.io/part-of": "faceops", "app.kubernetes.io/component": "training",
              "faceops/task": task, "faceops/run-id": run_id}
    args = [f"--nnodes={nodes}", f"--nproc_per_node={nproc}", "--node_rank=$(RANK)",
            "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)",
            "-m", ENTRY_MODULE, *map(_escape_kube_vars, train_argv(task, CONFIG_PATH, overrides, resume))]
    requests = {"cpu": job.cpu, "memory": job.memory}
    limits: dict[str, Any] = {job.gpu_resource: gpus_per_node} if gpus_per_node > 0 else {}
    if job.memory_limit:
        limits["memory"] = job.memory_limit
    container = {
        "name": CONTAINER_NAME,
        "image": job.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", POD_SCRIPT, "faceops-train"],
        "args": args,
        "env": [
            {"name": CONFIG_ENV, "value": config_yaml or ""},
            {"name": "FACEOPS_RUN_ID", "value": run_id},
            {"name": "FACEOPS_PUSHGATEWAY", "valueFrom": {"configMapKeyRef": {
                "name": job.env_configmap, "key": "FACEOPS_PUSHGATEWAY", "optional": True}}},
        ],
        "envFrom": [{"secretRef": {"name": job.secret_name}}],
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "ports": [{"name": MASTER_PORT_NAME, "containerPort": job.master_port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}],
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
    template = {"metadata": {"labels": dict(labels), "annotations": dict(job.pod_annotations)},
                "spec": pod_spec}

    def replicas(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "OnFailure", "template": template}

    run_policy: dict[str, Any] = {"backoffLimit": job.backoff_limit, "cleanPodPolicy": job.clean_pod_policy,
                                  "activeDeadlineSeconds": int(job.timeout_s)}
    if job.ttl_s_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = job.ttl_s_after_finished
    specs = {"Master": replicas(1), **({"Worker": replicas(nodes - 1)} if nodes > 1 else {})}
    return {
        "apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nprocPerNode": str(nproc), "runPolicy": run_policy, "pytorchReplicaSpecs": specs},
    }


def validate_task_config(task: str, config_yaml: str, overrides: list[str]) -> Any:
    """Load the task's config here, so a typo fails now and not after GPUs were scheduled."""
    spec = get_task(task)
    return config.load(spec.config_cls, text=config_yaml or "", overrides=list(overrides), section=spec.section,
                       source="<config>")


def check_shared_uris(task: str, cfg: Any) -> None:
    """Pods on other nodes cannot see this pod's files: the dataset and the output must be in the
    object store (s3://)."""
    for key in ("data", "out"):
        value = getattr(cfg, key, None)
        if not value or not str(value).startswith("s3://"):
            raise LaunchError(f"multi-node training of {task}: {key}={value!r} is not reachable from every "
                              f"node; set it to an s3:// URI (the MinIO store), e.g. --set {key}=s3://bucket/...")


def run_pytorchjob(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int, nodes: int,
                   resume: bool, job: JobConfig, jobs: PyTorchJobs | None = None,
                   namespace: str | None = None,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> int:
    """Create the PyTorchJob, print where its logs are, wait for it; 0 on success, raises otherwise."""
    check_shared_uris(task, validate_task_config(task, config_yaml, overrides))
    if jobs is None:
        from kubernetes import client

        api_client, default_ns = kube_client()
        jobs = PyTorchJobs(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client))
        namespace = namespace or default_ns
    namespace = job.namespace or namespace or "default"
    manifest = pytorchjob_manifest(task, config_yaml, overrides, gpus_per_node=gpus_per_node, nodes=nodes,
                                   resume=resume, job=job, namespace=namespace)
    name = manifest["metadata"]["name"]
    jobs.create(manifest)
    print(f"PyTorchJob {namespace}/{name} created: {nodes} nodes x {max(1, gpus_per_node)} processes "
          f"({gpus_per_node} GPU(s) each), image {job.image}. Master log: "
          f"{logs_command(namespace, name, follow=True)}", flush=True)
    try:
        outcome = wait_for_job(lambda: jobs.status(namespace, name), job.timeout_s, job.poll_s, sleep,
                               name=name, namespace=namespace, clock=clock)
    except LaunchError:
        tail = jobs.master_log_tail(namespace, name)
        if tail:
            log.error("last lines of %s-master-0:\n%s", name, tail)
        raise
    print(f"PyTorchJob {namespace}/{name} succeeded in {outcome.seconds:.0f}s "
          f"({' -> '.join(t for t, _ in outcome.transitions)})", flush=True)
    return 0
