"""Launch ``faceops train TASK`` on one process, on several GPUs of this node, or on several nodes.

One entry point, :func:`launch_training`, chosen by the size of the job:

- one node, at most one GPU: in this process (``faceops.cli.main``);
- one node, N GPUs: ``torchrun --standalone --nproc_per_node=N`` as a child process;
- several nodes: a Kubeflow ``PyTorchJob`` (``kubeflow.org/v1``: one Master and nodes-1 Workers, each
  running ``torchrun``), created through the ``kubernetes`` client and waited for.

The training code knows nothing about this: the engine joins the torchrun process group by itself
(``WORLD_SIZE > 1``). The manifest is a pure function (:func:`pytorchjob_manifest`) and waiting is
a pure loop over a status getter (:func:`wait_for_job`), so both are tested offline.

On a timeout the PyTorchJob is **left in place** (its pods keep their logs for ``kubectl logs``), and
``runPolicy.activeDeadlineSeconds`` equals the wait's timeout, so the training operator stops the job
at the same deadline and no GPU stays held by a job nobody waits for. Finished jobs are removed by
the operator after ``JobConfig.ttl_s_after_finished``.

``python -m faceops.train.launch ARGS`` runs ``faceops ARGS``: torchrun needs a module to run and
``faceops.cli`` is a package without ``__main__``.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from faceops import config
from faceops.config import check
from faceops.errors import FaceopsError
from faceops.images import TRAINER_IMAGE_ENV, image

log = logging.getLogger(__name__)

ENTRY_MODULE = "faceops.train.launch"  # what torchrun runs: `python -m faceops.train.launch train ...`
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER_NAME = "pytorch"  # the training operator finds the container (and its port) by this name
MASTER_PORT_NAME = "pytorchjob-port"  # ... and the rendezvous port by this name
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on every pod of a job
CONFIG_ENV = "FACEOPS_TRAIN_CONFIG"  # the run's config YAML, written to CONFIG_PATH in each pod
CONFIG_DIR = "/tmp/faceops"
CONFIG_PATH = f"{CONFIG_DIR}/config.yaml"
# In each pod: write the config from the environment, then become torchrun with the container's args
# ("$@", so no argument is ever re-parsed by the shell).
POD_SCRIPT = f'mkdir -p {CONFIG_DIR} && printf "%s" "${CONFIG_ENV}" > {CONFIG_PATH} && exec torchrun "$@"'
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# the first error a rank reports: the CLI's one-line error, or an uncaught exception's last line
RANK_ERROR = re.compile(r"^(faceops \w+: error: |[\w.]*(Error|Exception): )")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class LaunchError(FaceopsError):
    """Training could not be launched, or the launched training failed."""


class JobTimeoutError(LaunchError, TimeoutError):
    """The training job did not finish in time (it is left in place, see the module docstring)."""


def _tasks() -> dict[str, tuple]:
    from faceops.cli.train import TASKS

    return TASKS


# -- configuration ---------------------------------------------------------------------------------
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


# -- the entry point -------------------------------------------------------------------------------
def launch_training(task: str, config_yaml: str, overrides: list[str], *, gpus_per_node: int = 0,
                    nodes: int = 1, resume: bool = False, job: JobConfig | None = None) -> int:
    """Run ``faceops train TASK`` with the config YAML text ``config_yaml`` and ``--set`` overrides.

    Returns the exit code (0 on success). In-process runs return the CLI's code; torchrun and
    PyTorchJob failures raise :class:`LaunchError` naming the exit code or the job's reason.
    """
    tasks = _tasks()
    if task not in tasks:
        raise LaunchError(f"unknown training task {task!r} (known: {', '.join(tasks)})")
    if nodes < 1 or gpus_per_node < 0:
        raise LaunchError(f"nodes must be >= 1 and gpus_per_node >= 0, got nodes={nodes}, "
                          f"gpus_per_node={gpus_per_node}")
    config.parse_yaml(config_yaml or "", "<config>")
    if nodes > 1:
        job = job or job_config_from_yaml(config_yaml)
        return run_pytorchjob(task, config_yaml, overrides, gpus_per_node=gpus_per_node, nodes=nodes,
                              resume=resume, job=job)
    with tempfile.TemporaryDirectory(prefix="faceops-launch-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(config_yaml or "")
        argv = train_argv(task, str(config_file), overrides, resume)
        if gpus_per_node <= 1:
            from faceops.cli import main

            return main(argv)
        return run_torchrun(argv, gpus_per_node)


def train_argv(task: str, config_file: str, overrides: list[str], resume: bool) -> list[str]:
    """``train TASK --config FILE --set k=v ... [--resume]`` (the ``faceops`` arguments)."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return ["train", task, "--config", config_file, *sets, *(["--resume"] if resume else [])]


