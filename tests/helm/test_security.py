"""The chart's security, as rendered: tokens in Secrets mounted as files (the admin token in the head only),
the router's TLS from a given Secret or a cert-manager Certificate with a probe that still works over it,
hardened pods, the image by digest, and the NetworkPolicy that keeps the Ray control plane to the release."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helm.chart import CHART, VALUE_SETS, Helm, app_args, one
from tests.helm.test_chart import env, head_container, worker_group

TLS_FROM_SECRET = ("--set", "routerTLS.existingSecret=router-tls")
TLS_FROM_CERT_MANAGER = ("--set", "routerTLS.certManager.enabled=true",
                         "--set", "routerTLS.certManager.issuerRef.name=internal-ca",
                         "--set", "routerTLS.certManager.issuerRef.kind=ClusterIssuer")


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the release makes: KubeRay's head and workers, and the test hooks."""
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": worker_group(docs)["template"]["spec"]}
    specs.update({d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Pod"})
    return specs


def mounted(pod: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume that holds the file at `path` in the pod's container."""
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly"), mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


def test_existing_secrets_are_used(helm: Helm) -> None:
    docs = helm.render(None, "--set", "rayAuth.existingSecret=ray-token",
                       "--set", "routerAuth.existingSecret=grpc-token", "--set", "routerAuth.secretKey=bearer",
                       "--set", "adminAuth.existingSecret=admin-token", "--set", "adminAuth.secretKey=key")
    assert not [d for d in docs if d["kind"] == "Secret"]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["secretName"] == "ray-token"
    volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["router-auth"]["secret"] == {"secretName": "grpc-token", "defaultMode": 0o440,
                                                "items": [{"key": "bearer", "path": "token"}]}
    assert volumes["admin-auth"]["secret"] == {"secretName": "admin-token", "defaultMode": 0o440,
                                               "items": [{"key": "key", "path": "token"}]}


@pytest.mark.parametrize("router_auth", [True, False])
def test_admin_token_in_the_head_only(helm: Helm, router_auth: bool) -> None:
    """Admin takes its own token, from its own Secret, whether or not inference needs one; only the head,
    where the router runs, mounts it."""
    docs = helm.render(None, "--set", f"routerAuth.enabled={str(router_auth).lower()}")
    secret = one(docs, "Secret", "-admin-auth")
    assert set(secret["data"]) == {"token"}
    if router_auth:
        assert secret["data"]["token"] != one(docs, "Secret", "-router-auth")["data"]["token"]
    path = app_args(docs)["router"]["admin_token_file"]
    specs = pods(docs)
    assert mounted(specs["head"], path)["secret"]["secretName"] == secret["metadata"]["name"]
    for name, pod in specs.items():
        if name != "head":
            assert "admin-auth" not in {v["name"] for v in pod.get("volumes", [])}, name


def test_generated_tokens_are_long_and_random(helm: Helm) -> None:
    """Each render without the cluster makes new tokens (the install keeps the installed ones: tests/k8s)."""
    first, second = helm.render(None, "--set", "nameOverride=a"), helm.render(None, "--set", "nameOverride=b")
    for suffix in ("-ray-auth", "-router-auth", "-admin-auth"):
        (a,), (b,) = one(first, "Secret", suffix)["data"].values(), one(second, "Secret", suffix)["data"].values()
        assert a != b and len(a) >= 64  # 48 random characters, base64


@pytest.mark.parametrize(("options", "secret"), [(TLS_FROM_SECRET, "router-tls"),
                                                 (TLS_FROM_CERT_MANAGER, "llm-caravan-router-tls")])
def test_router_tls(helm: Helm, options: tuple[str, ...], secret: str) -> None:
    """The certificate's Secret mounted in the head and named in the router's config; both doors say https;
    the liveness probe asks the HTTPS port (the kubelet's gRPC probe cannot speak TLS); the helm test pod
    calls the API over HTTPS, trusting the served chain."""
    docs = helm.render(None, *options)
    router = app_args(docs)["router"]
    head = pods(docs)["head"]
    for key, item in (("tls_cert_file", "tls.crt"), ("tls_key_file", "tls.key")):
        volume = mounted(head, router[key])
        assert volume["secret"]["secretName"] == secret and router[key].endswith("/" + item)
        assert {"key": item, "path": item} in volume["secret"]["items"]
    ports = one(docs, "RayService")["spec"]["serveService"]["spec"]["ports"]
    assert [p["appProtocol"] for p in ports] == ["https", "https"]
    probe = head_container(docs)["livenessProbe"]
    assert "grpc" not in probe
    assert probe["httpGet"] == {"path": "/health?service=caravan.router", "port": "openai-http", "scheme": "HTTPS"}
    test_pod = one(docs, "Pod", "-openai")
    assert "https://llm-caravan-grpc:8000" in test_pod["spec"]["containers"][0]["command"][2]
    assert mounted(test_pod["spec"], "/var/run/secrets/caravan-tls/tls.crt")["secret"]["secretName"] == secret


def test_cert_manager_certificate(helm: Helm) -> None:
    docs = helm.render(None, *TLS_FROM_CERT_MANAGER, "--set", "routerTLS.certManager.dnsNames[0]=llm.example.com")
    spec = one(docs, "Certificate")["spec"]
    assert spec["secretName"] == "llm-caravan-router-tls"
    assert spec["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert spec["dnsNames"] == ["llm-caravan-grpc", "llm-caravan-grpc.serving", "llm-caravan-grpc.serving.svc",
                                "llm-caravan-grpc.serving.svc.cluster.local", "localhost", "llm.example.com"]
    assert spec["ipAddresses"] == ["127.0.0.1"] and "server auth" in spec["usages"]
    assert not [d for d in helm.render(None) if d["kind"] == "Certificate"]


def test_without_tls_the_probe_is_grpc(helm: Helm) -> None:
    docs = helm.render(None)
    assert "tls_cert_file" not in app_args(docs)["router"]
    assert head_container(docs)["livenessProbe"]["grpc"] == {"port": 50051, "service": "caravan.router"}
    assert "router-tls" not in {v["name"] for v in pods(docs)["head"]["volumes"]}


@pytest.mark.parametrize(("options", "expected"), [
    ((*TLS_FROM_SECRET, *TLS_FROM_CERT_MANAGER), "routerTLS.existingSecret=router-tls and "
                                                 "routerTLS.certManager.enabled are both set"),
    (("--set", "routerTLS.certManager.enabled=true"), "routerTLS.certManager.enabled needs "
                                                      "routerTLS.certManager.issuerRef.name"),
    # The chart owns the router's TLS keys: they come from routerTLS, mounted where the config says.
    (("--set", "caravan.router.tls_cert_file=/certs/tls.crt"),
     "at '/caravan/router': additional properties 'tls_cert_file' not allowed"),
    (("--set", "image.digest=latest"), "at '/image/digest'"),
])
def test_tls_and_image_values_refused(helm: Helm, options: tuple[str, ...], expected: str) -> None:
    result = helm.template(None, *options)
    assert result.returncode != 0 and expected in result.stderr, result.stderr


@pytest.mark.parametrize("example", VALUE_SETS)
def test_pods_are_hardened(helm: Helm, example: str | None) -> None:
    """Every pod non-root (uid spelt out: the image names its user), seccomp RuntimeDefault, no privilege
    escalation, every capability dropped, a read-only root with /tmp writable, no service account token."""
    for name, pod in pods(helm.render(example)).items():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] and context["runAsUser"] == 1000, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"], name
        assert security["capabilities"]["drop"] == ["ALL"], name
        if name in ("head", "worker") or name.endswith("-doctor"):
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in [v for v in pod["volumes"] if v["name"] == tmp["name"]][0], name
        assert not [e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})], name


