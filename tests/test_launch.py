"""Training launcher: the TrainJob manifest (validated by the Kubeflow SDK's models, its node pod by the
Kubernetes schema), the pod's command run through a real shell, waiting on recorded TrainJob statuses,
the kubernetes client and the Kubeflow SDK against a small HTTP stand-in for the API server (success,
failure, cancel, timeout), the backend choice, and torchrun (command construction; real 2-process runs
marked slow)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from faceops.config import ConfigError
from faceops.images import image
from faceops.train import cluster_job, launch, torchrun, trainjob_api
from faceops.train.cluster_job import (
    CLUSTER_ENV,
    JobConfig,
    job_config_from_yaml,
    owner_reference,
    run_trainjob,
    trainjob_manifest,
    validate_trainjob,
    with_cluster_settings,
)
from faceops.train.launch import launch_training
from faceops.train.torchrun import LaunchError, torchrun_command, train_argv
from faceops.train.trainjob_api import JobTimeoutError, TrainJobs, wait_for_job

KUBE_VERSION = "1.32"  # as tests/test_chart.py; kubernetes-validate ships it offline
CONFIG_YAML = "recognizer:\n  model:\n    name: edgeface_xxs\n  engine:\n    epochs: 1\n"
S3_SETS = ["data=s3://faceops/datasets/demo", "out=s3://faceops/runs/r1"]
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
OWNER = owner_reference("recognizer-abc12-system-container-impl-3456", "6f1c2a9e-0000-4000-8000-00000000b0b0")
JOB = "faceops-recognizer-run-42"
S3_KEYS = ["FACEOPS_S3_ENDPOINT", "FACEOPS_S3_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY", "FACEOPS_S3_SECURE",
           "FACEOPS_S3_REGION"]


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    """Each test states the launcher pod's environment itself."""
    for var in (CLUSTER_ENV, launch.BACKEND_ENV, "KFP_POD_NAME", "KFP_POD_UID", "POD_NAME", "POD_UID",
                "POD_NAMESPACE", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)


def gpu_job(**kw) -> JobConfig:
    return JobConfig(image="registry.local/faceops-trainer:1.2.3", namespace="team-a", run_id="run-42",
                     node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[TOLERATION],
                     service_account="pipeline-runner", **kw)


