"""Talking to the Kubeflow training operator: create, read and wait for a ``PyTorchJob``.

Waiting is a pure loop over a status getter (:func:`wait_for_job`), tested offline on recorded
statuses; :class:`PyTorchJobs` is the thin ``kubernetes`` client side, whose errors say what to fix.
On a timeout the job is **left in place**, so its pods keep their logs for ``kubectl logs``
(:mod:`faceops.train.cluster_job` sets the job's own deadline to the same timeout).
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

PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on every pod of a job
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class JobTimeoutError(LaunchError, TimeoutError):
    """The training job did not finish in time (it is left in place, see the module docstring)."""


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
    """Create and read PyTorchJobs with a ``kubernetes.client.CustomObjectsApi`` (and the Master's log
    with a ``CoreV1Api``)."""

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
