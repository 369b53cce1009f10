"""Hand-written CPU kernels (`cpu_kernels.c`) for what a decode step does slowly through PyTorch's
CPU operators: a linear layer over a few rows (MKL reads the weight at about half the machine's
read bandwidth there; this kernel at about 85%), and the small per-layer operations whose cost is
mostly dispatch (RMSNorm is six operators, RoPE five, SiLU-and-multiply two, paged decode attention a
gather, a mask and SDPA). `bench/decode.py` shows the effect end to end, `bench/cpu_linear.py` layer by layer.

The C file is compiled once per machine with the system C compiler into
`$XDG_CACHE_HOME/caravan/kernels/` (about a second) and loaded with ctypes, which releases the GIL
for the call. `CARAVAN_CPU_KERNELS` chooses:
- `auto` (default): use the kernels where they can be built (x86-64 with AVX2 and FMA, a C
  compiler); otherwise warn once, naming why, and use PyTorch's matmul.
- `on`: the same, but a machine that cannot build them is an error.
- `off`: PyTorch's matmul only (for comparisons).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "CARAVAN_CPU_KERNELS"
MAX_ROWS = 128           # the kernel beats MKL's GEMM up to here: 1.8x at 16 rows, 1.1x at 128 (bench/cpu_linear.py)
SOURCE = Path(__file__).with_name("cpu_kernels.c")
MAX_HEADS = 128          # query heads per rank the attention kernel takes (its score buffer: 64 KiB)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c99", f"-DCARAVAN_MAX_HEADS={MAX_HEADS}"]


class CpuKernelsUnavailable(RuntimeError):
    pass


class KVIndexError(IndexError):
    """A decode step whose indices point outside the tensors the attention kernels would read or
    write (a bug upstream, in whoever built the step): refused before the kernel runs."""


_INDEX_PROBLEMS = {   # caravan_check_decode_indices's kinds
    1: "decode row {row} reads token row {value}, outside the step's {tokens} rows",
    2: "decode row {row} reads block table row {value}, outside the step's {seqs} tables",
    3: "decode row {row} attends to {value} keys; its block table holds 1 to {keys}",
    4: "decode row {row}'s block table names block {value}, outside the KV cache's {blocks} blocks",
    5: "row {row} would write its key and value to slot {value}, outside the KV cache's {slots} slots",
}


_lock = threading.Lock()
_state: dict[str, object] = {}   # "lib": the loaded library or None; "why": the reason it is None


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={value!r}: use auto (default), on or off")
    return value


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they are off or cannot be built (`auto` warns once)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            choice = mode()
            lib, why = None, f"{ENV}=off"
            if choice != "off":
                try:
                    lib, why = _load(), ""
                except CpuKernelsUnavailable as e:
                    if choice == "on":
                        raise CpuKernelsUnavailable(f"{ENV}=on but {e}") from None
                    why = str(e)
                    log.warning("CPU kernels unavailable (%s); decode steps use PyTorch's operators, up to 2x "
                                "slower at a few sequences. Set %s=off to silence this.", why, ENV)
            _state["lib"], _state["why"] = lib, why
    return _state["lib"]  # type: ignore[return-value]


def why_unavailable() -> str:
    library()
    return str(_state.get("why", ""))


def for_tensor(x: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, where they apply to `x` (float32 on CPU) and are available."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return library()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for the headers of benchmarks and cache keys."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def attention_fits(heads: int, head_dim: int) -> bool:
    """Whether the decode attention kernel takes these per-rank shapes."""
    return head_dim % 8 == 0 and heads <= MAX_HEADS


def linear(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """x [rows, in] @ weight[out, in].T."""
    x, weight = x.contiguous(), weight.contiguous()
    rows, features = x.shape
    y = torch.empty(rows, weight.shape[0], dtype=torch.float32)
    lib.caravan_linear_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rows, features, weight.shape[0],
                           torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lib: ctypes.CDLL) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., dim]."""
    x = x.contiguous()
    y = torch.empty_like(x)
    dim = x.shape[-1]
    lib.caravan_rms_norm_f32(x.data_ptr(), weight.contiguous().data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps,
                             torch.get_num_threads())
    return y


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """silu(gate) * up for gate_up [rows, 2 * inter] (gate first); returns [rows, inter]."""
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(rows, inter, dtype=torch.float32)
    lib.caravan_silu_mul_f32(gate_up.data_ptr(), y.data_ptr(), rows, inter, torch.get_num_threads())
    return y


