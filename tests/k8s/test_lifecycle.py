"""A release's life on a real control plane, for every example: the PodDisruptionBudget syncs, NOTES.txt's
`helm upgrade` to two replicas passes (server-side apply, against KubeRay's own writes) and scales, the
generated tokens survive upgrades, `helm test` creates its pod, and `helm uninstall` leaves nothing behind."""

from __future__ import annotations

import base64
import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.helm.chart import CHART, EXAMPLES
from tests.k8s.control_plane import ControlPlane, wait_for
from tests.k8s.release import FULLNAME, RELEASE, Release, container, dump, shard_slots

pytestmark = pytest.mark.slow

# What a namespace holds before anything is installed in it (the controller manager publishes the CA bundles).
NAMESPACE_DEFAULTS = {"serviceaccount/default", "configmap/kube-root-ca.crt", "configmap/openshift-service-ca.crt"}


@pytest.fixture(scope="module")
def releases(control_plane: ControlPlane) -> Iterator[dict[str, Release]]:
    installed = {}
    try:
        for example in EXAMPLES:
            installed[example] = Release(control_plane, example, "life")
            installed[example].install()
        yield installed
    finally:
        for release in installed.values():
            release.helm("uninstall", RELEASE, "--ignore-not-found", check=False)


@pytest.fixture(params=list(EXAMPLES))
def release(request: pytest.FixtureRequest, releases: dict[str, Release]) -> Release:
    return releases[request.param]


def test_pod_disruption_budget_syncs(release: Release) -> None:
    """The disruption controller computes the budget's status. With maxUnavailable (or a percentage) it needs
    the scale subresource of the pods' controller, which a RayCluster lacks, and never syncs."""
    pods = 1 + release.values["workers"]["nodes"]
    release.pods("worker", pods - 1)

    def synced() -> dict | None:
        pdb = release.get("pdb", FULLNAME)
        status = pdb.get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        allowed = conditions.get("DisruptionAllowed", {})
        ok = status.get("observedGeneration") == pdb["metadata"]["generation"] and allowed.get("reason") != "SyncFailed"
        return status if ok and status.get("expectedPods") == pods else None

    try:
        status = wait_for(f"{release.namespace}: the PodDisruptionBudget's status", synced, 30)
    except AssertionError:
        events = release.get("events", "", "--field-selector", "involvedObject.kind=PodDisruptionBudget")
        pytest.fail(f"the PodDisruptionBudget never synced: {[e['message'] for e in events]}")
    # No Pod runs (no kubelet), so none may be evicted; the budget wants every one of them.
    assert status["desiredHealthy"] == pods and status["currentHealthy"] == 0 and status["disruptionsAllowed"] == 0


