"""Training on the cluster: a Kubeflow Trainer v2 ``TrainJob`` running ``faceops train`` under torchrun.

The job references the ``torch-distributed`` ClusterTrainingRuntime: ``numNodes`` pods, each running
``torchrun -m faceops train ...`` with the rendezvous settings (``PET_*``) the runtime injects. The
manifest is a pure function (:func:`trainjob_manifest`), checked against the Kubeflow SDK's own models
(:func:`validate_trainjob`); :func:`run_trainjob` creates it and waits (:mod:`faceops.train.trainjob_api`).

Cleanup: the TrainJob is owned by the launcher's Pod (``metadata.ownerReferences``), so Kubernetes
deletes it when that Pod is deleted (run deleted, pods garbage-collected); a launcher that is stopped
(SIGTERM when the run is cancelled, Ctrl-C) or times out deletes it at once. ``activeDeadlineSeconds``
equals the wait's timeout, so no job outlives its launcher's patience.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from faceops import config
from faceops.config import check
from faceops.images import TRAINER_IMAGE_ENV, image
from faceops.retry import poll
from faceops.train.torchrun import ENTRY_MODULE, LaunchError, train_argv
from faceops.train.trainjob_api import (
    TRAINJOB_GROUP,
    TRAINJOB_KIND,
    TRAINJOB_VERSION,
    JobTimeoutError,
    TrainJobs,
    current_state,
    kube_config,
    logs_command,
    wait_for_job,
)

log = logging.getLogger(__name__)

# The env contract with the pipeline (pipelines/platform.py apply() sets both on training steps; this
# module imports no torch, so the pipeline may import it at compile time):
TRAINING_BACKEND_ENV = "FACEOPS_TRAINING_BACKEND"  # "pod" | "trainjob" (cluster.training_backend)
BACKENDS = ("pod", "trainjob")
# the cluster config's part a TrainJob needs, as JSON (see cluster_settings_json)
CLUSTER_ENV = "FACEOPS_TRAINJOB_CLUSTER"
CLUSTER_KEYS = ("node_selector", "tolerations", "gpu_resource", "s3_secret", "env_configmap")
S3_ENV_KEYS = ("FACEOPS_S3_ENDPOINT", "FACEOPS_S3_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY", "FACEOPS_S3_SECURE",
               "FACEOPS_S3_REGION")  # the keys of the chart's Secret, read by faceops.storage.s3
CONFIGMAP_ENV_KEYS = ("FACEOPS_PUSHGATEWAY",)
NODE_CONTAINER = "node"  # the runtime's trainer container and replicated job (torch-distributed)
PATCH_MANAGER = "faceops.dev/launcher"  # owner of our runtimePatches entry
CONFIG_ENV = "FACEOPS_TRAIN_CONFIG"  # the run's config YAML, written to CONFIG_PATH in each pod
CONFIG_DIR = "/tmp/faceops"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
# In each pod: write the config from the environment, then become torchrun with the container's args
# ("$@", so no argument is ever re-parsed by the shell). torchrun reads --nnodes, --node_rank, the
# master address and port, and --nproc_per_node from the PET_* variables the Torch runtime sets.
POD_SCRIPT = f'mkdir -p {CONFIG_DIR} && printf "%s" "${CONFIG_ENV}" > {CONFIG_PATH} && exec torchrun "$@"'
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035, what the TrainJob webhook demands


@dataclass
class JobConfig:
    """How a run becomes a TrainJob (config section ``launch:``). Placement adds to the cluster config's
    (``FACEOPS_TRAINJOB_CLUSTER``). No secrets here: pods read the S3 credentials from a Secret."""

    namespace: str | None = None  # None: the launcher pod's namespace, else the kubeconfig's
    # CUDA PyTorch + faceops: the image of the step that launches the job (set at compile time)
    image: str = field(default_factory=lambda: os.environ.get(TRAINER_IMAGE_ENV) or image("trainer"))
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime (Kubeflow Trainer v2) the job uses
    secret_name: str | None = None  # Secret with FACEOPS_S3_*; None: the cluster's s3_secret, else faceops-s3
    env_configmap: str | None = None  # ConfigMap with FACEOPS_PUSHGATEWAY; None: the cluster's, else faceops-env
    cpu: str = "4"  # CPU request per node (pod)
    memory: str = "16Gi"  # memory request per node
    memory_limit: str | None = None  # memory limit per node; None = no limit
    shm_size: str = "8Gi"  # /dev/shm (RAM-backed emptyDir) for DataLoader workers and NCCL
    gpu_resource: str | None = None  # a GPU's resource name; None: cluster accelerator_type, else nvidia.com/gpu
    node_selector: dict[str, str] = field(default_factory=dict)  # merged over the cluster's gpu_node_selector
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # added to the cluster's GPU toleration
    service_account: str | None = None  # pods' service account; None = the namespace default
    pod_annotations: dict[str, str] = field(  # Istio sidecars keep finished pods alive and block rendezvous
        default_factory=lambda: {"sidecar.istio.io/inject": "false"})
    timeout_s: float = 48 * 3600.0  # wait this long; also the job's activeDeadlineSeconds
    poll_s: float = 30.0  # status polling interval
    # names the job faceops-<task>-<run_id>; None = a digest of the step's output folder, the same for every
    # retry of one pipeline step (which then adopts its running job) and different for every other step
    run_id: str | None = None

    def __post_init__(self) -> None:
        check(self.timeout_s >= 1, f"launch.timeout_s must be >= 1, got {self.timeout_s}")
        check(self.poll_s > 0, f"launch.poll_s must be > 0, got {self.poll_s}")
        check(self.run_id is None or bool(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", self.run_id)),
              f"launch.run_id={self.run_id!r} must be lowercase letters, digits and '-' (a DNS label)")


def job_config_from_yaml(config_yaml: str) -> JobConfig:
    """The ``launch:`` section of a run's config (defaults where it has none)."""
    return config.load(JobConfig, text=config_yaml or "", section="launch", source="<config>")


