"""Router overhead: the engine workload (32 concurrent requests, prompt 32, 128 new tokens, greedy, EOS
ignored, SmolLM2-135M fp32) through the gRPC router against the same engine called in-process.

One process holds the shard, the engine and the router; the gRPC clients run in a second process
(as real clients would, and so they do not share the router's interpreter). Rounds alternate
in-process and gRPC on the same engine, so machine noise hits both alike; the medians are compared.

    python bench/router.py              # 3 rounds of each; --rounds N

Prints throughput (tok/s) of each, the ratio gRPC / in-process (target >= 0.95), and the p50 time to
first token of each with the difference: what the router adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Workload, make_prompts  # noqa: E402

BLOCK = 16


def client(target: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """The gRPC side, run in its own process: every request at once, timed from the first send."""
    import grpc

    from caravan.v1 import inference_pb2 as pb
    from caravan.v1 import inference_pb2_grpc

    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            await channel.channel_ready()

            async def one(ids, start):
                first, n = None, 0
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), max_tokens=new_tokens, ignore_eos=True,
                                             sampling=pb.SamplingParams(temperature=0))
                async for r in stub.Generate(request):
                    if first is None and r.token_ids:
                        first = time.perf_counter() - start
                    n += len(r.token_ids)
                return n, first

            await one(prompts[0][:8], time.perf_counter())  # warm-up
            start = time.perf_counter()
            results = await asyncio.gather(*(one(p, start) for p in prompts))
            return {"tokens": sum(n for n, _ in results), "seconds": time.perf_counter() - start,
                    "ttft": [t for _, t in results]}
    return asyncio.run(run())


async def in_process(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    from shard.sampler import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def one(ids, start):
        first, n = None, 0
        async for _ in engine.generate(ids, params):
            if first is None:
                first = time.perf_counter() - start
            n += 1
        return n, first

    await one(prompts[0][:8], time.perf_counter())
    start = time.perf_counter()
    results = await asyncio.gather(*(one(p, start) for p in prompts))
    return {"tokens": sum(n for n, _ in results), "seconds": time.perf_counter() - start,
            "ttft": [t for _, t in results]}


async def bench(rounds: int) -> None:
    import torch

    from cluster.backends import LocalBackend
    from cluster.config import ServeConfig
    from cluster.engine import Engine, LocalExecutor
    from cluster.router import build_router
    from shard.demo import ensure_demo_model
    from shard.layout import Layout
    from shard.parallel import ParallelContext
    from shard.worker import ShardWorker

    w = Workload()
    torch.set_num_threads(w.threads)
    model_dir = ensure_demo_model()
    prompts = make_prompts(model_dir, w.requests, w.prompt_len)
    blocks = w.requests * -(-(w.prompt_len + w.new_tokens) // BLOCK) + 16
    worker = ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK, progress=False)
    engine = Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=blocks, block_size=BLOCK,
                    max_num_seqs=w.requests, max_tokens_per_step=512)
    config = ServeConfig.from_dict({"router": {"port": 0, "metrics_port": None}})
    token_file = Path(tempfile.mkdtemp()) / "auth_token"  # Admin is not used here; keep ~/.caravan untouched
    router = build_router(config, str(model_dir), LocalBackend(engine), default_token_file=token_file)
    await router.start()
    while not router.serving:
        await asyncio.sleep(0.05)
    target = f"127.0.0.1:{router.port}"
    print(f"workload: {w.requests} concurrent requests, prompt {w.prompt_len}, {w.new_tokens} new tokens, "
          f"{model_dir.name} fp32, {w.threads} threads; {rounds} rounds each, alternating")
    local, remote = [], []
    for r in range(rounds):
        local.append(await in_process(engine, prompts, w.new_tokens))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", target, stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        remote.append(json.loads(out))
        print(f"  round {r + 1}: in-process {_rate(local[-1]):6.1f} tok/s, gRPC {_rate(remote[-1]):6.1f} tok/s")
    await router.close()
    lr, rr = statistics.median(map(_rate, local)), statistics.median(map(_rate, remote))
    lt = statistics.median(t for x in local for t in x["ttft"])
    rt = statistics.median(t for x in remote for t in x["ttft"])
    print(f"throughput: in-process engine {lr:.1f} tok/s, through the gRPC router {rr:.1f} tok/s -> "
          f"gRPC / in-process = {rr / lr:.3f} (target >= 0.95)")
    print(f"p50 time to first token: in-process {1e3 * lt:.0f} ms, gRPC {1e3 * rt:.0f} ms -> router adds "
          f"{1e3 * (rt - lt):+.0f} ms")


def _rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        from shard.demo import ensure_demo_model
        w = Workload()
        print(json.dumps(client(args.client, make_prompts(ensure_demo_model(), w.requests, w.prompt_len),
                                w.new_tokens)))
        return
    asyncio.run(bench(args.rounds))


if __name__ == "__main__":
    main()
