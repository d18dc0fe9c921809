"""The Helm chart (charts/faceops): renders, lints, validates against the Kubernetes schemas, and wires
GPUs, the s3:// model repository, the S3 Secret, security contexts, network policies and monitoring;
and what `helm install --wait` meets on a real cluster: no Prometheus Operator CRDs, a Triton started
before its bucket exists, model control versus how exports are published, a CPU-only Triton.

Rendering uses the Helm v4 SDK through helm-python-sdk (no helm binary, no cluster).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")

CHART = Path(__file__).resolve().parents[1] / "charts" / "faceops"
KUBE_VERSION = "1.32"
RELEASE, NAMESPACE = "faceops", "faceops"
CRD_GROUPS = ("monitoring.coreos.com/",)  # Prometheus Operator CRDs: no schema in kubernetes-validate
OPERATOR_APIS = ("monitoring.coreos.com/v1",)  # what a cluster with the Prometheus Operator serves
WORKLOADS = ("Deployment", "Job", "Pod")

# every values file in ci/ (what chart-testing installs), keyed by its name without "-values"
SCENARIOS = {"default": {}, **{path.stem.removesuffix("-values"): yaml.safe_load(path.read_text())
                               for path in sorted((CHART / "ci").glob("*.yaml"))}}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_files(chart, values: dict | None = None, name: str = RELEASE, *, crds: bool = False,
                 **options) -> dict[str, str]:
    """Template path -> rendered text. ``crds``: as on a cluster serving the Prometheus Operator's API
    (helm template --api-versions monitoring.coreos.com/v1)."""
    if not crds:
        return chart.render(values=values or {}, name=name, namespace=NAMESPACE, **options)
    # helm-python-sdk's render() does not pass api_versions through; its native library takes it
    from helm_python import _native

    opts = {"name": name, "namespace": NAMESPACE, "api_versions": list(OPERATOR_APIS), **options}
    return json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts)))


def render(chart, values: dict | None = None, name: str = RELEASE, **options) -> list[dict]:
    """All rendered objects (hooks and test pods included), NOTES.txt left out."""
    manifests = render_files(chart, values, name, **options)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def only(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = of_kind(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} ({component}), got {[d['metadata']['name'] for d in found]}"
    return found[0]


def of_kind(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def triton_container(docs: list[dict]) -> dict:
    (container,) = pod_spec(only(docs, "Deployment", "triton"))["containers"]
    return container


def env_by_name(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- rendering, lint, schema validation -----------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_clean(scenario):
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_lint_reports_bad_values():
    report = helm.lint(CHART, {"triton": {"modelControl": {"mode": "sometimes"}}}, strict=True,
                       namespace=NAMESPACE)
    assert any(m["severity"] >= 3 for m in report["messages"]), report
    assert "/triton/modelControl/mode" in json.dumps(report)


@pytest.mark.parametrize("crds", [False, True], ids=["no-operator", "operator"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_manifest_validates_against_kubernetes_schemas(chart, scenario, crds):
    docs = render(chart, SCENARIOS[scenario], crds=crds)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        checked += 1
    assert checked >= 12


def test_schema_validation_is_strict(chart):
    deployment = only(render(chart), "Deployment", "triton")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ci_values_satisfy_the_schema(chart, scenario):
    chart.validate_schema(SCENARIOS[scenario])


@pytest.mark.parametrize("bad", [
    {"triton": {"modelControl": {"mode": "sometimes"}}},
    {"triton": {"gpu": {"count": -1}}},
    {"triton": {"ports": {"http": 70000}}},
    {"minio": {"resources": {"limits": {"cpu": "lots"}}}},
    {"s3": {"buckets": ["Not_A_Bucket"]}},
    {"tritonn": {"enabled": True}},  # a typo in a key
], ids=["mode", "gpu-count", "port", "quantity", "bucket", "unknown-key"])
def test_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values=bad, name=RELEASE, namespace=NAMESPACE)


def test_names_fit_kubernetes_limits_for_a_long_release_name(chart):
    long_release = "a-very-long-release-name-for-faceops-that-fills-53-ch"[:53]
    dns_label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for doc in render(chart, {}, name=long_release):
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and dns_label.match(name), name


# --- Triton ---------------------------------------------------------------------------------------

def test_default_triton_gets_a_gpu_on_gpu_nodes_and_the_s3_repository(chart):
    docs = render(chart)
    container = triton_container(docs)
    spec = pod_spec(only(docs, "Deployment", "triton"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert "--model-repository=s3://faceops-minio.faceops.svc:9000/faceops-models/triton" in container["args"]
    assert "--model-control-mode=poll" in container["args"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001,
                                                                           "metrics": 8002}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 300
    assert not of_kind(docs, "HorizontalPodAutoscaler")


def test_gpu_values_set_count_node_selector_tolerations_and_autoscaling(chart):
    docs = render(chart, SCENARIOS["gpu"])
    deployment = only(docs, "Deployment", "triton")
    spec, container = pod_spec(deployment), triton_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}  # the defaults stay
    assert spec["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {t["key"] for t in spec["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    args = container["args"]
    assert "--model-control-mode=poll" in args and "--repository-poll-secs=15" in args
    assert not any(a.startswith("--load-model=") for a in args)
    hpa = only(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2" and "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "avg_time_queue_us"


def test_cpu_only_triton_requests_no_gpu_and_no_gpu_node(chart):
    docs = render(chart, SCENARIOS["cpu"])
    spec, container = pod_spec(only(docs, "Deployment", "triton")), triton_container(docs)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert "nodeSelector" not in spec and "tolerations" not in spec
    assert "--allow-gpu-metrics=false" in container["args"]


def test_external_s3_endpoint_replaces_minio(chart):
    docs = render(chart, SCENARIOS["external-s3"])
    assert not of_kind(docs, "Deployment", "minio") and not of_kind(docs, "PersistentVolumeClaim")
    assert not of_kind(docs, "Secret"), "an existing Secret is used, none generated"
    container = triton_container(docs)
    assert ("--model-repository=s3://https://minio.storage.svc.cluster.local:443/faceops-models/triton"
            in container["args"])
    env = env_by_name(container)
    for name, key in (("AWS_ACCESS_KEY_ID", "FACEOPS_S3_ACCESS_KEY"),
                      ("AWS_SECRET_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "shared-minio-credentials", "key": key}
    assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    (job_container,) = pod_spec(only(docs, "Job", "buckets"))["containers"]
    assert job_container["envFrom"] == [{"secretRef": {"name": "shared-minio-credentials"}}]
    assert only(docs, "Role", "kfp")["metadata"]["namespace"] == "kubeflow-user-example-com"


def test_external_s3_needs_an_endpoint_and_credentials(chart):
    with pytest.raises(helm.HelmRenderError, match=r"s3\.endpoint"):
        chart.render(values={"minio": {"enabled": False}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"s3\.accessKey"):
        chart.render(values={"minio": {"enabled": False}, "s3": {"endpoint": "s3.example.com:443"}},
                     name=RELEASE, namespace=NAMESPACE)


# --- Secret wiring --------------------------------------------------------------------------------

S3_KEYS = {"FACEOPS_S3_ENDPOINT", "FACEOPS_S3_ACCESS_KEY", "FACEOPS_S3_SECRET_KEY", "FACEOPS_S3_SECURE",
           "FACEOPS_S3_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def test_generated_secret_feeds_minio_triton_and_the_pipelines(chart):
    docs = render(chart)
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(docs, "Secret")}
    assert set(secrets) == {(NAMESPACE, "faceops-s3"), ("kubeflow", "faceops-s3")}
    release_secret = secrets[(NAMESPACE, "faceops-s3")]["stringData"]
    assert set(release_secret) == S3_KEYS
    assert secrets[("kubeflow", "faceops-s3")]["stringData"] == release_secret  # one set of credentials
    assert release_secret["FACEOPS_S3_ENDPOINT"] == "faceops-minio.faceops.svc:9000"
    assert release_secret["FACEOPS_S3_SECURE"] == "false"
    assert len(release_secret["FACEOPS_S3_SECRET_KEY"]) >= 32
    assert release_secret["AWS_ACCESS_KEY_ID"] == release_secret["FACEOPS_S3_ACCESS_KEY"]
    (minio,) = pod_spec(only(docs, "Deployment", "minio"))["containers"]
    minio_env = env_by_name(minio)
    assert minio_env["MINIO_ROOT_USER"]["valueFrom"]["secretKeyRef"]["name"] == "faceops-s3"
    assert env_by_name(triton_container(docs))["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "faceops-s3", "key": "FACEOPS_S3_SECRET_KEY"}


def test_credentials_appear_only_in_the_generated_secret(chart):
    values = {"minio": {"enabled": False},
              "s3": {"endpoint": "s3.example.com:443", "secure": True,
                     "accessKey": "AKIAFACEOPSTEST", "secretKey": "s3cr3t-value-for-the-test-0123456789"}}
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    for path, text in manifests.items():
        docs = [d for d in yaml.safe_load_all(text) if d] if not path.endswith("NOTES.txt") else []
        for doc in docs:
            if doc["kind"] == "Secret":
                assert doc["stringData"]["FACEOPS_S3_ACCESS_KEY"] == "AKIAFACEOPSTEST"
                continue
            dumped = yaml.safe_dump(doc)
            assert "AKIAFACEOPSTEST" not in dumped and "s3cr3t-value" not in dumped, (path, doc["kind"])
        if path.endswith("NOTES.txt"):
            assert "AKIAFACEOPSTEST" not in text and "s3cr3t-value" not in text


def test_random_credentials_stay_out_of_everything_but_the_secret(chart):
    docs = render(chart)
    secret = only([d for d in of_kind(docs, "Secret") if d["metadata"]["namespace"] == NAMESPACE], "Secret")
    secret_key = secret["stringData"]["FACEOPS_S3_SECRET_KEY"]
    access_key = secret["stringData"]["FACEOPS_S3_ACCESS_KEY"]
    for doc in docs:
        if doc["kind"] != "Secret":
            dumped = yaml.safe_dump(doc)
            assert secret_key not in dumped and access_key not in dumped, doc["kind"]


def test_kfp_side_secret_configmap_and_trainjob_rbac(chart):
    docs = render(chart)
    config = only(docs, "ConfigMap", "kfp")
    assert config["metadata"]["namespace"] == "kubeflow"
    assert config["data"]["FACEOPS_PUSHGATEWAY"] == "faceops-pushgateway.faceops.svc:9091"
    role, binding = only(docs, "Role", "kfp"), only(docs, "RoleBinding", "kfp")
    rules = {resource: rule for rule in role["rules"] for resource in rule["resources"]}
    assert rules["trainjobs"]["apiGroups"] == ["trainer.kubeflow.org"]
    # create and wait; delete when the run is cancelled or times out
    assert {"create", "get", "list", "watch", "delete"} <= set(rules["trainjobs"]["verbs"])
    assert {"get", "list"} <= set(rules["trainingruntimes"]["verbs"])  # the SDK resolves the runtime
    for resource in ("pods", "pods/log"):  # the step's own pod (owner reference) and the nodes' logs
        assert rules[resource]["apiGroups"] == [""] and "get" in rules[resource]["verbs"]
    assert not any("pytorchjobs" in r["resources"] for r in role["rules"])  # no v1 training operator
    assert all(set(r["verbs"]) <= {"create", "get", "list", "watch", "delete"} for r in role["rules"])
    cluster_role, cluster_binding = only(docs, "ClusterRole", "kfp"), only(docs, "ClusterRoleBinding", "kfp")
    assert cluster_role["rules"] == [{"apiGroups": ["trainer.kubeflow.org"],
                                      "resources": ["clustertrainingruntimes"], "verbs": ["get", "list"]}]
    for b, r in ((binding, role), (cluster_binding, cluster_role)):
        assert b["roleRef"]["name"] == r["metadata"]["name"]
        assert b["subjects"] == [
            {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert not of_kind(docs, "ServiceAccount", "kfp")  # KFP brings its own unless asked
    off = render(chart, {"kfp": {"rbac": {"enabled": False}}})
    assert not [d for d in off if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
                and d["metadata"]["labels"]["app.kubernetes.io/component"] == "kfp"]


def test_kfp_in_the_release_namespace_shares_one_secret(chart):
    docs = render(chart, {"kfp": {"namespace": ""}, "fullnameOverride": "faceops"})
    assert [(s["metadata"]["namespace"], s["metadata"]["name"]) for s in of_kind(docs, "Secret")] == [
        (NAMESPACE, "faceops-s3")]


# --- security, resources, network policies --------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_pod_is_non_root_and_every_container_hardened_with_resources(chart, scenario):
    workloads = [d for d in render(chart, SCENARIOS[scenario]) if d["kind"] in WORKLOADS]
    assert len(workloads) >= 3
    for doc in workloads:
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{doc['metadata']['name']}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"] and container["resources"]["limits"], where


def test_network_policies_select_the_workloads_and_admit_kfp_and_monitoring(chart):
    docs = render(chart)
    policies = of_kind(docs, "NetworkPolicy")
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")]
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in policies} == {
        "minio", "triton", "pushgateway"}
    for policy in policies:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        matches = sum(selector.items() <= labels.items() for labels in pod_labels)
        assert matches == 1, policy["metadata"]["name"]
    peers = json.dumps([p["spec"]["ingress"] for p in policies])
    assert '"kubernetes.io/metadata.name": "kubeflow"' in peers
    assert '"kubernetes.io/metadata.name": "monitoring"' in peers
    assert not of_kind(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_services_select_existing_pods(chart):
    docs = render(chart)
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")]
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), service["metadata"]["name"]


def test_labels_follow_helm_conventions(chart):
    for doc in render(chart):
        labels = doc["metadata"]["labels"]
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                    "helm.sh/chart"):
            assert key in labels, (doc["kind"], doc["metadata"]["name"], key)


# --- monitoring -----------------------------------------------------------------------------------

def test_prometheus_rule_is_the_plain_rules_file(chart):
    rule = only(render(chart, crds=True), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())


def test_without_triton_the_serving_alerts_are_left_out(chart):
    """TritonDown fires when no Triton target exists: a release without Triton must not carry it."""
    groups = only(render(chart, {"triton": {"enabled": False}}, crds=True), "PrometheusRule")["spec"]["groups"]
    assert [g["name"] for g in groups] == ["faceops-training"]
    assert groups[0] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"][0]


def test_triton_down_alert_matches_the_job_the_service_monitor_scrapes(chart):
    """The Prometheus Operator names a ServiceMonitor's job after the Service: it must match the
    alert's job regex, or TritonDown would only ever see "no target"."""
    docs = render(chart, crds=True)
    rule = next(r for g in only(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]
                if r["alert"] == "TritonDown")
    (pattern,) = set(re.findall(r'up\{job=~"([^"]+)"\}', rule["expr"]))
    monitor = only(docs, "ServiceMonitor", "triton")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [s for s in of_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert re.fullmatch(pattern, service["metadata"]["name"]), (pattern, service["metadata"]["name"])


def test_service_monitors_scrape_triton_and_the_pushgateway(chart):
    docs = render(chart, crds=True)
    monitors = {m["metadata"]["labels"]["app.kubernetes.io/component"]: m
                for m in of_kind(docs, "ServiceMonitor")}
    assert set(monitors) == {"triton", "pushgateway"}
    assert monitors["pushgateway"]["spec"]["endpoints"][0]["honorLabels"] is True
    services = of_kind(docs, "Service")
    for component, monitor in monitors.items():
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert monitor["spec"]["endpoints"][0]["port"] in ports, component
    no_crds = render(chart, {"monitoring": {"serviceMonitor": {"enabled": False},
                                            "prometheusRule": {"enabled": False}}}, crds=True)
    assert not [d for d in no_crds if d["apiVersion"].startswith(CRD_GROUPS)]


def test_grafana_dashboard_ships_in_a_labelled_configmap(chart):
    config = only(render(chart), "ConfigMap", "dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config["data"]["faceops.json"])
    assert shipped == json.loads((CHART / "dashboards" / "faceops.json").read_text())


def test_dashboard_shows_loss_nan_throughput_evaluation_and_triton_latency():
    dashboard = json.loads((CHART / "dashboards" / "faceops.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("faceops_train_loss", "faceops_nan_events_total", "faceops_train_images_per_second",
                   "faceops_eval_metric", "faceops_train_steps_total", "faceops_run_finished",
                   "nv_inference_queue_duration_us", "nv_inference_request_duration_us", 'up{job=~".*triton.*"}'):
        assert metric in exprs, metric
    # evaluation figures of runs whose Pushgateway group was already cleaned up still show
    (evaluation,) = [p for p in panels if "faceops_eval_metric" in p["targets"][0]["expr"]]
    assert evaluation["targets"][0]["expr"].startswith("last_over_time(")
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for x in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][x], int)


def test_notes_name_the_endpoints(chart):
    notes = chart.render(values={}, name=RELEASE, namespace=NAMESPACE)["faceops/templates/NOTES.txt"]
    assert "s3://faceops-minio.faceops.svc:9000/faceops-models/triton" in notes
    assert "FACEOPS_PUSHGATEWAY=faceops-pushgateway.faceops.svc:9091" in notes


def test_every_optional_feature_switches_off(chart):
    off = {"enabled": False}
    values = {"kfp": off, "pushgateway": off, "triton": off, "networkPolicy": off, "tests": off,
              "s3": {"bucketJob": off}, "minio": {"persistence": off},
              "monitoring": {"grafanaDashboard": off, "serviceMonitor": off, "prometheusRule": off}}
    docs = render(chart, values)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Secret", "Service", "ServiceAccount"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_triton_keeps_serving_when_one_model_fails_and_readiness_can_follow_a_model(chart):
    """As the local server does (serve/local.py): --exit-on-error=false --strict-readiness=false."""
    def triton(values: dict) -> dict:
        return only(render(chart, values), "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]

    c = triton({})
    assert {"--exit-on-error=false", "--strict-readiness=false"} <= set(c["args"])
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    c = triton({"triton": {"probes": {"readiness": {"model": "recognizer"}}}})
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/models/recognizer/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


@pytest.mark.parametrize("name", ["vlr_face", "arcface_resnet34"])
def test_pipeline_defaults_use_the_charts_buckets_and_served_repository(chart, name):
    """A pipeline that writes where the chart's Triton does not read never serves; a bucket the chart
    does not create fails ingest."""
    from faceops.run import pipeline_module

    inputs = pipeline_module(name).build().component_spec.inputs
    store, repo = inputs["store_uri"].default, inputs["model_repo_uri"].default
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert store.removeprefix("s3://").split("/")[0] in values["s3"]["buckets"]
    triton = only(render(chart), "Deployment", "triton")["spec"]["template"]["spec"]["containers"][0]
    served = next(a for a in triton["args"] if a.startswith("--model-repository="))
    bucket_and_path = re.fullmatch(r"--model-repository=s3://(?:https?://)?[^/]+/(.+)", served).group(1)
    assert repo == f"s3://{bucket_and_path}", f"{name} exports to {repo}, Triton reads {served}"
    assert repo.removeprefix("s3://").split("/")[0] in values["s3"]["buckets"]


# --- what `helm install --wait` meets on a real cluster (issue 12, item 7) ------------------------

def test_without_the_operator_crds_no_service_monitor_or_rule_is_rendered(chart):
    """A cluster without the Prometheus Operator rejects the whole release on a ServiceMonitor
    ("no matches for kind"); the chart renders them only when monitoring.coreos.com/v1 is served."""
    for scenario in SCENARIOS.values():
        assert not [d for d in render(chart, scenario) if d["apiVersion"].startswith(CRD_GROUPS)]
    notes = render_files(chart)["faceops/templates/NOTES.txt"]
    assert "does not serve monitoring.coreos.com/v1" in notes and "monitoring.skipCRDCheck" in notes
    with_operator = render(chart, crds=True)
    assert {d["kind"] for d in with_operator if d["apiVersion"] == "monitoring.coreos.com/v1"} == {
        "ServiceMonitor", "PrometheusRule"}
    assert "does not serve" not in render_files(chart, crds=True)["faceops/templates/NOTES.txt"]
    forced = render(chart, {"monitoring": {"skipCRDCheck": True}})  # e.g. helm template for GitOps
    assert len([d for d in forced if d["apiVersion"].startswith(CRD_GROUPS)]) == 3


def test_bucket_creation_is_no_post_install_hook(chart):
    """helm install --wait runs post-install hooks only once every resource is ready; Triton is ready
    only after its bucket exists, so a hook creating the bucket deadlocks the install."""
    for scenario in SCENARIOS.values():
        for doc in render(chart, scenario):
            hooks = doc["metadata"].get("annotations", {}).get("helm.sh/hook", "")
            assert hooks in ("", "test"), (doc["kind"], doc["metadata"]["name"], hooks)
    # a Job's pod template is immutable: each revision runs its own Job instead of patching the last one
    first, second = (only(render(chart, revision=r), "Job", "buckets")["metadata"]["name"] for r in (1, 2))
    assert first != second


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_triton_waits_for_its_repository_instead_of_crash_looping(chart, scenario):
    """Triton exits when its s3:// repository is missing (no bucket, or no object under the path:
    "repository path is not a valid directory"). An init container polls exactly that location with the
    MinIO client the bucket job uses, looping (sleep) instead of failing; the bucket job creates the
    bucket and an object under the path, so an empty repository is visible to Triton."""
    docs = render(chart, SCENARIOS[scenario])
    spec = pod_spec(only(docs, "Deployment", "triton"))
    (init,) = spec["initContainers"]
    job = only(docs, "Job", "buckets")
    (creator,) = pod_spec(job)["containers"]
    assert init["image"] == creator["image"] and init["image"].startswith("quay.io/minio/mc:")
    served = next(a for a in triton_container(docs)["args"] if a.startswith("--model-repository="))
    bucket_and_path = re.fullmatch(r"--model-repository=s3://(?:https?://)?[^/]+/(.+)", served).group(1)
    assert env_by_name(init)["REPOSITORY"]["value"] == bucket_and_path
    script = init["args"][0]
    assert "until present" in script and "sleep" in script and "exit" not in script  # waits, never fails
    assert init["envFrom"] == creator["envFrom"]  # the same endpoint and credentials
    bucket, path = bucket_and_path.split("/", 1)
    job_env = env_by_name(creator)
    assert bucket in job_env["BUCKETS"]["value"].split()
    assert job_env["REPOSITORY_MARKER"]["value"].startswith(f"{bucket}/{path}/")
    assert {"name": "mc-config", "mountPath": "/mc"} in init["volumeMounts"]  # credentials not in Triton's /tmp


def test_triton_without_the_bucket_job_still_waits(chart):
    """External buckets (bucketJob off): Triton still waits, for the repository someone else creates."""
    docs = render(chart, {**SCENARIOS["external-s3"], "s3": {**SCENARIOS["external-s3"]["s3"],
                                                             "bucketJob": {"enabled": False}}})
    assert not of_kind(docs, "Job")
    assert pod_spec(only(docs, "Deployment", "triton"))["initContainers"][0]["name"] == "wait-for-repository"
    off = render(chart, {"triton": {"waitForRepository": {"enabled": False}}})
    assert "initContainers" not in pod_spec(only(off, "Deployment", "triton"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_model_control_loads_what_export_publishes(chart, scenario):
    """`faceops export` publishes a new version by writing its files, then switching config.pbtxt
    (version_policy specific), and the deploy step only checks the server: nothing calls the repository
    API. Only a polling Triton picks that up; explicit control would serve the start-up models forever."""
    args = triton_container(render(chart, SCENARIOS[scenario]))["args"]
    assert "--model-control-mode=poll" in args
    assert not any(a.startswith("--load-model=") for a in args)
    from faceops.serve import deploy

    assert "load_model" not in deploy.check_server.__code__.co_names  # deploy relies on polling


def test_explicit_model_control_is_still_possible_and_says_what_it_costs(chart):
    values = {"triton": {"modelControl": {"mode": "explicit", "loadModels": ["recognizer"]}}}
    args = triton_container(render(chart, values))["args"]
    assert "--model-control-mode=explicit" in args and "--load-model=recognizer" in args
    notes = render_files(chart, values)["faceops/templates/NOTES.txt"]
    assert "are not loaded unless you load them" in notes


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pipelines_learn_the_triton_gpu_count(chart, scenario):
    """The chart cannot edit model configs: it tells the export step how many GPUs Triton has."""
    docs = render(chart, SCENARIOS[scenario])
    gpus = int(triton_container(docs)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    assert only(docs, "ConfigMap", "kfp")["data"]["FACEOPS_TRITON_GPUS"] == str(gpus)


def test_cpu_triton_never_receives_kind_gpu_models(chart, tmp_path, monkeypatch):
    """Export with the environment the CPU values give the pipeline pods: every model is KIND_CPU
    without a GPU accelerator (a CPU Triton fails to load KIND_GPU); the GPU values give KIND_GPU with
    ONNX Runtime's TensorRT accelerator. A config asking for KIND_GPU is refused for the CPU Triton."""
    import torch
    from tritonclient.grpc import model_config_pb2 as mc

    from faceops.errors import FaceopsError
    from faceops.export import TRITON_GPUS_ENV, ExportConfig, export_modules, validate_repository
    from faceops.models import RecognizerConfig, create_recognizer
    from faceops.storage import open_store

    torch.manual_seed(0)
    model = create_recognizer(RecognizerConfig(name="edgeface_xxs")).eval()
    env = {name: only(render(chart, SCENARIOS[name]), "ConfigMap", "kfp")["data"] for name in ("cpu", "gpu")}
    for name, (kind, accelerators) in {"cpu": ("KIND_CPU", []), "gpu": ("KIND_GPU", ["tensorrt"])}.items():
        monkeypatch.setenv(TRITON_GPUS_ENV, env[name][TRITON_GPUS_ENV])
        repo = str(tmp_path / name)
        export_modules(model, repo, cfg=ExportConfig(parity_batch=2))
        for config in validate_repository(open_store(repo)).values():
            assert [mc.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == [kind]
            assert [a.name for a in config.optimization.execution_accelerators.gpu_execution_accelerator] == (
                accelerators)
    monkeypatch.setenv(TRITON_GPUS_ENV, env["cpu"][TRITON_GPUS_ENV])
    with pytest.raises(FaceopsError, match=r"KIND_GPU.*no GPU.*triton\.gpu\.count"):
        export_modules(model, str(tmp_path / "refused"), cfg=ExportConfig(instance_kind="KIND_GPU"))


def test_tensorrt_engine_cache_lies_on_a_writable_triton_volume(chart):
    """The exported accelerator caches engines at export.trt_engine_cache_path; with a read-only root
    filesystem that path must be on one of Triton's volumes."""
    from faceops.export import ExportConfig

    cache = ExportConfig().trt_engine_cache_path
    mounts = [m["mountPath"] for m in triton_container(render(chart, SCENARIOS["gpu"]))["volumeMounts"]]
    assert any(cache.startswith(m.rstrip("/") + "/") for m in mounts), (cache, mounts)


# --- the cluster path as docs/cluster.md writes it -------------------------------------------------

CLUSTER_DOC = CHART.parents[1] / "docs" / "cluster.md"
#: item fields of kfp-kubernetes 1.x that every KFP 2.x backend reads; anything newer needs its row in
#: docs/cluster.md's minimum-backend table
OLD_PLATFORM_FIELDS = {"configMapName", "keyToEnv", "secretName", "medium", "mountPath", "sizeLimit",
                       "volumeName", "labels", "effect", "key", "operator"}


def test_cluster_doc_lists_every_kubernetes_field_the_compiled_pipelines_use():
    """An older KFP backend stops every step on an IR field it does not know ("unknown field"): the
    minimum version in docs/cluster.md must account for each field the checked-in pipelines use."""
    doc = CLUSTER_DOC.read_text()
    used: set[str] = set()
    for compiled in sorted((CHART.parents[1] / "pipelines").glob("*.yaml")):
        platform = list(yaml.safe_load_all(compiled.read_text()))[1]["platforms"]["kubernetes"]
        for executor in platform["deploymentSpec"]["executors"].values():
            for field, value in executor.items():
                used.add(field)
                for item in value if isinstance(value, list) else [value]:
                    used.update(f"{field}.{key}" for key in item if key not in OLD_PLATFORM_FIELDS)
    assert {"secretAsEnv.secretNameParameter", "configMapAsEnv.optional"} <= used
    missing = sorted(field for field in used if f"`{field}`" not in doc)
    assert not missing, f"docs/cluster.md does not say which KFP backend reads {missing}"


def test_cluster_doc_helm_install_renders():
    """The install command of docs/cluster.md: its values files exist and its --set values pass the schema."""
    doc = CLUSTER_DOC.read_text()
    command = re.search(r"helm install .*?(?=\n```)", doc, re.S).group(0).replace("\\\n", " ")
    files = re.findall(r"-f (\S+)", command)
    sets = dict(kv.split("=", 1) for kv in re.findall(r"--set (\S+)", command))
    assert files and sets
    values: dict = {}
    for name in files:
        values.update(yaml.safe_load((CHART.parents[1] / name).read_text()))
    values["image"] = {key.removeprefix("image."): value for key, value in sets.items()}
    with helm.Chart.load(CHART) as loaded:
        loaded.validate_schema(values)
        assert "registry.example.com/ml/faceops-triton:0.1.0" in json.dumps(render(loaded, values))


@pytest.mark.parametrize("name", ["vlr_face", "arcface_resnet34"])
def test_every_configmap_key_a_pipeline_reads_is_in_the_charts_configmap(chart, name, tmp_path):
    """The steps read FACEOPS_PUSHGATEWAY / _TRITON_URL / _TRITON_GPUS from the chart's ConfigMap; a key
    the chart does not write is silently absent (the mapping is optional), e.g. a CPU export on GPUs."""
    from faceops.run import compile_pipeline

    cluster = CHART.parents[1] / "configs" / "cluster_gpu.yaml"
    docs = list(yaml.safe_load_all(compile_pipeline(name, str(tmp_path / "p.yaml"), str(cluster)).read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def cm_name(e: dict) -> str:
        return e.get("configMapName") or e["configMapNameParameter"]["runtimeValue"]["constant"]

    wanted = {(cm_name(e), m["configMapKey"])
              for ex in executors.values() for e in ex.get("configMapAsEnv", []) for m in e["keyToEnv"]}
    for scenario in SCENARIOS.values():
        maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(render(chart, scenario), "ConfigMap")}
        for cm, key in wanted:
            assert key in maps.get(cm, {}), f"{name} reads {key} from ConfigMap {cm}, which the chart lacks"