def rope_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, lib: ctypes.CDLL) -> None:
    """Rotates in place the first `heads` heads of x [T, any heads, head_dim] (contiguous)."""
    assert x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    rows, _, head_dim = x.shape
    lib.caravan_rope_f32(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), rows, heads, head_dim)


def paged_decode_attention(q: torch.Tensor, token_index: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor, seq_index: torch.Tensor,
                           kv_len: torch.Tensor, scale: float, lib: ctypes.CDLL) -> torch.Tensor:
    """q: [T, H, D] (rows may be strided, heads contiguous); rows `token_index` are decodes of the
    sequences `seq_index` (rows of `block_tables`) with `kv_len` keys each, already cached in
    k_cache, v_cache [blocks, block_size, KV, D]. Returns [len(token_index), H, D]."""
    _, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(2) == 1 and q.stride(1) == head_dim and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert attention_fits(heads, head_dim) and heads % kv_heads == 0
    tables = block_tables.contiguous()
    out = torch.empty(len(token_index), heads, head_dim, dtype=torch.float32)
    lib.caravan_paged_decode_attention_f32(
        q.data_ptr(), q.stride(0), token_index.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), tables.stride(0), seq_index.data_ptr(), kv_len.data_ptr(), len(token_index), heads,
        kv_heads, head_dim, block_size, scale, out.data_ptr(), torch.get_num_threads())
    return out


