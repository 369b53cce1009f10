"""Shared test fixtures: the demo model (converted once per machine) and the Llama 3.1 tokenizer."""

from pathlib import Path

import pytest

from shard.demo import ensure_demo_model

REPO_ROOT = Path(__file__).resolve().parents[1]
# Outside the repo (../shared from its root) because the vocabulary is not ours to commit.
SHARED = REPO_ROOT.parent / "shared"
LLAMA31_TOKENIZER = SHARED / "fixtures" / "llama-3.1-tokenizer"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct in the default cache, so later test runs (and CI re-runs) reuse it."""
    return ensure_demo_model()