def node_patch(manifest: dict) -> dict:
    """Our runtime patch's pod template for the runtime's `node` job."""
    (patch,) = manifest["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    return rjob["template"]["spec"]["template"]


def node_pod(manifest: dict) -> dict:
    """The Pod the Trainer controller makes for a node: the runtime's `node` container with spec.trainer
    and our runtime patch applied, plus the PET_* variables and the port the Torch runtime adds."""
    trainer, template = manifest["spec"]["trainer"], node_patch(manifest)
    (patched,) = template["spec"]["containers"]
    container = {"name": "node", "image": trainer["image"], "command": trainer["command"], "args": trainer["args"],
                 "env": [*trainer["env"], {"name": "PET_NNODES", "value": str(trainer["numNodes"])},
                         {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
                             "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
                 "resources": trainer["resourcesPerNode"], "volumeMounts": patched["volumeMounts"],
                 "ports": [{"containerPort": 29400}]}
    spec = {k: v for k, v in template["spec"].items() if k != "containers"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{JOB}-node-0-0", **template["metadata"]},
            "spec": {**spec, "containers": [container], "restartPolicy": "Never"}}


# -- the manifest ----------------------------------------------------------------------------------
def test_manifest_validates_against_the_sdk_models_and_carries_the_run():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    m = trainjob_manifest("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=4, nodes=3, job=gpu_job(),
                          namespace="team-a", owner=OWNER)
    model = validate_trainjob(m)  # the SDK's TrainerV1alpha1TrainJob, which gives the manifest back unchanged
    assert model.to_dict() == m and model.spec.trainer.num_nodes == 3
    assert (m["apiVersion"], m["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert m["metadata"] == {"name": JOB, "namespace": "team-a", "ownerReferences": [OWNER], "labels": {
        "app.kubernetes.io/part-of": "faceops", "app.kubernetes.io/component": "training",
        "faceops/task": "recognizer", "faceops/run-id": "run-42"}}
    assert set(OWNER) == {"apiVersion", "kind", "name", "uid"} and OWNER["kind"] == "Pod"
    spec = m["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == int(JobConfig().timeout_s)
    t = spec["trainer"]
    assert (t["image"], t["numNodes"], t["numProcPerNode"]) == ("registry.local/faceops-trainer:1.2.3", 3, 4)
    assert t["command"][:2] == ["sh", "-c"] and "exec torchrun" in t["command"][2]
    assert t["args"] == ["-m", "faceops", "train", "recognizer", "--config", cluster_job.CONFIG_PATH,
                         "--set", S3_SETS[0], "--set", S3_SETS[1]]
    assert t["resourcesPerNode"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": "4"}}
    env = {e["name"]: e for e in t["env"]}
    for key in S3_KEYS:  # credentials by reference to the Secret, never as values
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "faceops-s3", "key": key}}}
    assert not any(e["name"].startswith("PET_") for e in t["env"])  # the Torch runtime's, refused if set
    assert env["FACEOPS_PUSHGATEWAY"]["valueFrom"] == {"configMapKeyRef": {
        "name": "faceops-env", "key": "FACEOPS_PUSHGATEWAY", "optional": True}}
    assert yaml.safe_load(env["FACEOPS_TRAIN_CONFIG"]["value"]) == yaml.safe_load(CONFIG_YAML)
    assert "FACEOPS_RUN_ID" not in env  # metrics carry the pipeline run's id, from the out= folder
    assert [e for e in t["env"] if "value" in e] == [env["FACEOPS_TRAIN_CONFIG"]]
    assert spec["runtimePatches"][0]["manager"] == cluster_job.PATCH_MANAGER
    template = node_patch(m)
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert template["metadata"]["labels"]["faceops/run-id"] == "run-42"
    pod = template["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"] == [TOLERATION]
    assert pod["serviceAccountName"] == "pipeline-runner"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    kubernetes_validate.validate(node_pod(m), KUBE_VERSION, strict=True)


def test_manifest_defaults_cpu_nodes_and_resume():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    m = trainjob_manifest("dsr", "", S3_SETS, gpus_per_node=0, nodes=1, resume=True,
                          job=JobConfig(memory_limit="20Gi"))
    t, pod = m["spec"]["trainer"], node_patch(m)["spec"]
    assert t["resourcesPerNode"]["limits"] == {"memory": "20Gi"}  # no GPU asked for, none limited
    assert (t["numNodes"], t["numProcPerNode"]) == (1, 1)  # a one-node TrainJob is fine
    assert "nodeSelector" not in pod and "tolerations" not in pod and "serviceAccountName" not in pod
    assert "ownerReferences" not in m["metadata"]
    assert t["image"] == image("trainer") and t["args"][-1] == "--resume"
    # named by the step's output folder: a retry of this step finds its job, another step never shares it
    assert re.fullmatch(r"faceops-dsr-[0-9a-f]{12}", m["metadata"]["name"])
    again = trainjob_manifest("dsr", "", S3_SETS, gpus_per_node=0, nodes=1, resume=True)
    other = trainjob_manifest("dsr", "", [S3_SETS[0], "out=s3://faceops/runs/r1/dsr_14x16"], gpus_per_node=0,
                              nodes=1, resume=True)
    assert again["metadata"]["name"] == m["metadata"]["name"] != other["metadata"]["name"]
    kubernetes_validate.validate(node_pod(m), KUBE_VERSION, strict=True)


def _set(path: list, value):
    def change(m: dict) -> None:
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


@pytest.mark.parametrize(("change", "where"), [
    (_set(["spec", "trainer", "numnodes"], 2), "spec.trainer.numnodes"),  # misspelt: the model drops it
    (_set(["spec", "podTemplateOverrides"], []), "spec.podTemplateOverrides"),  # a field of an older API
    (_set(["spec", "trainer", "env"], [{"name": "A", "valueFrom": {"secretRef": {"name": "s"}}}]),
     "spec.trainer.env[0].valueFrom.secretRef"),  # envFrom's shape where an EnvVar is expected
    (_set(["metadata", "ownerReferences"], [{"apiVersion": "v1", "kind": "Pod", "name": "p"}]),
     "metadata.ownerReferences[0].uid"),  # required: the model would fill in "" and the server refuse it
    (_set(["spec", "trainer", "numNodes"], "2"), "numNodes"),  # wrong type
    (_set(["spec", "runtimeRef"], {"kind": "ClusterTrainingRuntime"}), "name"),  # required field missing
])
def test_manifest_refuses_what_the_api_would(change, where):
    m = trainjob_manifest("dsr", "", S3_SETS, gpus_per_node=1, nodes=2, job=gpu_job())
    change(m)
    with pytest.raises(LaunchError, match=re.escape(where)):
        validate_trainjob(m)


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: defined vars replaced, $$ -> $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


def test_pod_command_through_a_real_shell(tmp_path):
    """The pod's sh -c script writes the config byte for byte and hands every argument to torchrun
    unchanged (quotes, spaces, ';' and a user's literal '$(' included); torchrun gets the node layout
    from the PET_* variables the Torch runtime sets."""
    tricky = ["data=s3://b/datasets/x", "out=s3://b/runs/it's here; rm -rf /", "note=$(RANK) \"%s\" `x`"]
    config_text = CONFIG_YAML + "# 100% 'quoted' \"text\" $HOME \\n `cmd`\n"
    t = trainjob_manifest("recognizer", config_text, tricky, gpus_per_node=2, nodes=2, job=gpu_job())["spec"]["trainer"]
    runtime_env = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1", "RANK": "7",
                   "PET_MASTER_ADDR": f"{JOB}-node-0-0.{JOB}", "PET_MASTER_PORT": "29400"}
    env = {**{e["name"]: e["value"] for e in t["env"] if "value" in e}, **runtime_env}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_torchrun = bin_dir / "torchrun"  # records what torchrun would get
    fake_torchrun.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                             "print(json.dumps([sys.argv[1:], {k: v for k, v in os.environ.items() "
                             "if k.startswith('PET_')}]))\n")
    fake_torchrun.chmod(fake_torchrun.stat().st_mode | stat.S_IXUSR)
    script = t["command"][2].replace(cluster_job.CONFIG_DIR, str(tmp_path / "cfg"))
    argv = [kubelet_expand(a, env) for a in [*t["command"][:2], script, *t["command"][3:], *t["args"]]]
    out = subprocess.run(argv, env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True,
                         text=True, check=True).stdout
    got_argv, got_pet = json.loads(out)
    assert got_argv == ["-m", "faceops", *train_argv("recognizer", cluster_job.CONFIG_PATH, tricky, resume=False)]
    assert got_pet == {k: v for k, v in runtime_env.items() if k.startswith("PET_")}
    assert (tmp_path / "cfg" / "config.yaml").read_text() == config_text


