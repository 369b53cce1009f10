"""The linear layers of one step on CPU, four ways: Caravan's kernel (shard/kernels/cpu_kernels.c),
MKL's GEMM as (W @ x.T).T, F.linear (addmm), and oneDNN on a weight prepacked once
(`shard.kernels.onednn`, as vLLM's CPU backend does). Same weights, same process, alternating
rounds; prints the best round of each per batch size, and which is fastest.

    python bench/cpu_linear.py                     # SmolLM2-135M's shapes (every layer + LM head), 2 threads
    python bench/cpu_linear.py --rows 1 4 16 --rounds 9
    python bench/cpu_linear.py --stage             # and the path `CARAVAN_ONEDNN_LINEAR=auto` would take

`--stage` then times the demo model's first decoder layer (and an untied LM head) as a shard
does at load under `auto` (`shard.cpu_path`): whole decode steps, the fused kernels on the plain
weights against the layer's operators on weights prepacked for oneDNN, and prints the verdict.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M at TP 1: (out, in, how many per step): fused QKV, o_proj, fused gate|up, down_proj, LM head.
SHAPES = [(960, 576, 30), (576, 576, 30), (3072, 576, 30), (576, 1536, 30), (49152, 576, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stage", action="store_true", help="also time a decoder layer of the demo model both ways")
    args = ap.parse_args()

    from shard.kernels import cpu as cpu_kernels
    from shard.kernels import onednn

    torch.set_num_threads(args.threads)
    lib = cpu_kernels.library()
    if lib is None:
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    if not onednn.available():
        raise SystemExit(f"prepacked oneDNN linear unavailable: {onednn.why_unavailable()}")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen) for o, i, n in SHAPES for _ in range(n)]
    packed = [onednn.prepack(w) for w in weights]
    nbytes = sum(w.numel() * 4 for w in weights)
    ways = {
        "kernel": lambda x, i: cpu_kernels.linear(x, weights[i], lib),
        "MKL": lambda x, i: (weights[i] @ x.T).T.contiguous(),
        "F.linear": lambda x, i: F.linear(x, weights[i]),
        "oneDNN": lambda x, i: onednn.linear(x, packed[i]),
    }
    print(f"{cpu_kernels.cpu_model()}, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads")
    print(f"{len(weights)} weights, {nbytes / 1e6:.0f} MB; ms per step's linears, best of {args.rounds} rounds; "
          f"MKL is (W@x.T).T, oneDNN prepacked once (batch hint {onednn.BATCH_HINT})")
    print(f"{'rows':>5} " + " ".join(f"{name:>9}" for name in ways) + "   fastest  oneDNN vs F.linear, vs best other")
    for rows in args.rows:
        inputs = [torch.randn(rows, w.shape[1], generator=gen) for w in weights]
        best = {name: float("inf") for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                for i, x in enumerate(inputs):
                    fn(x, i)
                best[name] = min(best[name], time.perf_counter() - start)
        fastest = min(best, key=best.get)
        other = min(t for name, t in best.items() if name != "oneDNN")
        print(f"{rows:>5} " + " ".join(f"{t * 1e3:9.1f}" for t in best.values()) +
              f"   {fastest:<8} {best['F.linear'] / best['oneDNN']:5.2f}x {other / best['oneDNN']:14.2f}x", flush=True)
    if args.stage:
        print_stage_verdict()


def print_stage_verdict() -> None:
    import os

    from shard import cpu_path
    from shard.demo import ensure_demo_model
    from shard.kernels import onednn
    from shard.layout import Layout
    from shard.parallel import ParallelContext
    from shard.worker import ShardWorker

    os.environ[onednn.ENV] = "off"   # plain weights to time both ways from; the verdict is not cached
    worker = ShardWorker(ensure_demo_model(), ParallelContext(Layout()), num_blocks=16, block_size=16, progress=False)
    print(f"\n{worker.cfg.num_layers}-layer demo model, one decoder layer per step of decode rows, "
          f"{cpu_path.CONTEXT} tokens of context each:")
    for part, measured in cpu_path.measure(worker.model).items():
        print(f"  {part}: {measured.describe()}")


if __name__ == "__main__":
    main()
