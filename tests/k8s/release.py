"""A release of the chart on the test control plane: real `helm` against it, and the objects KubeRay
made from it, read back from the API server."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from typing import Any

from tests.helm.chart import CHART, EXAMPLES, values
from tests.k8s.control_plane import ControlPlane, tool, wait_for

RELEASE = "llm"
FULLNAME = f"{RELEASE}-caravan"
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class Release:
    """The chart installed with one example's values, in a namespace of its own."""

    def __init__(self, plane: ControlPlane, example: str, suffix: str):
        self.plane = plane
        self.example = example
        self.namespace = f"{example.removesuffix('.yaml').replace('.', '-')}-{suffix}"
        # What the chart means: values.yaml with the example over it.
        self.values = values(example)
        self.helm_binary = str(tool("helm"))

    def helm(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([self.helm_binary, *args, "--namespace", self.namespace], capture_output=True,
                                text=True, env=self.plane.env, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    def install(self) -> None:
        """`helm install`, with Helm's OpenAPI validation against the API server (on by default)."""
        self.plane.kubectl("create", "namespace", self.namespace)
        self.helm("install", RELEASE, str(CHART), "-f", str(EXAMPLES[self.example]))

    def upgrade(self, *sets: str) -> subprocess.CompletedProcess:
        """NOTES.txt's scaling recipe: `helm upgrade --reuse-values --set ...`."""
        return self.helm("upgrade", RELEASE, str(CHART), "--reuse-values",
                         *[arg for s in sets for arg in ("--set", s)], check=False)

    # -- reading back what the API server holds

    def get(self, kind: str, name: str = "", *selector: str) -> Any:
        return self.plane.get(kind, self.namespace, *([name] if name else []), *selector)

    def rayservice(self) -> dict[str, Any]:
        return self.get("rayservice", FULLNAME)

    def raycluster(self) -> dict[str, Any]:
        """The RayService's one RayCluster, once KubeRay made it."""
        clusters = wait_for(f"{self.namespace}: KubeRay's RayCluster", lambda: self.get("raycluster"), 60)
        assert len(clusters) == 1, [c["metadata"]["name"] for c in clusters]
        return clusters[0]

    def pods(self, node_type: str, count: int) -> list[dict[str, Any]]:
        """KubeRay's Ray pods of one type (head or worker), waiting until there are `count`."""
        def found() -> list[dict[str, Any]] | None:
            pods = [p for p in self.get("pods", "", "-l", f"ray.io/node-type={node_type}")
                    if not p["metadata"].get("deletionTimestamp")]
            return pods if len(pods) == count else None
        return wait_for(f"{self.namespace}: {count} {node_type} pod(s) from KubeRay", found, 60)

    def nodes_for(self, replicas: int) -> int:
        """workers.nodes that `replicas` fill, by the chart's rule (whole TP groups per node, no idle node)."""
        layout, workers = self.values["caravan"]["layout"], self.values["workers"]
        slots = workers["gpusPerNode"] or workers["cpuShardsPerNode"]
        stages_per_node = slots // layout["tp"]
        return -(-replicas * layout["pp"] // stages_per_node)


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c


def ray_start(c: dict[str, Any]) -> dict[str, str | bool]:
    """The `ray start` options KubeRay generated for a container: {'--num-cpus': '0', '--head': True, ...}."""
    script = " ".join(c.get("args", []))
    command = script[script.index("ray start"):]
    options: dict[str, str | bool] = {}
    for word in shlex.split(command)[2:]:
        key, _, value = word.partition("=")
        options[key] = value or True
    return options


def shard_slots(pod: dict[str, Any]) -> int:
    """Shards a worker pod holds: its GPUs, or on CPU workers its Ray CPUs less the one for the engines."""
    start = ray_start(container(pod))
    return int(start["--num-gpus"]) if "--num-gpus" in start else int(start["--num-cpus"]) - 1


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def bytes_of(quantity: str) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()
    return int(float(number) * UNITS.get(unit, 1))


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