# -- JobConfig and the cluster config --------------------------------------------------------------
def test_job_config_from_the_launch_section():
    cfg = job_config_from_yaml("recognizer: {}\nlaunch:\n  namespace: ml\n  node_selector: {pool: a100}\n"
                               "  tolerations: [{key: gpu, operator: Exists}]\n  timeout_s: 600\n")
    assert (cfg.namespace, cfg.node_selector, cfg.timeout_s) == ("ml", {"pool": "a100"}, 600.0)
    assert cfg.tolerations == [{"key": "gpu", "operator": "Exists"}] and cfg.runtime == "torch-distributed"
    with pytest.raises(ConfigError, match="section 'launch': unknown key 'nodeselector'"):
        job_config_from_yaml("launch: {nodeselector: {}}")
    with pytest.raises(ConfigError, match="run_id"):
        JobConfig(run_id="Run_1")
    with pytest.raises(ConfigError, match="poll_s"):
        JobConfig(poll_s=0)


CLUSTER = {"node_selector": {"nvidia.com/gpu.present": "true", "pool": "shared"}, "tolerations": [TOLERATION],
           "gpu_resource": "nvidia.com/mig-3g.40gb", "s3_secret": "team-s3", "env_configmap": "team-env"}


def test_cluster_placement_reaches_the_job_and_the_run_config_refines_it():
    """What the pipeline's cluster config passes (FACEOPS_TRAINJOB_CLUSTER) lands in the job; the run's
    launch: section wins per key, adds tolerations, and defaults fill the rest."""
    job = JobConfig(node_selector={"pool": "a100"}, tolerations=[{"key": "spot", "operator": "Exists"}, TOLERATION])
    resolved = with_cluster_settings(job, env={CLUSTER_ENV: json.dumps(CLUSTER)})
    m = trainjob_manifest("recognizer", "", S3_SETS, gpus_per_node=2, nodes=2, job=resolved)
    pod, t = node_patch(m)["spec"], m["spec"]["trainer"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "pool": "a100"}
    assert pod["tolerations"] == [TOLERATION, {"key": "spot", "operator": "Exists"}]
    assert t["resourcesPerNode"]["limits"] == {"nvidia.com/mig-3g.40gb": "2"}
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in t["env"] if "secretKeyRef" in e.get("valueFrom", {})} == {
        "team-s3"}
    explicit = with_cluster_settings(JobConfig(secret_name="mine", gpu_resource="amd.com/gpu"),
                                     env={CLUSTER_ENV: json.dumps(CLUSTER)})
    assert (explicit.secret_name, explicit.gpu_resource, explicit.env_configmap) == ("mine", "amd.com/gpu", "team-env")
    from_json = with_cluster_settings(JobConfig(), env={CLUSTER_ENV: cluster_job.cluster_settings_json(**CLUSTER)})
    assert (from_json.node_selector, from_json.tolerations, from_json.secret_name) == (
        CLUSTER["node_selector"], [TOLERATION], "team-s3")  # what the pipeline writes, the launcher reads
    bare = with_cluster_settings(JobConfig(), env={})
    assert (bare.secret_name, bare.env_configmap, bare.gpu_resource) == ("faceops-s3", "faceops-env", "nvidia.com/gpu")
    with pytest.raises(LaunchError, match=f"{CLUSTER_ENV} must be a JSON object"):
        with_cluster_settings(JobConfig(), env={CLUSTER_ENV: "[1]"})
    with pytest.raises(LaunchError, match="unknown key.*gpu_node_selector"):
        with_cluster_settings(JobConfig(), env={CLUSTER_ENV: '{"gpu_node_selector": {}}'})


