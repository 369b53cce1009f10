"""Bad values are refused by `helm template` with the values key named: types, ranges and required
keys by values.schema.json; what relates values to one another (the layout against the worker
group) by a template check. Every value is documented in values.yaml."""

from __future__ import annotations

import json
import re
from dataclasses import fields, is_dataclass
from typing import Any, get_type_hints

import pytest

from cluster.deploy.controller import NOT_ARGS
from cluster.config import RouterSection, ServeConfig
from tests.helm.chart import CHART, Helm

BF16 = "llama-3.1-405b-bf16-2x8xh100.yaml"
# Router keys the chart sets itself: the Service, the probes and the metrics Service depend on the ports, and the
# token and certificate files are where the chart mounts its Secrets (routerAuth, adminAuth, routerTLS).
CHART_ROUTER_KEYS = {"host", "port", "http_port", "metrics_port", "auth_token_file", "admin_token_file", "api_keys_file",
                     "tls_cert_file", "tls_key_file"}


def refused(helm: Helm, example: str | None, *options: str) -> str:
    result = helm.template(example, *options)
    assert result.returncode != 0, f"helm template accepted {options}"
    return result.stderr


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("caravan.layout.tp", "eight", "at '/caravan/layout/tp': got string, want integer"),
    ("caravan.layout.pp", "0", "at '/caravan/layout/pp': minimum: got 0, want 1"),
    ("replicas", "true", "at '/replicas': got boolean, want integer"),
    ("workers.gpusPerNode", "-8", "at '/workers/gpusPerNode': minimum: got -8, want 0"),
    ("caravan.kv_cache.memory_per_shard", "lots", "at '/caravan/kv_cache/memory_per_shard'"),
    ("caravan.shard.device", "tpu", "at '/caravan/shard/device': value must be one of"),
    ("service.type", "Ingress", "at '/service/type': value must be one of 'ClusterIP', 'NodePort', 'LoadBalancer'"),
    ("caravan.layout.ppp", "2", "at '/caravan/layout': additional properties 'ppp' not allowed"),
    ("caravan.router.port", "8080", "at '/caravan/router': additional properties 'port' not allowed"),
    ("image.tag", "", "at '/image/tag': minLength: got 0, want 1"),
    ("caravan.model.path", "models/llama", "at '/caravan/model/path'"),
    # A percentage needs the scale subresource that a RayCluster lacks (templates/poddisruptionbudget.yaml).
    ("podDisruptionBudget.maxUnavailable", "10%", "at '/podDisruptionBudget/maxUnavailable': got string, want integer"),
])
def test_schema_refuses_wrong_values(helm: Helm, key: str, value: str, expected: str) -> None:
    assert expected in refused(helm, None, "--set", f"{key}={value}")


def test_schema_refuses_missing_required_value(helm: Helm) -> None:
    assert "at '/image': missing property 'repository'" in refused(helm, None, "--set", "image.repository=null")


def test_gpu_workers_need_a_model_path(helm: Helm, tmp_path) -> None:
    no_path = tmp_path / "no-path.yaml"
    no_path.write_text("caravan:\n  model:\n    path: null\n")
    assert "at '/caravan/model/path': got null, want string" in refused(helm, BF16, "-f", str(no_path))


def test_gpu_workers_need_gpu_memory(helm: Helm) -> None:
    assert "at '/workers/gpuMemory': got null, want string" in refused(helm, BF16, "--set", "workers.gpuMemory=null")


def test_model_path_needs_its_claim(helm: Helm) -> None:
    assert "at '/modelVolume/claimName': minLength: got 0, want 1" in refused(
        helm, BF16, "--set", "modelVolume.claimName=")


def test_model_path_inside_the_volume(helm: Helm) -> None:
    error = refused(helm, BF16, "--set", "caravan.model.path=/data/llama")
    assert "caravan.model.path=/data/llama is not inside modelVolume.mountPath=/models" in error


def test_draft_model_inside_the_volume_and_in_the_serve_args(helm: Helm) -> None:
    draft = ["--set", "caravan.speculative.method=draft"]
    assert "caravan.speculative.method is draft but caravan.speculative.draft_model is not set" in refused(
        helm, BF16, *draft)
    error = refused(helm, BF16, *draft, "--set", "caravan.speculative.draft_model=/data/llama-1b")
    assert "caravan.speculative.draft_model=/data/llama-1b is not inside modelVolume.mountPath=/models" in error
    rendered = helm.template(BF16, *draft, "--set", "caravan.speculative.draft_model=/models/llama-3.2-1b")
    assert rendered.returncode == 0, rendered.stderr
    assert "draft_model: /models/llama-3.2-1b" in rendered.stdout and "method: draft" in rendered.stdout


def test_too_few_nodes_for_the_layout(helm: Helm) -> None:
    error = refused(helm, BF16, "--set", "workers.nodes=1")
    assert ("workers.nodes=1 does not match the layout: replicas=1 x caravan.layout.pp=2 = 2 stages of "
            "caravan.layout.tp=8") in error
    assert "set workers.nodes to 2" in error


def test_idle_nodes(helm: Helm) -> None:
    assert "set workers.nodes to 2" in refused(helm, BF16, "--set", "workers.nodes=3")


