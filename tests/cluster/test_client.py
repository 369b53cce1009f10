"""`caravan chat`, `complete`, `status` and `scale` against an in-process fake router: what they send,
what they print, and how they fail (one line, the right exit code, no traceback)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from concurrent import futures

import grpc
import pytest

from caravan.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from cluster.cli import main
from tests.cluster.routerfixture import self_signed_cert

ANSWER = ["Hel", "lo, ", "world", "!"]


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """Streams ANSWER in chunks, one token each, with finish reason and usage on the last; records
    each request and its metadata. `fail` makes the next calls abort with (code, details)."""

    def __init__(self) -> None:
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.slow = False
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if self.fail:
            context.abort(*self.fail)
        context.add_callback(self.cancelled.set)
        if self.slow:
            while context.is_active():
                yield inference_pb2.GenerateResponse(text="x", token_ids=[7])
                time.sleep(0.01)
            return
        for i, chunk in enumerate(ANSWER):
            last = i == len(ANSWER) - 1
            yield inference_pb2.GenerateResponse(
                text=chunk, token_ids=[100 + i], request_id="req-1" if i == 0 else "",
                logprobs=[inference_pb2.TokenLogprob(token_id=100 + i, logprob=-0.5 * i)] if request.logprobs else [],
                finish_reason=inference_pb2.FINISH_REASON_STOP if last else inference_pb2.FINISH_REASON_UNSPECIFIED,
                usage=inference_pb2.Usage(prompt_tokens=5, completion_tokens=4, time_to_first_token_s=0.01,
                                          total_time_s=0.02) if last else None)


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []
        self.fail: tuple[grpc.StatusCode, str] | None = None
        self.scaled_to: int | None = None
        self.drained_with: float | None = None

    def Status(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if self.fail:
            context.abort(*self.fail)
        shards = [admin_pb2.ShardStatus(rank=r, stage=r // 2, tp_rank=r % 2, node_id=f"n{r}", node_ip=f"10.0.0.{r}",
                                        healthy=r != 3) for r in range(4)]
        return admin_pb2.StatusResponse(
            serving=True, in_flight=3, max_in_flight=64, replicas_target=2,
            replicas=[admin_pb2.ReplicaStatus(name="replica-0", state=admin_pb2.REPLICA_STATE_SERVING, shards=shards,
                                              kv_blocks_total=128, kv_blocks_free=120, running=2, waiting=1,
                                              steps=4512, last_progress_age_s=0.25),
                      admin_pb2.ReplicaStatus(name="replica-1", state=admin_pb2.REPLICA_STATE_NOT_SERVING,
                                              kv_blocks_total=128, last_progress_age_s=42.0,
                                              error="stage 1 tp 1 died")])

    def Drain(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        self.drained_with = request.grace_period_s
        return admin_pb2.DrainResponse(in_flight=3)

    def Scale(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if request.replicas < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"replicas: got {request.replicas}; want >= 1")
        self.scaled_to = request.replicas
        return admin_pb2.ScaleResponse(replicas_before=2, replicas_target=request.replicas)


@pytest.fixture(scope="module")
def server():
    inference, admin = FakeInference(), FakeAdmin()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, srv)
    admin_pb2_grpc.add_AdminServicer_to_server(admin, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", inference, admin
    srv.stop(grace=None)


@pytest.fixture
def router(server, monkeypatch, tmp_path):
    """The fake router's address, reset between tests, with no token coming from the real HOME or env."""
    address, inference, admin = server
    inference.__init__()
    admin.__init__()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CARAVAN_AUTH_TOKEN", raising=False)
    return address, inference, admin


def caravan(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"caravan {command}: error: "), lines[0]
    return lines[0]


# --- complete -------------------------------------------------------------------------------------------


def test_complete_streams_the_answer_and_leaves_unset_fields_unset(router, monkeypatch, capsys):
    address, inference, _ = router
    code, out, err = caravan(monkeypatch, capsys, "complete", "Say hello", "--server", address)
    assert (code, out) == (0, "Hello, world!\n")
    assert err.startswith("[4 tokens, stop, first token ") and err.rstrip().endswith("tokens/s]"), err
    (req,) = inference.requests
    assert req.WhichOneof("input") == "prompt" and req.prompt == "Say hello"
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0
    assert not req.HasField("max_tokens")
    assert not req.sampling.HasField("top_p") and not req.sampling.HasField("seed")
    assert req.sampling.top_k == 0 and list(req.stop) == [] and not req.logprobs
    assert "authorization" not in inference.metadata[0]


