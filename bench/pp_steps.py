"""Where the time of a pipeline-parallel replica goes, from timestamps taken inside its shard actors.

Runs bench/engine.py's PP workload (32 requests, prompt 32, SmolLM2 fp32, Ray actors with one
thread each) on one replica of TP 1 x PP `--pp`, with every actor's `execute`, `recv_prev` and
`send_next` timed in place (through `__ray_call__`; nothing in the product changes). Prints, for
the steady decode steps, the median of each leg of one batch's round trip (engine dispatch, each
stage's compute, the hand-off between stages, the return to the engine), each stage's busy share
of the run, and how long the prefill phase took.

    python bench/pp_steps.py                    # PP 2, 128 new tokens (the workload's)
    python bench/pp_steps.py --pp 3 --new-tokens 96
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import drive, ray_replica  # noqa: E402
from workload import Workload, make_prompts  # noqa: E402


def instrument(actor) -> bool:
    """Runs inside a shard actor: wraps its worker's step, receive and send with wall-clock stamps."""
    worker, log, current = actor.worker, [], {}
    execute, recv, send = worker.execute, worker.ctx.recv_prev, worker.ctx.send_next

    def timed_recv(*args, **kwargs):
        out = recv(*args, **kwargs)
        current["received"] = time.time()
        return out

    def timed_send(*args, **kwargs):
        current["computed"] = time.time()
        send(*args, **kwargs)
        current["sent"] = time.time()

    def timed_execute(step):
        current.clear()
        current.update(start=time.time(), rows=len(step.seqs), tokens=sum(len(c.token_ids) for c in step.seqs))
        out = execute(step)
        current["end"] = time.time()
        log.append(dict(current))
        return out

    worker.execute, worker.ctx.recv_prev, worker.ctx.send_next = timed_execute, timed_recv, timed_send
    actor._step_log = log
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()

    import ray

    import cluster.runtime.ray_executor
    from shard.demo import ensure_demo_model

    dispatches: list[list] = []   # per step, in dispatch order (as the actors run them): [first seq id, sent, returned]
    execute = cluster.runtime.ray_executor.RayExecutor.execute

    async def stamped(self, step):
        entry = [step.seqs[0].seq_id, time.time(), None]
        dispatches.append(entry)
        out = await execute(self, step)
        entry[2] = time.time()
        return out
    cluster.runtime.ray_executor.RayExecutor.execute = stamped

    model_dir = ensure_demo_model()
    prompts = make_prompts(model_dir, args.requests)
    ray.init(num_cpus=2 * args.pp, logging_level="WARNING", include_dashboard=False)
    try:
        with ray_replica(model_dir, prompts, args.new_tokens, args.pp, name="pp-steps") as replica:
            ray.get([a.__ray_call__.remote(instrument) for a in replica.actors])

            async def run():
                try:
                    result = await drive(replica.engine, prompts, args.new_tokens)
                    logs = [await a.__ray_call__.remote(lambda self: self._step_log) for a in replica.actors]
                    return result, logs
                finally:
                    await replica.engine.close()
            result, logs = asyncio.run(run())
    finally:
        ray.shutdown()

    timed = [i for i, (first, _, _) in enumerate(dispatches) if first != 0]   # seq 0 is drive()'s warm-up
    start, end = dispatches[timed[0]][1], dispatches[-1][2]
    print(f"PP {args.pp}: {result.tok_per_s:.1f} tok/s ({result.tokens} tokens in {result.seconds:.1f} s)")
    for s, log in enumerate(logs):
        waits = sum(e.get("received", e["start"]) - e["start"] + e.get("sent", e["end"]) - e.get("computed", e["end"])
                    for e in (log[i] for i in timed))
        busy = sum(log[i]["end"] - log[i]["start"] for i in timed) - waits
        print(f"  stage {s}: computing {busy:.2f} s of {end - start:.2f} s ({busy / (end - start):.0%}), "
              f"{waits:.2f} s waiting on a neighbour stage")
    prefill_end = max(dispatches[i][2] for i in timed if logs[0][i]["tokens"] > logs[0][i]["rows"])
    print(f"  prefill phase (until the last step with a prompt chunk returned): {prefill_end - start:.2f} s")
    legs: dict[str, list[float]] = {}
    steady = timed[len(timed) // 4: -2 * args.pp]
    for i in steady:
        _, sent, returned = dispatches[i]
        first, last = logs[0][i], logs[-1][i]
        legs.setdefault("engine -> stage 0 start", []).append(first["start"] - sent)
        legs.setdefault("stage 0 compute", []).append(first.get("computed", first["end"]) - first["start"])
        if args.pp > 1:
            legs.setdefault("stage 0 send (waits for the receiver)", []).append(first["sent"] - first["computed"])
            legs.setdefault("hand-off to the last stage", []).append(last["received"] - first["computed"])
            legs.setdefault("last stage compute (incl. head, sampling)", []).append(last["end"] - last["received"])
        legs.setdefault("last stage -> engine", []).append(returned - last["end"])
        legs.setdefault("round trip of one batch", []).append(returned - sent)
    print(f"  steady decode steps ({len(steady)}), medians:")
    for name, values in legs.items():
        print(f"    {name:42s} {1e3 * statistics.median(values):7.1f} ms")


if __name__ == "__main__":
    main()