def test_ipc_lock_is_the_only_capability_added(helm: Helm) -> None:
    docs = helm.render(None, "--set", "workers.nccl.ipcLock=true")
    capabilities = worker_group(docs)["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    assert capabilities == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert "add" not in head_container(docs)["securityContext"]["capabilities"]


def test_image_by_digest(helm: Helm) -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    docs = helm.render(None, "--set", "image.repository=registry.example.com/caravan", "--set", f"image.digest={digest}")
    images = {name: pod["containers"][0]["image"] for name, pod in pods(docs).items()}
    assert set(images.values()) == {f"registry.example.com/caravan:0.1.0@{digest}"}, images
    assert {pod["containers"][0]["image"] for pod in pods(helm.render(None)).values()} == {"caravan:0.1.0"}


def test_network_policy(helm: Helm) -> None:
    """On by default. Ray's ports (GCS, dashboard, raylets) only from the release's own pods and the operator;
    the router's doors from their peers; metrics from the monitoring namespace; egress to the release and DNS."""
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}
    apps = "[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=apps"
    docs = helm.render(None, "--set", "networkPolicy.grpcFrom" + apps, "--set", "networkPolicy.httpFrom" + apps,
                       "--set", "networkPolicy.operatorNamespace=kuberay",
                       "--set", "networkPolicy.operatorPodLabels.app\\.kubernetes\\.io/name=kuberay-operator")
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    release = {"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}
    ray, grpc, http, operator, metrics = policy["ingress"]
    assert ray == {"from": [release]}  # every port, from the release's pods only
    assert grpc == {"ports": [{"port": 50051, "protocol": "TCP"}], "from": [peer]}
    assert http == {"ports": [{"port": 8001, "protocol": "TCP"}], "from": [peer]}
    assert operator == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay"}},
                                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}],
                        "ports": [{"port": 8265, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
    assert metrics == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                       "ports": [{"port": 9464, "protocol": "TCP"}]}
    to_release, dns = policy["egress"]
    assert to_release == {"to": [release]}
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
    # Peers left empty: the doors open to anyone, metrics to no one outside the release, DNS anywhere.
    open_ = one(helm.render(None, "--set", "networkPolicy.metricsFrom=null", "--set", "networkPolicy.dnsTo=null",
                            "--set", "networkPolicy.extraEgress[0].ports[0].port=443"), "NetworkPolicy")["spec"]
    assert len(open_["ingress"]) == 4 and "from" not in open_["ingress"][1] and "from" not in open_["ingress"][2]
    assert "to" not in open_["egress"][1] and open_["egress"][2] == {"ports": [{"port": 443}]}


@pytest.mark.parametrize("example", VALUE_SETS)
def test_network_policy_selects_the_ray_pods(helm: Helm, example: str | None) -> None:
    docs = helm.render(example)
    selector = one(docs, "NetworkPolicy")["spec"]["podSelector"]
    (components,) = selector["matchExpressions"]
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert selector["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] in components["values"]


def test_every_object_names_its_namespace(helm: Helm) -> None:
    docs = helm.render(None, *TLS_FROM_CERT_MANAGER, "--set", "metrics.serviceMonitor.enabled=true")
    assert {d["metadata"].get("namespace") for d in docs} == {"serving"}


@pytest.mark.parametrize("tls", [False, True])
def test_notes_fetch_the_admin_token_and_the_ca(helm: Helm, tls: bool) -> None:
    """NOTES.txt: the admin token from its Secret for `caravan status` through the port-forward, and with TLS
    the CA and TLS flags on every client command."""
    options = TLS_FROM_CERT_MANAGER if tls else ()
    result = helm.run("install", "llm", str(CHART), "--dry-run=client", "--namespace", "serving", *options)
    assert result.returncode == 0, result.stderr
    text = result.stdout.split("NOTES:", 1)[1]
    assert ("kubectl -n serving get secret llm-caravan-admin-auth -o jsonpath='{.data.token}' | base64 -d "
            "> caravan-admin-token") in text
    status = "caravan status --server localhost:50051 --token-file caravan-admin-token"
    if tls:
        assert status + " --tls-ca caravan-ca.crt" in text
        assert "get secret llm-caravan-router-tls -o jsonpath='{.data.ca\\.crt}' | base64 -d > caravan-ca.crt" in text
        assert "grpc_health_probe -addr localhost:50051 -tls -tls-ca-cert caravan-ca.crt" in text
        assert "-plaintext" not in text and text.count("grpcurl -cacert caravan-ca.crt") == 2
        assert "--token-file caravan-token --tls-ca caravan-ca.crt" in text
    else:
        assert status + "\n" in text and "caravan-ca.crt" not in text