def test_the_env_contract_imports_without_torch():
    """pipelines/platform.py imports the env names and cluster_settings_json at compile time."""
    code = ("import sys; from faceops.train.cluster_job import CLUSTER_ENV, TRAINING_BACKEND_ENV, BACKENDS, "
            "cluster_settings_json; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the backend -------------------------------------------------------------------------------------
def test_the_backend_comes_from_the_pipeline_env(monkeypatch):
    """FACEOPS_TRAINING_BACKEND=trainjob (cluster.training_backend) sends every size of run, one node
    included, to a TrainJob; the pod backend refuses nodes > 1 naming the setting."""
    calls = []
    monkeypatch.setattr(launch, "run_trainjob", lambda *a, **kw: calls.append((a, kw)) or 0)
    monkeypatch.setenv(launch.BACKEND_ENV, "trainjob")
    assert launch_training("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=1, nodes=1) == 0
    (args, kw), = calls
    assert args[0] == "recognizer" and (kw["nodes"], kw["gpus_per_node"]) == (1, 1)
    assert isinstance(kw["job"], JobConfig)
    monkeypatch.setenv(launch.BACKEND_ENV, "pod")
    with pytest.raises(LaunchError, match="nodes=2 needs .*cluster.training_backend: trainjob"):
        launch_training("recognizer", CONFIG_YAML, S3_SETS, nodes=2)
    monkeypatch.setenv(launch.BACKEND_ENV, "pytorchjob")
    with pytest.raises(LaunchError, match="'pytorchjob' is not a training backend"):
        launch_training("recognizer", CONFIG_YAML, S3_SETS)


# -- waiting on recorded TrainJob statuses -----------------------------------------------------------
def cond(type_: str, reason: str, message: str, status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2025-05-01T10:00:00Z"}


def jobs_status(active: int = 0, ready: int = 0, succeeded: int = 0, failed: int = 0) -> list[dict]:
    return [{"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
             "suspended": 0}]


STATUS_CREATED: dict = {}
STATUS_QUEUED = {"conditions": [cond("Suspended", "Suspended", "TrainJob is suspended")]}
STATUS_RUNNING = {"conditions": [cond("Suspended", "Resumed", "TrainJob is resumed", "False")],
                  "jobsStatus": jobs_status(active=1, ready=1)}
STATUS_COMPLETE = {"conditions": [cond("Suspended", "Resumed", "TrainJob is resumed", "False"),
                                  cond("Complete", "AllJobsCompleted", "jobset completed successfully")],
                   "jobsStatus": jobs_status(succeeded=1)}
STATUS_FAILED = {"conditions": [cond("Failed", "FailedJobs", "jobset failed due to one or more job failures")],
                 "jobsStatus": jobs_status(failed=1)}


class Recorded:
    """Replays statuses (the last one repeats), on a fake clock advanced by sleep()."""

    def __init__(self, statuses: list, on_sleep=None):
        self.statuses, self.now, self.sleeps, self.on_sleep = list(statuses), 0.0, [], on_sleep

    def status(self, *_):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))

    def clock(self) -> float:
        return self.now


def test_wait_completes_through_a_queue(caplog):
    rec = Recorded([STATUS_CREATED, None, STATUS_QUEUED, STATUS_RUNNING, STATUS_RUNNING, STATUS_COMPLETE])
    with caplog.at_level("INFO", logger=trainjob_api.__name__):
        out = wait_for_job(rec.status, timeout_s=3600, poll_s=30, sleep=rec.sleep, name="j", namespace="ml",
                           clock=rec.clock)
    assert out.state == "Complete" and out.reason == "AllJobsCompleted" and out.seconds == 5 * 30
    assert [t for t, _ in out.transitions] == ["Created", "Suspended", "Running", "Complete"]
    assert sum("TrainJob ml/j: Running" in r.message for r in caplog.records) == 1  # transitions only


def test_wait_raises_the_jobs_failure_reason():
    rec = Recorded([STATUS_CREATED, STATUS_RUNNING, STATUS_FAILED])
    with pytest.raises(LaunchError, match=r"ml/j failed: FailedJobs: jobset failed due to one or more job") as e:
        wait_for_job(rec.status, 3600, 30, rec.sleep, name="j", namespace="ml", clock=rec.clock)
    assert "kubectl -n ml logs -l jobset.sigs.k8s.io/jobset-name=j" in str(e.value)
    assert not isinstance(e.value, JobTimeoutError)


def test_wait_times_out():
    rec = Recorded([STATUS_CREATED, STATUS_RUNNING])
    with pytest.raises(JobTimeoutError, match=r"ml/j did not finish within 100s \(last state: Running"):
        wait_for_job(rec.status, timeout_s=100, poll_s=30, sleep=rec.sleep, name="j", namespace="ml",
                     clock=rec.clock)
    assert rec.sleeps == [30, 30, 30, 10] and rec.now == 100  # never sleeps past the deadline


# -- the kubernetes client and the Kubeflow SDK against an HTTP stand-in for the API server ----------
TRAINER_PATH = "/apis/trainer.kubeflow.org/v1alpha1"
NODE_POD = f"{JOB}-node-0-0-x7k2p"
LAUNCHER_POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {
    "name": OWNER["name"], "namespace": "team-a", "uid": OWNER["uid"], "creationTimestamp": "2025-05-01T09:59:00Z"}}
