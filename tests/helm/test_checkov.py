"""checkov's Kubernetes checks over everything the chart renders and over the pods KubeRay makes from the
RayService (checkov does not look inside a CRD, so the head and worker templates are written out as Pods
for it). A failed check passes only where helm/README.md's table of skipped checks justifies it for that
kind of pod, and every skip in the table must still be needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helm.chart import CHART, VALUE_SETS, Helm

README = CHART.parent / "README.md"
# Every template rendered at least once: the defaults and each example, and one with the optional objects.
SCANS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    **{(example or "defaults").removesuffix(".yaml"): (example, ()) for example in VALUE_SETS},
    "tls-monitoring": (None, ("--set", "routerTLS.certManager.enabled=true",
                              "--set", "routerTLS.certManager.issuerRef.name=ca",
                              "--set", "metrics.serviceMonitor.enabled=true")),
}


def find_checkov() -> str | None:
    """checkov in this interpreter's bin folder (where .ci/run links it from its own virtualenv) or on PATH."""
    return shutil.which("checkov", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def scanned_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rendered objects, and the Service and Pods KubeRay makes from the RayService, as checkov reads them."""
    objects = []
    for doc in docs:
        objects.append(doc)
        if doc["kind"] != "RayService":
            continue
        meta, spec = doc["metadata"], doc["spec"]
        objects.append({"apiVersion": "v1", "kind": "Service", "metadata": {
            **spec["serveService"]["metadata"], "namespace": meta["namespace"]}, "spec": spec["serveService"]["spec"]})
        cluster = spec["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for name, group in groups:
            template = group["template"]
            objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                **template.get("metadata", {}), "name": f"{meta['name']}-{name}", "namespace": meta["namespace"]},
                "spec": template["spec"]})
    return objects


def role(resource: str) -> str:
    """What a checkov resource ("Pod.serving.llm-caravan-head") is, in the words of the README's table."""
    kind, _, name = resource.split(".", 2)
    if kind != "Pod":
        return kind
    if name.endswith("-head"):
        return "head"
    if name.endswith(("-doctor", "-openai")):
        return "test hooks"
    return "workers"


def documented_skips() -> dict[str, set[str]]:
    """helm/README.md's table of skipped checks: check id -> the pods (head, workers, test hooks) it is skipped for."""
    text = README.read_text()
    section = text[text.index("### Skipped checkov checks"):]
    skips: dict[str, set[str]] = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        match = re.match(r"^\| `(CKV\w+)` \| ([^|]+) \|", line)
        if match:
            skips[match[1]] = {part.strip() for part in match[2].split(",")}
    assert skips, f"no skipped checks found in {README}"
    return skips


@pytest.fixture(scope="module")
def failed(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], set[str]]:
    """(check id, role) -> the scans and resources where it failed, from one checkov run over every scan."""
    checkov = find_checkov()
    if checkov is None:
        reason = ("checkov is not installed; `bash .ci/run` installs it into its own virtualenv and links it into "
                  ".venv/bin, or `pip install checkov` into a virtualenv and put it on PATH")
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("checkov")
    for name, (example, options) in SCANS.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(scanned_objects(helm.render(example, *options))))
    result = subprocess.run([checkov, "--directory", str(folder), "--framework", "kubernetes", "--output", "json",
                             "--quiet", "--compact", "--skip-download"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stderr[-3000:]}"
    reports = json.loads(result.stdout) if result.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    found: dict[tuple[str, str], set[str]] = {}
    for report in reports:
        if isinstance(report, dict) and "results" in report:
            assert report["summary"]["parsing_errors"] == 0, report["summary"]
            assert report["summary"]["resource_count"] >= 8 * len(SCANS), report["summary"]
            for check in report["results"]["failed_checks"]:
                where = f"{Path(check['file_path']).stem}: {check['resource']}"
                found.setdefault((check["check_id"], role(check["resource"])), set()).add(where)
    return found


def test_no_failed_check_but_the_documented_skips(failed: dict[tuple[str, str], set[str]]) -> None:
    skips = documented_skips()
    unjustified = {f"{check} ({who})": sorted(where) for (check, who), where in failed.items()
                   if who not in skips.get(check, set())}
    assert not unjustified, ("checkov checks failed that helm/README.md does not justify (fix the chart, or add the "
                             f"check to its table with the reason): {json.dumps(unjustified, indent=1)}")


def test_every_documented_skip_is_still_needed(failed: dict[tuple[str, str], set[str]]) -> None:
    stale = [f"{check} ({who})" for check, whom in documented_skips().items() for who in whom
             if (check, who) not in failed]
    assert not stale, f"helm/README.md skips checks that now pass; take them out of its table: {stale}"


def test_the_pods_inside_the_rayservice_are_scanned(helm: Helm) -> None:
    pods = [o for o in scanned_objects(helm.render(None)) if o["kind"] == "Pod"]
    assert {role(f"Pod.serving.{p['metadata']['name']}") for p in pods} == {"head", "workers", "test hooks"}
    head = next(p for p in pods if p["metadata"]["name"] == "llm-caravan-head")
    assert head["metadata"]["labels"]["app.kubernetes.io/component"] == "head" and head["spec"]["containers"]
