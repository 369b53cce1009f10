"""`caravan generate`: offline generation from a model sharded TP x PP over local processes, no Ray."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import torch

from cluster.api.tokenizer import IncrementalDetokenizer, Tokenizer
from cluster.cli.args import model_dir
from cluster.engine.executor import LocalExecutor
from cluster.engine.offline import Request, blocks_needed, check_requests, generate
from cluster.runtime.processes import LocalReplica
from shard.config import ModelConfig
from shard.layout import Layout, check_layout
from shard.loader import Checkpoint
from shard.sampler import SamplingParams

BLOCK_SIZE = 16


def run(args: argparse.Namespace) -> int:
    folder = model_dir(args)
    cfg = ModelConfig.from_pretrained(folder)
    layout = Layout(args.tp, args.pp)
    check_layout(cfg, layout)
    # Headers only, and before the tokenizer: a broken checkpoint is the first thing to report.
    Checkpoint.open(folder).validate(cfg)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens, logprobs=0 if args.json else None)
    tok = Tokenizer.from_pretrained(folder)
    prompt_ids = (tok.encode(args.prompt) if args.raw
                  else tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    requests = [Request(prompt_ids, params)]
    check_requests(requests, cfg.max_position_embeddings, cfg.vocab_size)
    num_blocks = blocks_needed(requests, BLOCK_SIZE)
    start = time.perf_counter()
    with LocalReplica(folder, layout, dtype=getattr(torch, args.dtype), num_blocks=num_blocks, block_size=BLOCK_SIZE,
                      progress=not args.json) as replica:
        loaded = time.perf_counter()
        executor = LocalExecutor(replica)
        detok = IncrementalDetokenizer(tok)
        ids, logprobs, finish = [], [], None
        for ev in generate(executor, requests, tok.eos_token_ids, num_blocks=num_blocks, block_size=BLOCK_SIZE):
            ids.append(ev.token_id)
            logprobs.append(ev.logprob)
            finish = ev.finish_reason
            delta = detok.push(ev.token_id)
            if not args.json:
                print(delta, end="", flush=True)
        tail = detok.flush()
        done = time.perf_counter()
        asyncio.run(executor.close())
    rate = len(ids) / (done - loaded)
    if args.json:
        print(json.dumps({
            "model": str(folder), "tp": layout.tp, "pp": layout.pp, "dtype": args.dtype,
            "prompt_token_ids": prompt_ids, "token_ids": ids, "text": detok.text + tail,
            "logprobs": logprobs, "finish_reason": finish,
            "load_seconds": round(loaded - start, 2), "tokens_per_second": round(rate, 2),
        }))
    else:
        print(tail)
        print(f"[{len(ids)} tokens, {finish}, {rate:.1f} tokens/s, {layout}, load {loaded - start:.1f} s]",
              file=sys.stderr)
    return 0
