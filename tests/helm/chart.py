"""The chart under test, through the real `helm` binary: render it, lint it, and read what it renders."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

CHART = REPO_ROOT / "helm" / "caravan"
EXAMPLES = {p.name: p for p in sorted((CHART / "examples").glob("*.yaml"))}
# Every values set the chart must take: the defaults (None) and each example.
VALUE_SETS: list[str | None] = [None, *EXAMPLES]
RELEASE, NAMESPACE = "llm", "serving"
KUBE_VERSION = "1.33.0"


def find_helm() -> str | None:
    """helm on PATH, or in this interpreter's bin folder, where .ci/run puts it."""
    return shutil.which("helm", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


class Helm:
    def __init__(self, binary: str):
        self.binary = binary
        self._rendered: dict[tuple[str, ...], str] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=60)

    def template(self, values: str | None = None, *options: str) -> subprocess.CompletedProcess:
        """`helm template` of the chart with an example's values (None: the defaults) and more options."""
        files = ["-f", str(EXAMPLES[values])] if values else []
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION,
                        *files, *options)

    def render(self, values: str | None = None, *options: str) -> list[dict[str, Any]]:
        """The objects the chart renders (hooks included), parsed; fails the test on a helm error."""
        key = (values or "", *options)
        if key not in self._rendered:
            result = self.template(values, *options)
            assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
            self._rendered[key] = result.stdout
        return [doc for doc in yaml.safe_load_all(self._rendered[key]) if doc]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def app_args(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def values(example: str | None) -> dict[str, Any]:
    """The chart's values as helm merges them: values.yaml, then the example over it."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if example:
        _merge(merged, yaml.safe_load(EXAMPLES[example].read_text()))
    return merged


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
