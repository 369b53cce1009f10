"""Speculative decoding (n-gram prompt lookup, or a draft model) against plain decoding, in one run,
on SmolLM2-135M.

An input-grounded workload: chat requests whose answers copy from their prompt (repeat a passage,
correct its typos, quote the sentences about something, turn it into a list), greedy, up to
`--max-tokens` new tokens each, EOS honoured. Both modes run the same requests through the same
engine over one in-process shard (TP 1 x PP 1), and the outputs must be the same token for token.

1. Batch 1: the requests one after another. Prints tokens/s of each mode, their ratio, and the
   acceptance rate and mean accepted length of the speculative run. Then, in the same run, llama.cpp
   on the same token ids (an f32 GGUF of the same weights, the same threads, `bench/peers.py`), plain
   and with its own prompt lookup decoding, and Caravan's ratio to each; skipped with a note when its
   virtualenv is missing (`--llamacpp-python`, see `bench/peers.py`).
2. `--concurrent` requests at once (default 32), the same prompts repeated: tokens/s and the ratio.

    python bench/speculative.py                   # both; --rounds 3 alternates the modes 3 times
    python bench/speculative.py --smoke           # a few short requests, to check the script
    python bench/speculative.py --draft-layers 6  # a draft model: SmolLM2's first 6 of 30 layers

With `--draft-model PATH` (a checkpoint sharing SmolLM2's tokenizer) or `--draft-layers N`, the
proposer is that draft model (`speculative.method: draft`) instead of n-gram lookup. SmolLM2-135M
is the smallest model of its tokenizer here, so `--draft-layers` cuts a draft out of it: its first N
layers with its own final norm and head, untrained as an early exit (self-speculation in the style
of LayerSkip or Draft & Verify, without their training), which bounds how often it is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import run_llamacpp  # noqa: E402
from workload import TEXT  # noqa: E402

from cluster.api.tokenizer import Tokenizer  # noqa: E402
from cluster.config import SpeculativeSection  # noqa: E402
from cluster.engine.engine import Engine  # noqa: E402
from cluster.engine.executor import LocalExecutor  # noqa: E402
from shard.demo import ensure_demo_model  # noqa: E402
from shard.layout import Layout  # noqa: E402
from shard.parallel import ParallelContext  # noqa: E402
from shard.sampler import SamplingParams  # noqa: E402
from shard.worker import ShardWorker  # noqa: E402

BLOCK = 16
SENTENCES = [s.strip() + "." for s in TEXT.split(".") if s.strip()]


def typos(text: str) -> str:
    """Every seventh word with two letters swapped."""
    words = text.split()
    return " ".join(w[:1] + w[2:3] + w[1:2] + w[3:] if i % 7 == 3 and len(w) > 3 else w for i, w in enumerate(words))


def tasks() -> list[str]:
    out = []
    for i in range(0, len(SENTENCES) - 2, 3):
        passage = " ".join(SENTENCES[i:i + 3])
        out += [f"Repeat this text exactly, word for word:\n\n{passage}",
                f"Correct the spelling mistakes in this text and write it out in full:\n\n{typos(passage)}",
                f"Here is a text:\n\n{passage}\n\nQuote its first two sentences."]
    out.append(f"Turn this text into a bulleted list, one sentence per bullet:\n\n{' '.join(SENTENCES[:4])}")
    return out


def first_layers(model_dir: str, n: int, folder: Path) -> Path:
    """A copy of the checkpoint with only its first `n` decoder layers (a draft cut out of the model)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(model_dir, folder)
    for path in folder.glob("*.safetensors"):
        kept = {k: v for k, v in load_file(path).items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
        save_file(kept, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": n}))
    return folder


def engine_for(worker: ShardWorker, eos: frozenset[int], blocks: int, spec: SpeculativeSection | None,
               draft: ShardWorker | None = None) -> Engine:
    return Engine(LocalExecutor(worker, draft), worker.cfg, eos, num_blocks=blocks, block_size=BLOCK, max_num_seqs=32,
                  max_tokens_per_step=512, speculative=spec)


async def run(engine: Engine, prompts: list[list[int]], params: SamplingParams, concurrent: bool):
    async def one(p):
        return [u.sample.token_id async for u in engine.generate(p, params)]

    start = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(*(one(p) for p in prompts))
    else:
        outs = [await one(p) for p in prompts]
    return outs, time.perf_counter() - start


def measure(worker, eos, blocks, prompts, params, spec, concurrent, draft=None):
    async def go():
        engine = engine_for(worker, eos, blocks, spec, draft)
        await run(engine, [prompts[0][:8]], dataclasses.replace(params, max_tokens=4), False)  # warm-up
        outs, seconds = await run(engine, prompts, params, concurrent)
        stats = engine.stats()
        await engine.close()
        return outs, seconds, stats
    return asyncio.run(go())


def compare(name, worker, eos, blocks, prompts, params, spec, concurrent, rounds, draft=None):
    """Prints each round and the median ratio; returns the plain outputs and both modes' tok/s of each round."""
    ratios, rates = [], {"plain": [], "speculative": []}
    for r in range(rounds):
        plain, t_plain, _ = measure(worker, eos, blocks, prompts, params, None, concurrent)
        fast, t_fast, s = measure(worker, eos, blocks, prompts, params, spec, concurrent, draft)
        if fast != plain:
            bad = next(i for i, (a, b) in enumerate(zip(plain, fast)) if a != b)
            raise SystemExit(f"{name}: request {bad} differs with speculation: {plain[bad]} vs {fast[bad]}")
        tokens = sum(map(len, plain))
        ratios.append(t_plain / t_fast)
        rates["plain"].append(tokens / t_plain)
        rates["speculative"].append(tokens / t_fast)
        rate = s.spec_accepted / s.spec_proposed if s.spec_proposed else 0.0
        mean_len = s.spec_emitted / s.spec_steps if s.spec_steps else 0.0
        print(f"{name} round {r + 1}: {tokens} tokens, plain {tokens / t_plain:7.1f} tok/s, speculative "
              f"{tokens / t_fast:7.1f} tok/s, ratio {ratios[-1]:.2f}x; acceptance {rate:.2f} "
              f"({s.spec_accepted}/{s.spec_proposed}), mean accepted length {mean_len:.2f} over {s.spec_steps} "
              f"verify steps", flush=True)
    print(f"{name}: median ratio {statistics.median(ratios):.2f}x (same outputs token for token)", flush=True)
    return plain, rates


def llamacpp(prompts, max_tokens, threads, lookup, rounds, caravan, caravan_outputs, python) -> None:
    """llama.cpp plain and with its prompt lookup decoding, alternating, `rounds` times each; then the medians of
    Caravan's two modes over llama.cpp's two."""
    rates = {}
    for r in range(rounds):
        for draft in (0, lookup):
            res = run_llamacpp(prompts, max_tokens, threads, lookup=draft, python=python)
            if res is None:
                return
            same = sum(a == b for a, b in zip(res.outputs, caravan_outputs))
            rates.setdefault(res.system, []).append(res.tok_per_s)
            print(f"batch 1 round {r + 1}: {res.system} {res.tokens} tokens, {res.tok_per_s:7.1f} tok/s; "
                  f"{same}/{len(prompts)} requests token for token as Caravan's", flush=True)
    medians = {name: statistics.median(v) for name, v in (*caravan.items(), *rates.items())}
    for peer in rates:
        print(f"batch 1 vs {peer} ({medians[peer]:.1f} tok/s median): Caravan plain "
              f"{medians['plain'] / medians[peer]:.2f}x, speculative {medians['speculative'] / medians[peer]:.2f}x",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-tokens", type=int, default=SpeculativeSection.num_tokens)
    ap.add_argument("--max-batch", type=int, default=SpeculativeSection.max_batch)
    ap.add_argument("--only", choices=("batch1", "concurrent"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--draft-model", help="a draft checkpoint sharing SmolLM2's tokenizer (method draft)")
    ap.add_argument("--draft-layers", type=int, help="a draft of SmolLM2's first N layers (method draft)")
    ap.add_argument("--llamacpp-python", help="llama.cpp virtualenv's python (default: see bench/peers.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = ensure_demo_model()
    tok = Tokenizer.from_pretrained(model_dir)
    texts = tasks()[:2] if args.smoke else tasks()
    max_tokens = 8 if args.smoke else args.max_tokens
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    draft_dir = args.draft_model
    if args.draft_layers:
        draft_dir = first_layers(model_dir, args.draft_layers, Path(tempfile.mkdtemp()) / "draft")
    spec = SpeculativeSection(method="draft" if draft_dir else "ngram", draft_model=draft_dir and str(draft_dir),
                              num_tokens=args.num_tokens, max_batch=args.max_batch)
    many = [prompts[i % len(prompts)] for i in range(2 if args.smoke else args.concurrent)]
    blocks = sum(-(-(len(p) + max_tokens + args.num_tokens) // BLOCK) for p in many) + 8
    worker = ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK, progress=False)
    draft = draft_dir and ShardWorker(draft_dir, ParallelContext(Layout()), num_blocks=blocks, block_size=BLOCK,
                                      progress=False)
    print(f"SmolLM2-135M fp32, {args.threads} threads, {len(prompts)} input-grounded chat requests "
          f"(prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens), greedy, max_tokens {max_tokens}; "
          f"speculative: {spec}", flush=True)
    if args.only != "concurrent":
        outputs, rates = compare("batch 1", worker, tok.eos_token_ids, blocks, prompts, params, spec, False,
                                 args.rounds, draft)  # fmt: skip
        llamacpp(prompts, max_tokens, args.threads, args.num_tokens, args.rounds, rates, outputs, args.llamacpp_python)
    if args.only != "batch1":
        compare(f"{len(many)} concurrent", worker, tok.eos_token_ids, blocks, many, params, spec, True, args.rounds,
                draft)


if __name__ == "__main__":
    main()