def test_complete_sends_every_option_given(router, monkeypatch, capsys):
    address, inference, _ = router
    code, _, _ = caravan(monkeypatch, capsys, "complete", "Hi", "--chat", "--server", address, "--max-tokens", "9",
                         "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3",
                         "--stop", "\n\n", "--stop", "END")
    assert code == 0
    (req,) = inference.requests
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "Hi")]
    assert req.max_tokens == 9 and req.sampling.top_k == 40 and req.sampling.seed == 3
    assert req.sampling.temperature == pytest.approx(0.7) and req.sampling.top_p == pytest.approx(0.9)
    assert list(req.stop) == ["\n\n", "END"]


def test_complete_json_prints_one_object(router, monkeypatch, capsys):
    address, inference, _ = router
    code, out, err = caravan(monkeypatch, capsys, "complete", "Hi", "--json", "--logprobs", "--server", address)
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result == {"request_id": "req-1", "text": "Hello, world!", "token_ids": [100, 101, 102, 103],
                      "finish_reason": "stop", "logprobs": [0.0, -0.5, -1.0, -1.5],
                      "usage": {"prompt_tokens": 5, "completion_tokens": 4, "time_to_first_token_s": 0.01,
                                "total_time_s": 0.02}}
    assert inference.requests[0].logprobs


