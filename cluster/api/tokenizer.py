"""Text <-> token ids for the CLI and the router: a thin layer over a checkpoint's Hugging Face tokenizer.

The shards only ever see ids; everything textual (chat templates, stop tokens, streaming text)
happens here, once, in front of the pipeline.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from cluster.engine.request import checkpoint_eos_ids
from shard.errors import UserError


class TokenizerError(UserError, ValueError):
    """The checkpoint folder cannot give what was asked; the message names the folder and the fix."""


class Tokenizer:
    """A checkpoint's tokenizer plus the stop ids its model may emit."""

    def __init__(self, hf_tokenizer, eos_token_ids: set[int], folder: Path) -> None:
        self._hf = hf_tokenizer
        # The Rust tokenizer itself, where there is one: transformers' decode wraps it in a walk over
        # every id (type checks and conversions) that cost 5x the decode on the router's loop.
        self._fast = hf_tokenizer.backend_tokenizer if getattr(hf_tokenizer, "is_fast", False) else None
        self._eos_token_ids = frozenset(eos_token_ids)
        self._folder = folder

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise TokenizerError(
                f"{folder} has no tokenizer.json; point at a Hugging Face checkpoint folder that has "
                "tokenizer.json and tokenizer_config.json (as written by tokenizer.save_pretrained)"
            )
        hf = AutoTokenizer.from_pretrained(folder)
        eos = set(checkpoint_eos_ids(folder))
        if hf.eos_token_id is not None:
            eos.add(hf.eos_token_id)
        return cls(hf, eos, folder)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def chat_template(self) -> str | None:
        return self._hf.chat_template

    @property
    def has_chat_template(self) -> bool:
        return bool(self._hf.chat_template)

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added special tokens included (Llama 3.1: 128,256)."""
        return len(self._hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # No "clean up" of spaces before punctuation: it is a WordPiece-era rewrite that corrupts
        # BPE output and would make streamed text differ from the whole decode.
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids for a conversation (with `tools`, for a template that takes them); the
        template itself adds any BOS, so encode() is not used."""
        if not self._hf.chat_template:
            raise TokenizerError(
                f"The tokenizer in {self._folder} has no chat template (neither chat_template.jinja nor a "
                "chat_template key in tokenizer_config.json); use an instruct checkpoint or send a plain prompt"
            )
        return list(
            self._hf.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        )


class IncrementalDetokenizer:
    """Streams text from ids arriving one at a time, with the same result as decoding them all at once.

    Decoding only a short window (the ids not yet emitted as text, plus the ids of the previous piece
    as context) keeps the cost per token constant instead of re-decoding everything. A window whose text
    ends in U+FFFD stops mid-character (an emoji or CJK character spans several byte tokens), so its
    text is held back until the character is complete, but for `MAX_HELD_TOKENS` tokens at most: a
    UTF-8 character is at most 4 bytes, so longer runs are no character, and holding them would grow
    the window, and the cost of every token, without bound.
    """

    MAX_HELD_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # Start of the window: context already turned into text.
        self._read_offset = 0  # End of the ids whose text has been emitted.
        self._text = ""
        self._prefix: str | None = None  # the text of ids[_prefix_offset:_read_offset], once decoded

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", while a character is still partial)."""
        self._ids.append(token_id)
        return self._emit(hold_partial=True)

    def flush(self) -> str:
        """At the end of the stream, return held-back text (a cut-off character decodes to U+FFFD)."""
        return self._emit(hold_partial=False)

    def _emit(self, hold_partial: bool) -> str:
        skip = self._skip_special_tokens
        if self._prefix is None:  # the window's context changes only when text is emitted
            self._prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip)
        prefix = self._prefix
        window = self._tokenizer.decode(self._ids[self._prefix_offset :], skip)
        held = len(self._ids) - self._read_offset
        partial = hold_partial and window.endswith("\ufffd") and held < self.MAX_HELD_TOKENS
        if len(window) <= len(prefix) or partial:
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix = None
        self._text += delta
        return delta
