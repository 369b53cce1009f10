"""`caravan serve` as a user runs it: bad configs fail at start with one line naming the fix, and
the demo answers a chat prompt through a local two-node Ray cluster."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def serve(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


@pytest.mark.parametrize("yaml_text,message", [
    ("layout:\n  tp: 3\n  ppp: 2\n", "layout.ppp: unknown key; did you mean layout.pp?"),
    ("replicas: 0\n", "replicas: got 0"),
    ("model:\n  path: does-not-exist\n", "does not exist; point it at a Hugging Face checkpoint folder"),
    ("layout:\n  tp: 2\n", "TP=2 does not divide the 9 attention heads"),
])
def test_bad_config_fails_at_start_with_one_line(tmp_path, yaml_text, message, smollm2_dir):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text)
    result = serve(str(path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_layout_larger_than_the_cluster_names_what_is_missing(tmp_path, smollm2_dir):
    path = tmp_path / "cluster.yaml"
    path.write_text("layout: {tp: 3, pp: 2}\nlocal_cluster: {nodes: 2, gpus_per_node: 2}\n")
    result = serve(str(path))
    assert result.returncode == 2, result.stderr
    assert "need 2 stages of 3 GPUs each, every stage on one node; this cluster holds 0" in result.stderr
    assert "ray status" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_demo_answers_a_chat_prompt_through_the_cluster(tmp_path, smollm2_dir):
    path = tmp_path / "cluster.yaml"
    path.write_text("layout: {tp: 1, pp: 2}\nrouter: {port: 0, http_port: 0, metrics_port: 0}\n")
    # Ray's usual dashboard port taken (another local cluster, say): the local cluster's dashboard takes another.
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", 8265))
            holder.listen()
        except OSError:
            pass  # something else holds it already: the same case
        result = serve(str(path), "--once", "What is the capital of France?", "--max-tokens", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    dashboard = re.search(r"dashboard [\w.]+:(\d+)", result.stderr)
    assert dashboard and dashboard[1] != "8265", result.stderr[-2000:]
    assert "Paris" in result.stdout
    assert "stage" in result.stderr and "serving smollm2-135m-instruct as 1 replica(s) of TP 1 x PP 2" in result.stderr
    assert "router: caravan.v1 on 127.0.0.1:" in result.stderr
    assert re.search(r"\[\d+ tokens, (stop|length), first token [\d.]+ s, [\d.]+ tokens/s\]", result.stderr)
