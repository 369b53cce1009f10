"""The chart renders, lints and validates: every object against the schema its API server would use
(KubeRay's CRDs for the RayService, Kubernetes 1.33 for the rest), and what the object says matches
how Caravan runs on KubeRay (only gRPC exposed, probes, auth, GPUs, NCCL, the test hook)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import SHARED
from tests.helm.chart import CHART, EXAMPLES, KUBE_VERSION, NAMESPACE, VALUE_SETS, Helm, one, values

CRDS = SHARED / "fixtures" / "kuberay-crds"
GRPC_PORT = 50051


@lru_cache
def crd_validator(file: str) -> jsonschema.Draft7Validator:
    """The validator of KubeRay's v1 schema, which the API server applies to the object."""
    crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(v1["schema"]["openAPIV3Schema"])


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare. JSON Schema lets them through; the API server drops them,
    or refuses them under strict field validation: either way a misspelt field is caught here."""
    if isinstance(obj, list):
        return [f for i, item in enumerate(obj) for f in unknown_fields(item, schema.get("items", {}), f"{path}[{i}]")]
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, value in obj.items():
        if props is not None and key in props:
            found += unknown_fields(value, props[key], f"{path}.{key}")
        elif isinstance(extra, dict):
            found += unknown_fields(value, extra, f"{path}.{key}")
        elif props is not None:
            found.append(f"{path}.{key}")
    return found


def head_container(docs) -> dict[str, Any]:
    return one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def worker_group(docs) -> dict[str, Any]:
    (group,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("example", VALUE_SETS)
def test_lint_strict(helm: Helm, example: str | None) -> None:
    files = ["-f", str(EXAMPLES[example])] if example else []
    result = helm.run("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, *files)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("example", VALUE_SETS)
def test_renders_the_objects(helm: Helm, example: str | None) -> None:
    kinds = sorted(d["kind"] for d in helm.render(example))
    assert kinds == ["ConfigMap", "NetworkPolicy", "Pod", "Pod", "PodDisruptionBudget", "RayService", "Secret",
                     "Secret", "Secret", "Service"]
    optional = helm.render(example, "--set", "metrics.serviceMonitor.enabled=true",
                           "--set", "routerTLS.certManager.enabled=true",
                           "--set", "routerTLS.certManager.issuerRef.name=ca")
    assert {d["kind"] for d in optional} - set(kinds) == {"Certificate", "ServiceMonitor"}
    off = helm.render(example, "--set", "networkPolicy.enabled=false")
    assert "NetworkPolicy" not in {d["kind"] for d in off}


@pytest.mark.parametrize("example", VALUE_SETS)
def test_rayservice_matches_kuberay_crd(helm: Helm, example: str | None) -> None:
    validator = crd_validator("ray.io_rayservices.yaml")
    service = one(helm.render(example), "RayService")
    validator.validate(service)
    assert unknown_fields(service, validator.schema) == []


def test_raycluster_spec_matches_kuberay_crd(helm: Helm) -> None:
    """KubeRay copies rayClusterConfig into a RayCluster, which its own CRD must accept too."""
    spec = one(helm.render("smollm2-cpu.yaml"), "RayService")["spec"]["rayClusterConfig"]
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "llm-caravan-x7k2q"}, "spec": spec}
    validator = crd_validator("ray.io_rayclusters.yaml")
    validator.validate(cluster)
    assert unknown_fields(cluster, validator.schema) == []


def test_crd_schema_catches_a_bad_rayservice() -> None:
    validator = crd_validator("ray.io_rayservices.yaml")
    bad = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "x"},
           "spec": {"rayClusterConfig": {"headGroupSpec": {"template": {"spec": {"containers": "ray-head"}}}}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)
    misspelt = {"spec": {"serveServce": {}, "rayClusterConfig": {"headGroupSpec": {"rayStartParams": {"x": "0"}}}}}
    assert unknown_fields(misspelt, validator.schema) == [".spec.serveServce"]


@pytest.mark.parametrize("example", VALUE_SETS)
def test_core_objects_match_kubernetes_1_33(helm: Helm, example: str | None) -> None:
    docs = helm.render(example, "--set", "routerTLS.existingSecret=router-tls")
    core = [d for d in docs if d["kind"] not in ("RayService", "ServiceMonitor", "Certificate")]
    # What KubeRay turns into Kubernetes objects: the gRPC Service and the head and worker pods.
    spec = one(docs, "RayService")["spec"]
    core.append({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    cluster = spec["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        core.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray-pod"}, **group["template"]})
    kinds = {d["kind"] for d in core}
    assert kinds >= {"ConfigMap", "Secret", "Service", "PodDisruptionBudget", "NetworkPolicy", "Pod"}
    for doc in core:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_service(helm: Helm) -> None:
    """No CRD for monitoring.coreos.com here: its structure, and that it selects the metrics Service's port."""
    docs = helm.render(None, "--set", "metrics.serviceMonitor.enabled=true",
                       "--set", "metrics.serviceMonitor.labels.release=prometheus")
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service", "-metrics")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]] and endpoint["path"] == "/metrics"
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 9464
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "head"


