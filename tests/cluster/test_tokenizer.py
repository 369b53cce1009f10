import json
import shutil
from pathlib import Path

import pytest

from cluster.api.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError
from tests.conftest import LLAMA31_TOKENIZER

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]
TEXTS = [
    "Hello, my dog is cute",
    "Crème brûlée à la française, s'il vous plaît.",
    "Emoji 🦙🚀 and a family 👨‍👩‍👧 in one line",
    "東京は日本の首都です。北京是中国的首都。",
    "  leading spaces,\ttabs\nand newlines  ",
    "Mixed: naïve café — 😀 中文 ✓",
]


@pytest.fixture(scope="module")
def llama31() -> Tokenizer:
    return Tokenizer.from_pretrained(LLAMA31_TOKENIZER)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(params=["llama31", pytest.param("smollm2", marks=pytest.mark.slow)])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def test_llama31_known_encoding(llama31: Tokenizer) -> None:
    assert llama31.encode("Hello, my dog is cute") == [128000, 9906, 11, 856, 5679, 374, 19369]
    assert llama31.encode("Hello", add_special_tokens=False) == [9906]
    assert llama31.bos_token_id == 128000
    assert llama31.vocab_size == 128256


def test_llama31_chat_template(llama31: Tokenizer) -> None:
    ids = llama31.apply_chat_template(CONVERSATION)
    text = llama31.decode(ids, skip_special_tokens=False)
    assert ids[0] == 128000 and ids[1] != 128000  # One BOS, from the template.
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not llama31.decode(llama31.apply_chat_template(CONVERSATION, add_generation_prompt=False),
                              skip_special_tokens=False).endswith("assistant<|end_header_id|>\n\n")


@pytest.mark.slow
def test_smollm2_chatml_template(smollm2: Tokenizer) -> None:
    text = smollm2.decode(smollm2.apply_chat_template(CONVERSATION), skip_special_tokens=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert (smollm2.bos_token_id, smollm2.vocab_size) == (1, 49152)


def test_llama31_eos_ids_include_the_configs(llama31: Tokenizer, tmp_path: Path) -> None:
    assert llama31.eos_token_ids == {128009}  # <|eot_id|>, the tokenizer's own
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA31_TOKENIZER / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 128001}))
    assert Tokenizer.from_pretrained(tmp_path).eos_token_ids == {128001, 128008, 128009}


@pytest.mark.slow
def test_smollm2_eos_ids(smollm2: Tokenizer) -> None:
    assert smollm2.eos_token_ids == {2}  # <|im_end|>


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_matches_whole_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text) + tokenizer.encode(" " + text, add_special_tokens=False) + sorted(
        tokenizer.eos_token_ids
    )
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == text + " " + text
    assert detokenizer.flush() == ""


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🦙", add_special_tokens=False)
    assert len(ids) > 1  # Several byte tokens, so the first ones alone are not a character.
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert [detokenizer.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.push(ids[-1]) == "🦙"


def test_flush_emits_a_cut_off_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🦙", add_special_tokens=False)[:-1]  # The stream ends mid-emoji.
    detokenizer = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detokenizer.push(i) for i in ids)
    assert streamed + detokenizer.flush() == detokenizer.text == tokenizer.decode(ids)
    assert detokenizer.text.endswith("\ufffd")


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=rf"{tmp_path} has no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_without_chat_template(tmp_path: Path) -> None:
    shutil.copy(LLAMA31_TOKENIZER / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="has no chat template"):
        Tokenizer.from_pretrained(tmp_path).apply_chat_template(CONVERSATION)


class CountingTokenizer:
    """A tokenizer that records how many ids each decode call is given."""

    def __init__(self, inner: Tokenizer):
        self.inner, self.sizes = inner, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens)


def test_a_long_run_of_incomplete_characters_costs_the_same_per_token(tokenizer: Tokenizer) -> None:
    """8k tokens that never complete a character (the lead byte of an emoji, again and again): each
    token decodes a bounded window, so the stream is linear in its length, and its text is still the
    whole decode's."""
    lead = tokenizer.encode("🦙", add_special_tokens=False)[0]
    ids = [lead] * 8192
    counting = CountingTokenizer(tokenizer)
    detokenizer = IncrementalDetokenizer(counting)
    streamed = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
    assert max(counting.sizes) <= 16  # two pieces of at most 8 held tokens, whatever the length
    assert streamed == tokenizer.decode(ids)
