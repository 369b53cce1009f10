"""The harness itself, without a cluster: the fixture's binaries are checked before they run, and a
control plane that fails to start leaves no process behind."""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import psutil
import pytest

from tests.k8s.control_plane import BINARIES, ControlPlane, ControlPlaneError, unpack_binaries


def fake_fixture(folder: Path, scripts: dict[str, str], lie_about: str = "") -> Path:
    """A fixture folder like ../shared/fixtures/k8s-control-plane: xz'd executables and their SHA256SUMS."""
    folder.mkdir()
    sums = []
    for name in BINARIES:
        packed = lzma.compress(scripts.get(name, "#!/bin/sh\nexit 0\n").encode())
        (folder / f"{name}.xz").write_bytes(packed)
        digest = hashlib.sha256(packed + (b"x" if name == lie_about else b"")).hexdigest()
        sums.append(f"{digest}  {name}.xz")
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return folder


def test_unpacks_once(tmp_path: Path) -> None:
    fixture = fake_fixture(tmp_path / "fixture", {"kuberay-operator": "#!/bin/sh\necho operator\n"})
    paths = unpack_binaries(fixture, tmp_path / "cache")
    assert paths["kuberay-operator"].read_text() == "#!/bin/sh\necho operator\n"
    assert all(p.stat().st_mode & 0o111 for p in paths.values())
    mtimes = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    again = unpack_binaries(fixture, tmp_path / "cache")
    assert {name: p.stat().st_mtime_ns for name, p in again.items()} == mtimes


def test_refuses_a_binary_that_is_not_the_fixtures(tmp_path: Path) -> None:
    fixture = fake_fixture(tmp_path / "fixture", {}, lie_about="kube-apiserver")
    with pytest.raises(ControlPlaneError, match=r"kube-apiserver.xz has SHA-256 \w+, not \w+ as SHA256SUMS says"):
        unpack_binaries(fixture, tmp_path / "cache")


@pytest.mark.slow
def test_failed_start_leaves_no_process(tmp_path: Path) -> None:
    """etcd is up when the API server dies at once: start fails with the server's output, and etcd is gone."""
    fixture = fake_fixture(tmp_path / "fixture", {"kube-apiserver": "#!/bin/sh\necho no etcd for me\nexit 3\n"})
    work = tmp_path / "work"
    work.mkdir()
    plane = ControlPlane(work, fixture, tmp_path / "cache")
    with pytest.raises(ControlPlaneError, match=r"(?s)kube-apiserver exited with 3.*no etcd for me"):
        plane.start()
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    assert left == []
