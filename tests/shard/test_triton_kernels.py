"""The Triton kernels against the PyTorch path, through Triton's interpreter on the CPU: the checks
are `triton_checks.py`, run here in one child process because the interpreter is chosen when
triton is imported, and this process may have imported it already. Without triton they are
skipped on a developer's machine and fail in CI (`CI` set), where `.[test]` installs it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from shard import kernels
from tests.conftest import REPO_ROOT

CHECKS = REPO_ROOT / "tests" / "shard" / "triton_checks.py"


def test_every_kernel_matches_the_torch_path_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed; `pip install triton numpy` (CI's `.[test]` extra installs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(reason)
        pytest.skip(reason)
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def test_use_triton_takes_only_known_kernels_and_never_cpu_tensors():
    before = kernels.use_triton(["silu_mul"])
    try:
        assert kernels.triton_ops() == {"silu_mul"}
        with pytest.raises(ValueError, match="unknown Triton kernel.*fused_mlp.*choose from decode_attention"):
            kernels.use_triton(["fused_mlp"])
        assert kernels.triton_ops() == {"silu_mul"}
        assert kernels.triton_for(torch.ones(2), "silu_mul") is None
    finally:
        kernels.use_triton(before)
    assert kernels.triton_ops() == kernels.DEFAULT_TRITON_OPS
