"""bench/peers.py's llama.cpp side: the f32 GGUF it runs, the note when its virtualenv is missing, and (where that
virtualenv exists) greedy batch-1 tokens with and without its prompt lookup decoding."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import shard.demo
from bench.peers import f32_gguf, llamacpp_python, run_llamacpp


def test_f32_gguf_dequantizes_every_tensor_and_keeps_the_metadata(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    src = tmp_path / "tiny.Q4_1.gguf"
    writer = gguf.GGUFWriter(src, "llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_block_count(1)
    writer.add_token_list(["<a>", "<b>"])
    writer.add_eos_token_id(1)
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    quantized = gguf.quants.quantize(weight, q4_1)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_shape=quantized.shape, raw_dtype=q4_1)
    writer.add_tensor("blk.0.attn_norm.weight", weight[0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(shard.demo, "gguf_path", lambda: src)

    out = gguf.GGUFReader(f32_gguf(tmp_path))
    tensors = {t.name: t for t in out.tensors}
    assert {t.tensor_type for t in out.tensors} == {gguf.GGMLQuantizationType.F32}
    expected = gguf.quants.dequantize(quantized, q4_1)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(8, 64), expected)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), weight[0])
    assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert out.fields["tokenizer.ggml.tokens"].contents() == ["<a>", "<b>"]
    assert out.fields["tokenizer.ggml.eos_token_id"].contents() == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_missing_interpreter_skips_with_the_setup_command(tmp_path, capsys):
    assert run_llamacpp([[1, 2]], 4, 1, python=str(tmp_path / "no-python")) is None
    assert "pip install llama-cpp-python==0.3.36" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not Path(llamacpp_python()).exists(), reason="no llama.cpp virtualenv (see bench/peers.py)")
def test_lookup_decoding_emits_the_plain_greedy_tokens():
    from cluster.api.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(shard.demo.ensure_demo_model(progress=False))
    text = "Repeat exactly: the cat sat on the mat, the cat sat."
    prompt = tok.apply_chat_template([{"role": "user", "content": text}])
    plain = run_llamacpp([prompt], 24, 2)
    lookup = run_llamacpp([prompt], 24, 2, lookup=4)
    assert plain is not None and lookup is not None
    assert lookup.outputs == plain.outputs and 0 < plain.tokens == len(plain.outputs[0]) <= 24
    assert plain.seconds > 0 and lookup.system == "llama.cpp lookup 4"
