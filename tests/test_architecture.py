"""The layering rules, checked rather than promised (contracts in pyproject.toml, run by import-linter):
shard/ is plain PyTorch and imports neither Ray nor the control plane, and cluster/ is in layers
(cli, doctor, deploy, api, runtime, engine, config), each importing only those below it. Also the
size rules that keep each file one sitting's read."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()"], cwd=root, capture_output=True, text=True)


def test_import_contracts_hold():
    run = lint_imports(REPO_ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 3 kept, 0 broken" in run.stdout, run.stdout


def test_an_import_up_the_layers_breaks_the_contract(tmp_path):
    """A scratch copy where the engine imports the API: the contract must name it."""
    for name in ("cluster", "shard", "pyproject.toml"):
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    (tmp_path / "proto").symlink_to(REPO_ROOT / "proto")
    scheduler = tmp_path / "cluster" / "engine" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\nfrom cluster.api import server  # reversed on purpose\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0, run.stdout
    assert "cluster/ in layers: each imports only the ones below it BROKEN" in run.stdout, run.stdout
    assert "cluster.engine.scheduler -> cluster.api.server" in run.stdout, run.stdout


def test_files_and_functions_of_cluster_stay_short():
    long = []
    for path in sorted((REPO_ROOT / "cluster").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(REPO_ROOT)
        if text.count("\n") > MAX_FILE_LINES:
            long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function: {long}"
