"""Prefix caching and cache-aware routing, in one run, each against its baseline.

1. Time to first token of a request whose 2,000-token prefix is cached (an earlier request sent
   the same prefix with another ending) against the same request on an engine with
   `kv_cache.prefix_caching: false`. Rounds alternate between the two engines; medians compared.
2. A multi-turn chat workload over 2 replicas (two engines in this process, each over its own
   shard on a thread of its own, 1 torch thread each): conversations that share a system prompt,
   each sending its next turn (the whole history: earlier turns and answers, and a new user
   message) once its previous answer is in. Routed by `cluster.routing.rank_replicas` from the
   replicas' own reports, refreshed every `ROUTING_STATS_PERIOD_S` as Serve does: cache-aware
   against least-loaded (the same policy without the cached prefixes). Prints the prefix-cache
   hit rate, throughput and TTFT of each.

SmolLM2-135M-Instruct fp32 (the demo model), greedy, EOS ignored, random token ids.

    python bench/prefix.py                       # both; JSON in bench/results/prefix-<time>.json
    python bench/prefix.py --rounds 5 --conversations 8 --turns 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from cluster.deploy.request_router import (PREFIX_SUMMARY_BLOCKS, ROUTING_STATS_PERIOD_S, PrefixSummaries, RoutedSinceReport,
                             rank_replicas, routing_stats)
from shard.demo import ensure_demo_model
from shard.layout import Layout
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.worker import ShardWorker

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = 16


def engine_over(worker: ShardWorker, num_blocks: int, caching: bool, name: str = "bench") -> Engine:
    return Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=num_blocks, block_size=BLOCK,
                  max_num_seqs=32, max_tokens_per_step=512, prefix_caching=caching, name=name,
                  step_timeout_s=600)  # a busy machine is no fault here


async def ttft(engine: Engine, prompt: list[int]) -> float:
    start = time.perf_counter()
    async for _ in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1)):
        return time.perf_counter() - start
    raise AssertionError("no token")


def bench_ttft(model_dir, prefix_len: int, rounds: int, threads: int, rng: random.Random, vocab: int) -> dict:
    torch.set_num_threads(threads)
    blocks = 4 * -(-(prefix_len + 64) // BLOCK)
    workers = [ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK,
                           progress=False) for _ in range(2)]
    prefix = [rng.randrange(vocab) for _ in range(prefix_len)]

    def ending() -> list[int]:
        return [rng.randrange(vocab) for _ in range(24)]

    async def run():
        on, off = engine_over(workers[0], blocks, True), engine_over(workers[1], blocks, False)
        await ttft(on, prefix + ending())         # puts the prefix in the cache (and warms up)
        await ttft(off, prefix[:64])              # warms up
        cached, uncached = [], []
        for r in range(rounds):
            prompt = prefix + ending()            # a new ending each round: only the prefix is cached
            for engine, times in ((on, cached), (off, uncached)) if r % 2 == 0 else ((off, uncached), (on, cached)):
                times.append(await ttft(engine, prompt))
        hit = on.stats()
        await on.close()
        await off.close()
        return cached, uncached, hit

    cached, uncached, hit = asyncio.run(run())
    result = {"prefix_tokens": prefix_len, "new_tokens": 24, "rounds": rounds, "threads": threads,
              "ttft_cached_s": cached, "ttft_uncached_s": uncached,
              "median_cached_s": statistics.median(cached), "median_uncached_s": statistics.median(uncached),
              "hit_tokens": hit.prefix_hit_tokens, "prompt_tokens": hit.prefix_prompt_tokens}
    result["speedup"] = result["median_uncached_s"] / result["median_cached_s"]
    return result


async def chat_workload(engines: dict[str, Engine], cache_aware: bool, conversations: int, turns: int,
                        system: list[int], user_len: int, answer_len: int, seed: int, vocab: int) -> dict:
    rng = random.Random(seed)
    routed, prefixes = RoutedSinceReport(), PrefixSummaries()
    reports: dict[str, dict] = {}

    def refresh() -> None:
        reports.update({k: routing_stats(asdict(e.stats()), BLOCK, e.sched.cached_hashes(PREFIX_SUMMARY_BLOCKS))
                        for k, e in engines.items()})
        routed.update(reports)
        prefixes.update(reports)

    async def reporter() -> None:
        while True:
            await asyncio.sleep(ROUTING_STATS_PERIOD_S)
            refresh()

    params = SamplingParams(temperature=0, max_tokens=answer_len, ignore_eos=True)
    ttfts, moves, output_tokens, prompt_tokens = [], 0, 0, 0

    async def conversation(i: int) -> None:
        nonlocal moves, output_tokens, prompt_tokens
        history, last = list(system), None
        for _ in range(turns):
            history += [rng.randrange(vocab) for _ in range(user_len)]
            cached = prefixes.cached_tokens(reports, history) if cache_aware else {}
            where = rank_replicas([(k, s, routed[k]) for k, s in reports.items()], cached)[0]
            routed.charge(where, len(history) - cached.get(where, 0))
            moves += last is not None and where != last
            last = where
            start, answer = time.perf_counter(), []
            async for u in engines[where].generate(history, params):
                if not answer:
                    ttfts.append(time.perf_counter() - start)
                answer.append(u.sample.token_id)
            prompt_tokens += len(history)
            output_tokens += len(answer)
            history += answer

    refresh()
    before = {k: e.stats() for k, e in engines.items()}
    task = asyncio.get_running_loop().create_task(reporter())
    start = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(conversations)))
    elapsed = time.perf_counter() - start
    task.cancel()
    after = {k: e.stats() for k, e in engines.items()}
    hit = sum(after[k].prefix_hit_tokens - before[k].prefix_hit_tokens for k in engines)
    asked = sum(after[k].prefix_prompt_tokens - before[k].prefix_prompt_tokens for k in engines)
    hit_req = sum(after[k].prefix_hit_requests - before[k].prefix_hit_requests for k in engines)
    reqs = sum(after[k].prefix_requests - before[k].prefix_requests for k in engines)
    return {"routing": "cache-aware" if cache_aware else "least-loaded", "seconds": elapsed,
            "requests": reqs, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / elapsed, "requests_per_s": reqs / elapsed,
            "hit_rate_tokens": hit / asked, "hit_rate_requests": hit_req / reqs,
            "conversation_moves": moves, "ttft_p50_s": statistics.median(ttfts),
            "evictions": sum(after[k].prefix_evictions - before[k].prefix_evictions for k in engines)}


def bench_routing(model_dir, args, vocab: int) -> list[dict]:
    torch.set_num_threads(1)  # one core per replica: each engine's steps run on a thread of their own
    rng = random.Random(args.seed)
    system = [rng.randrange(vocab) for _ in range(args.system_tokens)]
    results = []
    for r in range(args.chat_rounds):
        for cache_aware in ((True, False) if r % 2 == 0 else (False, True)):
            # Fresh replicas for each run, so that neither starts with the other's cache.
            engines = {k: engine_over(ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=args.chat_blocks,
                                                  block_size=BLOCK, progress=False), args.chat_blocks, True, k)
                       for k in ("a", "b")}

            async def run():
                try:
                    return await chat_workload(engines, cache_aware, args.conversations, args.turns, system,
                                               args.user_tokens, args.answer_tokens, args.seed + 1, vocab)
                finally:
                    for e in engines.values():
                        await e.close()
            results.append({"round": r, **asyncio.run(run())})
            res = results[-1]
            print(f"  round {r} {res['routing']:>12}: {res['output_tokens_per_s']:6.1f} output tok/s, "
                  f"{res['requests_per_s']:.2f} req/s, hit rate {res['hit_rate_tokens']:.0%} of prompt tokens "
                  f"({res['hit_rate_requests']:.0%} of requests), TTFT p50 {1e3 * res['ttft_p50_s']:.0f} ms, "
                  f"{res['conversation_moves']} turns moved replica", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5, help="TTFT rounds, alternating cache on and off")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the TTFT part")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=200)
    parser.add_argument("--user-tokens", type=int, default=150)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--chat-blocks", type=int, default=512, help="KV blocks of 16 tokens per replica")
    parser.add_argument("--chat-rounds", type=int, default=2, help="rounds of each routing, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-routing", action="store_true")
    args = parser.parse_args()

    model_dir = ensure_demo_model()
    from shard.config import ModelConfig
    vocab = ModelConfig.from_pretrained(model_dir).vocab_size
    out = {"bench": "prefix", "created": datetime.now().isoformat(timespec="seconds"), "model": Path(model_dir).name,
           "dtype": "float32", "args": vars(args)}
    if not args.skip_ttft:
        print(f"TTFT, {args.prefix_tokens}-token prefix + 24 new tokens, {args.threads} threads:", flush=True)
        t = out["ttft"] = bench_ttft(model_dir, args.prefix_tokens, args.rounds, args.threads, random.Random(args.seed),
                                     vocab)
        print(f"  prefix cached: {1e3 * t['median_cached_s']:.0f} ms, cache off: {1e3 * t['median_uncached_s']:.0f} ms "
              f"(medians of {args.rounds}) = {t['speedup']:.1f}x faster (target 5x)", flush=True)
    if not args.skip_routing:
        print(f"multi-turn chat over 2 replicas: {args.conversations} conversations x {args.turns} turns, system "
              f"prompt {args.system_tokens}, user turns {args.user_tokens}, answers {args.answer_tokens} tokens:",
              flush=True)
        runs = out["routing"] = bench_routing(model_dir, args, vocab)
        med = {policy: {k: statistics.median(r[k] for r in runs if r["routing"] == policy)
                        for k in ("output_tokens_per_s", "hit_rate_tokens", "hit_rate_requests", "ttft_p50_s")}
               for policy in ("cache-aware", "least-loaded")}
        out["routing_medians"] = med
        ca, ll = med["cache-aware"], med["least-loaded"]
        print(f"  cache-aware / least-loaded: throughput {ca['output_tokens_per_s']:.1f} / "
              f"{ll['output_tokens_per_s']:.1f} output tok/s = {ca['output_tokens_per_s'] / ll['output_tokens_per_s']:.2f}x; "
              f"hit rate {ca['hit_rate_tokens']:.0%} / {ll['hit_rate_tokens']:.0%} of prompt tokens; "
              f"TTFT p50 {1e3 * ca['ttft_p50_s']:.0f} / {1e3 * ll['ttft_p50_s']:.0f} ms (medians of rounds)")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"prefix-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    sys.exit(main())
