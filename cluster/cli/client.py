"""The command-line clients of a running router: chat, complete, status and scale over gRPC.

Each command is a function of a `Router` (a channel and what every call carries) that writes to
the streams it is given, so tests drive it against an in-process server. `run` turns what can go
wrong (an RPC error, a missing token or CA file) into one line on stderr and an exit code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from caravan.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from cluster.cli.args import UNARY_TIMEOUT_S
from cluster.tokens import admin_token_file

# The caller is at fault: retrying the same call cannot help. Everything else exits 1.
CLIENT_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION,
                           grpc.StatusCode.PERMISSION_DENIED})
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}


class ClientError(Exception):
    """A local problem found before any call (a token or CA file that cannot be read)."""


def find_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token to send: --token-file, else $CARAVAN_AUTH_TOKEN, else ~/.caravan/auth_token."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ClientError(f"--token-file {token_file}: {e.strerror}") from None
        if not token:
            raise ClientError(f"--token-file {token_file} is empty; it should hold the router's bearer token")
        return token
    if environ.get("CARAVAN_AUTH_TOKEN", "").strip():
        return environ["CARAVAN_AUTH_TOKEN"].strip()
    default = admin_token_file()
    if not default.is_file():
        return None
    return default.read_text().strip() or None


def check_token_transport(server: str, token: str | None, tls_ca: Path | None, plaintext: bool) -> None:
    """A bearer token crosses the network in clear text over a plaintext channel: only to this machine,
    or when the caller says the network is trusted (`--plaintext`)."""
    if token is None or tls_ca is not None or plaintext or is_loopback(server):
        return
    raise ClientError(f"refusing to send the bearer token in clear text to {server}: pass --tls-ca with the CA "
                      "of the router's certificate, or --plaintext if the network between is trusted")


def is_loopback(server: str) -> bool:
    if server.startswith("["):
        host = server[1:server.find("]")]
    elif server.count(":") == 1:
        host = server.split(":")[0]
    else:
        host = server  # a bare IPv6 address, or a host without a port
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_channel(server: str, tls_ca: Path | None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(server)
    try:
        ca = tls_ca.read_bytes()
    except OSError as e:
        raise ClientError(f"--tls-ca {tls_ca}: {e.strerror}") from None
    return grpc.secure_channel(server, grpc.ssl_channel_credentials(root_certificates=ca))


@dataclass(frozen=True)
class Router:
    """One router's channel, and the metadata and deadlines its calls carry."""
    channel: grpc.Channel
    token: str | None = None
    unary_timeout: float = UNARY_TIMEOUT_S
    stream_timeout: float | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel)


def run(command: str, server: str, body: Callable[[Router], int], *, token_file: Path | None = None,
        tls_ca: Path | None = None, timeout: float | None = None, plaintext: bool = False, err: TextIO) -> int:
    """Connect to `server`, run `body`, and turn failures into one line on `err` and an exit code:
    2 for the caller's faults, 1 for the rest. Ctrl-C propagates (the caller exits 130)."""
    try:
        token = find_token(token_file)
        check_token_transport(server, token, tls_ca, plaintext)
        channel = open_channel(server, tls_ca)
    except ClientError as e:
        print(f"caravan {command}: error: {e}", file=err)
        return 2
    with channel:
        router = Router(channel, token, unary_timeout=timeout or UNARY_TIMEOUT_S, stream_timeout=timeout)
        try:
            return body(router)
        except grpc.RpcError as e:
            code = e.code()
            if code is grpc.StatusCode.UNAVAILABLE and not _connected(channel):
                hint = f" that trusts --tls-ca {tls_ca}" if tls_ca else ""
                print(f"caravan {command}: error: no Caravan router answers at {server}{hint}; "
                      "start one with `caravan serve`", file=err)
                return 1
            details = " ".join((e.details() or "").split())
            print(f"caravan {command}: error: {code.name}: {details}", file=err)
            return 2 if code in CLIENT_FAULTS else 1


