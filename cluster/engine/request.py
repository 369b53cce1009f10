"""What the engine needs to know of a request before it queues it: whether the model could ever run
it (`check_request`), and which token ids end a sequence (`checkpoint_eos_ids`)."""

from __future__ import annotations

import json
from pathlib import Path

from shard.errors import UserError
from shard.sampler import SamplingParams


class RequestError(UserError, ValueError):
    """A request the model cannot run; the message names the request and the fix."""


def check_request(prompt_ids: list[int], params: SamplingParams, max_len: int, vocab_size: int | None = None) -> None:
    """Raises RequestError when the model could never run this request."""
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > max_len:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                           f"model's context of {max_len} tokens; lower max_tokens or shorten the prompt")
    bad = [] if vocab_size is None else [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the model's vocabulary of {vocab_size}; "
                           f"does the tokenizer belong to this model?")


def checkpoint_eos_ids(folder: str | Path) -> frozenset[int]:
    """End-of-sequence ids from the model's configs. Instruct checkpoints stop on several ids
    (Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>) while the tokenizer names only one."""
    eos: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        if (Path(folder) / name).is_file():
            value = json.loads((Path(folder) / name).read_text()).get("eos_token_id")
            eos.update([value] if isinstance(value, int) else value or [])
    return frozenset(eos)