TORCH_RUNTIME = {  # the torch-distributed ClusterTrainingRuntime as Kubeflow Trainer v2 installs it
    "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
             "template": {"spec": {"replicatedJobs": [{"name": "node", "template": {
                 "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                 "spec": {"template": {"spec": {"containers": [{
                     "name": "node", "image": "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"}]}}}}}]}}}}
NODE_PODS = {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [{
    "metadata": {"name": NODE_POD, "namespace": "team-a", "creationTimestamp": "2025-05-01T10:00:01Z",
                 "labels": {"jobset.sigs.k8s.io/jobset-name": JOB, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                            "batch.kubernetes.io/job-completion-index": "0"}},
    "spec": {"containers": [{"name": "node", "image": "registry.local/faceops-trainer:1.2.3",
                             "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
    "status": {"phase": "Failed"}}]}
NODE_LOG = "step 10 loss 7.1\nTraceback (most recent call last):\nFaceopsError: CUDA out of memory\n"


class FakeApiServer:
    """The endpoints the launcher and the Kubeflow SDK call, on 127.0.0.1, answering with the shapes a
    real API server records: TrainJobs (statuses replayed from a list), the launcher's Pod, the
    runtime, the node pods and their log, the Trainer's version ConfigMap."""

    def __init__(self, statuses: list, fail_create: int | None = None, existing: bool = False):
        """``existing``: a job of that name is there before the launcher starts (an earlier attempt's),
        its status the first of ``statuses``; a DELETE removes it."""
        self.statuses, self.fail_create, self.existing = list(statuses), fail_create, existing
        self.created: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self, code: int, message: str = "") -> None:
                reason = {404: "NotFound", 409: "AlreadyExists", 403: "Forbidden", 422: "Invalid"}.get(code, "")
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code})

            def do_POST(self):
                server.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.fail_create:
                    webhook = 'admission webhook "validator.trainjob.trainer.kubeflow.org"'
                    return self.status(server.fail_create, f"{webhook} denied the request: {server.fail_create}")
                body["metadata"].update(uid="0c4f-trainjob", creationTimestamp="2025-05-01T10:00:00Z")
                server.created.append(body)
                return self.reply(201, body)

            def do_DELETE(self):
                server.requests.append(("DELETE", self.path))
                server.existing = False
                return self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success",
                                        "details": {"name": JOB, "kind": "trainjobs"}})

            def do_GET(self):
                server.requests.append(("GET", self.path))
                url = urlsplit(self.path)
                path = url.path
                if path == f"/api/v1/namespaces/team-a/pods/{OWNER['name']}":
                    return self.reply(200, LAUNCHER_POD)
                if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
                    return self.reply(200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
                        "name": "kubeflow-trainer-public"}, "data": {"kubeflow_trainer_version": "v2.3.0"}})
                if path == f"{TRAINER_PATH}/namespaces/team-a/trainingruntimes/torch-distributed":
                    return self.status(404, 'trainingruntimes "torch-distributed" not found')
                if path == f"{TRAINER_PATH}/clustertrainingruntimes/torch-distributed":
                    return self.reply(200, TORCH_RUNTIME)
                if path == "/api/v1/namespaces/team-a/pods":
                    selector = parse_qs(url.query)["labelSelector"][0]
                    assert selector.startswith(f"jobset.sigs.k8s.io/jobset-name={JOB},")
                    return self.reply(200, NODE_PODS)
                if path == f"/api/v1/namespaces/team-a/pods/{NODE_POD}/log":
                    assert parse_qs(url.query)["container"] == ["node"]
                    return self.reply(200, NODE_LOG)
                if path == f"{TRAINER_PATH}/namespaces/team-a/trainjobs/{JOB}" and (server.created or server.existing):
                    status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                    if isinstance(status, int):
                        return self.status(status)
                    body = server.created[-1] if server.created else {"metadata": {"name": JOB}}
                    return self.reply(200, {**body, "status": status})
                return self.status(404, f"no such path in the stand-in: {path}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> TrainJobs:
        from kubernetes import client

        self.thread.start()
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return TrainJobs(cfg, "team-a")

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self, method: str) -> list[str]:
        return [p.split("?")[0] for m, p in self.requests if m == method]