def _connected(channel: grpc.Channel) -> bool:
    """Whether the channel holds a live connection now. A router that answered UNAVAILABLE itself
    (draining, no replica) is connected; one that is not there leaves the channel in failure."""
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    report = states.put
    channel.subscribe(report, try_to_connect=False)
    try:
        return states.get(timeout=1.0) is grpc.ChannelConnectivity.READY
    except queue.Empty:
        return False
    finally:
        channel.unsubscribe(report)


# --- generation ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What a Generate request asks for besides its input; None leaves a field to the server."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def request(self, *, prompt: str | None = None,
                messages: list[tuple[str, str]] | None = None) -> inference_pb2.GenerateRequest:
        assert (prompt is None) != (messages is None), "exactly one input"
        req = inference_pb2.GenerateRequest(stop=self.stop, logprobs=self.logprobs)
        if prompt is not None:
            req.prompt = prompt
        else:
            req.chat.messages.extend(inference_pb2.ChatMessage(role=r, content=c) for r, c in messages)
        if self.max_tokens is not None:
            req.max_tokens = self.max_tokens
        sampling = req.sampling
        if self.temperature is not None:
            sampling.temperature = self.temperature
        if self.top_p is not None:
            sampling.top_p = self.top_p
        if self.top_k is not None:
            sampling.top_k = self.top_k
        if self.seed is not None:
            sampling.seed = self.seed
        return req


@dataclass
class Completion:
    """One Generate stream, gathered; times are measured here, from sending the request."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: inference_pb2.Usage | None = None
    request_id: str = ""
    first_token_s: float | None = None
    total_s: float = 0.0

    def summary(self) -> str:
        """The stderr line after a stream, like `caravan generate`'s."""
        rate = len(self.token_ids) / self.total_s if self.total_s > 0 else 0.0
        first = f"{self.first_token_s:.2f} s" if self.first_token_s is not None else "none"
        return (f"[{len(self.token_ids)} tokens, {self.finish_reason or 'unfinished'}, first token {first}, "
                f"{rate:.1f} tokens/s]")

    def to_json(self, with_logprobs: bool) -> dict:
        usage = self.usage or inference_pb2.Usage()
        out = {"request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
               "finish_reason": self.finish_reason,
               "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                         "time_to_first_token_s": usage.time_to_first_token_s,
                         "total_time_s": usage.total_time_s}}
        if with_logprobs:
            out["logprobs"] = self.logprobs
        return out


def generate(router: Router, request: inference_pb2.GenerateRequest, out: TextIO | None) -> Completion:
    """Run one Generate call, writing its text to `out` as it arrives (None: gather only).
    Ctrl-C cancels the call, which makes the router abort the sequence, then propagates."""
    start = time.perf_counter()
    call: Iterator[inference_pb2.GenerateResponse] = router.inference.Generate(
        request, metadata=router.metadata, timeout=router.stream_timeout)
    done = Completion()
    try:
        for resp in call:
            if resp.token_ids and done.first_token_s is None:
                done.first_token_s = time.perf_counter() - start
            done.request_id = done.request_id or resp.request_id
            done.text += resp.text
            done.token_ids.extend(resp.token_ids)
            done.logprobs.extend(lp.logprob for lp in resp.logprobs)
            if resp.finish_reason:
                done.finish_reason = FINISH_REASONS.get(resp.finish_reason, str(resp.finish_reason))
            if resp.HasField("usage"):
                done.usage = resp.usage
            if out is not None and resp.text:
                out.write(resp.text)
                out.flush()
    except KeyboardInterrupt:
        call.cancel()
        raise
    done.total_s = time.perf_counter() - start
    return done


def complete(router: Router, prompt: str, options: Options, *, as_chat: bool, as_json: bool,
             out: TextIO, err: TextIO) -> int:
    """`caravan complete`: one prompt, streamed to `out` (or one JSON object at the end)."""
    request = options.request(messages=[("user", prompt)]) if as_chat else options.request(prompt=prompt)
    done = generate(router, request, None if as_json else out)
    if as_json:
        print(json.dumps(done.to_json(options.logprobs)), file=out)
    else:
        print(file=out)
        print(done.summary(), file=err)
    return 0


