"""Engine throughput, in one run, against peers on the same workload, and pipeline parallelism
with batches in flight against a single stage.

1. 32 concurrent requests, prompt 32, 128 new tokens each (EOS ignored), greedy, SmolLM2-135M fp32,
   2 threads: Caravan's engine over an in-process shard and over a shard in a Ray actor (the
   serving layout: engine and shard in separate processes), transformers' continuous batching
   (`generate_batch`) and vLLM on CPU (from its own virtualenv, see peers.py; skipped with a note
   when it is not installed). Prints tok/s and Caravan's ratio to each.
2. The same workload through Ray shard actors with one thread each: PP 2, two batches in flight,
   against PP 1, in alternating rounds (the machine is noisy). Prints each round's throughput
   ratio and their median (the ideal is 2; bench/pp_ceiling.py shows what the stages alone reach).

    python bench/engine.py                  # both; --skip-peers: Caravan's rows of 1 only; --skip-pp: 1 only
    python bench/engine.py --skip-peers --pp-rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import Result, run_transformers, run_vllm  # noqa: E402
from workload import Workload, make_prompts  # noqa: E402

from cluster.engine.engine import Engine  # noqa: E402
from cluster.engine.executor import LocalExecutor  # noqa: E402
from shard.demo import ensure_demo_model  # noqa: E402
from shard.kernels.cpu import cpu_model  # noqa: E402
from shard.layout import Layout  # noqa: E402
from shard.parallel import ParallelContext  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.worker import ShardWorker  # noqa: E402

BLOCK = 16


async def drive(engine: Engine, prompts: list[list[int]], new_tokens: int) -> Result:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    async def one(p):
        return sum([1 async for _ in engine.generate(p, params)])

    await one(prompts[0][:8])  # warm-up, as the peers get
    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    return Result("caravan", sum(counts), time.perf_counter() - start)


def run_caravan(model_dir, prompts, new_tokens: int, threads: int) -> Result:
    torch.set_num_threads(threads)
    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // BLOCK) + 8
    worker = ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK, progress=False)

    async def run():
        engine = Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=blocks, block_size=BLOCK,
                        max_num_seqs=len(prompts), max_tokens_per_step=max(512, len(prompts)))
        try:
            return await drive(engine, prompts, new_tokens)
        finally:
            await engine.close()
    return asyncio.run(run())


@contextmanager
def ray_replica(model_dir, prompts, new_tokens: int, pp: int, threads: int = 1, name: str = "bench"):
    """One replica of TP 1 x PP `pp` as Ray actors with `threads` each (Ray already started), the
    engine in this process; its placement group goes when the block ends (close the engine first,
    on the event loop that used it)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.config import ServeConfig
    from cluster.runtime.placement import replica_bundles
    from cluster.runtime.replica import start_replica

    # Blocks for every request's whole budget, as the in-process run gets: no preemption in either.
    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // BLOCK) + 8 * pp
    cfg = ServeConfig.from_dict({"layout": {"tp": 1, "pp": pp}, "kv_cache": {"block_size": BLOCK, "num_blocks": blocks},
                                 "scheduler": {"max_num_seqs": len(prompts)}, "shard": {"cpu_threads": threads},
                                 "timeouts": {"step_s": 120}})
    pg = placement_group(replica_bundles(Layout(1, pp), "CPU"), strategy="PACK")
    ray.get(pg.ready())
    try:
        yield start_replica(cfg, str(model_dir), pg, f"{name}-pp{pp}", "CPU")
    finally:
        remove_placement_group(pg)


def run_ray_pp(model_dir, prompts, new_tokens: int, pp: int, threads: int = 1) -> Result:
    """`drive` over a `ray_replica`."""
    with ray_replica(model_dir, prompts, new_tokens, pp, threads) as replica:
        async def run():
            try:
                return await drive(replica.engine, prompts, new_tokens)
            finally:
                await replica.engine.close()
        result = asyncio.run(run())
    return Result(f"caravan PP {pp}", result.tokens, result.seconds)


def run_caravan_actor(model_dir, prompts, new_tokens: int, threads: int) -> Result:
    """The serving layout: the shard in a Ray actor, the engine driving it from this process."""
    import ray
    ray.init(num_cpus=4, logging_level="WARNING", include_dashboard=False)
    try:
        result = run_ray_pp(model_dir, prompts, new_tokens, 1, threads)
    finally:
        ray.shutdown()
    return Result("caravan (shard actor)", result.tokens, result.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-pp", action="store_true")
    parser.add_argument("--pp-new-tokens", type=int, default=Workload.new_tokens)
    parser.add_argument("--pp-rounds", type=int, default=2)
    args = parser.parse_args()
    w = Workload()
    model_dir = ensure_demo_model()
    prompts = make_prompts(model_dir, w.requests, w.prompt_len)
    print(f"workload: {w.requests} requests, prompt {w.prompt_len}, {w.new_tokens} new tokens, "
          f"{model_dir.name} fp32, {w.threads} threads; {cpu_model()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    ours = run_caravan(model_dir, prompts, w.new_tokens, w.threads)
    actor = run_caravan_actor(model_dir, prompts, w.new_tokens, w.threads)
    print(f"  caravan engine        {ours.tok_per_s:7.1f} tok/s ({ours.tokens} tokens in {ours.seconds:.1f} s; "
          f"shard in this process)")
    print(f"  caravan engine        {actor.tok_per_s:7.1f} tok/s ({actor.tokens} tokens in {actor.seconds:.1f} s; "
          f"shard in a Ray actor, as served)", flush=True)
    if not args.skip_peers:
        for peer in (run_transformers(model_dir, prompts, w.new_tokens, w.threads),
                     run_vllm(model_dir, prompts, w.new_tokens, w.threads)):
            if peer is not None:
                print(f"  {peer.system:<21} {peer.tok_per_s:7.1f} tok/s -> caravan / {peer.system} = "
                      f"{ours.tok_per_s / peer.tok_per_s:.2f}x in-process, "
                      f"{actor.tok_per_s / peer.tok_per_s:.2f}x as served")
    if not args.skip_pp:
        import ray
        ray.init(num_cpus=4, logging_level="WARNING", include_dashboard=False)
        print(f"pipeline ({args.pp_new_tokens} new tokens, Ray actors with 1 thread each):")
        ratios = []
        try:
            for r in range(args.pp_rounds):
                one = run_ray_pp(model_dir, prompts, args.pp_new_tokens, 1)
                two = run_ray_pp(model_dir, prompts, args.pp_new_tokens, 2)
                ratios.append(two.tok_per_s / one.tok_per_s)
                print(f"  round {r + 1}: PP 1 {one.tok_per_s:6.1f} tok/s, PP 2 with 2 batches in flight "
                      f"{two.tok_per_s:6.1f} tok/s -> {ratios[-1]:.2f}x", flush=True)
        finally:
            ray.shutdown()
        print(f"  PP 2 / PP 1 = {statistics.median(ratios):.2f}x (median of {len(ratios)} rounds)")


if __name__ == "__main__":
    main()
