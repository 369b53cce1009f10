"""One control plane for the whole session (tests/k8s/control_plane.py), stopped at its end, and the
harness's wall time in the summary. A missing etcd, helm, kubectl or fixture binary fails the tests,
naming the fix: skipped on CI, they would prove nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.k8s.control_plane import ControlPlane, ControlPlaneError

_timings: dict[str, float] = {}


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    t0 = time.monotonic()
    error = None
    try:
        plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
        plane.start()
    except ControlPlaneError as e:
        error = str(e)
    if error:
        pytest.fail(f"the Kubernetes control plane of tests/k8s did not start: {error}", pytrace=False)
    _timings.update(plane.timings, start=time.monotonic() - t0)
    try:
        yield plane
    finally:
        plane.stop()
        _timings["wall"] = time.monotonic() - t0


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "wall" in _timings:
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in _timings.items()
                          if step not in ("start", "wall"))
        terminalreporter.write_line(f"tests/k8s: {_timings['wall']:.1f} s wall time, control plane and tests "
                                    f"(its start {_timings['start']:.1f} s: {steps})")
