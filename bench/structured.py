"""Constrained generation (JSON schemas) against the same requests unconstrained, in one run, on SmolLM2-135M.

`--concurrent` chat requests (default 32) at once through one engine over an in-process shard
(TP 1 x PP 1), greedy, each with one of eight JSON schemas. Then the same prompts without a
schema, each with max_tokens set to the length of its constrained answer and EOS ignored, so both
runs compute exactly the same number of tokens per request: the ratio of their throughputs is the
cost of constraining (masks filled by the engine, applied by the sampler, matchers advanced).
Every constrained answer that closes is checked against its schema. The schemas are compiled before
the runs (a replica compiles a schema once); their compile times are printed apart: cold, on a fresh
compiler, and cached. Also printed: the engine's mask time per step and per sequence-step.

    python bench/structured.py               # --rounds 3 alternates the two runs 3 times
    python bench/structured.py --smoke       # a few short requests, to check the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cluster.api.tokenizer import Tokenizer  # noqa: E402
from cluster.engine.engine import Engine  # noqa: E402
from cluster.engine.executor import LocalExecutor  # noqa: E402
from cluster.engine.grammar import Constraint, Grammars  # noqa: E402
from shard.demo import ensure_demo_model  # noqa: E402
from shard.layout import Layout  # noqa: E402
from shard.parallel import ParallelContext  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.worker import ShardWorker  # noqa: E402

BLOCK = 16


def text(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def integer(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = [
    ("a person", obj({"name": text(20), "age": integer(0, 120), "email": {"type": "string", "format": "email"}})),
    ("an order", obj({"id": integer(1, 99999), "items": {"type": "array", "minItems": 1, "maxItems": 4,
                                                         "items": obj({"sku": text(8), "qty": integer(1, 9)})}})),
    ("a recipe", obj({"name": text(24), "minutes": integer(1, 240), "vegan": {"type": "boolean"},
                      "steps": {"type": "array", "items": text(40), "minItems": 2, "maxItems": 4}})),
    ("three cities", {"type": "array", "minItems": 3, "maxItems": 3,
                      "items": obj({"city": text(16), "country": text(16)})}),
    ("a movie review", obj({"title": text(24), "stars": integer(1, 5), "summary": text(80)})),
    ("a meeting", obj({"topic": text(24), "date": {"type": "string", "format": "date"},
                       "room": {"type": "string", "pattern": "^[A-D][0-9]{3}$"}})),
    ("a server", obj({"host": text(16), "port": integer(1, 65535), "tls": {"type": "boolean"},
                      "role": {"enum": ["web", "db", "cache"]}})),
    ("a shape", {"anyOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0, "maximum": 99}}),
                           obj({"kind": {"const": "rect"}, "w": integer(1, 99), "h": integer(1, 99)})]}),
]
VARIANTS = ["Write {} as JSON.", "Give me {} in JSON.", "Describe {} as a JSON value.", "JSON for {}, please."]


def requests(tok: Tokenizer, n: int) -> list[tuple[list[int], dict]]:
    out = []
    for k in range(n):
        what, schema = SCHEMAS[k % len(SCHEMAS)]
        variant = VARIANTS[(k // len(SCHEMAS)) % len(VARIANTS)]
        out.append((tok.apply_chat_template([{"role": "user", "content": variant.format(what)}]), schema))
    return out


async def run(engine: Engine, jobs) -> tuple[list[list[int]], float]:
    """jobs: (prompt, params, constraint or None), all at once; their tokens and the seconds taken."""
    async def one(p, params, c):
        return [u.sample.token_id async for u in engine.generate(p, params, constraint=c)]
    start = time.perf_counter()
    outs = await asyncio.gather(*(one(*j) for j in jobs))
    return outs, time.perf_counter() - start


def measure(worker, tok, grammars, blocks, jobs):
    """One engine: a warm-up, then `jobs`; the outputs, seconds and the engine's mask seconds and steps."""
    async def go():
        engine = Engine(LocalExecutor(worker), worker.cfg, tok.eos_token_ids, num_blocks=blocks, block_size=BLOCK,
                        max_num_seqs=len(jobs), max_tokens_per_step=512, grammars=grammars)
        await run(engine, [(jobs[0][0][:8], SamplingParams(temperature=0, max_tokens=4), None)])
        steps = engine.steps
        outs, seconds = await run(engine, jobs)
        result = outs, seconds, engine.mask_seconds, engine.steps - steps
        await engine.close()
        return result
    return asyncio.run(go())


