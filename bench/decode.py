"""Single-process decode throughput: Caravan against Hugging Face `transformers.generate`.

Same checkpoint, same threads, same process, alternating runs so that machine noise hits both;
prints tokens/s for each, the ratio, and the batch-1 figure against the memory-bandwidth
roofline (weight bytes read per decode step / measured copy bandwidth).

    python bench/decode.py                       # SmolLM2-135M, fp32, 2 threads, prompt 32, 128 new tokens
    python bench/decode.py --batch 1 16 --repeat 3 --model PATH
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def copy_bandwidth(nbytes: int = 1 << 29, repeat: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the machine's usable
    memory bandwidth, measured rather than assumed."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def caravan_run(worker, prompts: list[list[int]], new_tokens: int, num_blocks: int, block_size: int) -> float:
    from cluster.engine.executor import LocalExecutor
    from cluster.engine.offline import Request, generate
    from shard.sampler import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    count = sum(1 for _ in generate(LocalExecutor(worker), [Request(p, params) for p in prompts], frozenset(),
                                    num_blocks=num_blocks, block_size=block_size))
    assert count == len(prompts) * new_tokens
    return count / (time.perf_counter() - start)


def hf_run(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape == (len(prompts), ids.shape[1] + new_tokens)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the SmolLM2 demo model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs per system; the median is kept")
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    from shard.demo import ensure_demo_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or ensure_demo_model()
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    block = 16
    per_seq = -(-(args.prompt_len + args.new_tokens) // block)
    from shard.layout import Layout
    from shard.parallel import ParallelContext
    from shard.worker import ShardWorker

    num_blocks = per_seq * max(args.batch)
    caravan = ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=num_blocks, block_size=block, progress=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in caravan.model.parameters())
    bandwidth = copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    vocab = caravan.cfg.vocab_size

    print(f"model {model_dir}, fp32, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"weights {weight_bytes / 1e6:.0f} MB; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"batch-1 roofline {bandwidth / weight_bytes:.1f} tok/s")
    for batch in args.batch:
        prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(batch)]
        caravan_run(caravan, prompts, 4, num_blocks, block)  # warm-up: first-call allocations and kernel selection
        hf_run(hf, prompts, 4)
        ours, theirs = [], []
        for _ in range(args.repeat):
            theirs.append(hf_run(hf, prompts, args.new_tokens))
            ours.append(caravan_run(caravan, prompts, args.new_tokens, num_blocks, block))
        o, t = statistics.median(ours), statistics.median(theirs)
        line = f"batch {batch:>3}: caravan {o:7.1f} tok/s   transformers {t:7.1f} tok/s   ratio {o / t:.2f}x"
        if batch == 1:
            line += f"   roofline {bandwidth / weight_bytes:.1f} tok/s ({o / (bandwidth / weight_bytes):.0%} of it)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
