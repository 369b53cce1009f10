"""The control plane's cost per decode step: the engine (scheduler, paged KV, prefix cache, streaming
to every request's iterator) driven by executors that cost nothing, so that what is left is what a
GPU would wait on.

- null: an executor that answers every step at once with a fixed token. ms per decode step is the
  mean time between two consecutive decode steps reaching the executor: all the work of the
  decode phase (steps that take new blocks, collector pauses, the requests' own tasks) divided by
  its steps. µs per sequence divides it by the batch. The median and the longest gap print too.
  The gaps are bimodal (about 7 and 13 µs a sequence here): the requests' tasks read their tokens
  in some gaps and not in others, so a median lands on either mode by small shifts of their
  proportion, and is no measure of the whole.
- stand-in: an executor that takes a fixed time per step on a thread of its own, as a device would
  (`--device-ms`, 20 by default: a 405B decode step at TP 8 is about 30 ms). busy is the fraction
  of the decode phase's wall time the stand-in spends in steps.

Every request is added at once, prefilled in one step, then decodes `--steps` tokens (EOS
ignored); only steps in which every sequence decodes are timed. The model config (vocabulary,
context) is Llama 3.1 405B's, KV blocks of 16 tokens, enough blocks that nothing is preempted.

With `--baseline REV` the same rows run first on `cluster/` and `shard/` as of git revision REV
(extracted to a temporary folder, in a child process), then on this tree, and the ratios print.

    python bench/overhead.py                              # the rows below, this tree only
    python bench/overhead.py --baseline HEAD~1            # before / after
    python bench/overhead.py --rows 256x128 1024x64 --device-ms 20
    python bench/overhead.py --repeat 5                   # each row's quickest of 5 runs (a noisy machine)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT.parent / "shared" / "fixtures" / "llama-3.1-405b-instruct"
ROWS = ["32x128", "64x128", "256x128", "1024x64", "64x32768", "4096x64"]   # sequences x prompt tokens
BLOCK = 16
TOKEN = 7


def sampled(step) -> dict:
    from shard.sampler import Sample
    return {c.seq_id: Sample(TOKEN) for c in step.seqs if c.params is not None}


class Recorder:
    """Start and end time of every step in which all `seqs` sequences decode one token."""

    def __init__(self, seqs: int):
        self.seqs, self.starts, self.ends = seqs, [], []

    def decode_step(self, step) -> bool:
        return len(step.seqs) == self.seqs and all(len(c.token_ids) == 1 for c in step.seqs)


class NullExecutor(Recorder):
    async def execute(self, step):
        from shard.worker import StepOutput
        if self.decode_step(step):
            self.starts.append(time.perf_counter())
        return StepOutput(sampled(step))

    async def close(self) -> None:
        pass


class StandInExecutor(Recorder):
    """A device in another process: a step starts when it is sent (or when the step before ends) and
    takes `step_s`; steps run one after another. A thread waits out each step, timed from when it
    was sent, so that the thread's own wait for the interpreter lock is not counted as device time."""

    def __init__(self, seqs: int, step_s: float):
        super().__init__(seqs)
        self.step_s, self.lock, self.free_at = step_s, threading.Lock(), 0.0

    def _run(self, step, sent: float):
        from shard.worker import StepOutput
        with self.lock:
            start = max(sent, self.free_at)
            self.free_at = start + self.step_s
            out = StepOutput(sampled(step))
            time.sleep(max(0.0, self.free_at - time.perf_counter()))
            if self.decode_step(step):
                self.starts.append(start)
                self.ends.append(self.free_at)
        return out

    async def execute(self, step):
        return await asyncio.get_running_loop().run_in_executor(None, self._run, step, time.perf_counter())

    async def close(self) -> None:
        pass


async def drive(executor, seqs: int, prompt: int, steps: int) -> None:
    from cluster.engine.engine import Engine
    from shard.config import ModelConfig
    from shard.sampler import SamplingParams

    cfg = ModelConfig.from_pretrained(CONFIG)
    try:  # as a replica's process does once it is up (absent from revisions before it)
        from cluster.engine import heap
        heap.settle()
    except ImportError:
        pass
    blocks = seqs * -(-(prompt + steps + 2) // BLOCK)
    engine = Engine(executor, cfg, frozenset(), num_blocks=blocks, block_size=BLOCK, max_num_seqs=seqs,
                    max_tokens_per_step=seqs * prompt, step_timeout_s=600)
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)

    async def one(i: int) -> int:
        # Distinct prompts (no prefix is shared), as many requests of a busy replica are.
        tokens = [(i * 7919 + j) % 100_000 + 1 for j in range(prompt)]
        return sum([1 async for _ in engine.generate(tokens, params)])

    counts = await asyncio.gather(*(one(i) for i in range(seqs)))
    assert counts == [steps + 2] * seqs
    await engine.close()


