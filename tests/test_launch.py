"""Training launcher: the PyTorchJob manifest (schema-validated pod template), the pod's command run
through a real shell, waiting on recorded PyTorchJob statuses, the Kubernetes client against a small
HTTP stand-in for the API server, and torchrun (command construction; real 2-process runs marked slow)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from faceops.config import ConfigError
from faceops.images import image
from faceops.train import cluster_job, pytorchjob_api, torchrun
from faceops.train.cluster_job import JobConfig, job_config_from_yaml, pytorchjob_manifest, run_pytorchjob
from faceops.train.launch import launch_training
from faceops.train.pytorchjob_api import JobTimeoutError, PyTorchJobs, wait_for_job
from faceops.train.torchrun import LaunchError, torchrun_command, train_argv

KUBE_VERSION = "1.32"  # as tests/test_chart.py; kubernetes-validate ships it offline
CONFIG_YAML = "recognizer:\n  model:\n    name: edgeface_xxs\n  engine:\n    epochs: 1\n"
S3_SETS = ["data=s3://faceops/datasets/demo", "out=s3://faceops/runs/r1"]
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def gpu_job(**kw) -> JobConfig:
    return JobConfig(image="registry.local/faceops-trainer:1.2.3", namespace="team-a", run_id="run-42",
                     node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[TOLERATION],
                     service_account="pipeline-runner", **kw)


def replica_pod(manifest: dict, replica: str) -> dict:
    """A replica's pod template as the Pod the operator makes of it."""
    template = manifest["spec"]["pytorchReplicaSpecs"][replica]["template"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", **template["metadata"]}, "spec": template["spec"]}


# -- the manifest ----------------------------------------------------------------------------------
def test_manifest_shape_and_pod_schema():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    m = pytorchjob_manifest("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=4, nodes=3, job=gpu_job(),
                            namespace="team-a")
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert m["metadata"] == {"name": "faceops-recognizer-run-42", "namespace": "team-a", "labels": {
        "app.kubernetes.io/part-of": "faceops", "app.kubernetes.io/component": "training",
        "faceops/task": "recognizer", "faceops/run-id": "run-42"}}
    spec = m["spec"]
    assert "elasticPolicy" not in spec and spec["nprocPerNode"] == "4"
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["activeDeadlineSeconds"] == int(JobConfig().timeout_s)
    replicas = spec["pytorchReplicaSpecs"]
    assert {k: (v["replicas"], v["restartPolicy"]) for k, v in replicas.items()} == {
        "Master": (1, "OnFailure"), "Worker": (2, "OnFailure")}
    for replica in ("Master", "Worker"):
        pod = replica_pod(m, replica)
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
        (c,) = pod["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"] == "registry.local/faceops-trainer:1.2.3"
        assert c["command"][:2] == ["sh", "-c"] and "exec torchrun" in c["command"][2]
        assert c["args"][:5] == ["--nnodes=3", "--nproc_per_node=4", "--node_rank=$(RANK)",
                                 "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]
        assert c["args"][5:] == ["-m", "faceops", "train", "recognizer", "--config",
                                 cluster_job.CONFIG_PATH, "--set", S3_SETS[0], "--set", S3_SETS[1]]
        assert c["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"nvidia.com/gpu": 4}}
        assert c["envFrom"] == [{"secretRef": {"name": "faceops-s3"}}]
        env = {e["name"]: e for e in c["env"]}
        assert env["FACEOPS_PUSHGATEWAY"]["valueFrom"] == {"configMapKeyRef": {
            "name": "faceops-env", "key": "FACEOPS_PUSHGATEWAY", "optional": True}}
        assert yaml.safe_load(env["FACEOPS_TRAIN_CONFIG"]["value"]) == yaml.safe_load(CONFIG_YAML)
        assert env["FACEOPS_RUN_ID"]["value"] == "run-42"
        assert all("value" not in e or "SECRET" not in e["name"] for e in c["env"])  # credentials via envFrom
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
        assert pod["spec"]["volumes"] == [{"name": "dshm",
                                           "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
        assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["spec"]["tolerations"] == [TOLERATION]
        assert pod["spec"]["serviceAccountName"] == "pipeline-runner"
        assert pod["metadata"]["labels"]["faceops/run-id"] == "run-42"
        assert pod["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_manifest_defaults_cpu_nodes_and_resume():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    m = pytorchjob_manifest("dsr", "", S3_SETS, gpus_per_node=0, nodes=2, resume=True,
                            job=JobConfig(memory_limit="20Gi"))
    pod = replica_pod(m, "Worker")
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"] == {"memory": "20Gi"}  # no GPU asked for, none limited
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]  # empty by default
    assert "serviceAccountName" not in pod["spec"]
    assert c["image"] == image("trainer")
    assert c["args"][:2] == ["--nnodes=2", "--nproc_per_node=1"] and c["args"][-1] == "--resume"
    assert m["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert re.fullmatch(r"faceops-dsr-\d{8}-\d{6}-[0-9a-f]{6}", m["metadata"]["name"])


def test_manifest_rejects_what_kubernetes_would():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate")
    pod = replica_pod(pytorchjob_manifest("dsr", "", S3_SETS, gpus_per_node=1, nodes=2), "Master")
    pod["spec"]["volumes"][0]["emptyDir"]["medium"] = 5  # the validator does catch a broken template
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: defined vars replaced, $$ -> $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


def test_pod_command_through_a_real_shell(tmp_path):
    """The pod's sh -c script writes the config byte for byte and hands every argument to torchrun
    unchanged: quotes, spaces, ';' and a user's literal '$(' included."""
    tricky = ["data=s3://b/datasets/x", "out=s3://b/runs/it's here; rm -rf /", "note=$(RANK) \"%s\" `x`"]
    config_text = CONFIG_YAML + "# 100% 'quoted' \"text\" $HOME \\n `cmd`\n"
    m = pytorchjob_manifest("recognizer", config_text, tricky, gpus_per_node=2, nodes=2, job=gpu_job())
    c = m["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    operator_env = {"RANK": "1", "MASTER_ADDR": "faceops-recognizer-run-42-master-0", "MASTER_PORT": "23456"}
    env = {**{e["name"]: e["value"] for e in c["env"] if "value" in e}, **operator_env}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_torchrun = bin_dir / "torchrun"  # records what torchrun would get
    fake_torchrun.write_text(f"#!{sys.executable}\nimport json, sys\n"
                             f"print(json.dumps(sys.argv[1:]))\n")
    fake_torchrun.chmod(fake_torchrun.stat().st_mode | stat.S_IXUSR)
    script = c["command"][2].replace(cluster_job.CONFIG_DIR, str(tmp_path / "cfg"))
    argv = [kubelet_expand(a, env) for a in [*c["command"][:2], script, *c["command"][3:], *c["args"]]]
    out = subprocess.run(argv, env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out)
    assert got[:5] == ["--nnodes=2", "--nproc_per_node=2", "--node_rank=1",
                       "--master_addr=faceops-recognizer-run-42-master-0", "--master_port=23456"]
    assert got[5:] == ["-m", "faceops",
                       *train_argv("recognizer", cluster_job.CONFIG_PATH, tricky, resume=False)]
    assert (tmp_path / "cfg" / "config.yaml").read_text() == config_text


# -- JobConfig -------------------------------------------------------------------------------------
def test_job_config_from_the_launch_section():
    cfg = job_config_from_yaml("recognizer: {}\nlaunch:\n  namespace: ml\n  node_selector: {pool: a100}\n"
                               "  tolerations: [{key: gpu, operator: Exists}]\n  timeout_s: 600\n")
    assert (cfg.namespace, cfg.node_selector, cfg.timeout_s) == ("ml", {"pool": "a100"}, 600.0)
    assert cfg.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert job_config_from_yaml("").secret_name == "faceops-s3"
    with pytest.raises(ConfigError, match="section 'launch': unknown key 'nodeselector'"):
        job_config_from_yaml("launch: {nodeselector: {}}")
    with pytest.raises(ConfigError, match="run_id"):
        JobConfig(run_id="Run_1")
    with pytest.raises(ConfigError, match="poll_s"):
        JobConfig(poll_s=0)


# -- waiting on recorded PyTorchJob statuses ----------------------------------------------------------
def cond(type_: str, reason: str, message: str, status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastUpdateTime": "2024-05-01T10:00:00Z", "lastTransitionTime": "2024-05-01T10:00:00Z"}


CREATED = cond("Created", "PyTorchJobCreated", "PyTorchJob j is created.")
RUNNING = cond("Running", "PyTorchJobRunning", "PyTorchJob ml/j is running.")
RESTARTING = cond("Restarting", "PyTorchJobRestarting",
                  "PyTorchJob j is restarting because 1 Worker replica(s) failed.")
STATUS_CREATED = {"conditions": [CREATED], "replicaStatuses": {"Master": {}, "Worker": {}}}
STATUS_RUNNING = {"conditions": [CREATED, RUNNING], "startTime": "2024-05-01T10:00:05Z",
                  "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 1}}}
STATUS_RESTARTING = {"conditions": [CREATED, {**RUNNING, "status": "False"}, RESTARTING],
                     "replicaStatuses": {"Master": {"active": 1}, "Worker": {"failed": 1}}}
STATUS_SUCCEEDED = {"conditions": [CREATED, {**RUNNING, "status": "False"},
                                   cond("Succeeded", "PyTorchJobSucceeded",
                                        "PyTorchJob ml/j successfully completed.")],
                    "completionTime": "2024-05-01T11:00:00Z",
                    "replicaStatuses": {"Master": {"succeeded": 1}, "Worker": {"succeeded": 1}}}
STATUS_FAILED = {"conditions": [CREATED, {**RUNNING, "status": "False"},
                                cond("Failed", "PyTorchJobFailed", "PyTorchJob j is failed because 1 Master "
                                     "replica(s) failed.")],
                 "replicaStatuses": {"Master": {"failed": 1}, "Worker": {"active": 1}}}


class Recorded:
    """Replays statuses (the last one repeats), on a fake clock advanced by sleep()."""

    def __init__(self, statuses: list):
        self.statuses, self.now, self.sleeps = list(statuses), 0.0, []

    def status(self, *_):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def test_wait_succeeds_through_a_restart(caplog):
    rec = Recorded([{}, None, STATUS_CREATED, STATUS_RUNNING, STATUS_RUNNING, STATUS_RESTARTING,
                    STATUS_RUNNING, STATUS_SUCCEEDED])
    with caplog.at_level("INFO", logger=pytorchjob_api.__name__):
        out = wait_for_job(rec.status, timeout_s=3600, poll_s=30, sleep=rec.sleep, name="j", namespace="ml",
                           clock=rec.clock)
    assert out.state == "Succeeded" and out.reason == "PyTorchJobSucceeded" and out.seconds == 7 * 30
    assert [t for t, _ in out.transitions] == ["Created", "Running", "Restarting", "Running", "Succeeded"]
    assert sum("PyTorchJob ml/j: Running" in r.message for r in caplog.records) == 2  # transitions only


def test_wait_raises_the_jobs_failure_reason():
    rec = Recorded([STATUS_CREATED, STATUS_RUNNING, STATUS_FAILED])
    failed = r"ml/j failed: PyTorchJobFailed: .*1 Master replica\(s\) failed"
    with pytest.raises(LaunchError, match=failed) as e:
        wait_for_job(rec.status, 3600, 30, rec.sleep, name="j", namespace="ml", clock=rec.clock)
    assert "kubectl -n ml logs j-master-0" in str(e.value)
    assert not isinstance(e.value, JobTimeoutError)


def test_wait_times_out_with_the_logs_command():
    rec = Recorded([STATUS_CREATED, STATUS_RUNNING])
    with pytest.raises(JobTimeoutError) as e:
        wait_for_job(rec.status, timeout_s=100, poll_s=30, sleep=rec.sleep, name="j", namespace="ml",
                     clock=rec.clock)
    assert rec.sleeps == [30, 30, 30, 10] and rec.now == 100  # never sleeps past the deadline
    msg = str(e.value)
    assert "ml/j did not finish within 100s (last state: Running)" in msg and "left in place" in msg
    assert "kubectl -n ml logs -l training.kubeflow.org/job-name=j" in msg


# -- the Kubernetes client against an HTTP stand-in for the API server ---------------------------------
class FakeApiServer:
    """Just the PyTorchJob and pod-log endpoints, on 127.0.0.1; statuses replayed from a list."""

    def __init__(self, statuses: list, fail_create: int | None = None):
        self.statuses, self.fail_create = list(statuses), fail_create
        self.created: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                kind = "text/plain" if isinstance(body, str) else "application/json"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                server.requests.append(("POST", self.path))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if server.fail_create:
                    return self.reply(server.fail_create, {"kind": "Status", "code": server.fail_create})
                server.created.append(body)
                return self.reply(201, body)

            def do_GET(self):
                server.requests.append(("GET", self.path))
                if self.path.endswith("/log?tailLines=30"):
                    return self.reply(200, "Traceback ...\nFaceopsError: CUDA out of memory\n")
                status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                if isinstance(status, int):
                    return self.reply(status, {"kind": "Status", "code": status})
                return self.reply(200, {**server.created[-1], "status": status})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> PyTorchJobs:
        from kubernetes import client

        self.thread.start()
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        api = client.ApiClient(cfg)
        return PyTorchJobs(client.CustomObjectsApi(api), client.CoreV1Api(api))

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_run_pytorchjob_end_to_end_through_the_kubernetes_client(capsys):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    rec = Recorded([])
    fake = FakeApiServer([{}, STATUS_RUNNING, 503, STATUS_SUCCEEDED])
    with fake as jobs:
        rc = run_pytorchjob("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=2, nodes=2, resume=False,
                            job=gpu_job(poll_s=5), jobs=jobs, sleep=rec.sleep, clock=rec.clock)
    assert rc == 0
    (body,) = fake.created
    assert body["metadata"]["name"] == "faceops-recognizer-run-42"
    assert body["metadata"]["namespace"] == "team-a"
    assert fake.requests[0] == ("POST", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs")
    assert fake.requests[1] == ("GET", "/apis/kubeflow.org/v1/namespaces/team-a/pytorchjobs/"
                                       "faceops-recognizer-run-42")
    assert len(fake.requests) == 5 and rec.sleeps == [5, 5, 5]  # the 503 was retried at the next poll
    out = capsys.readouterr().out
    assert "kubectl -n team-a logs -f faceops-recognizer-run-42-master-0" in out and "succeeded" in out


def test_run_pytorchjob_failure_shows_the_master_log(caplog):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    rec = Recorded([])
    fake = FakeApiServer([STATUS_RUNNING, STATUS_FAILED])
    with fake as jobs, pytest.raises(LaunchError, match="PyTorchJobFailed"):
        run_pytorchjob("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=1, nodes=2, resume=False,
                       job=gpu_job(), jobs=jobs, sleep=rec.sleep, clock=rec.clock)
    assert "CUDA out of memory" in caplog.text


@pytest.mark.parametrize(("code", "hint"), [(404, "training operator"), (403, "kfp.rbac"), (409, "run_id")])
def test_create_errors_say_what_to_do(code, hint):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    with FakeApiServer([{}], fail_create=code) as jobs, pytest.raises(LaunchError, match=hint):
        run_pytorchjob("recognizer", CONFIG_YAML, S3_SETS, gpus_per_node=1, nodes=2, resume=False,
                       job=gpu_job(), jobs=jobs)


@pytest.mark.parametrize(("config_yaml", "sets", "error", "match"), [
    (CONFIG_YAML, ["data=/data/demo", S3_SETS[1]], LaunchError, "data='/data/demo' is not reachable"),
    (CONFIG_YAML, [S3_SETS[0], "out=file:///r1"], LaunchError, "out='file:///r1' is not reachable"),
    (CONFIG_YAML, [S3_SETS[0]], LaunchError, "out=None"),
    ("recognizer: {engin: {}}", S3_SETS, ConfigError, "unknown key 'engin'"),
])
def test_multi_node_checks_before_submitting(config_yaml, sets, error, match):
    """Nothing reaches the cluster (jobs=None would need one) when the run could not work there."""
    with pytest.raises(error, match=re.escape(match)):
        run_pytorchjob("recognizer", config_yaml, sets, gpus_per_node=1, nodes=2, resume=False,
                       job=JobConfig(), jobs=None)


def test_kube_client_without_cluster_access(tmp_path, monkeypatch):
    pytest.importorskip("kubernetes", reason="kubernetes client not installed")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no Kubernetes access"):
        pytorchjob_api.kube_client()
    kubeconfig = {"apiVersion": "v1", "kind": "Config", "current-context": "c",
                  "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
                  "users": [{"name": "u", "user": {"token": "t"}}],
                  "contexts": [{"name": "c",
                                "context": {"cluster": "k", "user": "u", "namespace": "ml-team"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    _, namespace = pytorchjob_api.kube_client()
    assert namespace == "ml-team"


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
