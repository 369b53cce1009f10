"""The linear layers of one decode step on CPU, three ways: Caravan's kernel (shard/kernels/cpu_kernels.c),
MKL's GEMM as (W @ x.T).T, and F.linear (addmm). Same weights, same process, alternating rounds;
prints the best round of each and the kernel's speedup, per batch size.

    python bench/cpu_linear.py                     # SmolLM2-135M's shapes (every layer + LM head), 2 threads
    python bench/cpu_linear.py --rows 1 4 16 --rounds 9
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
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from shard.kernels import cpu as cpu_kernels

    torch.set_num_threads(args.threads)
    lib = cpu_kernels.library()
    if lib is None:
        raise SystemExit(f"CPU kernels unavailable: {cpu_kernels.why_unavailable()}")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=gen) for o, i, n in SHAPES for _ in range(n)]
    nbytes = sum(w.numel() * 4 for w in weights)
    ways = {
        "kernel": lambda x, w: cpu_kernels.linear(x, w, lib),
        "MKL (W@x.T).T": lambda x, w: (w @ x.T).T.contiguous(),
        "F.linear": lambda x, w: F.linear(x, w),
    }
    print(f"{len(weights)} weights, {nbytes / 1e6:.0f} MB, {args.threads} threads; best of {args.rounds} rounds")
    for rows in args.rows:
        inputs = [torch.randn(rows, w.shape[1], generator=gen) for w in weights]
        best = {name: float("inf") for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                for x, w in zip(inputs, weights):
                    fn(x, w)
                best[name] = min(best[name], time.perf_counter() - start)
        k = best["kernel"]
        cells = "   ".join(f"{name} {t * 1e3:6.1f} ms" for name, t in best.items())
        print(f"rows {rows:>3}: {cells}   kernel {best['MKL (W@x.T).T'] / k:.2f}x MKL, {best['F.linear'] / k:.2f}x "
              f"F.linear; weights at {nbytes / k / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
