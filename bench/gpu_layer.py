"""One TP-8 shard of Llama 3.1 405B's decoder layers on one GPU (the all-reduces left out), measured
against what the same device measures first: its copy bandwidth and its bf16 GEMM rate.

- decode, batch 1 to 256 at contexts 1K and 8K, time per layer in four ways: eager with PyTorch's
  operators only, eager with the default kernels (`shard.kernels.DEFAULT_TRITON_OPS`), replayed as
  CUDA graphs (`shard.graphs`) with those, and as graphs with every Triton kernel; each as a
  percentage of the roofline: the layer's weights and its KV read once at the copy bandwidth.
- a speculative verify step (1 + 4 rows a sequence, batch 1 and 8, both contexts), in the same ways,
  and as a multiple of the decode step of the same batch: what speculation's gain rests on.
- prefill of 2,048 and 8,192 tokens (one sequence) and 4 x 512, as a percentage of the GEMM rate
  (the layer's linear FLOPs plus causal attention's).
- greedy tokens in fp32 against transformers' for a synthetic Llama 3.1 (when transformers is installed).

The shard's shapes come from 405B's real config.json (`../shared/fixtures/llama-3.1-405b-instruct/`):
heads, KV heads and MLP rows divided by 8. Writes JSON to bench/results/. It needs only torch (and
triton for the kernels) and this checkout: no Ray, no install. `--smoke` runs tiny shapes on the
CPU in seconds (CI runs it), where there are no graphs nor Triton kernels to time.

    python bench/gpu_layer.py              # on a GPU
    python bench/gpu_layer.py --smoke      # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shard import kernels  # noqa: E402
from shard.attention import AttentionMetadata  # noqa: E402
from shard.config import ModelConfig  # noqa: E402
from shard.gpus import gpu_for_device  # noqa: E402
from shard.layout import Layout  # noqa: E402
from shard.model import LlamaStage  # noqa: E402
from shard.parallel import ParallelContext  # noqa: E402

FIXTURE = REPO.parent / "shared" / "fixtures" / "llama-3.1-405b-instruct"
TP, BLOCK = 8, 16
DRAFTS = 4        # draft tokens a verify step checks (speculative.num_tokens' default)
TARGETS = {"decode": {1: 0.8, 8: 0.8, 32: 0.8, 64: 0.8, 256: 0.7}, "prefill": 0.6}


def shard_config(cfg: ModelConfig, tp: int, layers: int) -> ModelConfig:
    """One TP rank's layer shapes as a TP-1 model (the same math without the all-reduces); a tiny
    vocabulary, so the embedding and LM head cost nothing beside the layers."""
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
                               intermediate_size=cfg.intermediate_size // tp, num_layers=layers, vocab_size=256,
                               tie_word_embeddings=False)


def build(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> LlamaStage:
    torch.manual_seed(0)
    model = LlamaStage(cfg, ParallelContext(Layout(), device=device), dtype, device)
    for name, p in model.named_parameters():
        p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return model.eval()


def timed(fn, device: torch.device, iters: int) -> float:
    """Median seconds of one call over `iters` rounds, after a warm-up."""
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, iters)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, device, iters)


def layer_bytes(model: LlamaStage) -> int:
    layer = model.layers[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def decode_case(model: LlamaStage, batch: int, context: int, device: torch.device):
    per_seq = -(-(context + 1) // BLOCK)
    cache = model.new_kv_cache(batch * per_seq + 1, BLOCK)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, BLOCK, device)
    ids = torch.zeros(batch, dtype=torch.int64, device=device)
    positions = torch.full((batch,), context, dtype=torch.int64, device=device)
    return cache, tables, meta, ids, positions


def measure_decode(model, batch, context, device, iters, modes) -> dict[str, float]:
    """Seconds per step of `model` (all its layers) in each mode."""
    from shard.graphs import CudaGraphBackend, DecodeGraphRunner

    cache, tables, meta, ids, positions = decode_case(model, batch, context, device)
    out = {}
    for mode in modes:
        ops = {"eager": (), "eager+kernels": kernels.DEFAULT_TRITON_OPS, "graphs": kernels.DEFAULT_TRITON_OPS,
               "graphs+all_triton": kernels.TRITON_OPS}[mode]
        previous = kernels.use_triton(ops)
        try:
            if mode.startswith("graphs"):
                runner = DecodeGraphRunner(model, cache, CudaGraphBackend(device), max_batch=batch,
                                           max_context=context + BLOCK, pad_block=cache.num_blocks - 1)
                runner.run(ids.cpu(), [context] * batch, tables)
                replay = runner.graphs[runner.bucket(batch)]
                out[mode] = timed(replay, device, iters)
                del runner
            else:
                out[mode] = timed(lambda: model(ids, positions, meta, cache), device, iters)
        finally:
            kernels.use_triton(previous)
    return out


def measure_verify(model, batch, drafts, context, device, iters, modes) -> dict[str, float]:
    """Seconds per speculative verify step of `model`: `batch` sequences of 1 + `drafts` rows each over
    `context` cached tokens (decode rows, `shard.attention.MAX_DECODE_ROWS`), eagerly and as graphs."""
    from shard.graphs import CudaGraphBackend, DecodeGraphRunner

    rows = drafts + 1
    cache, tables, _, _, _ = decode_case(model, batch, context + drafts, device)
    meta = AttentionMetadata.build([rows] * batch, [context] * batch, tables, BLOCK, device)
    ids = torch.zeros(batch * rows, dtype=torch.int64, device=device)
    positions = torch.arange(context, context + rows, device=device).repeat(batch)
    out = {}
    for mode in modes:
        ops = kernels.TRITON_OPS if mode == "graphs+all_triton" else () if mode == "eager" else kernels.DEFAULT_TRITON_OPS
        previous = kernels.use_triton(ops)
        try:
            if mode.startswith("graphs"):
                runner = DecodeGraphRunner(model, cache, CudaGraphBackend(device), max_batch=batch * rows,
                                           max_context=context + rows + BLOCK, pad_block=cache.num_blocks - 1)
                runner.run(ids.cpu(), [context] * batch, tables, [rows] * batch)
                out[mode] = timed(runner.graphs[runner.bucket(batch * rows)], device, iters)
                del runner
            else:
                out[mode] = timed(lambda: model(ids, positions, meta, cache), device, iters)
        finally:
            kernels.use_triton(previous)
    return out


def measure_prefill(model, lengths: list[int], device, iters) -> float:
    total = sum(lengths)
    per_seq = [-(-n // BLOCK) for n in lengths]
    cache = model.new_kv_cache(sum(per_seq), BLOCK)
    starts = [sum(per_seq[:i]) for i in range(len(lengths))]
    tables = [list(range(s, s + n)) for s, n in zip(starts, per_seq)]
    meta = AttentionMetadata.build(lengths, [0] * len(lengths), tables, BLOCK, device)
    ids = torch.zeros(total, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    rows = torch.tensor([sum(lengths[:i + 1]) - 1 for i in range(len(lengths))], device=device)
    return timed(lambda: model(ids, positions, meta, cache, logit_rows=rows), device, iters)


def prefill_flops(cfg: ModelConfig, lengths: list[int], layers: int) -> float:
    """Linear FLOPs (2 per weight per token) plus causal attention's (QK and PV, half the square)."""
    h, d = cfg.hidden_size, cfg.head_dim
    weights = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * cfg.intermediate_size
    attn = sum(2 * 2 * cfg.num_heads * d * n * n / 2 for n in lengths)
    return layers * (2 * weights * sum(lengths) + attn)