@pytest.mark.parametrize("example", VALUE_SETS)
def test_only_grpc_is_exposed(helm: Helm, example: str | None) -> None:
    """The router's two doors, gRPC and the OpenAI-compatible HTTP API, on one Service; nothing else."""
    docs = helm.render(example, "--set", "service.type=LoadBalancer")
    spec = one(docs, "RayService")["spec"]
    grpc = spec["serveService"]["spec"]
    assert grpc["type"] == "LoadBalancer"
    assert grpc["ports"] == [{"name": "serve-grpc", "port": GRPC_PORT, "targetPort": "serve-grpc",
                              "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"},
                             {"name": "openai-http", "port": 8000, "targetPort": "openai-http",
                              "protocol": "TCP", "appProtocol": "http"}]
    # KubeRay's head Service (dashboard 8265, GCS, client) takes the head group's serviceType.
    assert spec["rayClusterConfig"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert all(d["spec"]["type"] == "ClusterIP" for d in docs if d["kind"] == "Service")
    # Only the head has the port the gRPC Service targets by name, so the workers are never endpoints.
    ports = {p["name"]: p["containerPort"] for p in head_container(docs)["ports"]}
    assert ports["serve-grpc"] == GRPC_PORT and ports["dashboard"] == 8265 and ports["openai-http"] == 8001
    # The router listens where the head's named port says; Serve's own proxy keeps 8000.
    assert yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["router"]["http_port"] == 8001
    assert "ports" not in worker_group(docs)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("example", VALUE_SETS)
def test_serve_proxy_on_the_head_only(helm: Helm, example: str | None) -> None:
    """HeadOnly: KubeRay labels the head ray.io/serve=true from the proxy's health, and the gRPC Service
    selects that label (Disabled would leave it without endpoints). No port of ours is named `serve`."""
    docs = helm.render(example)
    assert yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["proxy_location"] == "HeadOnly"
    assert "serve" not in [p["name"] for p in head_container(docs)["ports"]]


@pytest.mark.parametrize("example", VALUE_SETS)
def test_probes_let_the_head_start_before_the_router(helm: Helm, example: str | None) -> None:
    """KubeRay deploys the application only once the head pod is Ready, so neither readiness nor a
    startup probe may wait on the router; the router's gRPC health is the liveness probe, with a window
    of at least timeouts.setup_s."""
    docs = helm.render(example)
    head = head_container(docs)
    assert "readinessProbe" not in head and "startupProbe" not in head
    live = head["livenessProbe"]
    # The router's own liveness name: overall health is NOT_SERVING while replicas rebuild, and a
    # restart of the head would take the whole Ray cluster down with it.
    assert live["grpc"] == {"port": GRPC_PORT, "service": "caravan.router"}
    setup_s = values(example)["caravan"]["timeouts"]["setup_s"]
    assert live["initialDelaySeconds"] + live["failureThreshold"] * live["periodSeconds"] >= setup_s
    worker = worker_group(docs)["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    # Liveness asks about the raylet alone: a GCS outage must not restart every worker.
    assert worker["livenessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}


@pytest.mark.parametrize("example", VALUE_SETS)
def test_ray_token_auth_everywhere(helm: Helm, example: str | None) -> None:
    """Ray's token as a file (RAY_AUTH_TOKEN_PATH, which Ray reads), in no container's environment."""
    docs = helm.render(example)
    secret = one(docs, "Secret", "-ray-auth")
    assert set(secret["data"]) == {"auth_token"}
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret["metadata"]["name"]}
    pods = [cluster["headGroupSpec"]["template"]["spec"], worker_group(docs)["template"]["spec"],
            one(docs, "Pod", "-doctor")["spec"]]
    for pod in pods:
        (container,) = pod["containers"]
        variables = env(container)
        assert variables["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in variables
        path = variables["RAY_AUTH_TOKEN_PATH"]
        (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert mount["readOnly"] and volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert volume["secret"]["items"] == [{"key": "auth_token", "path": path.rsplit("/", 1)[1]}]
        assert volume["secret"]["defaultMode"] == 0o440


@pytest.mark.parametrize("enabled", [True, False])
def test_router_token_file(helm: Helm, enabled: bool) -> None:
    docs = helm.render(None, "--set", f"routerAuth.enabled={str(enabled).lower()}")
    args = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    mounts = {m["name"]: m["mountPath"] for m in head_container(docs)["volumeMounts"]}
    if enabled:
        assert args["router"]["auth_token_file"] == mounts["router-auth"] + "/token"
        assert set(one(docs, "Secret", "-router-auth")["data"]) == {"token"}
    else:
        assert "auth_token_file" not in args["router"] and "router-auth" not in mounts


@pytest.mark.parametrize("example", VALUE_SETS)
def test_worker_pods(helm: Helm, example: str | None) -> None:
    v = values(example)["workers"]
    group = worker_group(helm.render(example, "--set", "workers.nccl.extraEnv.NCCL_DEBUG=INFO"))
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert group["replicas"] == group["maxReplicas"] == v["nodes"]
    gpus = v["gpusPerNode"]
    if gpus:
        # A string, as KubeRay writes it back (see test_quantities_as_kubernetes_writes_them).
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert group["rayStartParams"] == {"num-gpus": str(gpus)}
    else:
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert group["rayStartParams"] == {"num-cpus": str(v["cpuShardsPerNode"] + 1)}
    volumes = {vol["name"]: vol for vol in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": v["shmSize"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    nccl = env(container)
    assert nccl["NCCL_DEBUG"] == "INFO"
    assert nccl.get("NCCL_SOCKET_IFNAME") == (v["nccl"]["socketIfname"] or None)
    assert nccl.get("NCCL_IB_HCA") == (v["nccl"]["ibHca"] or None)
    caps = container.get("securityContext", {}).get("capabilities", {}).get("add", [])
    assert caps == (["IPC_LOCK"] if v["nccl"]["ipcLock"] else [])


@pytest.mark.parametrize("example", VALUE_SETS)
def test_worker_group_as_kuberay_writes_it(helm: Helm, example: str | None) -> None:
    """The worker group list is atomic: KubeRay writes the RayService back with its defaults filled in and
    its quantities as strings, and any difference from what Helm applied makes the operator the owner of the
    whole list, so that the next `helm upgrade` (server-side apply) conflicts. tests/k8s shows it on a real
    API server; here, every field the CRD defaults is spelt out, and scaleStrategy, which KubeRay adds."""
    group = worker_group(helm.render(example))
    schema = crd_validator("ray.io_rayservices.yaml").schema
    group_schema = schema["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["workerGroupSpecs"]
    defaulted = {k for k, v in group_schema["items"]["properties"].items() if "default" in v}
    assert defaulted | {"scaleStrategy"} <= group.keys()
    assert (group["numOfHosts"], group["priority"], group["scaleStrategy"]) == (1, 0, {})
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert all(isinstance(q, str) for part in resources.values() for q in part.values()), resources


@pytest.mark.parametrize("example", VALUE_SETS)
def test_model_volume_and_config(helm: Helm, example: str | None) -> None:
    v = values(example)
    docs = helm.render(example)
    config = one(docs, "ConfigMap")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {vol["name"]: vol for vol in pod["volumes"]}
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
        assert mounts["config"]["mountPath"] == "/etc/caravan" and "config.yaml" in config["data"]
        claim = v["modelVolume"]["claimName"]
        if claim:
            assert volumes["models"]["persistentVolumeClaim"] == {"claimName": claim, "readOnly": True}
            assert mounts["models"] == {"name": "models", "mountPath": v["modelVolume"]["mountPath"], "readOnly": True}
            assert v["caravan"]["model"]["path"].startswith(v["modelVolume"]["mountPath"] + "/")
        else:
            assert "models" not in volumes and v["caravan"]["model"]["path"] is None


def test_doctor_hook_runs_as_a_ray_job_on_the_head(helm: Helm) -> None:
    """KubeRay names a RayService's head Service `<rayservice>-head-svc`."""
    docs = helm.render()
    pod = one(docs, "Pod", "-doctor")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    name = one(docs, "RayService")["metadata"]["name"]
    assert pod["spec"]["containers"][0]["command"] == [
        "ray", "job", "submit", "--address", f"http://{name}-head-svc:8265", "--",
        "caravan", "doctor", "/etc/caravan/config.yaml", "--address", "auto"]
    assert pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("example", VALUE_SETS)
def test_pod_disruption_budget(helm: Helm, example: str | None) -> None:
    """An integer minAvailable over the head and the workers: maxUnavailable would need the RayCluster to
    have a scale subresource, and the budget would never sync (tests/k8s checks it syncs)."""
    docs = helm.render(example)
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    nodes = values(example)["workers"]["nodes"]
    assert pdb["minAvailable"] == 1 + nodes and "maxUnavailable" not in pdb
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] in pdb["selector"]["matchExpressions"][0]["values"]
    allowed = one(helm.render(example, "--set", "podDisruptionBudget.maxUnavailable=1"), "PodDisruptionBudget")
    assert allowed["spec"]["minAvailable"] == nodes
    everything = one(helm.render(example, "--set", "podDisruptionBudget.maxUnavailable=99"), "PodDisruptionBudget")
    assert everything["spec"]["minAvailable"] == 0


def test_names_fit_kuberay(helm: Helm) -> None:
    """KubeRay appends 6 characters for the RayCluster and `-serve-svc` to that; 47 keeps it within 63."""
    result = helm.run("template", "r" * 53, str(CHART), "--kube-version", KUBE_VERSION)  # Helm's longest release name
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(one(docs, "RayService")["metadata"]["name"]) == 47


@pytest.mark.parametrize("example", VALUE_SETS)
def test_notes(helm: Helm, example: str | None) -> None:
    """NOTES.txt says how to reach the router, check its health and send a first request."""
    notes = helm.run("install", "llm", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                     *(["-f", str(EXAMPLES[example])] if example else []))
    assert notes.returncode == 0, notes.stderr
    text = notes.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n serving port-forward service/llm-caravan-grpc 50051:50051" in text
    assert "grpc_health_probe -addr localhost:50051" in text
    token = '-H "authorization: Bearer $(cat caravan-token)"'
    assert f"grpcurl -plaintext {token} localhost:50051 grpc.health.v1.Health/Check" in text
    assert "secret llm-caravan-router-auth -o jsonpath='{.data.token}' | base64 -d > caravan-token" in text
    assert 'caravan complete --chat "What is the capital of France?" --server localhost:50051 ' \
           "--token-file caravan-token" in text
    assert f"grpcurl -plaintext {token}" in text and "caravan.v1.Inference/Generate" in text