@pytest.fixture
def in_kfp_pod(monkeypatch):
    """The launcher as a KFP step: its Pod's name and namespace in the environment, uid from the API."""
    monkeypatch.setenv("POD_NAME", OWNER["name"])
    monkeypatch.setenv("POD_NAMESPACE", "team-a")


def run(jobs, rec, **kw) -> int:
    args = {"gpus_per_node": 2, "nodes": 2, "resume": False, "job": gpu_job(poll_s=5), **kw}
    return run_trainjob("recognizer", CONFIG_YAML, S3_SETS, jobs=jobs, sleep=rec.sleep, clock=rec.clock, **args)


def test_run_trainjob_completes_through_the_kubernetes_client(capsys, in_kfp_pod, monkeypatch):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    monkeypatch.setenv(CLUSTER_ENV, json.dumps({"node_selector": {"pool": "h100"}, "s3_secret": "team-s3"}))
    rec = Recorded([])
    fake = FakeApiServer([STATUS_CREATED, STATUS_RUNNING, 503, STATUS_COMPLETE])
    with fake as jobs:
        assert run(jobs, rec) == 0
    (body,) = fake.created
    validate_trainjob({k: v for k, v in body.items() if k != "metadata"} | {"metadata": {
        k: v for k, v in body["metadata"].items() if k not in ("uid", "creationTimestamp")}})  # a valid TrainJob
    assert body["metadata"]["name"] == JOB and body["metadata"]["namespace"] == "team-a"
    assert body["metadata"]["ownerReferences"] == [OWNER]  # the Pod read from the API owns the job
    assert node_patch(body)["spec"]["nodeSelector"] == {"pool": "h100", "nvidia.com/gpu.present": "true"}
    assert "team-s3" in json.dumps(body["spec"]["trainer"]["env"])
    assert fake.calls("POST") == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs"]
    assert fake.calls("GET")[0] == f"/api/v1/namespaces/team-a/pods/{OWNER['name']}"
    # one look for an earlier attempt's job (none: 404), then the polls
    assert fake.calls("GET")[1:] == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs/{JOB}"] * 5
    assert rec.sleeps == [5, 5, 5] and not fake.calls("DELETE")  # the 503 was retried; a finished job stays
    out = capsys.readouterr().out
    assert f"kubectl -n team-a logs -f -l jobset.sigs.k8s.io/jobset-name={JOB}" in out and "complete" in out


def test_a_retried_step_follows_the_job_its_earlier_attempt_started(capsys, in_kfp_pod):
    """The launcher died without deleting its job (OOMKilled, node lost): KFP's retry must not start a
    second job training into the same folder; it follows the one that runs."""
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    rec = Recorded([])
    fake = FakeApiServer([STATUS_RUNNING, STATUS_RUNNING, STATUS_COMPLETE], existing=True)
    with fake as jobs:
        assert run(jobs, rec) == 0
    assert not fake.calls("POST") and not fake.calls("DELETE")
    assert "started by an earlier attempt of this step; following it" in capsys.readouterr().out