def decode_attention_block(h: torch.Tensor, norm_w: torch.Tensor, eps: float, qkv_w: torch.Tensor, heads: int,
                           kv_heads: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, token_index: torch.Tensor,
                           seq_index: torch.Tensor, block_tables: torch.Tensor, kv_len: torch.Tensor, scale: float,
                           o_w: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """The attention half of a decoder layer for a step of decode rows only (row `token_index[d]` of h
    is a query of sequence `seq_index[d]` over `kv_len[d]` keys), before the all-reduce and the
    residual: o_proj(attention(rope(qkv_proj(rms_norm(h))))); new keys and values go to the cache."""
    rows, hidden = h.shape
    head_dim = k_cache.shape[-1]
    assert h.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous()
    assert sin.is_contiguous() and attention_fits(heads, head_dim) and rows <= MAX_ROWS
    tables = block_tables.contiguous()
    out = torch.empty(rows, o_w.shape[0], dtype=torch.float32)
    scratch = torch.empty(rows * (hidden + (2 * heads + 2 * kv_heads) * head_dim), dtype=torch.float32)
    lib.caravan_decode_attention_block_f32(
        h.data_ptr(), rows, hidden, norm_w.data_ptr(), eps, qkv_w.data_ptr(), heads, kv_heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(),
        token_index.data_ptr(), seq_index.data_ptr(), tables.data_ptr(), tables.stride(0), kv_len.data_ptr(), k_cache.shape[1], scale,
        o_w.data_ptr(), out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out


def check_decode_indices(token_index: torch.Tensor, seq_index: torch.Tensor, kv_len: torch.Tensor, tokens: int,
                         tables: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         lib: ctypes.CDLL) -> None:
    """Raises KVIndexError where a step's indices (int64, contiguous) leave its tensors: the attention
    kernels (`paged_decode_attention`, `decode_attention_block`) index raw memory and would not fail,
    only read or corrupt someone else's. `LlamaStage.forward` calls it once a step, before its layers
    (all of which share the step's indices and the cache's shape); 9 µs, about 1% of a 1-row layer of
    SmolLM2 were it called at every layer. `tokens`: the step's rows; every one has a slot."""
    assert len(seq_index) == len(kv_len) == len(token_index) and tables.is_contiguous()
    blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    slots = slot_mapping.contiguous()
    bad = (ctypes.c_int64 * 2)()
    kind = lib.caravan_check_decode_indices(
        token_index.data_ptr(), seq_index.data_ptr(), kv_len.data_ptr(), len(token_index), tokens, tables.data_ptr(),
        tables.shape[0], tables.stride(0), tables.shape[1], block_size, blocks,
        slots.data_ptr(), tokens, bad)
    if kind:
        raise KVIndexError(_INDEX_PROBLEMS[kind].format(
            row=bad[0], value=bad[1], tokens=tokens, seqs=tables.shape[0], keys=tables.shape[1] * block_size,
            blocks=blocks, slots=blocks * block_size) + "; the step was refused before the CPU kernel ran")


def mlp_block(h: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_up_w: torch.Tensor, down_w: torch.Tensor,
              lib: ctypes.CDLL) -> torch.Tensor:
    """The MLP half of a decoder layer for a few rows, before the all-reduce and the residual:
    down_proj(silu(gate) * up) of rms_norm(h)."""
    rows, hidden = h.shape
    inter = gate_up_w.shape[0] // 2
    assert h.is_contiguous() and rows <= MAX_ROWS
    out = torch.empty(rows, down_w.shape[0], dtype=torch.float32)
    scratch = torch.empty(rows * (hidden + 3 * inter), dtype=torch.float32)
    lib.caravan_mlp_block_f32(h.data_ptr(), rows, hidden, norm_w.data_ptr(), eps, gate_up_w.data_ptr(), inter,
                              down_w.data_ptr(), out.data_ptr(), scratch.data_ptr(), torch.get_num_threads())
    return out


def _cpuinfo(field: str) -> str:
    """The value of the first `field: value` line of /proc/cpuinfo ("" where there is none, or no file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return ""


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def _load() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise CpuKernelsUnavailable(f"they are written for x86-64 and this machine is {platform.machine()}")
    missing = {"avx2", "fma"} - _cpu_flags()
    if missing:
        raise CpuKernelsUnavailable(f"this CPU lacks {', '.join(sorted(missing))}")
    path = _build()
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    signatures = {
        "caravan_linear_f32": [p, p, p, i64, i64, i64, i32],
        "caravan_rms_norm_f32": [p, p, p, i64, i64, f32, i32],
        "caravan_rope_f32": [p, i64, p, p, i64, i64, i64],
        "caravan_silu_mul_f32": [p, p, i64, i64, i32],
        "caravan_paged_decode_attention_f32": [p, i64, p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, p, i32],
        "caravan_decode_attention_block_f32": [p, i64, i64, p, f32, p, i64, i64, i64, p, p, p, p, p, p, p, p, i64, p,
                                               i64, f32, p, p, p, i32],
        "caravan_mlp_block_f32": [p, i64, i64, p, f32, p, i64, p, p, p, i32],
        "caravan_check_decode_indices": [p, p, p, i64, i64, p, i64, i64, i64, i64, i64, p, i64, p],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int32 if name == "caravan_check_decode_indices" else None
    return lib


def _build() -> Path:
    """Compiles the C file unless this exact build (source, flags, PyTorch) is already cached."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CpuKernelsUnavailable("no C compiler found (install gcc, or set CC)")
    torch_lib = Path(torch.__file__).parent / "lib"
    # PyTorch's own OpenMP runtime, so that one thread pool serves both.
    link = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"] if (torch_lib / "libgomp.so.1").exists() else []
    link.append("-lm")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS + link).encode(), compiler.encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caravan" / "kernels"
    target = cache / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    log.info("building CPU kernels (once per machine): %s -> %s", SOURCE.name, target)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
    except OSError as e:
        raise CpuKernelsUnavailable(f"the kernel cache {cache} is not writable ({e.strerror}); "
                                    f"set XDG_CACHE_HOME to a writable folder") from None
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, *link], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise CpuKernelsUnavailable(f"{compiler} failed to build {SOURCE.name}: "
                                        f"{(done.stderr or done.stdout).strip()[-500:]}")
        os.replace(tmp, target)  # atomic: ranks building at once each install a whole file
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CpuKernelsUnavailable(f"{compiler} could not run: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
