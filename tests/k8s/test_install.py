"""`helm install` of every example into a real API server, and what the real KubeRay operator made of
it: the RayCluster, the head and worker Pods and the Services carry the layout's GPUs, shared memory,
ports, probes, env and `ray start` parameters that the chart means (the merged values, not the
template). Pods stay Pending: there is no kubelet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.helm.chart import EXAMPLES
from tests.k8s.control_plane import ControlPlane, wait_for
from tests.k8s.release import FULLNAME, RELEASE, Release, bytes_of, container, dump, env, ray_start, shard_slots

pytestmark = pytest.mark.slow

GRPC_PORT = 50051
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "serve-grpc": GRPC_PORT}


@pytest.fixture(scope="module")
def releases(control_plane: ControlPlane) -> Iterator[dict[str, Release]]:
    """Every example installed at once, each in its namespace, so that KubeRay reconciles them together."""
    installed = {}
    try:
        for example in EXAMPLES:
            installed[example] = Release(control_plane, example, "install")
            installed[example].install()
        yield installed
    finally:
        for release in installed.values():
            release.helm("uninstall", RELEASE, check=False)


@pytest.fixture(params=list(EXAMPLES))
def release(request: pytest.FixtureRequest, releases: dict[str, Release]) -> Release:
    return releases[request.param]


def shm_size(pod: dict[str, Any]) -> str:
    """The size of the memory-backed volume mounted at /dev/shm."""
    (mount,) = [m for m in container(pod)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    return volume["emptyDir"]["sizeLimit"]


def test_raycluster(release: Release) -> None:
    """KubeRay's RayCluster: no autoscaler, the worker group sized to the layout, Ray's token auth."""
    spec = release.raycluster()["spec"]
    (group,) = spec["workerGroupSpecs"]
    workers = release.values["workers"]
    assert group["replicas"] == group["maxReplicas"] == workers["nodes"] and group["minReplicas"] == 0
    assert spec["enableInTreeAutoscaling"] is False
    assert spec["authOptions"] == {"mode": "token", "secretName": f"{FULLNAME}-ray-auth"}
    assert spec["rayVersion"] == release.values["rayVersion"]


def test_head_pod(release: Release) -> None:
    """Ray's head without Ray CPUs, the router's ports, its gRPC liveness probe, Ray's readiness probe."""
    (pod,) = release.pods("head", 1)
    head, v = container(pod), release.values["head"]
    start = ray_start(head)
    assert start["--head"] is True and start["--num-cpus"] == "0" and start["--dashboard-host"] == "0.0.0.0"
    assert start["--memory"] == str(bytes_of(v["resources"]["limits"]["memory"]))
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports.items() >= {**HEAD_PORTS, "router-metrics": release.values["metrics"]["port"]}.items(), ports
    probe = v["livenessProbe"]
    assert head["livenessProbe"]["grpc"] == {"port": GRPC_PORT, "service": probe["service"]}
    assert {k: head["livenessProbe"][k] for k in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds",
                                                  "failureThreshold")} == \
           {k: probe[k] for k in ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold")}
    # KubeRay's own readiness probe (Ray's health): the head must be Ready before KubeRay deploys the
    # application that starts the router.
    assert head["readinessProbe"]["httpGet"]["path"] == "/api/healthz"
    assert head["resources"] == v["resources"]
    assert shm_size(pod) == v["shmSize"]
    mounts = {m["mountPath"]: m for m in head["volumeMounts"]}
    for folder in ("/var/run/secrets/caravan", "/var/run/secrets/caravan-admin", "/var/run/secrets/ray", "/etc/caravan"):
        assert mounts[folder]["readOnly"], folder
    assert env(head)["RAY_AUTH_MODE"] == "token"
    assert env(head)["RAY_AUTH_TOKEN_PATH"] == "/var/run/secrets/ray/auth_token"


def test_worker_pods(release: Release) -> None:
    """One pod per node, each with its GPUs (or Ray CPUs) for whole TP groups, NCCL's settings, shared
    memory, the model volume, and Ray's health as readiness without a Serve proxy check."""
    v = release.values
    workers, layout = v["workers"], v["caravan"]["layout"]
    pods = release.pods("worker", workers["nodes"])
    head_service = f"{release.raycluster()['metadata']['name']}-head-svc"
    for pod in pods:
        worker = container(pod)
        start, resources = ray_start(worker), worker["resources"]
        assert start["--address"] == f"{head_service}.{release.namespace}.svc.cluster.local:6379"
        if workers["gpusPerNode"]:
            assert start["--num-gpus"] == str(workers["gpusPerNode"])
            assert resources["limits"]["nvidia.com/gpu"] == str(workers["gpusPerNode"])
        else:
            assert "--num-gpus" not in start and "nvidia.com/gpu" not in resources["limits"]
            # A Ray CPU per shard, and one for the replicas' engines.
            assert start["--num-cpus"] == str(workers["cpuShardsPerNode"] + 1)
        assert resources["requests"]["cpu"] == workers["resources"]["requests"]["cpu"]
        assert resources["limits"]["memory"] == workers["resources"]["limits"]["memory"]
        assert shm_size(pod) == workers["shmSize"]
        nccl, variables = workers["nccl"], env(worker)
        assert variables.get("NCCL_SOCKET_IFNAME") == (nccl["socketIfname"] or None)
        assert variables.get("NCCL_IB_HCA") == (nccl["ibHca"] or None)
        assert variables["RAY_AUTH_MODE"] == "token"
        capabilities = worker.get("securityContext", {}).get("capabilities", {}).get("add", [])
        assert ("IPC_LOCK" in capabilities) == nccl["ipcLock"]
        assert pod["spec"].get("nodeSelector", {}) == workers["nodeSelector"]
        assert all(t in pod["spec"].get("tolerations", []) for t in workers["tolerations"])
        assert worker["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365, "scheme": "HTTP"}
        claim = v["modelVolume"]["claimName"]
        claims = [vol["persistentVolumeClaim"] for vol in pod["spec"]["volumes"] if "persistentVolumeClaim" in vol]
        assert claims == ([{"claimName": claim, "readOnly": True}] if claim else [])
    # The layout's shards fill the worker group exactly: no shard short, no node idle.
    shards, slots = v["replicas"] * layout["tp"] * layout["pp"], sum(map(shard_slots, pods))
    assert shards <= slots < shards + (workers["gpusPerNode"] or workers["cpuShardsPerNode"]), (shards, slots)


def test_pods_are_hardened(release: Release) -> None:
    """KubeRay's Pods keep the chart's security contexts, its own containers (the workers' wait for the GCS)
    included. Ray's token is a file in every container; KubeRay adds it to the environment of the Ray
    containers too (RAY_AUTH_TOKEN, from the authOptions Secret, which it needs for its own calls): what
    helm/README.md says, checked here so that a KubeRay that stops doing it is noticed."""
    pods = release.pods("head", 1) + release.pods("worker", release.values["workers"]["nodes"])
    injected = {"secretKeyRef": {"name": f"{FULLNAME}-ray-auth", "key": "auth_token"}}
    for pod in pods:
        name = pod["metadata"]["name"]
        assert pod["spec"]["securityContext"] == release.values["podSecurityContext"], name
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            security = c.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, (name, c["name"], security)
            assert security.get("capabilities", {}).get("drop") == ["ALL"], (name, c["name"], security)
            assert security.get("readOnlyRootFilesystem") is True, (name, c["name"], security)
            assert env(c).get("RAY_AUTH_TOKEN_PATH") == "/var/run/secrets/ray/auth_token", (name, c["name"])
            assert env(c).get("RAY_AUTH_TOKEN", injected) == injected, (name, c["name"])
        assert env(container(pod))["RAY_AUTH_TOKEN"] == injected, name


def test_services(release: Release) -> None:
    """KubeRay's head Service has the router's ports; the metrics Service selects the head pod only.
    (The gRPC Service and the RayService's own head Service appear only once Serve runs the application.)"""
    cluster = release.raycluster()["metadata"]["name"]
    head_service = wait_for("KubeRay's head Service", lambda: release.get("services", "", "-l", f"ray.io/cluster={cluster}"))
    (service,) = head_service
    assert service["metadata"]["name"] == f"{cluster}-head-svc"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports.items() >= HEAD_PORTS.items()
    metrics = release.get("service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert metrics["spec"]["ports"][0]["port"] == release.values["metrics"]["port"]
    selector = ",".join(f"{k}={v}" for k, v in metrics["spec"]["selector"].items())
    (selected,) = release.get("pods", "", "-l", selector)
    assert selected["metadata"]["labels"]["ray.io/node-type"] == "head"


def test_everything_the_pods_name_exists(release: Release) -> None:
    """Every ConfigMap, Secret and Secret key that KubeRay's pods refer to is in the namespace (the model's
    PersistentVolumeClaim aside: the user stages it)."""
    pods = release.pods("head", 1) + release.pods("worker", release.values["workers"]["nodes"])
    for pod in pods:
        for volume in pod["spec"]["volumes"]:
            if "configMap" in volume:
                release.get("configmap", volume["configMap"]["name"])
            if "secret" in volume:
                data = release.get("secret", volume["secret"]["secretName"])["data"]
                assert {item["key"] for item in volume["secret"].get("items", [])} <= data.keys()
        for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            for value in env(c).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    ref = value["secretKeyRef"]
                    assert ref["key"] in release.get("secret", ref["name"])["data"], dump(ref)


def test_config_file_and_serve_config(release: Release) -> None:
    """/etc/caravan/config.yaml (the ConfigMap every Ray pod mounts) and the Serve application KubeRay
    holds carry the layout and the replica count."""
    config = yaml.safe_load(release.get("configmap", f"{FULLNAME}-config")["data"]["config.yaml"])
    layout = release.values["caravan"]["layout"]
    assert config["layout"] == layout and config["replicas"] == release.values["replicas"]
    (app,) = yaml.safe_load(release.rayservice()["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["layout"] == layout
    assert app["deployments"] == [{"name": "replica", "num_replicas": release.values["replicas"]}]