def same_work(reqs, lengths: list[int]):
    """The prompts unconstrained, each computing as many tokens as its constrained answer did."""
    return [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), None) for (p, _), n in zip(reqs, lengths)]


def compile_times(model_dir, vocab_size, eos) -> None:
    g = Grammars(model_dir, vocab_size, eos)
    start = time.perf_counter()
    g.compile(Constraint("json_object"))
    print(f"grammar compiler start-up (the tokenizer's vocabulary, once per replica): "
          f"{(time.perf_counter() - start) * 1e3:.0f} ms", flush=True)
    cold, warm = [], []
    for _, schema in SCHEMAS:
        c = Constraint("json_schema", json.dumps(schema))
        for times in (cold, warm):
            start = time.perf_counter()
            g.compile(c)
            times.append((time.perf_counter() - start) * 1e3)
    print(f"compile a schema: cold median {statistics.median(cold):.1f} ms (max {max(cold):.1f} ms), "
          f"cached median {statistics.median(warm):.3f} ms, over {len(SCHEMAS)} schemas", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_demo_model()
    tok = Tokenizer.from_pretrained(model_dir)
    n, max_tokens = (4, 24) if args.smoke else (args.concurrent, args.max_tokens)
    reqs = requests(tok, n)
    blocks = sum(-(-(len(p) + max_tokens) // BLOCK) for p, _ in reqs) + 8
    worker = ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK, progress=False)
    print(f"SmolLM2-135M fp32, {args.threads} threads, TP 1 x PP 1 in-process, {n} concurrent chat requests, "
          f"{len(SCHEMAS)} JSON schemas, greedy, max_tokens {max_tokens}", flush=True)
    compile_times(model_dir, worker.cfg.vocab_size, tok.eos_token_ids)
    grammars = Grammars(model_dir, worker.cfg.vocab_size, tok.eos_token_ids)
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    constrained = [(p, greedy, Constraint("json_schema", json.dumps(s))) for p, s in reqs]
    for _, _, c in constrained:  # as a serving replica would have: compile times are printed above
        grammars.compile(c)
    ratios, lengths = [], None
    for r in range(args.rounds):
        # Which run goes first alternates (greedy: the lengths are the same every round), so that a
        # machine getting busier or quieter during a round does not favour one of them.
        if r % 2:
            plain, t_u, _, _ = measure(worker, tok, grammars, blocks, same_work(reqs, lengths))
        outs, t_c, mask_s, steps = measure(worker, tok, grammars, blocks, constrained)
        closed = 0
        for out, (_, schema) in zip(outs, reqs):
            if out[-1] in tok.eos_token_ids:  # a cut answer (max_tokens) is a valid prefix, not a whole value
                jsonschema.validate(json.loads(tok.decode(out)), schema)
                closed += 1
        assert lengths is None or lengths == list(map(len, outs))
        lengths = list(map(len, outs))
        if not r % 2:
            plain, t_u, _, _ = measure(worker, tok, grammars, blocks, same_work(reqs, lengths))
        assert list(map(len, plain)) == lengths
        tokens = sum(map(len, outs))
        ratios.append(t_u / t_c)
        print(f"round {r + 1}: {tokens} tokens ({closed}/{n} answers closed and valid), unconstrained "
              f"{tokens / t_u:6.1f} tok/s, constrained {tokens / t_c:6.1f} tok/s, ratio {ratios[-1]:.2f}x; "
              f"masks {mask_s * 1e3 / max(steps, 1):.2f} ms per step over {steps} steps "
              f"({mask_s * 1e6 / tokens:.0f} us per sequence-step, {100 * mask_s / t_c:.1f}% of the run)", flush=True)
    print(f"constrained / unconstrained throughput: median {statistics.median(ratios):.2f}x over {args.rounds} "
          f"round(s) (target >= 0.9x)", flush=True)


if __name__ == "__main__":
    main()
