"""Talking to Kubeflow Trainer v2: create, read, wait for and delete a ``TrainJob``.

Waiting is a pure loop over a status getter (:func:`wait_for_job`), tested offline on recorded
statuses. :class:`TrainJobs` is the ``kubernetes`` client side. It creates and reads the TrainJob with
the ``CustomObjectsApi`` exactly as the Kubeflow SDK's Kubernetes backend does (same group, version and
plural, from the SDK's constants), because the SDK's ``TrainerClient.train`` cannot set what we need
(an owner reference, env from a Secret, placement), and its ``get_job``/``wait_for_job_status`` report
only "Failed", not the condition's reason and message. Logs and deletion go through the SDK's
``TrainerClient`` (``get_job_logs``, ``delete_job``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceops.train.torchrun import LaunchError

log = logging.getLogger(__name__)

# kubeflow.trainer.constants.constants (GROUP, VERSION, TRAINJOB_PLURAL, TRAINJOB_KIND), spelled out here
# so that building and testing a manifest does not import the SDK's client stack
TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
TRAINJOB_KIND = "TrainJob"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # on every pod of a TrainJob (its JobSet's name)
NODE_STEP = "node-0"  # the SDK's name for the first training node (torchrun rank-0 node)
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LOG_TAIL_LINES = 30


class JobTimeoutError(LaunchError, TimeoutError):
    """The TrainJob did not finish in time (the launcher deletes it, see :mod:`faceops.train.cluster_job`)."""


def logs_command(namespace: str, name: str, follow: bool = False) -> str:
    """kubectl command for the logs of every node of the TrainJob, prefixed by pod name."""
    return (f"kubectl -n {namespace} logs {'-f ' if follow else ''}-l {JOBSET_NAME_LABEL}={name} "
            f"--prefix --tail=-1 --max-log-requests=64")


# -- waiting -------------------------------------------------------------------------------------
@dataclass
class JobOutcome:
    name: str
    namespace: str
    state: str  # "Complete"
    reason: str
    message: str
    seconds: float
    transitions: list[tuple[str, str]]  # (state, reason) in the order they were seen


def current_state(status: dict) -> tuple[str, str, str]:
    """(state, reason, message) of a TrainJob ``.status``: Complete/Failed when set, else the last true
    condition (Suspended: e.g. queued by Kueue), else Running once a child job is active, else Created."""
    conditions = [c for c in status.get("conditions") or [] if str(c.get("status")) == "True"]
    for terminal in ("Complete", "Failed"):
        for c in conditions:
            if c.get("type") == terminal:
                return terminal, c.get("reason", ""), c.get("message", "")
    if conditions:
        c = conditions[-1]
        return c.get("type", "?"), c.get("reason", ""), c.get("message", "")
    jobs = status.get("jobsStatus") or []
    if any(j.get("active") or j.get("ready") for j in jobs):
        ready = sum(j.get("ready") or 0 for j in jobs)
        return "Running", "", f"{ready} of {len(jobs)} child job(s) ready"
    return "Created", "", ""


def wait_for_job(get_status: Callable[[], dict | None], timeout_s: float, poll_s: float,
                 sleep: Callable[[float], None] = time.sleep, *, name: str = "trainjob",
                 namespace: str = "default", clock: Callable[[], float] = time.monotonic) -> JobOutcome:
    """Poll ``get_status()`` (a TrainJob's ``.status``; None = unknown right now) until the job completes
    (returns), fails (raises :class:`LaunchError` with its reason and message) or ``timeout_s`` passes
    (raises :class:`JobTimeoutError`)."""
    start = clock()
    seen: list[tuple[str, str]] = []
    state = "Pending"
    while True:
        status = get_status()
        if status is not None:
            state, reason, message = current_state(status)
            if not seen or seen[-1] != (state, reason):
                seen.append((state, reason))
                log.info("TrainJob %s/%s: %s %s %s", namespace, name, state, reason, message)
            if state == "Complete":
                return JobOutcome(name, namespace, state, reason, message, clock() - start, seen)
            if state == "Failed":
                raise LaunchError(f"TrainJob {namespace}/{name} failed: {reason}: {message} "
                                  f"Logs: {logs_command(namespace, name)}")
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise JobTimeoutError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s "
                                  f"(last state: {state}; launch.timeout_s)")
        sleep(min(poll_s, max(0.0, timeout_s - elapsed)))


# -- the Kubernetes side ---------------------------------------------------------------------------
def kube_config() -> tuple[Any, str]:
    """(kubernetes ``Configuration``, default namespace): in-cluster config, else the kubeconfig. One
    ``Configuration`` object, so our client and the SDK's ``TrainerClient`` talk to the same server."""
    try:
        from kubernetes import client
        from kubernetes import config as kconfig
    except ImportError:
        raise LaunchError("TrainJob training needs the kubernetes client and the Kubeflow SDK: "
                          "pip install 'faceops[kfp]'") from None
    cfg = client.Configuration()
    try:
        kconfig.load_incluster_config(client_configuration=cfg)
        namespace = IN_CLUSTER_NAMESPACE_FILE.read_text().strip() or "default"
    except kconfig.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None  # read now: the client reads it at import
        try:
            kconfig.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except (kconfig.ConfigException, OSError) as exc:
            raise LaunchError("training as a TrainJob found no Kubernetes access: not in a pod and no "
                              f"usable kubeconfig (KUBECONFIG / ~/.kube/config): {exc}") from None
        _, active = kconfig.list_kube_config_contexts(config_file=kubeconfig)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return cfg, namespace


def _api_message(exc: Any) -> str:
    """The API server's own message from an ``ApiException`` body (a ``Status``), else its reason."""
    import json

    try:
        return json.loads(exc.body or "{}").get("message") or exc.reason
    except (TypeError, ValueError):
        return str(exc.reason)


class TrainJobs:
    """TrainJobs in one namespace through a kubernetes ``Configuration``: ``CustomObjectsApi`` for
    create/get, ``CoreV1Api`` for this launcher's own Pod, the SDK's ``TrainerClient`` (made on first
    use: its constructor calls the API server) for logs and deletion."""

    def __init__(self, configuration: Any, namespace: str):
        from kubernetes import client

        self.configuration, self.namespace = configuration, namespace
        api_client = client.ApiClient(configuration)
        self.custom, self.core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
        self._trainer: Any = None

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            from kubeflow.common.types import KubernetesBackendConfig
            from kubeflow.trainer import TrainerClient

            self._trainer = TrainerClient(KubernetesBackendConfig(
                namespace=self.namespace, client_configuration=self.configuration))
        return self._trainer

    def _args(self) -> dict:
        return {"group": TRAINJOB_GROUP, "version": TRAINJOB_VERSION, "namespace": self.namespace,
                "plural": TRAINJOB_PLURAL}

    def create(self, manifest: dict) -> dict:
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        try:
            return self.custom.create_namespaced_custom_object(body=manifest, **self._args())
        except ApiException as exc:
            hint = {404: "is Kubeflow Trainer v2 (the TrainJob CRD) installed? See docs/cluster.md.",
                    403: "may the service account create trainjobs (the chart's kfp.rbac)?",
                    409: "a job of that name exists (another step with the same launch.run_id?): leave "
                         "launch.run_id unset, or set a new value"}.get(exc.status, "")
            raise LaunchError(f"could not create TrainJob {self.namespace}/{name}: {exc.status} "
                              f"{_api_message(exc)}. {hint}".rstrip()) from None

    def find(self, name: str) -> dict | None:
        """The job's ``.status`` if a TrainJob of that name exists, else None."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._status(name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise LaunchError(f"reading TrainJob {self.namespace}/{name}: {exc.status} {exc.reason}") from None

    def _status(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(name=name, **self._args()).get("status") or {}

    def status(self, name: str) -> dict | None:
        """The job's ``.status`` ({} before the controller's first update); None after a transient error."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return self._status(name)
        except ApiException as exc:
            if exc.status == 404:
                raise LaunchError(f"TrainJob {self.namespace}/{name} disappeared while waiting "
                                  "(deleted?)") from None
            if exc.status < 500 and exc.status != 429:
                raise LaunchError(f"reading TrainJob {self.namespace}/{name}: {exc.status} "
                                  f"{exc.reason}") from None
            log.warning("reading TrainJob %s/%s: %s %s (retrying)", self.namespace, name, exc.status, exc.reason)
            return None
        except HTTPError as exc:
            log.warning("reading TrainJob %s/%s: %s (retrying)", self.namespace, name, exc)
            return None

    def delete(self, name: str) -> bool:
        """Delete the TrainJob (its JobSet and pods follow); False, logged with the command, if it failed."""
        try:
            self.trainer.delete_job(name)
        except Exception as exc:  # noqa: BLE001 - the SDK wraps every API error in RuntimeError
            cause = exc.__cause__ or exc
            log.error("could not delete TrainJob %s/%s (%s); delete it yourself: kubectl -n %s delete "
                      "trainjob %s", self.namespace, name, cause, self.namespace, name)
            return False
        log.warning("TrainJob %s/%s deleted", self.namespace, name)
        return True

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str | None:
        """Last lines of node 0's log through the SDK, or None when they cannot be read."""
        try:
            tail = list(self.trainer.get_job_logs(name, step=NODE_STEP))[-lines:]
        except Exception as exc:  # noqa: BLE001 - the SDK wraps every API error in RuntimeError
            log.warning("could not read the log of TrainJob %s/%s %s: %s", self.namespace, name, NODE_STEP,
                        exc.__cause__ or exc)
            return None
        return "\n".join(tail) or None

    def own_pod(self) -> tuple[str, str] | None:
        """(name, uid) of the Pod this launcher runs in, or None outside a cluster, in another namespace
        than the job's, or when unreadable.

        The name comes from ``KFP_POD_NAME`` (KFP sets it on every step), ``POD_NAME`` or, in a pod,
        ``HOSTNAME``; the uid from ``KFP_POD_UID`` / ``POD_UID`` (the downward API), else from the API.
        """
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        name = (os.environ.get("KFP_POD_NAME") or os.environ.get("POD_NAME")
                or (os.environ.get("HOSTNAME") if in_pod else None))
        if not name:
            return None
        pod_namespace = os.environ.get("POD_NAMESPACE") or (
            IN_CLUSTER_NAMESPACE_FILE.read_text().strip() if in_pod and IN_CLUSTER_NAMESPACE_FILE.is_file()
            else self.namespace)
        if pod_namespace != self.namespace:  # Kubernetes ignores (and GC-deletes on) a cross-namespace owner
            log.warning("this pod runs in namespace %s, the TrainJob in %s: no owner reference, so only this "
                        "launcher deletes the job when cancelled", pod_namespace, self.namespace)
            return None
        uid = os.environ.get("KFP_POD_UID") or os.environ.get("POD_UID")
        if uid:
            return name, uid
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self.core.read_namespaced_pod(name, self.namespace)
        except ApiException as exc:
            log.warning("could not read this pod %s/%s (%s %s): the TrainJob gets no owner reference",
                        self.namespace, name, exc.status, exc.reason)
            return None
        return name, pod.metadata.uid
