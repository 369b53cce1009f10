"""TLS end to end, as the chart runs it: `caravan serve` with router.tls_cert_file and router.tls_key_file
(a self-signed certificate for 127.0.0.1), both doors over TLS: a Generate over gRPC with TLS, the CLI with
`--tls-ca` (inference with the inference token, status with the admin token), the chart's liveness probe
over HTTPS, and nothing answered in clear text."""

from __future__ import annotations

import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from caravan.v1 import inference_pb2 as pb
from tests.cluster.routerfixture import caravan_serve, self_signed_cert

pytestmark = pytest.mark.slow

TOKEN = "test-token-tls"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls-serve")
    key, cert = self_signed_cert(folder)
    with caravan_serve(folder, "", TOKEN, tls=(key, cert), metrics_port=None) as clients:
        clients.folder, clients.cert = folder, cert
        yield clients


def caravan(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--server", server.target,
                           "--tls-ca", str(server.cert)], capture_output=True, text=True, timeout=120)


def test_generate_over_tls(server):
    request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="What is the capital "
                                                                                           "of France?")]),
                                 max_tokens=8, sampling=pb.SamplingParams(temperature=0))
    tokens = [t for r in server.inference.Generate(request, metadata=server.auth, timeout=120) for t in r.token_ids]
    assert len(tokens) == 8


def test_cli_with_tls_ca(server):
    answer = caravan(server, "complete", "--chat", "--max-tokens", "8", "--token-file", str(server.folder / "token"),
                     "What is the capital of France?")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    status = caravan(server, "status", "--token-file", str(server.folder / "admin_token"))
    assert status.returncode == 0 and "replica" in status.stdout, status.stderr
    # The inference token opens no Admin RPC, over TLS either.
    refused = caravan(server, "status", "--token-file", str(server.folder / "token"))
    assert refused.returncode != 0 and "PERMISSION_DENIED" in refused.stderr + refused.stdout


def test_https_liveness_probe(server):
    """What the chart's liveness probe asks over TLS (the kubelet skips verification; this client verifies)."""
    context = ssl.create_default_context(cafile=str(server.cert))
    live = urllib.request.urlopen(server.http + "/health?service=caravan.router", timeout=10, context=context)
    assert live.status == 200 and server.http.startswith("https://")


def test_nothing_in_clear_text(server):
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(server.http.replace("https://", "http://") + "/health", timeout=10)
