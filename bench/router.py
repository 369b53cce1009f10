"""Router overhead: the engine workload (32 concurrent requests, prompt 32, 128 new tokens, greedy, EOS
ignored, SmolLM2-135M fp32) through the gRPC router against the same engine called in-process.

As in production, the shard computes in a Ray actor (TP 1 x PP 1, 2 torch threads) and the engine
drives it from another process: here the bench process, which also hosts the router. The gRPC
clients run in a third process, as real clients would. Rounds alternate in-process and gRPC on the
same engine, so machine noise hits both alike; the medians are compared. (With the shard in the
router's own process, torch and the event loop would contend for one interpreter lock, which no
deployment does.)

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


async def bench(rounds: int, replica, model_dir: str) -> None:
    from cluster.api.backend import LocalBackend
    from cluster.config import ServeConfig
    from cluster.api.server import build_router

    w = Workload()
    prompts = make_prompts(model_dir, w.requests, w.prompt_len)
    config = ServeConfig.from_dict({"router": {"port": 0, "http_port": 0, "metrics_port": None}})
    token_file = Path(tempfile.mkdtemp()) / "auth_token"  # Admin is not used here; keep ~/.caravan untouched
    router = build_router(config, model_dir, LocalBackend(replica.engine), default_token_file=token_file)
    await router.start()
    while not router.serving:
        await asyncio.sleep(0.05)
    target = f"127.0.0.1:{router.port}"
    print(f"workload: {w.requests} concurrent requests, prompt {w.prompt_len}, {w.new_tokens} new tokens, "
          f"{Path(model_dir).name} fp32, shard on {w.threads} threads; {rounds} rounds each, alternating")
    local, remote = [], []
    for r in range(rounds):
        local.append(await in_process(replica.engine, prompts, w.new_tokens))
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


def start_shard():
    """One TP 1 x PP 1 replica: its shard in a Ray actor, its engine in this process."""
    import ray
    from ray.util.placement_group import placement_group

    from cluster.config import ServeConfig
    from cluster.runtime.placement import replica_bundles
    from cluster.runtime.replica import start_replica
    from shard.demo import ensure_demo_model
    from shard.layout import Layout

    w = Workload()
    ray.init(num_cpus=4, logging_level="WARNING", include_dashboard=False)
    blocks = w.requests * -(-(w.prompt_len + w.new_tokens) // BLOCK) + 16
    cfg = ServeConfig.from_dict({"layout": {"tp": 1, "pp": 1}, "kv_cache": {"block_size": BLOCK, "num_blocks": blocks},
                                 "scheduler": {"max_num_seqs": w.requests}, "shard": {"cpu_threads": w.threads},
                                 "timeouts": {"step_s": 120}})
    pg = placement_group(replica_bundles(Layout(1, 1), "CPU"), strategy="PACK")
    ray.get(pg.ready())
    model_dir = str(ensure_demo_model())
    return start_replica(cfg, model_dir, pg, "bench-router", "CPU"), model_dir


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
    import ray
    replica, model_dir = start_shard()
    try:
        asyncio.run(bench(args.rounds, replica, model_dir))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
