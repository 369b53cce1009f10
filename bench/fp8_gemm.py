"""FP8 GEMMs against BF16 for one Llama 3.1 405B layer at TP 8, and FP8 logits against a BF16 twin.

For the layer's four GEMMs (fused q|k|v, o, fused gate|up, down; per-rank shapes from the 405B
config.json) at each row count: BF16 (cuBLAS, F.linear), the weight-only FP8 Triton kernel and
`torch._scaled_mm` with per-token activation quantisation (shard/kernels/fp8.py), each as the median
of timed calls over weight copies that do not fit in L2 together, with its ratio to BF16. Then a
small random Llama built twice, FP8 MLPs and their dequantised BF16 twin: the max abs and relative
error of the logits through each FP8 GEMM. JSON to bench/results/fp8_gemm-<time>.json, with the
efficiencies `caravan plan` reads (decode: weight bytes over time against the HBM peak; prefill: FLOPs
over time against the tensor-core peak) and the row count from which the scaled GEMM beat the
weight-only one (`FP8Gemm.scaled_mm_min_rows`).

    python bench/fp8_gemm.py                 # on a CUDA GPU (SM89+ for the scaled GEMM): Python, torch, triton; no Ray
    python bench/fp8_gemm.py --smoke         # on CPU in seconds: tiny shapes, Triton's interpreter, no timing claims
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runs from a checkout, without installing the package
CONFIG = REPO_ROOT.parent / "shared" / "fixtures" / "llama-3.1-405b-instruct" / "config.json"
ROWS = (1, 16, 64, 256, 2048)
L2_BYTES = 2 * 60 * 2**20          # twice an H200's L2: each timed call reads weights from HBM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=CONFIG, help="the 405B config.json (default: %(default)s)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--iters", type=int, default=50, help="timed calls per GEMM and row count")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter: checks the "
                                                         "script end to end in seconds; its times mean nothing")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by shard.kernels.fp8)
    import torch

    from shard.gpus import gpu_for_device

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU, or with --smoke on CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    gpu = None if args.smoke else gpu_for_device(name)
    shapes = layer_shapes(args.config, args.tp, tiny=args.smoke)
    rows = [1, 16] if args.smoke else args.rows
    iters = 2 if args.smoke else args.iters

    timings = [time_shape(shape, n, k, r, iters, device) for shape, (n, k) in shapes.items() for r in rows]
    for t in timings:
        print(f"{t['shape']:>8} {t['rows']:>5} rows: bf16 {t['bf16_ms']:.3f} ms, weight-only fp8 "
              f"{t['weight_only_ms']:.3f} ms ({t['weight_only_ratio']:.2f}x bf16's time), scaled fp8 "
              f"{t['scaled_mm_ms']:.3f} ms ({t['scaled_mm_ratio']:.2f}x)", flush=True)
    logits = logit_errors(device, tiny=args.smoke)
    for kernel, e in logits.items():
        print(f"logits through {kernel}: max abs error {e['max_abs']:.4g}, relative {e['relative']:.4g}")
    result = {
        "gpu": gpu.name if gpu else None, "device_name": name, "smoke": args.smoke,
        "torch": torch.__version__, "triton": _triton_version(), "tp": args.tp, "config": str(args.config),
        "shapes": {s: {"out": n, "in": k} for s, (n, k) in shapes.items()}, "timings": timings,
        "scaled_mm_faster_from_rows": crossover(timings, rows), "logits": logits,
        "efficiency": efficiency(timings, shapes, rows, gpu) if gpu else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8_gemm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"scaled FP8 faster than weight-only FP8 from {result['scaled_mm_faster_from_rows']} rows "
          f"(FP8Gemm.scaled_mm_min_rows); wrote {path}")


def layer_shapes(config: Path, tp: int, *, tiny: bool) -> dict[str, tuple[int, int]]:
    """(out, in) per rank of the four GEMMs of one decoder layer."""
    from shard.config import ModelConfig

    if tiny:
        return {"qkv": (96, 64), "o": (64, 64), "gate_up": (256, 64), "down": (64, 128)}
    if not config.is_file():
        raise SystemExit(f"no {config}: pass --config with Llama 3.1 405B's config.json")
    cfg = ModelConfig.from_pretrained(config)
    return {"qkv": ((cfg.q_size + 2 * cfg.kv_size) // tp, cfg.hidden_size), "o": (cfg.hidden_size, cfg.q_size // tp),
            "gate_up": (2 * cfg.intermediate_size // tp, cfg.hidden_size),
            "down": (cfg.hidden_size, cfg.intermediate_size // tp)}


def time_shape(shape: str, n: int, k: int, rows: int, iters: int, device) -> dict:
    import torch
    import torch.nn.functional as F

    from shard.kernels import fp8

    gen = torch.Generator(device=device).manual_seed(0)
    copies = max(1, -(-L2_BYTES // (n * k))) if device.type == "cuda" else 1
    w = [torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    scales = [(x.abs().amax(dim=1, keepdim=True).float() / fp8.FP8_MAX) for x in w]
    q = [(x.float() / s).to(fp8.FP8) for x, s in zip(w, scales)]
    x = torch.randn(rows, k, generator=gen, device=device, dtype=torch.bfloat16)
    ways = {"bf16": lambda i: F.linear(x, w[i]),
            "weight_only": lambda i: fp8.weight_only_triton(x, q[i], scales[i]),
            "scaled_mm": lambda i: fp8.scaled_mm(x, q[i], scales[i], 1200.0)}
    out = {"shape": shape, "rows": rows, "out": n, "in": k}
    for way, fn in ways.items():
        out[f"{way}_ms"] = _median_ms(fn, copies, iters, device)
    for way in ("weight_only", "scaled_mm"):
        out[f"{way}_ratio"] = out[f"{way}_ms"] / out["bf16_ms"]
    return out


def _median_ms(fn, copies: int, iters: int, device) -> float:
    import torch

    for i in range(min(copies, 3)):
        fn(i)                                    # compile and warm up
    times = []
    for i in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % copies)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn(i % copies)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def crossover(timings: list[dict], rows: list[int]) -> int | None:
    """The fewest rows from which the scaled GEMM's layer time beats the weight-only one's at every
    measured row count up."""
    def layer(r: int, way: str) -> float:
        return sum(t[f"{way}_ms"] for t in timings if t["rows"] == r)

    faster = [layer(r, "scaled_mm") < layer(r, "weight_only") for r in rows]
    for i, r in enumerate(rows):
        if all(faster[i:]):
            return r
    return None


def efficiency(timings: list[dict], shapes: dict, rows: list[int], gpu) -> dict:
    """What `caravan plan` reads (shard/planner.py, `Measured`), per weight dtype: decode, at each row
    count, the layer's weight bytes over its time against the HBM peak; prefill, at the most rows, its
    FLOPs over its time against the tensor-core peak (FP8's where the scaled GEMM ran)."""
    import torch

    from shard.kernels.fp8 import FP8Gemm

    def layer_ms(r: int, way: str) -> float:
        return sum(t[f"{way}_ms"] for t in timings if t["rows"] == r)

    params = sum(n * k for n, k in shapes.values())
    top = max(rows)
    fp8_prefill = FP8Gemm(1200.0).kernel_for(top, torch.bfloat16)
    out = {}
    for dtype, decode_way, prefill_way, nbytes, flops in (
            ("bf16", "bf16", "bf16", 2, gpu.bf16_flops),
            ("fp8", "weight_only", fp8_prefill, 1,
             gpu.fp8_flops if fp8_prefill == "scaled_mm" and gpu.fp8_flops else gpu.bf16_flops)):
        out[dtype] = {
            "decode_roofline_fraction": {str(r): min(1.0, params * nbytes / (layer_ms(r, decode_way) / 1e3)
                                                     / gpu.hbm_bytes_per_s) for r in rows if r <= 256},
            "prefill_gemm_fraction": min(1.0, 2 * top * params / (layer_ms(top, prefill_way) / 1e3) / flops),
        }
    return out


def logit_errors(device, *, tiny: bool) -> dict:
    """A random 4-layer Llama whose MLPs are FP8 (row-wise, as Meta's checkpoints), against its BF16
    twin holding the dequantised weights: logits of one prompt through each FP8 GEMM."""
    import torch

    from shard.attention import AttentionMetadata
    from shard.config import ModelConfig
    from shard.kernels import fp8
    from shard.layers import ColumnParallelLinear, RowParallelLinear
    from shard.layout import Layout
    from shard.model import LlamaStage
    from shard.parallel import ParallelContext

    raw = json.loads(CONFIG.read_text()) if CONFIG.is_file() else {}
    raw |= {"hidden_size": 128 if tiny else 2048, "intermediate_size": 256 if tiny else 5632,
            "num_hidden_layers": 4, "num_attention_heads": 8 if tiny else 16, "num_key_value_heads": 2 if tiny else 4,
            "vocab_size": 512 if tiny else 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False}
    raw.pop("rope_scaling", None)
    quantization = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                    "modules_to_not_convert": ["lm_head", "model.layers.0", "model.layers.3", "self_attn"]}
    cfg, ctx = ModelConfig.from_dict(raw | {"quantization_config": quantization}), ParallelContext(Layout(), 0, device)
    twin = LlamaStage(ModelConfig.from_dict(raw), ctx, torch.bfloat16, device)
    model = LlamaStage(cfg, ctx, torch.bfloat16, device, fp8_resident=True)
    gen = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            kept = model.get_parameter(name)
            w = torch.randn(p.shape, generator=gen, device=device) * (1.0 if "norm" in name else 0.05)
            if kept.dtype == fp8.FP8:
                scale = w.abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX
                kept.copy_((w / scale).to(fp8.FP8))
                model.get_parameter(name + "_scale").copy_(scale)
                w = kept.float() * scale
            else:
                kept.copy_(w)
            p.copy_(w)
    ids = torch.randint(0, cfg.vocab_size, (32,), generator=gen, device=device)
    meta = AttentionMetadata.build([32], [0], [[0, 1]], 16, device)

    def logits(m: LlamaStage) -> torch.Tensor:
        return m(ids, torch.arange(32, device=device), meta, m.new_kv_cache(2, 16)).float()

    want = logits(twin)
    out = {}
    for kernel, min_rows in (("weight_only", 10**9), ("scaled_mm", 1)):
        for m in model.modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.fp8:
                m.fp8 = fp8.FP8Gemm(1200.0, scaled_mm_min_rows=min_rows)
        got = logits(model)
        out[kernel] = {"max_abs": (got - want).abs().max().item(),
                       "relative": ((got - want).norm() / want.norm()).item()}
    return out


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