# -- one node, several processes: torchrun ----------------------------------------------------------
def torchrun_command(argv: list[str], nproc: int, python: str = sys.executable) -> list[str]:
    """Single-node torchrun running ``faceops ARGV`` in ``nproc`` processes."""
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", ENTRY_MODULE, *argv]


def run_torchrun(argv: list[str], nproc: int) -> int:
    """Run torchrun, streaming its output to stdout; a non-zero exit raises :class:`LaunchError`."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise LaunchError(f"gpus_per_node={nproc} but this node has {torch.cuda.device_count()} CUDA "
                          "device(s): lower gpus_per_node or run on a bigger node")
    if not torch.cuda.is_available():
        log.warning("no CUDA device: running %d CPU processes (gloo) instead of %d GPUs", nproc, nproc)
    cmd = torchrun_command(argv, nproc)
    log.info("launching: %s", " ".join(cmd))
    cause: str | None = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for line in proc.stdout or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            if cause is None and RANK_ERROR.match(line) and "ChildFailedError" not in line:
                cause = line.strip()
    rc = proc.returncode
    if rc != 0:
        where = f": {cause}" if cause else "; the failing rank's traceback is in the output above"
        raise LaunchError(f"torchrun with {nproc} processes of 'faceops {' '.join(argv[:2])}' exited with "
                          f"code {rc}{where}")
    return rc


# -- several nodes: a Kubeflow PyTorchJob -----------------------------------------------------------
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


def logs_command(namespace: str, name: str, follow: bool = False) -> str:
    """kubectl command for the Master pod's log (the operator names it ``<job>-master-0``)."""
    return f"kubectl -n {namespace} logs {'-f ' if follow else ''}{name}-master-0"


# -- waiting -------------------------------------------------------------------------------------
@dataclass
class JobOutcome:
    name: str
    namespace: str
    state: str  # "Succeeded"
    reason: str
    message: str
    seconds: float
    transitions: list[tuple[str, str]]  # (condition type, reason) in the order they were seen


def current_condition(status: dict) -> dict | None:
    """The job's state: Succeeded/Failed when set, else the last condition that is true."""
    conditions = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    for terminal in ("Succeeded", "Failed"):
        for c in conditions:
            if c.get("type") == terminal:
                return c
    return conditions[-1] if conditions else None


def wait_for_job(get_status: Callable[[], dict | None], timeout_s: float, poll_s: float,
                 sleep: Callable[[float], None] = time.sleep, *, name: str = "pytorchjob",
                 namespace: str = "default", clock: Callable[[], float] = time.monotonic) -> JobOutcome:
    """Poll ``get_status()`` (a PyTorchJob's ``.status``; None = unknown right now) until the job
    succeeds (returns), fails (raises :class:`LaunchError` with its reason and message) or
    ``timeout_s`` passes (raises :class:`JobTimeoutError`; the job is left in place)."""
    start = clock()
    seen: list[tuple[str, str]] = []
    state = "Pending"
    while True:
        status = get_status()
        cond = current_condition(status) if status is not None else None
        if cond is not None:
            state, reason, message = cond.get("type", "?"), cond.get("reason", ""), cond.get("message", "")
            if not seen or seen[-1] != (state, reason):
                seen.append((state, reason))
                log.info("PyTorchJob %s/%s: %s (%s) %s", namespace, name, state, reason, message)
            if state == "Succeeded":
                return JobOutcome(name, namespace, state, reason, message, clock() - start, seen)
            if state == "Failed":
                raise LaunchError(f"PyTorchJob {namespace}/{name} failed: {reason}: {message} "
                                  f"Logs: {logs_command(namespace, name)}")
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise JobTimeoutError(
                f"PyTorchJob {namespace}/{name} did not finish within {timeout_s:.0f}s (last state: "
                f"{state}); it was left in place. Logs: kubectl -n {namespace} logs -l "
                f"{JOB_NAME_LABEL}={name} --prefix --tail=100; stop it: "
                f"kubectl -n {namespace} delete pytorchjob {name}")
        sleep(min(poll_s, max(0.0, timeout_s - elapsed)))