def chat(router: Router, options: Options, *, system: str | None, stdin: TextIO, out: TextIO,
         err: TextIO) -> int:
    """`caravan chat`: one user turn per input line; the whole conversation goes with each turn.
    `/reset` forgets it (the system message stays), `/exit` or end of input ends."""
    interactive = stdin.isatty()
    base = [("system", system)] if system else []
    history = list(base)
    if interactive:
        print("/reset forgets the conversation, /exit or Ctrl-D ends it", file=err)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            if interactive:
                print(file=out)
            return 0
        turn = line.rstrip("\r\n")
        if turn.strip() == "/exit":
            return 0
        if turn.strip() == "/reset":
            history = list(base)
            print("[conversation reset]", file=err)
            continue
        if not turn.strip():
            continue
        history.append(("user", turn))
        done = generate(router, options.request(messages=history), out)
        print(file=out)
        print(done.summary(), file=err)
        history.append(("assistant", done.text))


# --- admin -------------------------------------------------------------------------------------------


def status(router: Router, *, as_json: bool, out: TextIO) -> int:
    """`caravan status`: the router, its replicas and their shards."""
    resp = router.admin.Status(admin_pb2.StatusRequest(), metadata=router.metadata, timeout=router.unary_timeout)
    if as_json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2), file=out)
    else:
        print(format_status(resp), file=out)
    return 0


def format_status(resp: admin_pb2.StatusResponse) -> str:
    state = "draining" if resp.draining else "serving" if resp.serving else "not serving"
    lines = [f"router: {state}, {resp.in_flight} / {resp.max_in_flight} requests in flight, "
             f"{len(resp.replicas)} of {resp.replicas_target} replicas reporting"]
    if resp.pending:
        lines.append(f"pending: {resp.pending}")
    for r in resp.replicas:
        replica_state = {admin_pb2.REPLICA_STATE_SERVING: "serving",
                         admin_pb2.REPLICA_STATE_NOT_SERVING: "not serving"}.get(r.state, "unknown")
        lines.append("")
        lines += _table(["REPLICA", "STATE", "KV FREE/TOTAL", "RUNNING", "WAITING", "STEPS", "LAST PROGRESS",
                         "ERROR"],
                        [[r.name, replica_state, f"{r.kv_blocks_free}/{r.kv_blocks_total}", r.running, r.waiting,
                          r.steps, f"{r.last_progress_age_s:.1f} s ago", r.error or "-"]])
        # The node id too: simulated nodes (and some pods) share one IP.
        lines += _table(["RANK", "STAGE", "TP RANK", "NODE IP", "NODE", "HEALTHY"],
                        [[s.rank, s.stage, s.tp_rank, s.node_ip or "-", s.node_id[:8] or "-",
                          "yes" if s.healthy else "NO"]
                         for s in r.shards], indent="    ")
        tokens = _share(r.prefix_cache_hit_tokens, r.prefix_cache_prompt_tokens)
        requests = _share(r.prefix_cache_hit_requests, r.prefix_cache_requests)
        lines.append(f"    prefix cache: {r.prefix_cache_blocks} blocks; hits: {tokens} prompt tokens, {requests} "
                     f"requests; {r.prefix_cache_evictions} evictions")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / whole:.0%})" if whole else "0/0"


def _table(header: list[str], rows: list[list[object]], indent: str = "") -> list[str]:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def scale(router: Router, replicas: int, *, out: TextIO) -> int:
    """`caravan scale N`: ask for N replicas; they show in `caravan status` as they come up."""
    resp = router.admin.Scale(admin_pb2.ScaleRequest(replicas=replicas), metadata=router.metadata,
                              timeout=router.unary_timeout)
    print(f"replicas: {resp.replicas_before} -> {resp.replicas_target}", file=out)
    return 0


def drain(router: Router, grace_s: float, *, out: TextIO) -> int:
    """`caravan drain`: the router stops admitting, lets in-flight requests finish, then exits."""
    resp = router.admin.Drain(admin_pb2.DrainRequest(grace_period_s=grace_s), metadata=router.metadata,
                              timeout=router.unary_timeout)
    print(f"draining: {resp.in_flight} request(s) in flight; the router exits when they finish", file=out)
    return 0