def cluster_settings_json(*, node_selector: dict[str, str] | None = None,
                          tolerations: list[dict[str, Any]] | None = None, gpu_resource: str | None = None,
                          s3_secret: str | None = None, env_configmap: str | None = None) -> str:
    """The value of ``FACEOPS_TRAINJOB_CLUSTER`` for a training step, from the cluster config."""
    settings = {"node_selector": node_selector or None, "tolerations": tolerations or None,
                "gpu_resource": gpu_resource, "s3_secret": s3_secret, "env_configmap": env_configmap}
    return json.dumps({k: v for k, v in settings.items() if v is not None}, sort_keys=True, separators=(",", ":"))


def with_cluster_settings(job: JobConfig, env: dict[str, str] | None = None) -> JobConfig:
    """``job`` completed from the cluster config the pipeline passed in ``FACEOPS_TRAINJOB_CLUSTER``:
    the run's ``launch:`` values win, node selectors merge, tolerations add up."""
    raw = (os.environ if env is None else env).get(CLUSTER_ENV) or "{}"
    try:
        cluster = json.loads(raw)
        check(isinstance(cluster, dict), "not a JSON object")
    except (ValueError, config.ConfigError) as exc:
        raise LaunchError(f"{CLUSTER_ENV} must be a JSON object (set by the pipeline from the cluster "
                          f"config): {exc}") from None
    unknown = set(cluster) - set(CLUSTER_KEYS)
    if unknown:
        raise LaunchError(f"{CLUSTER_ENV}: unknown key(s) {sorted(unknown)}")
    tolerations = list(cluster.get("tolerations") or [])
    return replace(
        job,
        node_selector={**(cluster.get("node_selector") or {}), **job.node_selector},
        tolerations=tolerations + [t for t in job.tolerations if t not in tolerations],
        gpu_resource=job.gpu_resource or cluster.get("gpu_resource") or "nvidia.com/gpu",
        secret_name=job.secret_name or cluster.get("s3_secret") or "faceops-s3",
        env_configmap=job.env_configmap or cluster.get("env_configmap") or "faceops-env",
    )


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def step_run_id(overrides: list[str]) -> str | None:
    """A job id from the step's output folder (``out=`` among the overrides): a retried step finds the
    job its earlier attempt started, the per-size steps of one run never share one."""
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("out=")), None)
    return hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:12] if out else None


def job_name(task: str, run_id: str) -> str:
    # pods are <job>-node-0-<index>-<suffix>; 52 characters keep their hostnames DNS labels
    name = f"faceops-{task}-{run_id}".lower()[:52].rstrip("-")
    if not DNS_LABEL.match(name):
        raise LaunchError(f"job name {name!r} is not a DNS label: use lowercase letters, digits and '-'")
    return name


def _escape_kube_vars(arg: str) -> str:
    """Kubernetes expands ``$(VAR)`` in args; ``$$`` keeps a user's ``$(`` literal."""
    return arg.replace("$(", "$$(")


def owner_reference(pod_name: str, pod_uid: str) -> dict:
    """The launcher's Pod as the TrainJob's owner: deleting the Pod deletes the job. Neither
    ``controller`` nor ``blockOwnerDeletion`` (the latter needs update rights on the Pod's finalizers)."""
    return {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid}