def greedy_check(device: torch.device, tokens: int) -> dict:
    """fp32 greedy tokens of Caravan's worker against transformers' generate on one synthetic Llama 3.1."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed"}
    import tempfile

    from shard.sampler import SamplingParams
    from shard.worker import SeqChunk, ShardWorker, StepInput
    from tests.synthetic import make_llama

    with tempfile.TemporaryDirectory() as tmp:
        path = make_llama(Path(tmp) / "m", layers=4, heads=8, kv_heads=2, head_dim=32, intermediate=512)
        prompt = [5, 17, 42, 99, 7, 300, 12, 8]
        hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).to(device).eval()
        hf.generation_config.eos_token_id = None   # every token greedy, as the worker's ignore_eos
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=tokens,
                              do_sample=False)[0, len(prompt):].tolist()
        blocks = -(-(len(prompt) + tokens) // BLOCK)
        worker = ShardWorker(path, ParallelContext(Layout(), device=device), num_blocks=blocks, block_size=BLOCK,
                             progress=False, cuda_graphs=True, graph_max_batch=1)
        greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        ids, got = list(prompt), []
        for i in range(tokens):
            chunk = ids if i == 0 else ids[-1:]
            out = worker.execute(StepInput([SeqChunk(0, chunk, 0 if i == 0 else len(ids) - 1,
                                                     list(range(blocks)), greedy, i)]))
            got.append(out.samples[0].token_id)
            ids.append(got[-1])
    same = sum(a == b for a, b in zip(got, ref))
    return {"tokens": tokens, "equal": same, "graphs": worker.graphs is not None, "match": same == tokens}


def installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def efficiency(result: dict) -> dict:
    """What `caravan plan` reads (`shard.planner.load_measured`): the fraction of the roofline decode
    reached at each batch, at the shortest context and in the fastest way measured (serving replays
    graphs where it can), and the fraction of the GEMM rate of the first prefill."""
    context = min(r["context"] for r in result["decode"])
    best: dict[str, float] = {}
    for r in result["decode"]:
        if r["context"] == context:
            key = str(r["batch"])
            best[key] = max(best.get(key, 0.0), min(1.0, r["pct_of_roofline"] / 100))
    prefill = min(1.0, result["prefill"][0]["pct_of_gemm_rate"] / 100)
    return {"bf16": {"decode_roofline_fraction": best, "prefill_gemm_fraction": prefill, "context": context}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in seconds")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="JSON file (default: bench/results/gpu_layer-<time>.json)")
    args = ap.parse_args(argv)

    cfg = ModelConfig.from_pretrained(FIXTURE)
    if args.smoke:
        device, dtype, layers, iters = torch.device("cpu"), torch.float32, 2, 2
        cfg = dataclasses.replace(cfg, hidden_size=128, num_heads=8 * TP, num_kv_heads=TP, head_dim=16,
                                  intermediate_size=96 * TP)
        batches, contexts, prefills = [1, 4], [16, 40], [[32], [64], [16] * 4]
        verify_batches = [1, 4]
        bw_bytes, gemm_n, greedy_tokens = 2**24, 256, 4
        modes = ["eager"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on a CPU")
        device, dtype, layers, iters = torch.device("cuda"), torch.bfloat16, args.layers, args.iters
        batches, contexts, prefills = [1, 8, 32, 64, 128, 256], [1024, 8192], [[2048], [512] * 4, [8192]]
        verify_batches = [1, 8]   # speculation's default max_batch
        bw_bytes, gemm_n, greedy_tokens = 2**31, 8192, 128
        modes = ["eager", "eager+kernels", "graphs", "graphs+all_triton"]
        if kernels.triton_module() is None:
            modes = ["eager"]
    shard = shard_config(cfg, TP, layers)
    bandwidth = copy_bandwidth(device, bw_bytes, iters)
    rate = gemm_rate(device, dtype, gemm_n, iters)
    print(f"{device}: copy {bandwidth / 1e9:.0f} GB/s, {dtype} GEMM {rate / 1e12:.1f} TFLOP/s")
    model = build(shard, dtype, device)
    weights = layer_bytes(model)
    kv_per_token = 2 * shard.num_kv_heads * shard.head_dim * torch.finfo(dtype).bits // 8
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "smoke": args.smoke,
        "torch": torch.__version__, "triton": installed("triton"), "dtype": str(dtype), "layers": layers,
        "shard": {k: getattr(shard, k) for k in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                                  "intermediate_size")},
        "copy_bandwidth_Bps": bandwidth, "gemm_flops_per_s": rate, "layer_weight_bytes": weights,
        "default_triton_ops": sorted(kernels.DEFAULT_TRITON_OPS), "decode": [], "prefill": [],
    }
    for context in contexts:
        for batch in batches:
            times = measure_decode(model, batch, context, device, iters, modes)
            roofline = (weights + batch * (context + 1) * kv_per_token) / bandwidth
            for mode, t in times.items():
                row = {"batch": batch, "context": context, "mode": mode, "ms_per_layer": 1e3 * t / layers,
                       "roofline_ms_per_layer": 1e3 * roofline, "pct_of_roofline": 100 * roofline * layers / t}
                result["decode"].append(row)
                print(f"decode b={batch:<3} ctx={context:<5} {mode:<18} {row['ms_per_layer']:.3f} ms/layer "
                      f"(roofline {row['roofline_ms_per_layer']:.3f}): {row['pct_of_roofline']:.0f}%")
    result["verify"] = []
    for context in contexts:
        for batch in verify_batches:
            for mode, t in measure_verify(model, batch, DRAFTS, context, device, iters, modes).items():
                decode = next(r for r in result["decode"] if (r["batch"], r["context"], r["mode"]) == (batch, context, mode))
                row = {"batch": batch, "draft_tokens": DRAFTS, "context": context, "mode": mode,
                       "ms_per_layer": 1e3 * t / layers, "decode_steps": 1e3 * t / layers / decode["ms_per_layer"]}
                result["verify"].append(row)
                print(f"verify b={batch:<3} k={DRAFTS} ctx={context:<5} {mode:<18} {row['ms_per_layer']:.3f} ms/layer: "
                      f"{row['decode_steps']:.2f} decode steps of the same batch")
    previous = kernels.use_triton(kernels.DEFAULT_TRITON_OPS)
    for lengths in prefills:
        t = measure_prefill(model, lengths, device, max(2, iters // 4))
        flops = prefill_flops(shard, lengths, layers)
        row = {"tokens": lengths, "ms_per_layer": 1e3 * t / layers, "pct_of_gemm_rate": 100 * flops / t / rate}
        result["prefill"].append(row)
        print(f"prefill {'+'.join(map(str, lengths)):<12} {row['ms_per_layer']:.3f} ms/layer: "
              f"{row['pct_of_gemm_rate']:.0f}% of the GEMM rate")
    kernels.use_triton(previous)
    del model
    gpu = gpu_for_device(result["device"])
    result["gpu"] = gpu.name if gpu else None
    result["efficiency"] = efficiency(result)
    result["greedy_fp32_vs_transformers"] = greedy_check(device, greedy_tokens)
    print("greedy fp32 vs transformers:", result["greedy_fp32_vs_transformers"])
    out = args.out or REPO / "bench" / "results" / f"gpu_layer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
