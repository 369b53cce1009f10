"""How far pipeline parallelism can go on this machine with no runtime at all: PP 2 decode as two
bare shard processes against PP 1 as one, with no Ray, no engine and no scheduler in the loop.

The workload is bench/engine.py's decode phase: 32 sequences, SmolLM2-135M fp32, one thread per
process, every step a decode at a fixed context (`--context`, by default 96 tokens, the middle of
a 32-token prompt plus 128 new tokens). PP 1 runs 32-row steps. PP 2 runs the two lanes the engine
would (16 sequences each) through stage 0 and stage 1, joined by torch.distributed (gloo), in the
engine's order A, B, A, B, ... so both stages are busy at once; no step waits for a sampled token.
It also times each stage's 16-row step alone (one lane, a barrier after every step, so the stages
take turns), which splits the gap to the ideal 2x in two: what a 16-row step costs per row against
half a PP 1 step, and how close the 2-lane cycle comes to twice the slower stage (the overlap).
Rounds alternate (the machine is noisy); each prints its ratio.

The served ratio (bench/engine.py) cannot beat this one: it adds the engine's round trip per
step, prefill, and Ray's dispatch to the same stage compute.

    python bench/pp_ceiling.py                  # 3 rounds of 40 steps per lane
    python bench/pp_ceiling.py --rounds 5 --steps 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp

from cluster.runtime.ports import free_port
from shard.demo import ensure_demo_model
from shard.layout import Layout
from shard.parallel import Endpoint, ParallelContext, init_parallel, shutdown_parallel
from shard.sampler import SamplingParams
from shard.worker import SeqChunk, ShardWorker, StepInput

SEQS, BLOCK = 32, 16


def blocks_per_seq(context: int) -> int:
    return -(-(context + 1) // BLOCK)


def decode_step(seq_ids: range, context: int) -> StepInput:
    per_seq = blocks_per_seq(context)
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    return StepInput([SeqChunk(i, [100 + i], context, list(range(i * per_seq, (i + 1) * per_seq)), params, 1)
                      for i in seq_ids])


def run_steps(worker: ShardWorker, steps: list[StepInput], warmup: int, in_turn: bool = False) -> tuple[float, float]:
    """Runs `steps`: (seconds in all, seconds inside `execute`). `in_turn`: every rank waits for the
    whole step to finish before the next one starts (a barrier), so the stages never compute at once."""
    for i in range(warmup):
        worker.execute(steps[i % len(steps)])
    start, executing = time.perf_counter(), 0.0
    for step in steps:
        t = time.perf_counter()
        worker.execute(step)
        executing += time.perf_counter() - t
        if in_turn:
            torch.distributed.barrier()
    return time.perf_counter() - start, executing


def new_worker(model_dir, ctx: ParallelContext, context: int) -> ShardWorker:
    return ShardWorker(model_dir, ctx, num_blocks=SEQS * blocks_per_seq(context), block_size=BLOCK, progress=False)


def pp1_main(model_dir, context: int, steps: int, results) -> None:
    torch.set_num_threads(1)
    worker = new_worker(model_dir, ParallelContext(Layout()), context)
    results.put(run_steps(worker, [decode_step(range(SEQS), context)] * steps, 2)[0])


def pp2_main(rank: int, port: int, model_dir, context: int, steps: int, num_lanes: int, results) -> None:
    torch.set_num_threads(1)
    ctx = init_parallel(Layout(1, 2), rank, Endpoint("127.0.0.1", port, 120.0))
    try:
        worker = new_worker(model_dir, ctx, context)
        lanes = [decode_step(range(SEQS // 2), context), decode_step(range(SEQS // 2, SEQS), context)][:num_lanes]
        torch.distributed.barrier()
        results.put((rank, run_steps(worker, lanes * steps, 4, in_turn=num_lanes == 1)))
    finally:
        shutdown_parallel()


def spawn(procs, target, args_per_proc) -> list:
    results = procs.SimpleQueue()
    ps = [procs.Process(target=target, args=(*args, results)) for args in args_per_proc]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a bench process exited with code {p.exitcode}")
    return [results.get() for _ in ps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="decode steps per lane and round")
    ap.add_argument("--context", type=int, default=96, help="cached tokens per sequence at every step")
    args = ap.parse_args()
    model_dir = ensure_demo_model()
    procs = mp.get_context("spawn")
    tokens = SEQS * args.steps
    print(f"{SEQS} sequences decoding at context {args.context}, {args.steps} steps per lane, "
          f"{model_dir.name} fp32, 1 thread per process, no runtime")
    ratios = []
    for r in range(args.rounds):
        [one] = spawn(procs, pp1_main, [(model_dir, args.context, args.steps)])
        piped, in_turn = (sorted(spawn(procs, pp2_main, [(rank, port, model_dir, args.context, args.steps, lanes)
                                                         for rank in range(2)]))
                          for port, lanes in ((free_port(), 2), (free_port(), 1)))
        two = max(total for _, (total, _) in piped)
        # In turn, stage 0's execute is its compute (its send finds stage 1 waiting); stage 1's
        # execute is its wait for stage 0 plus its own compute.
        stage0 = in_turn[0][1][1] / args.steps
        stage1 = in_turn[1][1][1] / args.steps - stage0
        ratios.append(one / two)
        half = one / args.steps / 2
        print(f"  round {r + 1}: PP 1 {tokens / one:6.1f} tok/s ({1e3 * one / args.steps:.1f} ms per 32-row step), "
              f"PP 2 {tokens / two:6.1f} tok/s ({1e3 * two / args.steps:.1f} ms per cycle of 2 lanes) -> {ratios[-1]:.2f}x")
        print(f"    16-row steps alone: stage 0 {1e3 * stage0:.1f} ms + stage 1 {1e3 * stage1:.1f} ms = "
              f"{(stage0 + stage1) / half:.2f}x half a PP 1 step; the 2-lane cycle is "
              f"{two / args.steps / (2 * max(stage0, stage1)):.2f}x twice the slower stage")
    print(f"PP 2 / PP 1 without a runtime: median {statistics.median(ratios):.2f}x over {len(ratios)} rounds "
          f"(ideal 2; bench/engine.py measures the served ratio)")


if __name__ == "__main__":
    main()