def test_upgrade_to_two_replicas(release: Release) -> None:
    """NOTES.txt's recipe on Helm 4 (server-side apply). KubeRay writes the RayService back with its
    defaults filled in; had the chart left one out of the (atomic) worker group list, KubeRay would own the
    list and this upgrade would fail on a conflict. Then `num_replicas` and the worker count change, on the
    same cluster, and the worker group's resize (the NOTES' patch) brings the pods."""
    cluster = release.raycluster()
    # KubeRay has written the RayService back (its finalizer is the sign) before Helm applies again.
    wait_for("KubeRay's finalizer on the RayService", lambda: release.rayservice()["metadata"].get("finalizers"), 30)
    nodes = release.nodes_for(2)
    result = release.upgrade("replicas=2", f"workers.nodes={nodes}")
    assert result.returncode == 0, result.stderr

    rayservice = release.get("rayservice", FULLNAME, "--show-managed-fields")
    (app,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    assert app["deployments"] == [{"name": "replica", "num_replicas": 2}]
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["replicas"] == group["maxReplicas"] == nodes
    owned = [f["manager"] for f in rayservice["metadata"]["managedFields"]
             if "f:rayClusterConfig" in f.get("fieldsV1", {}).get("f:spec", {})]
    assert owned == ["helm"], dump(rayservice["metadata"]["managedFields"])

    # Same cluster: the replica count and the worker count are applied in place, no second cluster starts.
    time.sleep(2)
    assert release.raycluster()["metadata"]["name"] == cluster["metadata"]["name"]
    # NOTES.txt's resize of the worker group. It patches the active cluster; with no kubelet the cluster
    # never serves, so it stays the pending one.
    name = rayservice["status"]["pendingServiceStatus"]["rayClusterName"]
    patch = (f'[{{"op": "replace", "path": "/spec/workerGroupSpecs/0/maxReplicas", "value": {nodes}}}, '
             f'{{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": {nodes}}}]')
    release.plane.kubectl("-n", release.namespace, "patch", "raycluster", name, "--type=json", "-p", patch)
    layout = release.values["caravan"]["layout"]
    assert sum(map(shard_slots, release.pods("worker", nodes))) >= 2 * layout["tp"] * layout["pp"]
    assert release.get("pdb", FULLNAME)["spec"]["minAvailable"] == 1 + nodes


def test_tokens_survive_upgrades_and_renders(release: Release) -> None:
    """The chart's generated tokens (Ray's, the router's, the admin's) are read back from the installed Secrets
    by `lookup`: an upgrade keeps them (a new Ray token would lock the running cluster out, a new router or admin
    token its clients), and so does a render against the cluster (`helm template --dry-run=server`)."""
    names = [f"{FULLNAME}-{part}" for part in ("ray-auth", "router-auth", "admin-auth")]
    installed = {name: release.get("secret", name)["data"] for name in names}
    assert all(len(base64.b64decode(value)) >= 48 for data in installed.values() for value in data.values())
    assert len({value for data in installed.values() for value in data.values()}) == 3  # three different tokens
    result = release.helm("upgrade", RELEASE, str(CHART), "--reuse-values", check=False)
    assert result.returncode == 0, result.stderr
    assert {name: release.get("secret", name)["data"] for name in names} == installed
    rendered = release.helm("template", RELEASE, str(CHART), "-f", str(EXAMPLES[release.example]),
                            "--dry-run=server").stdout
    secrets = {d["metadata"]["name"]: d["data"] for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Secret"}
    assert secrets == installed


def test_helm_test_creates_the_doctor_pod(release: Release) -> None:
    """`helm test` creates the doctor's pod (a Ray job submitted to KubeRay's head Service of the RayService);
    it stays Pending, so Helm gives up, and the pod is deleted after the test either way."""
    pod_name = f"{FULLNAME}-doctor"
    helm = subprocess.Popen([release.helm_binary, "test", RELEASE, "--namespace", release.namespace, "--timeout", "3s"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=release.plane.env)
    try:
        pod = wait_for("the doctor's pod", lambda: release.plane.kubectl(
            "get", "pod", pod_name, "-n", release.namespace, "-o", "json", check=False).stdout, 30, interval=0.1)
    finally:
        output, _ = helm.communicate(timeout=60)
    assert helm.returncode != 0 and "not ready" in output, output
    spec = yaml.safe_load(pod)["spec"]
    command = container({"spec": spec})["command"]
    assert command[:5] == ["ray", "job", "submit", "--address", f"http://{FULLNAME}-head-svc:8265"]
    assert command[5:] == ["--", "caravan", "doctor", "/etc/caravan/config.yaml", "--address", "auto"]
    assert spec["activeDeadlineSeconds"] == release.values["doctor"]["timeoutSeconds"]
    wait_for("the doctor's pod deleted after the test", lambda: release.plane.kubectl(
        "get", "pod", pod_name, "-n", release.namespace, check=False).returncode != 0, 30)


def test_uninstall_leaves_nothing(release: Release) -> None:
    """Everything the release made, and everything KubeRay and the hooks made from it, is gone."""
    plane = release.plane
    kinds = plane.kubectl("api-resources", "--verbs=list", "--namespaced", "-o", "name").stdout.split()
    kinds = [k for k in kinds if k not in ("events", "events.events.k8s.io", "endpoints")]  # endpoints: endpointslices
    release.helm("uninstall", RELEASE)

    def left() -> list[str]:
        names = plane.kubectl("get", ",".join(kinds), "-n", release.namespace, "-o", "name").stdout.split()
        return sorted(set(names) - NAMESPACE_DEFAULTS)

    try:
        wait_for(f"{release.namespace} empty", lambda: not left(), 60)
    except AssertionError:
        pytest.fail(f"helm uninstall left {left()} in {release.namespace}")
    cluster_wide = plane.kubectl("get", "clusterroles,clusterrolebindings,persistentvolumes,priorityclasses",
                                 "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
    assert cluster_wide == []
