"""The image and the chart state the versions pyproject.toml pins: Ray, Python and torch in
helm/Dockerfile, Caravan's version as the chart's appVersion and default image tag, Ray's as the
RayService's rayVersion."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helm.chart import CHART

DOCKERFILE = REPO_ROOT / "helm" / "Dockerfile"
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def pin(package: str) -> str:
    (version,) = [m[1] for d in PROJECT["dependencies"] if (m := re.fullmatch(rf"{package}(?:\[[^]]*\])?==(\S+)", d))]
    return version


def build_args() -> dict[str, str]:
    """The ARGs above the first FROM, with their defaults: where the Dockerfile states its pins."""
    header = DOCKERFILE.read_text().split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", header, flags=re.M))


def test_dockerfile_pins_match_pyproject() -> None:
    args = build_args()
    assert args["RAY_VERSION"] == pin("ray")
    assert args["TORCH_VERSION"] == pin("torch")
    major, minor = re.fullmatch(r"py(\d)(\d+)", args["RAY_PYTHON"]).groups()
    required = re.fullmatch(r">=(\d+)\.(\d+)", PROJECT["requires-python"]).groups()
    assert (int(major), int(minor)) >= tuple(map(int, required))


def test_dockerfile_uses_its_pins() -> None:
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert base == "rayproject/ray:${RAY_VERSION}-${RAY_PYTHON}-gpu"
    assert '"torch==${TORCH_VERSION}"' in text
    # torch before Caravan, so that pyproject's pin finds the CUDA build installed.
    assert text.index("torch==${TORCH_VERSION}") < text.index("pip install --no-cache-dir -e .")
    # Stated once: no version number outside the ARG lines.
    body = "\n".join(line for line in text.splitlines() if not line.startswith(("ARG ", "#")))
    for version in build_args().values():
        assert version not in body


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "cluster", "shard", "proto"])
def test_dockerfile_copies_what_it_installs(path: str) -> None:
    ignore = (REPO_ROOT / "helm" / "Dockerfile.dockerignore").read_text().splitlines()
    assert f"!{path}" in ignore or f"!{path}/" in ignore
    assert re.search(rf"^COPY .*\b{re.escape(path)}\b", DOCKERFILE.read_text(), flags=re.M)


def test_chart_versions_match_pyproject() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == values["image"]["tag"] == PROJECT["version"]
    assert values["rayVersion"] == pin("ray")