def test_logprobs_without_json_is_a_usage_error(router, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        caravan(monkeypatch, capsys, "complete", "Hi", "--logprobs", "--server", router[0])
    assert exit_.value.code == 2
    assert "--logprobs needs --json" in capsys.readouterr().err


@pytest.mark.parametrize("code,details,exit_code", [
    (grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: got 1.5; want a value in (0, 1]", 2),
    (grpc.StatusCode.OUT_OF_RANGE, "max_tokens: prompt (5) + max_tokens (9000) exceed the context (8192)", 2),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (64 in flight); retry later", 1),
    (grpc.StatusCode.UNAVAILABLE, "the router is draining", 1),
])
def test_rpc_errors_are_one_line_with_the_code(router, monkeypatch, capsys, code, details, exit_code):
    address, inference, _ = router
    inference.fail = (code, details)
    rc, out, err = caravan(monkeypatch, capsys, "complete", "Hi", "--server", address)
    assert rc == exit_code and out == ""
    assert one_error_line(err, "complete") == f"caravan complete: error: {code.name}: {details}"


def test_ctrl_c_cancels_the_stream_and_exits_130(router, monkeypatch, capsys):
    address, inference, _ = router
    inference.slow = True

    class Interrupting(io.StringIO):
        def write(self, text: str) -> int:
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdout", Interrupting())
    assert main(["complete", "Hi", "--server", address]) == 130
    assert inference.cancelled.wait(5), "the server never saw the call end"
    assert "Traceback" not in capsys.readouterr().err


def test_stream_deadline_comes_from_timeout(router, monkeypatch, capsys):
    address, inference, _ = router
    inference.slow = True
    code, _, err = caravan(monkeypatch, capsys, "complete", "Hi", "--server", address, "--timeout", "0.2")
    assert code == 1
    assert one_error_line(err, "complete").startswith("caravan complete: error: DEADLINE_EXCEEDED: ")


# --- chat -----------------------------------------------------------------------------------------------


def test_chat_sends_the_growing_history_each_turn(router, monkeypatch, capsys):
    address, inference, _ = router
    code, out, err = caravan(monkeypatch, capsys, "chat", "--server", address, "--system", "Be brief.",
                             stdin="Hi\n\nHow are you?\n/reset\nAgain\n/exit\nnever sent\n")
    assert code == 0
    assert out == "Hello, world!\n" * 3
    assert err.count("[4 tokens, stop, first token") == 3 and "[conversation reset]" in err
    turns = [[(m.role, m.content) for m in r.chat.messages] for r in inference.requests]
    assert turns == [
        [("system", "Be brief."), ("user", "Hi")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello, world!"), ("user", "How are you?")],
        [("system", "Be brief."), ("user", "Again")],
    ]
    assert all(r.sampling.temperature == 0 and not r.HasField("max_tokens") for r in inference.requests)


def test_chat_ends_at_end_of_input_without_a_system_message(router, monkeypatch, capsys):
    address, inference, _ = router
    code, out, _ = caravan(monkeypatch, capsys, "chat", "--server", address, "--max-tokens", "4", stdin="Hi")
    assert (code, out) == (0, "Hello, world!\n")
    assert [(m.role, m.content) for m in inference.requests[0].chat.messages] == [("user", "Hi")]
    assert inference.requests[0].max_tokens == 4


def test_chat_stops_at_the_first_error(router, monkeypatch, capsys):
    address, inference, _ = router
    inference.fail = (grpc.StatusCode.OUT_OF_RANGE, "chat: the conversation (8200 tokens) exceeds the context")
    code, out, err = caravan(monkeypatch, capsys, "chat", "--server", address, stdin="Hi\nAgain\n")
    assert code == 2 and out == "" and len(inference.requests) == 1
    assert "OUT_OF_RANGE: chat: the conversation" in one_error_line(err, "chat")


# --- auth -----------------------------------------------------------------------------------------------


def test_token_file_then_env_then_home(router, monkeypatch, capsys, tmp_path):
    address, _, admin = router
    (tmp_path / ".caravan").mkdir()
    (tmp_path / ".caravan" / "auth_token").write_text("from-home\n")
    assert caravan(monkeypatch, capsys, "status", "--server", address)[0] == 0
    monkeypatch.setenv("CARAVAN_AUTH_TOKEN", "from-env")
    assert caravan(monkeypatch, capsys, "status", "--server", address)[0] == 0
    (tmp_path / "token").write_text("  from-file\n")
    assert caravan(monkeypatch, capsys, "status", "--server", address, "--token-file", str(tmp_path / "token"))[0] == 0
    assert [m["authorization"] for m in admin.metadata] == ["Bearer from-home", "Bearer from-env", "Bearer from-file"]


def test_unauthenticated_exits_2(router, monkeypatch, capsys):
    address, _, admin = router
    admin.fail = (grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required; see ~/.caravan/auth_token")
    code, out, err = caravan(monkeypatch, capsys, "status", "--server", address)
    assert code == 2 and out == ""
    assert one_error_line(err, "status") == ("caravan status: error: UNAUTHENTICATED: a bearer token is required; "
                                             "see ~/.caravan/auth_token")


def test_missing_token_file_is_a_user_error(router, monkeypatch, capsys, tmp_path):
    code, _, err = caravan(monkeypatch, capsys, "status", "--server", router[0], "--token-file",
                           str(tmp_path / "nope"))
    assert code == 2
    assert "--token-file" in one_error_line(err, "status") and "No such file" in err


# --- status and scale -----------------------------------------------------------------------------------


def test_status_table(router, monkeypatch, capsys):
    code, out, _ = caravan(monkeypatch, capsys, "status", "--server", router[0])
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "router: serving, 3 / 64 requests in flight, 2 of 2 replicas reporting"
    assert lines[2].split() == ["REPLICA", "STATE", "KV", "FREE/TOTAL", "RUNNING", "WAITING", "STEPS", "LAST",
                                "PROGRESS", "ERROR"]
    assert lines[3].split() == ["replica-0", "serving", "120/128", "2", "1", "4512", "0.2", "s", "ago", "-"]
    assert lines[4].split() == ["RANK", "STAGE", "TP", "RANK", "NODE", "IP", "NODE", "HEALTHY"]
    assert lines[5].split() == ["0", "0", "0", "10.0.0.0", "n0", "yes"] and lines[5].startswith("    ")
    assert lines[8].split() == ["3", "1", "1", "10.0.0.3", "n3", "NO"]
    assert "replica-1  not serving" in out and "42.0 s ago" in out and "stage 1 tp 1 died" in out


def test_status_says_why_replicas_are_missing():
    from cluster.cli.client import format_status
    resp = admin_pb2.StatusResponse(serving=True, max_in_flight=8, replicas_target=2, pending=(
        "cannot be placed now: 1 replica(s) of TP1xPP2 need 2 stages of 1 GPUs each, every stage on one node; what is "
        "free holds 0 [10.0.0.1 (n1): 0 GPU]; Serve places them when nodes come back or are added"))
    lines = format_status(resp).splitlines()
    assert lines[0] == "router: serving, 0 / 8 requests in flight, 0 of 2 replicas reporting"
    assert lines[1].startswith("pending: cannot be placed now: 1 replica(s) of TP1xPP2 need 2 stages")
    assert "pending" not in format_status(admin_pb2.StatusResponse(replicas_target=1))


def test_status_json(router, monkeypatch, capsys):
    code, out, _ = caravan(monkeypatch, capsys, "status", "--server", router[0], "--json")
    assert code == 0
    status = json.loads(out)
    assert status["serving"] is True and status["draining"] is False and status["in_flight"] == 3
    assert status["replicas"][0]["shards"][3] == {"rank": 3, "stage": 1, "tp_rank": 1, "node_id": "n3",
                                                  "node_ip": "10.0.0.3", "healthy": False}
    assert status["replicas"][1]["state"] == "REPLICA_STATE_NOT_SERVING"


def test_scale(router, monkeypatch, capsys):
    address, _, admin = router
    assert caravan(monkeypatch, capsys, "scale", "4", "--server", address)[:2] == (0, "replicas: 2 -> 4\n")
    assert admin.scaled_to == 4
    code, out, err = caravan(monkeypatch, capsys, "scale", "0", "--server", address)
    assert code == 2 and out == ""
    assert one_error_line(err, "scale") == "caravan scale: error: INVALID_ARGUMENT: replicas: got 0; want >= 1"


def test_drain(router, monkeypatch, capsys):
    address, _, admin = router
    code, out, _ = caravan(monkeypatch, capsys, "drain", "--grace", "7.5", "--server", address)
    assert (code, admin.drained_with) == (0, 7.5)
    assert out == "draining: 3 request(s) in flight; the router exits when they finish\n"


# --- connection -----------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args", [["status"], ["scale", "2"], ["drain"], ["complete", "Hi"], ["chat"]])
def test_unreachable_router(router, monkeypatch, capsys, args):
    address = f"127.0.0.1:{closed_port()}"
    code, out, err = caravan(monkeypatch, capsys, *args, "--server", address, stdin="Hi\n")
    assert code == 1 and out == ""
    assert one_error_line(err, args[0]) == (f"caravan {args[0]}: error: no Caravan router answers at {address}; "
                                            "start one with `caravan serve`")


@pytest.fixture(scope="module")
def tls_router(tmp_path_factory):
    """The fake Admin behind TLS, with a self-signed certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = self_signed_cert(folder)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(), srv)
    port = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    srv.start()
    yield f"127.0.0.1:{port}", cert
    srv.stop(grace=None)


def test_tls(tls_router, monkeypatch, capsys, tmp_path):
    address, cert = tls_router
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = caravan(monkeypatch, capsys, "status", "--server", address, "--tls-ca", str(cert))
    assert code == 0 and out.startswith("router: serving"), err
    code, _, err = caravan(monkeypatch, capsys, "status", "--server", address, "--tls-ca", str(tmp_path / "nope"))
    assert code == 2 and "--tls-ca" in one_error_line(err, "status")


# --- the token in transit ---------------------------------------------------------------------------------


def test_a_token_is_not_sent_in_clear_text_off_this_machine(router, monkeypatch, capsys, tmp_path):
    """Loopback, TLS or an explicit --plaintext: otherwise the CLI refuses before any call."""
    address, inference, _ = router
    (tmp_path / "token").write_text("secret")
    remote = "10.255.255.1:50051"   # a router elsewhere, which the call must never reach
    code, _, err = caravan(monkeypatch, capsys, "status", "--server", remote, "--token-file", str(tmp_path / "token"))
    assert code == 2 and "refusing to send the bearer token in clear text to 10.255.255.1:50051" in \
        one_error_line(err, "status")
    code, _, err = caravan(monkeypatch, capsys, "complete", "Hi", "--server", address,
                           "--token-file", str(tmp_path / "token"))
    assert code == 0 and inference.requests  # loopback: the token goes
    code, _, err = caravan(monkeypatch, capsys, "status", "--server", remote, "--token-file", str(tmp_path / "token"),
                           "--plaintext", "--timeout", "0.5")
    assert code == 1 and "refusing" not in err  # tried, and found nothing there