# -- the Kubernetes side ---------------------------------------------------------------------------
def kube_client() -> tuple[Any, str]:
    """(kubernetes ApiClient, default namespace): in-cluster config, else the kubeconfig."""
    try:
        from kubernetes import client
        from kubernetes import config as kconfig
    except ImportError:
        raise LaunchError("multi-node training needs the kubernetes client: "
                          "pip install 'faceops[kfp]'") from None
    try:
        kconfig.load_incluster_config()
        namespace = IN_CLUSTER_NAMESPACE_FILE.read_text().strip() or "default"
    except kconfig.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None  # read now: the client reads it at import
        try:
            kconfig.load_kube_config(config_file=kubeconfig)
        except (kconfig.ConfigException, OSError) as exc:
            raise LaunchError("multi-node training creates a PyTorchJob but found no Kubernetes access: "
                              "not in a pod and no usable kubeconfig (KUBECONFIG / ~/.kube/config): "
                              f"{exc}") from None
        _, active = kconfig.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return client.ApiClient(), namespace


class PyTorchJobs:
    """Create / read / delete PyTorchJobs with a ``kubernetes.client.CustomObjectsApi``."""

    def __init__(self, custom_api: Any, core_api: Any | None = None):
        self.api, self.core = custom_api, core_api

    def _args(self, namespace: str) -> dict:
        return {"group": PYTORCHJOB_GROUP, "version": PYTORCHJOB_VERSION, "namespace": namespace,
                "plural": PYTORCHJOB_PLURAL}

    def create(self, manifest: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            return self.api.create_namespaced_custom_object(body=manifest, **self._args(ns))
        except ApiException as exc:
            hint = {404: "is the Kubeflow training operator (PyTorchJob CRD) installed?",
                    403: "may the service account create pytorchjobs (the chart's kfp.rbac)?",
                    409: "a job of that name exists: set launch.run_id to a new value"}.get(exc.status, "")
            raise LaunchError(f"could not create PyTorchJob {ns}/{name}: {exc.status} {exc.reason}. "
                              f"{hint}") from None

    def status(self, namespace: str, name: str) -> dict | None:
        """The job's ``.status`` ({} before the operator's first update); None after a transient error."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            obj = self.api.get_namespaced_custom_object(name=name, **self._args(namespace))
        except ApiException as exc:
            if exc.status == 404:
                raise LaunchError(f"PyTorchJob {namespace}/{name} disappeared while waiting "
                                  "(deleted?)") from None
            if exc.status < 500 and exc.status != 429:
                raise LaunchError(f"reading PyTorchJob {namespace}/{name}: {exc.status} "
                                  f"{exc.reason}") from None
            log.warning("reading PyTorchJob %s/%s: %s %s (retrying)", namespace, name, exc.status, exc.reason)
            return None
        except HTTPError as exc:
            log.warning("reading PyTorchJob %s/%s: %s (retrying)", namespace, name, exc)
            return None
        return obj.get("status") or {}

    def master_log_tail(self, namespace: str, name: str, lines: int = 30) -> str | None:
        """Last lines of the Master pod's log, or None when it cannot be read."""
        if self.core is None:
            return None
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(f"{name}-master-0", namespace, tail_lines=lines)
        except ApiException as exc:
            log.warning("could not read the log of %s-master-0: %s %s", name, exc.status, exc.reason)
            return None


def validate_task_config(task: str, config_yaml: str, overrides: list[str]) -> Any:
    """Load the task's config here, so a typo fails now and not after GPUs were scheduled."""
    import importlib

    module_name, cfg_name, _, section, _ = _tasks()[task]
    cls = getattr(importlib.import_module(module_name), cfg_name)
    return config.load(cls, text=config_yaml or "", overrides=list(overrides), section=section, source="<config>")


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


if __name__ == "__main__":
    from faceops.cli import main

    sys.exit(main(sys.argv[1:]))