def measure(seqs: int, prompt: int, steps: int, device_ms: float) -> dict:
    null = NullExecutor(seqs)
    asyncio.run(drive(null, seqs, prompt, steps))
    # From the second decode step: the gap after the first one holds the prefill's bookkeeping (its
    # blocks hashed and published, 55 ns a prompt token), which belongs to the prefill, not to decoding.
    gaps = [b - a for a, b in zip(null.starts[1:], null.starts[2:])]
    step_ms = 1e3 * statistics.mean(gaps)
    stand_in = StandInExecutor(seqs, device_ms / 1e3)
    asyncio.run(drive(stand_in, seqs, prompt, steps))
    busy = sum(e - s for s, e in zip(stand_in.starts, stand_in.ends)) / (stand_in.ends[-1] - stand_in.starts[0])
    return {"seqs": seqs, "prompt": prompt, "steps": len(gaps), "step_ms": step_ms,
            "median_ms": 1e3 * statistics.median(gaps), "us_per_seq": 1e3 * step_ms / seqs,
            "max_ms": 1e3 * max(gaps), "busy": busy}


def steps_for(seqs: int, requested: int | None) -> int:
    return requested or max(16, min(64, 16384 // seqs))


def run_rows(rows: list[str], steps: int | None, device_ms: float, repeat: int = 1) -> list[dict]:
    """Each row `repeat` times, keeping its quickest run (of the null executor's ms per step), as timeit
    does: on a shared machine the other runs measure the neighbours too."""
    out = []
    for row in rows:
        seqs, prompt = (int(v) for v in row.split("x"))
        runs = [measure(seqs, prompt, steps_for(seqs, steps), device_ms) for _ in range(repeat)]
        out.append(min(runs, key=lambda r: r["step_ms"]))
    return out


def run_baseline(rev: str, args) -> list[dict]:
    """The same rows on `cluster/` and `shard/` of git revision `rev`, in a child process."""
    with tempfile.TemporaryDirectory(prefix="caravan-baseline-") as tmp:
        archive = subprocess.run(["git", "archive", rev, "cluster", "shard"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        cmd = [sys.executable, __file__, "--json", "--rows", *args.rows, "--device-ms", str(args.device_ms),
               "--repeat", str(args.repeat)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=ROWS, help="SEQUENCESxPROMPT_TOKENS")
    ap.add_argument("--steps", type=int, help="decode steps per row (default: 16 to 64, fewer for big batches)")
    ap.add_argument("--device-ms", type=float, default=20.0, help="the stand-in executor's time per step")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row, the quickest kept (default 1)")
    ap.add_argument("--baseline", metavar="REV", help="also run git revision REV's engine, first, and compare")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:
        print(json.dumps(run_rows(args.rows, args.steps, args.device_ms, args.repeat)))
        return
    base = run_baseline(args.baseline, args) if args.baseline else None
    now = run_rows(args.rows, args.steps, args.device_ms, args.repeat)
    print(f"engine overhead per decode step; stand-in device step {args.device_ms:g} ms"
          + (f"; baseline: {args.baseline}" if base else ""))
    head = f"{'seqs x prompt':>15} {'steps':>5} {'ms/step':>9} {'µs/seq':>8} {'median':>8} {'max ms':>8} {'busy':>6}"
    print(head + (f" | {'was ms/step':>11} {'µs/seq':>8} {'busy':>6} {'speedup':>8}" if base else ""))
    for i, r in enumerate(now):
        line = (f"{r['seqs']:>7} x {r['prompt']:>5} {r['steps']:>5} {r['step_ms']:>9.3f} {r['us_per_seq']:>8.2f} "
                f"{r.get('median_ms', float('nan')):>8.3f} {r['max_ms']:>8.1f} "
                f"{r['busy']:>6.1%}")
        if base:
            b = base[i]
            line += (f" | {b['step_ms']:>11.3f} {b['us_per_seq']:>8.2f} {b['busy']:>6.1%} "
                     f"{b['step_ms'] / r['step_ms']:>7.1f}x")
        print(line)
    flat = [r["us_per_seq"] for r in now]
    print(f"µs per sequence, most / least over the rows: {max(flat) / min(flat):.2f}x")


if __name__ == "__main__":
    main()