def trainjob_manifest(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int, nodes: int,
                      resume: bool = False, job: JobConfig | None = None, name: str | None = None,
                      namespace: str = "default", owner: dict | None = None) -> dict:
    """The ``trainer.kubeflow.org/v1alpha1`` TrainJob running ``faceops train TASK`` on ``nodes`` pods
    with ``gpus_per_node`` GPUs each, validated by :func:`validate_trainjob`.

    ``spec.trainer`` carries image, command, resources and env (the S3 keys by reference to the Secret,
    never values). What ``spec.trainer`` cannot say (placement, service account, /dev/shm, pod
    annotations) goes in one ``runtimePatches`` entry on the runtime's ``node`` job; env cannot go
    there (the API refuses env patches on the ``node`` container).
    """
    job = with_cluster_settings(job or JobConfig(), env={})  # fills what is unset with the defaults
    run_id = job.run_id or step_run_id(overrides) or new_run_id()
    name = name or job_name(task, run_id)
    labels = {"app.kubernetes.io/part-of": "faceops", "app.kubernetes.io/component": "training",
              "faceops/task": task, "faceops/run-id": run_id}
    args = ["-m", ENTRY_MODULE, *map(_escape_kube_vars, train_argv(task, CONFIG_PATH, overrides, resume))]
    limits = {job.gpu_resource: str(gpus_per_node)} if gpus_per_node > 0 else {}
    if job.memory_limit:
        limits["memory"] = job.memory_limit
    secret_env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": job.secret_name, "key": key}}}
                  for key in S3_ENV_KEYS]
    configmap_env = [{"name": key, "valueFrom": {"configMapKeyRef": {
        "name": job.env_configmap, "key": key, "optional": True}}} for key in CONFIGMAP_ENV_KEYS]
    trainer = {
        "image": job.image,
        "command": ["sh", "-c", POD_SCRIPT, "faceops-train"],
        "args": args,
        # no FACEOPS_RUN_ID: training labels its metrics with the pipeline run's id from its out= folder
        "env": [{"name": CONFIG_ENV, "value": config_yaml or ""},
                *secret_env, *configmap_env],
        "numNodes": nodes,
        "numProcPerNode": max(1, gpus_per_node),
        "resourcesPerNode": {"requests": {"cpu": job.cpu, "memory": job.memory},
                             **({"limits": limits} if limits else {})},
    }
    pod_spec: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}],
        "containers": [{"name": NODE_CONTAINER, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if job.node_selector:
        pod_spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in job.tolerations]
    if job.service_account:
        pod_spec["serviceAccountName"] = job.service_account
    pod_template = {"metadata": {"labels": dict(labels), "annotations": dict(job.pod_annotations)},
                    "spec": pod_spec}
    patch = {"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": NODE_CONTAINER, "template": {"spec": {"template": pod_template}}}]}}}}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner:
        metadata["ownerReferences"] = [owner]
    manifest = {
        "apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}",
        "kind": TRAINJOB_KIND,
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"apiGroup": TRAINJOB_GROUP, "kind": "ClusterTrainingRuntime", "name": job.runtime},
            "trainer": trainer,
            "runtimePatches": [patch],
            "activeDeadlineSeconds": int(job.timeout_s),
        },
    }
    validate_trainjob(manifest)
    return manifest


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key}".lstrip(".")
            if key not in a or a[key] != b[key]:
                return _first_difference(a.get(key), b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path.lstrip(".") or "<root>"


def validate_trainjob(manifest: dict) -> Any:
    """The manifest as the Kubeflow SDK's ``TrainerV1alpha1TrainJob`` model. Types are checked by the
    model; a field the model does not know (a typo, a field of another API version) is dropped by its
    ``from_dict``, so a manifest that does not come back unchanged from ``to_dict`` is refused."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    name = manifest.get("metadata", {}).get("name", "?")
    try:
        model = TrainerV1alpha1TrainJob.from_dict(manifest)
    except ValidationError as exc:
        raise LaunchError(f"TrainJob {name} does not match the Trainer v1alpha1 API: {exc}") from None
    back = model.to_dict()
    if back != manifest:
        raise LaunchError(f"TrainJob {name} does not match the Trainer v1alpha1 API at "
                          f"{_first_difference(manifest, back)} (unknown field or wrong type)")
    return model


def validate_task_config(task: str, config_yaml: str, overrides: list[str]) -> Any:
    """Load the task's config here, so a typo fails now and not after GPUs were scheduled."""
    from faceops.train.registry import get_task  # imports the models (torch): not at module import

    spec = get_task(task)
    return config.load(spec.config_cls, text=config_yaml or "", overrides=list(overrides), section=spec.section,
                       source="<config>")


def check_shared_uris(task: str, cfg: Any) -> None:
    """The job's pods cannot see this pod's files: the dataset and the output must be in the object
    store (s3://)."""
    for key in ("data", "out"):
        value = getattr(cfg, key, None)
        if not value or not str(value).startswith("s3://"):
            raise LaunchError(f"training {task} as a TrainJob: {key}={value!r} is not reachable from the "
                              f"job's pods; set it to an s3:// URI (the MinIO store), e.g. --set {key}=s3://bucket/...")


class _Terminated(BaseException):
    """SIGTERM while waiting (KFP cancelling the run): unwinds the wait like Ctrl-C does."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` in the main thread, so the job is deleted on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_trainjob(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int, nodes: int,
                 resume: bool, job: JobConfig, jobs: TrainJobs | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> int:
    """Create the TrainJob, print where its logs are, wait for it; 0 on success, raises otherwise.
    Stopped (SIGTERM, Ctrl-C) or timed out, the launcher deletes the job before it exits."""
    check_shared_uris(task, validate_task_config(task, config_yaml, overrides))
    job = with_cluster_settings(job)
    if jobs is None:
        configuration, default_ns = kube_config()
        jobs = TrainJobs(configuration, job.namespace or default_ns)
    namespace = jobs.namespace
    own = jobs.own_pod()
    manifest = trainjob_manifest(task, config_yaml, overrides, gpus_per_node=gpus_per_node, nodes=nodes,
                                 resume=resume, job=job, namespace=namespace,
                                 owner=owner_reference(*own) if own else None)
    name = manifest["metadata"]["name"]
    existing = jobs.find(name)
    if existing is not None and current_state(existing)[0] == "Failed":
        print(f"TrainJob {namespace}/{name} of an earlier attempt failed: deleting it to try again", flush=True)
        if not jobs.delete(name):
            raise LaunchError(f"TrainJob {namespace}/{name} failed earlier and could not be deleted: delete it "
                              f"(kubectl -n {namespace} delete trainjob {name}) and retry the step")
        _wait_gone(jobs, name, sleep, clock)
        existing = None
    if existing is None:
        jobs.create(manifest)
        print(f"TrainJob {namespace}/{name} created (runtime {job.runtime}): {nodes} node(s) x "
              f"{max(1, gpus_per_node)} process(es), {gpus_per_node} GPU(s) each, image {job.image}"
              f"{', owned by pod ' + own[0] if own else ''}. Logs: {logs_command(namespace, name, follow=True)}",
              flush=True)
    else:  # a retried step whose earlier attempt died without deleting its job: follow that job, never a second
        print(f"TrainJob {namespace}/{name} exists ({current_state(existing)[0]}): started by an earlier attempt "
              f"of this step; following it. Logs: {logs_command(namespace, name, follow=True)}", flush=True)
    try:
        with _sigterm_unwinds():
            outcome = wait_for_job(lambda: jobs.status(name), job.timeout_s, job.poll_s, sleep,
                                   name=name, namespace=namespace, clock=clock)
    except (_Terminated, KeyboardInterrupt, JobTimeoutError) as exc:
        _show_log_tail(jobs, name)
        deleted = jobs.delete(name)
        if isinstance(exc, JobTimeoutError):
            raise JobTimeoutError(f"{exc}; {'deleted' if deleted else 'NOT deleted'}") from None
        if isinstance(exc, _Terminated):
            raise LaunchError(f"stopped (SIGTERM) while waiting for TrainJob {namespace}/{name}; "
                              f"{'deleted it' if deleted else 'could NOT delete it'}") from None
        raise
    except LaunchError:
        _show_log_tail(jobs, name)
        raise
    print(f"TrainJob {namespace}/{name} complete in {outcome.seconds:.0f}s "
          f"({' -> '.join(t for t, _ in outcome.transitions)})", flush=True)
    return 0


def _wait_gone(jobs: TrainJobs, name: str, sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
    """Deletion is asynchronous: a create under the same name right away would get 409."""
    if not poll(lambda: jobs.find(name) is None, timeout_s=120.0, interval_s=2.0, sleep=sleep, clock=clock):
        raise LaunchError(f"TrainJob {jobs.namespace}/{name} is still being deleted: retry the step later")


def _show_log_tail(jobs: TrainJobs, name: str) -> None:
    tail = jobs.log_tail(name)
    if tail:
        log.error("last lines of TrainJob %s/%s node-0:\n%s", jobs.namespace, name, tail)
