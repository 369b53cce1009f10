"""The head's read-only root file system, run: a Ray head and `caravan serve --address auto` (which deploys
the Serve application and its router, as KubeRay does) answer a request with the root file system read-only
and only the chart's writable mounts written: its emptyDirs (as tmpfs) and /dev/shm. Ray's token comes from
the file RAY_AUTH_TOKEN_PATH names, as in the chart, and nowhere else. In a private mount namespace, as root
(CI runs as root); skipped where one cannot be made."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.runtime.ports import free_port
from tests.helm.chart import Helm
from tests.helm.test_chart import env, head_container
from tests.helm.test_security import pods
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

IMAGE_HOME = "/home/ray"  # the Ray image's home, where the chart mounts the kernel caches


def writable_mounts(helm: Helm) -> list[str]:
    """The head container's emptyDir mounts, with the image's home as this machine's."""
    docs = helm.render(None)
    head = pods(docs)["head"]
    empty = {v["name"] for v in head["volumes"] if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
    paths = [m["mountPath"] for m in head_container(docs)["volumeMounts"] if m["name"] in empty]
    return [str(Path.home()) + p[len(IMAGE_HOME):] if p.startswith(IMAGE_HOME + "/") else p for p in paths]


def namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "mount --bind / / && mount -o remount,bind,ro / && ! touch /.caravan-probe 2>/dev/null"],
                           capture_output=True)
    return probe.returncode == 0


def test_ray_and_the_router_run_on_a_read_only_root(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> None:
    if not namespaces_work():
        pytest.skip("needs root and a private mount namespace with a read-only bind of / (unshare -m)")
    mounts = writable_mounts(helm)
    assert "/tmp" in mounts and any(m.endswith("/.cache/caravan/kernels") for m in mounts), mounts
    assert "RAY_AUTH_TOKEN_PATH" in env(head_container(helm.render(None)))  # the chart's way, as below
    # Everything the pod would mount read-only (its Secrets, its config) is made before the root turns read-only,
    # outside /tmp, which becomes an empty tmpfs.
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caravan" / "read-only-root"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "ray_token").write_text(secrets.token_hex(24))
    (folder / "token").write_text("inference-" + secrets.token_hex(8))
    (folder / "admin_token").write_text("admin-" + secrets.token_hex(8))
    (folder / "cluster.yaml").write_text(
        "layout: {tp: 1, pp: 1}\n"
        f"router: {{host: 127.0.0.1, port: {free_port()}, http_port: {free_port()}, metrics_port: {free_port()}, "
        f"auth_token_file: {folder / 'token'}, admin_token_file: {folder / 'admin_token'}}}\n")
    for mount in mounts:
        Path(mount).mkdir(parents=True, exist_ok=True)  # the container runtime makes the mount points
    # The code and its virtualenv are the image's: read-only, and still there when a tmpfs covers the folder
    # that holds them here (a checkout under /tmp, say), as in a container whose image holds them elsewhere.
    code = [REPO_ROOT] + ([] if Path(sys.prefix).is_relative_to(REPO_ROOT) else [Path(sys.prefix)])
    keep = [(p, folder / "keep" / str(i)) for i, p in enumerate(code) if any(p.is_relative_to(m) for m in mounts)]
    for _, spot in keep:
        spot.mkdir(parents=True)
    log = tmp_path_factory.mktemp("ro-root") / "run.log"
    script = "\n".join([
        "set -u",
        "mount --bind / / || exit 90",
        *[f"mount --bind {path} {spot} && mount -o remount,bind,ro {spot} || exit 94" for path, spot in keep],
        "mount -o remount,bind,ro / || exit 90",
        *[f"mount -t tmpfs tmpfs {mount} || exit 91" for mount in mounts],
        *[f"mkdir -p {path} && mount --bind {spot} {path} && mount -o remount,bind,ro {path} || exit 95"
          for path, spot in keep],
        "if touch /.caravan-probe 2>/dev/null; then exit 92; fi",
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={folder / 'ray_token'}",
        "unset RAY_AUTH_TOKEN",
        "cd /",
        f"timeout 120 {Path(sys.executable).parent / 'ray'} start --head --port {free_port()} "
        f"--dashboard-port {free_port()} --num-cpus 2 --disable-usage-stats || exit 93",
        f"timeout 300 {sys.executable} -m cluster.cli serve {folder / 'cluster.yaml'} --address auto "
        "--once 'What is the capital of France?'",
        "status=$?",
        f"{Path(sys.executable).parent / 'ray'} stop --force > /dev/null 2>&1",
        "exit $status",
    ])
    with open(log, "w") as out:
        result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], stdout=out,
                                stderr=subprocess.STDOUT, cwd="/", timeout=540,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    text = log.read_text()
    assert result.returncode == 0, f"exit {result.returncode}; the run's output ends:\n{text[-4000:]}"
    assert "Paris" in text and "Read-only file system" not in text, text[-4000:]
    shutil.rmtree(folder, ignore_errors=True)