def test_a_retried_step_replaces_the_failed_job_of_its_earlier_attempt(in_kfp_pod):
    pytest.importorskip("kubeflow.trainer", reason="Kubeflow SDK not installed")
    rec = Recorded([])
    fake = FakeApiServer([STATUS_FAILED, STATUS_RUNNING, STATUS_COMPLETE], existing=True)
    with fake as jobs:
        assert run(jobs, rec) == 0
    assert fake.calls("DELETE") == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs/{JOB}"]
    assert fake.calls("POST") == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs"]


def test_run_trainjob_failure_names_the_reason_and_shows_node_0s_log(caplog, in_kfp_pod):
    pytest.importorskip("kubeflow.trainer", reason="Kubeflow SDK not installed")
    rec = Recorded([])
    fake = FakeApiServer([STATUS_RUNNING, STATUS_FAILED])
    with fake as jobs, pytest.raises(LaunchError) as e:
        run(jobs, rec)
    msg = str(e.value)
    assert f"TrainJob team-a/{JOB} failed: FailedJobs: jobset failed due to one or more job failures" in msg
    assert f"kubectl -n team-a logs -l jobset.sigs.k8s.io/jobset-name={JOB}" in msg
    assert "FaceopsError: CUDA out of memory" in caplog.text  # node-0's log through the SDK's get_job_logs
    assert f"/api/v1/namespaces/team-a/pods/{NODE_POD}/log" in fake.calls("GET")
    assert not fake.calls("DELETE")  # a failed job is kept for its logs (its owner's deletion removes it)


@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_cancelling_the_step_deletes_the_trainjob(stop, in_kfp_pod):
    """KFP cancels a run by stopping the step's pod (SIGTERM); the launcher deletes the job on the way out."""
    pytest.importorskip("kubeflow.trainer", reason="Kubeflow SDK not installed")
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(n: int) -> None:
        if n == 2:
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    rec = Recorded([], on_sleep=interrupt)
    fake = FakeApiServer([STATUS_CREATED, STATUS_RUNNING])
    expected = (LaunchError, "stopped \\(SIGTERM\\).*deleted it") if stop == "sigterm" else (KeyboardInterrupt, None)
    with fake as jobs, pytest.raises(expected[0], match=expected[1]):
        run(jobs, rec)
    assert fake.calls("DELETE") == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs/{JOB}"]
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is only there while waiting


def test_timeout_deletes_the_trainjob(in_kfp_pod):
    pytest.importorskip("kubeflow.trainer", reason="Kubeflow SDK not installed")
    rec = Recorded([])
    fake = FakeApiServer([STATUS_RUNNING])
    with fake as jobs, pytest.raises(JobTimeoutError, match="did not finish within 12s.*; deleted"):
        run(jobs, rec, job=gpu_job(poll_s=5, timeout_s=12))
    assert fake.created[0]["spec"]["activeDeadlineSeconds"] == 12
    assert fake.calls("DELETE") == [f"{TRAINER_PATH}/namespaces/team-a/trainjobs/{JOB}"]


def test_outside_a_pod_there_is_no_owner_and_cross_namespace_none_either(monkeypatch):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    with FakeApiServer([STATUS_COMPLETE]) as jobs:
        assert jobs.own_pod() is None  # a laptop with a kubeconfig
        monkeypatch.setenv("KFP_POD_NAME", "step-pod")
        monkeypatch.setenv("KFP_POD_UID", "uid-from-the-downward-api")
        assert jobs.own_pod() == ("step-pod", "uid-from-the-downward-api")  # no API call needed
        monkeypatch.setenv("POD_NAMESPACE", "kubeflow")  # the job goes to team-a: no owner there
        assert jobs.own_pod() is None


@pytest.mark.parametrize(("code", "hint"), [(404, "Kubeflow Trainer v2"), (403, "kfp.rbac"), (409, "run_id"),
                                            (422, "denied the request")])
def test_create_errors_say_what_to_do(code, hint):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    with FakeApiServer([{}], fail_create=code) as jobs, pytest.raises(LaunchError, match=hint):
        run(jobs, Recorded([]))


@pytest.mark.parametrize(("config_yaml", "sets", "error", "match"), [
    (CONFIG_YAML, ["data=/data/demo", S3_SETS[1]], LaunchError, "data='/data/demo' is not reachable"),
    (CONFIG_YAML, [S3_SETS[0], "out=file:///r1"], LaunchError, "out='file:///r1' is not reachable"),
    (CONFIG_YAML, [S3_SETS[0]], LaunchError, "out=None"),
    ("recognizer: {engin: {}}", S3_SETS, ConfigError, "unknown key 'engin'"),
])
def test_checks_before_submitting(config_yaml, sets, error, match):
    """Nothing reaches the cluster (jobs=None would need one) when the run could not work there."""
    with pytest.raises(error, match=re.escape(match)):
        run_trainjob("recognizer", config_yaml, sets, gpus_per_node=1, nodes=2, resume=False,
                     job=JobConfig(), jobs=None)