def test_more_replicas_need_more_nodes(helm: Helm) -> None:
    assert "set workers.nodes to 4" in refused(helm, BF16, "--set", "replicas=2")
    helm.render(BF16, "--set", "replicas=2", "--set", "workers.nodes=4")


@pytest.mark.parametrize("gpus", [4, 12])
def test_tp_group_must_fit_a_node(helm: Helm, gpus: int) -> None:
    error = refused(helm, BF16, "--set", f"workers.gpusPerNode={gpus}")
    assert f"caravan.layout.tp=8 does not divide workers.gpusPerNode={gpus}" in error


def test_cpu_shards_in_whole_tp_groups(helm: Helm) -> None:
    error = refused(helm, "smollm2-cpu.yaml", "--set", "workers.cpuShardsPerNode=4")
    assert "caravan.layout.tp=3 does not divide workers.cpuShardsPerNode=4" in error


def test_two_stages_per_node(helm: Helm) -> None:
    """TP 4 x PP 2 fills one 8-GPU node."""
    helm.render(BF16, "--set", "caravan.layout.tp=4", "--set", "workers.nodes=1")


@pytest.mark.parametrize(("options", "expected"), [
    (("--set", "caravan.shard.device=cpu"), "caravan.shard.device is cpu but workers.gpusPerNode is 8"),
    (("--set", "workers.gpusPerNode=0"), "caravan.shard.device is cuda but workers.gpusPerNode is 0"),
])
def test_device_matches_the_workers(helm: Helm, options: tuple[str, ...], expected: str) -> None:
    assert expected in refused(helm, BF16, *options)


def test_liveness_window_covers_setup(helm: Helm) -> None:
    error = refused(helm, BF16, "--set", "caravan.timeouts.setup_s=4000")
    assert "head.livenessProbe gives the router 3000 s" in error and "caravan.timeouts.setup_s=4000" in error


@pytest.mark.parametrize(("key", "value"), [
    ("workers.resources.limits.memory", "1024Mi"),  # Kubernetes writes 1Gi
    ("workers.resources.requests.cpu", "0.5"),  # 500m
    ("workers.resources.requests.cpu", "1000m"),  # 1
    ("workers.shmSize", "1.5Gi"),  # 1536Mi
    ("workers.extraResources.rdma/hca", "1000"),  # 1k
    ("head.resources.limits.memory", "8192Mi"),  # 8Gi
    ("head.shmSize", "0Gi"),  # 0
])
def test_quantities_as_kubernetes_writes_them(helm: Helm, key: str, value: str) -> None:
    """KubeRay writes the RayService back through its Go types, which print quantities in one form; any
    other form would change, make the operator the owner of the field (of the whole worker group) and fail
    the next `helm upgrade` on a conflict. tests/k8s shows the conflict on a real API server."""
    error = refused(helm, None, "--set", f"{key}={value}")
    assert f"{key}={value}: write it as Kubernetes does" in error


@pytest.mark.parametrize("value", ["1Gi", "1536Mi", "500m", "1", "96", "1000Gi", "0", "2M"])
def test_quantities_in_their_form_pass(helm: Helm, value: str) -> None:
    helm.render(None, "--set", f"workers.resources.requests.memory={value}", "--set", f"head.shmSize={value}")


def test_fullname_fits_kuberay(helm: Helm) -> None:
    assert "at '/fullnameOverride': maxLength: got 60, want 47" in refused(
        helm, None, "--set", "fullnameOverride=" + "a" * 60)


def test_schema_follows_the_caravan_config() -> None:
    """The schema's `caravan` keys are cluster/config.py's, less what is not the application's args and
    the router keys the chart owns: a key added there must be added here."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["caravan"]

    def keys(cls: type, node: dict[str, Any], path: str) -> None:
        hints = get_type_hints(cls)
        expected = {f.name for f in fields(cls)}
        expected -= set(NOT_ARGS) if cls is ServeConfig else set()
        expected -= CHART_ROUTER_KEYS if cls is RouterSection else set()
        assert set(node["properties"]) == expected, path
        assert node["additionalProperties"] is False, path
        for name in expected:
            if is_dataclass(hints[name]):
                keys(hints[name], node["properties"][name], f"{path}.{name}")

    keys(ServeConfig, schema, "caravan")


def test_every_value_is_documented() -> None:
    """helm-docs style: every value has a `# --` comment right above it, or above a section holding it."""
    keys: list[tuple[str, bool]] = []   # (dotted key, has a `# --` comment)
    stack: list[tuple[int, str]] = []   # (indent, key) of the sections the line is in
    comment = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment = comment or stripped.startswith("# --")
            continue
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if match is None:
            comment = comment and bool(stripped)  # a blank line parts a comment from what follows
            continue
        while stack and stack[-1][0] >= len(match[1]):
            stack.pop()
        stack.append((len(match[1]), match[2]))
        keys.append((".".join(k for _, k in stack), comment))
        comment = False
    documented = [key for key, has in keys if has]
    leaves = [key for key, _ in keys if not any(k.startswith(key + ".") for k, _ in keys)]
    undocumented = [leaf for leaf in leaves if not any(leaf == d or leaf.startswith(d + ".") for d in documented)]
    assert not undocumented, f"values without a `# --` comment on them or on a section above: {undocumented}"