def test_kube_config_without_cluster_access(tmp_path, monkeypatch):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no Kubernetes access"):
        trainjob_api.kube_config()
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
                  "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
                  "users": [{"name": "u", "user": {"token": "t"}}],
                  "contexts": [{"name": "c",
                                "context": {"cluster": "k", "user": "u", "namespace": "ml-team"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    cfg, namespace = trainjob_api.kube_config()
    assert namespace == "ml-team" and cfg.host == "https://127.0.0.1:6443"


# -- one node ----------------------------------------------------------------------------------------
def test_torchrun_command():
    argv = train_argv("dsr", "/tmp/c.yaml", ["engine.epochs=1", "out=s3://b/r"], resume=True)
    assert argv == ["train", "dsr", "--config", "/tmp/c.yaml", "--set", "engine.epochs=1", "--set", "out=s3://b/r",
                    "--resume"]
    assert torchrun_command(argv, 4, python="/venv/bin/python") == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "faceops", *argv]


def test_entry_module_is_the_faceops_cli():
    out = subprocess.run([sys.executable, "-m", torchrun.ENTRY_MODULE, "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "recognizer" in out and "finetune" in out


@pytest.mark.parametrize(("kwargs", "match"), [({"task": "detector"}, "unknown training task 'detector'"),
                                               ({"nodes": 0}, "nodes must be >= 1"),
                                               ({"config_yaml": "- a list"}, "top level must be a mapping")])
def test_launch_rejects_bad_arguments(kwargs, match):
    args = {"task": "recognizer", "config_yaml": CONFIG_YAML, **kwargs}
    nodes = args.pop("nodes", 1)
    with pytest.raises((LaunchError, ConfigError), match=match):
        launch_training(args["task"], args["config_yaml"], [], nodes=nodes)


def test_in_process_returns_the_cli_exit_code(capsys):
    """In-process: the config text reaches `faceops train` (its unknown key is reported) and the CLI's
    exit code comes back."""
    rc = launch_training("recognizer", "recognizer:\n  bogus_knob: 1\n", ["engine.epochs=1"])
    assert rc == 2
    assert "unknown key 'bogus_knob'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    from faceops.data.ingest import IngestConfig, ingest
    from faceops.data.synth import synthesize

    root = tmp_path_factory.mktemp("launch-data")
    src = synthesize(root / "synth", identities=6, images_per_identity=8, seed=0, size=112, progress=False)
    cfg = IngestConfig(pairs_per_split=20, workers=1)
    cfg.degrade.sizes = []
    return ingest(str(src), "tiny", str(root / "store"), cfg, progress=False).uri


TINY_SETS = ["model.name=edgeface_xxs", "loader.batch_size=8", "engine.max_steps=2", "engine.epochs=1",
             "engine.progress=false", "engine.checkpoint_every_steps=1000"]


@pytest.mark.slow
def test_torchrun_two_processes_train_a_recognizer(tiny_dataset, tmp_path, monkeypatch):
    """A real `torchrun --nproc_per_node=2` run on the CPU (gloo): two ranks, one result (about 25 s)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    sets = [f"data={tiny_dataset}", f"out={out}", *TINY_SETS]
    rc = launch_training("recognizer", "", sets, gpus_per_node=2)
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["epochs"] == 1 and result["nan_events"]["loss"] == 0
    assert (out / "last.pt").is_file()


@pytest.mark.slow
def test_torchrun_failure_names_the_exit_code(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    missing = tmp_path / "no-such-dataset"
    expected = (r"torchrun with 2 processes of 'faceops train recognizer' exited with code 1: "
                r"faceops train: error: no dataset at .*no-such-dataset")
    with pytest.raises(LaunchError, match=expected):
        launch_training("recognizer", "", [f"data={missing}", f"out={tmp_path / 'run'}"], gpus_per_node=2)


@pytest.mark.gpu
def test_torchrun_asks_no_more_gpus_than_the_node_has():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n = torch.cuda.device_count() + 1
    with pytest.raises(LaunchError, match=f"gpus_per_node={n} but this node has {n - 1} CUDA device"):
        launch_training("recognizer", "", [], gpus_per_node=n)
