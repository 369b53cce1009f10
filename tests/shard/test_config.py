"""ModelConfig: Hugging Face config.json files read strictly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from shard.config import ConfigError, ModelConfig, RopeScaling
from tests.conftest import SHARED

LLAMA_405B = SHARED / "fixtures" / "llama-3.1-405b-instruct"

# What transformers 5 writes for SmolLM2-135M-Instruct (the demo model's config.json).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "dtype": "float32", "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 576, "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1, "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "transformers_version": "5.23.0", "unk_token_id": 0, "use_cache": True, "vocab_size": 49152,
}

# Llama 3.1 8B Instruct as published (transformers 4 spelling of RoPE).
LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def llama31_v5() -> dict:
    """The same model as transformers 5 writes it: theta and scaling together in rope_parameters."""
    raw = copy.deepcopy(LLAMA31_V4)
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**scaling, "rope_theta": raw.pop("rope_theta")}
    raw["dtype"] = raw.pop("torch_dtype")
    return raw


def with_(base: dict, **changes) -> dict:
    raw = copy.deepcopy(base)
    for key, value in changes.items():
        if value is _DROP:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


_DROP = object()


# --- parsing ----------------------------------------------------------------------------------------


def test_smollm2_config() -> None:
    cfg = ModelConfig.from_dict(SMOLLM2, name="smollm2")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 576, 1536)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.q_size == 576 and cfg.kv_size == 192
    assert cfg.tie_word_embeddings is True
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert cfg.name == "smollm2"
    # 30 layers x K and V x 3 heads x 64 x 2 bytes
    assert cfg.kv_bytes_per_token(2) == 2 * 30 * 192 * 2


def test_llama31_config() -> None:
    cfg = ModelConfig.from_dict(LLAMA31_V4)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (32, 32, 8)
    assert cfg.head_dim == 128  # derived: 4096 / 32
    assert cfg.tie_word_embeddings is False
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


def test_head_dim_given_differs_from_derived() -> None:
    # Llama 3.2-style explicit head_dim that is not hidden / heads.
    cfg = ModelConfig.from_dict(with_(SMOLLM2, head_dim=32))
    assert cfg.head_dim == 32 and cfg.q_size == 9 * 32
    cfg = ModelConfig.from_dict(with_(SMOLLM2, head_dim=None))
    assert cfg.head_dim == 64


def test_defaults_when_optional_fields_absent() -> None:
    raw = with_(SMOLLM2, num_key_value_heads=_DROP, tie_word_embeddings=_DROP, eos_token_id=_DROP,
                bos_token_id=_DROP, rms_norm_eps=_DROP, head_dim=_DROP, rope_parameters=_DROP)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.num_kv_heads == 9  # multi-head attention
    assert cfg.tie_word_embeddings is False
    assert cfg.eos_token_ids == () and cfg.bos_token_id is None
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def test_rope_spellings_agree() -> None:
    v4 = ModelConfig.from_dict(LLAMA31_V4)
    v5 = ModelConfig.from_dict(llama31_v5())
    assert v4 == v5
    # The old key "type" instead of "rope_type".
    legacy = with_(LLAMA31_V4, rope_scaling={**{k: v for k, v in LLAMA31_V4["rope_scaling"].items()
                                               if k != "rope_type"}, "type": "llama3"})
    assert ModelConfig.from_dict(legacy) == v4
    # rope_theta repeated beside rope_parameters, with the same value, is not a contradiction.
    assert ModelConfig.from_dict(with_(llama31_v5(), rope_theta=500000.0)) == v4


def test_rope_default_spellings_agree() -> None:
    v5 = ModelConfig.from_dict(SMOLLM2)
    v4 = ModelConfig.from_dict(with_(SMOLLM2, rope_parameters=_DROP, rope_theta=100000.0))
    v4_null_scaling = ModelConfig.from_dict(with_(SMOLLM2, rope_parameters=_DROP, rope_theta=100000.0,
                                                  rope_scaling=None))
    assert v5 == v4 == v4_null_scaling


def test_405b_fixture() -> None:
    cfg = ModelConfig.from_pretrained(LLAMA_405B)
    assert cfg.name == "llama-3.1-405b-instruct"
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (126, 128, 8, 128)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (16384, 53248, 128256)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)
    assert cfg.max_position_embeddings == 131072
    assert cfg.tie_word_embeddings is False
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    # The config file directly, not its folder.
    assert ModelConfig.from_pretrained(LLAMA_405B / "config.json") == cfg


def test_from_dict_does_not_mutate_its_input() -> None:
    raw = llama31_v5()
    before = copy.deepcopy(raw)
    ModelConfig.from_dict(raw)
    assert raw == before


# --- errors -----------------------------------------------------------------------------------------


def error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw, name="m")
    return str(e.value)


def test_unknown_architecture() -> None:
    msg = error(with_(LLAMA31_V4, architectures=["MistralForCausalLM"]))
    assert "MistralForCausalLM" in msg and "LlamaForCausalLM" in msg
    msg = error(with_(LLAMA31_V4, architectures=_DROP, model_type="mistral"))
    assert "mistral" in msg and "not supported" in msg


def test_unknown_key() -> None:
    msg = error(with_(LLAMA31_V4, sliding_window=4096))
    assert "sliding_window" in msg and "unknown" in msg


def test_heads_not_multiple_of_kv_heads() -> None:
    msg = error(with_(LLAMA31_V4, num_key_value_heads=5))
    assert "num_attention_heads=32" in msg and "num_key_value_heads=5" in msg


def test_hidden_not_divisible_without_head_dim() -> None:
    msg = error(with_(LLAMA31_V4, num_attention_heads=24, num_key_value_heads=8, hidden_size=4100))
    assert "hidden_size=4100" in msg and "head_dim" in msg


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)])
def test_unsupported_values(key: str, value) -> None:
    msg = error(with_(LLAMA31_V4, **{key: value}))
    assert key in msg and repr(value) in msg


def test_unknown_rope_type() -> None:
    msg = error(with_(LLAMA31_V4, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    assert "rope_type" in msg and "yarn" in msg
    msg = error(with_(llama31_v5(), rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    assert "dynamic" in msg


@pytest.mark.parametrize("field", ["factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings"])
def test_llama3_scaling_missing_field(field: str) -> None:
    scaling = {k: v for k, v in LLAMA31_V4["rope_scaling"].items() if k != field}
    msg = error(with_(LLAMA31_V4, rope_scaling=scaling))
    assert field in msg and "llama3" in msg


def test_llama3_scaling_unknown_field_and_bad_factors() -> None:
    msg = error(with_(LLAMA31_V4, rope_scaling={**LLAMA31_V4["rope_scaling"], "beta_fast": 32}))
    assert "beta_fast" in msg
    msg = error(with_(LLAMA31_V4, rope_scaling={**LLAMA31_V4["rope_scaling"], "high_freq_factor": 1.0}))
    assert "high_freq_factor" in msg


def test_default_rope_with_extra_fields() -> None:
    msg = error(with_(SMOLLM2, rope_parameters={"rope_type": "default", "rope_theta": 1e5, "factor": 2.0}))
    assert "factor" in msg and "default" in msg


def test_contradictory_rope_spellings() -> None:
    msg = error(with_(llama31_v5(), rope_theta=10000.0))
    assert "rope_parameters" in msg and "rope_theta" in msg
    msg = error(with_(llama31_v5(), rope_scaling=LLAMA31_V4["rope_scaling"]))
    assert "rope_parameters" in msg and "rope_scaling" in msg


def test_rope_parameters_not_an_object() -> None:
    assert "rope_parameters" in error(with_(SMOLLM2, rope_parameters=[100000.0]))


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])
def test_missing_required_field(field: str) -> None:
    msg = error(with_(LLAMA31_V4, **{field: _DROP}))
    assert repr(field) in msg and "missing" in msg


def test_non_positive_size() -> None:
    msg = error(with_(LLAMA31_V4, num_hidden_layers=0))
    assert "num_layers" in msg and "positive" in msg


def test_no_config_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json") as e:
        ModelConfig.from_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value) and "--model" in str(e.value)
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "does-not-exist")


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 4096,')
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        ModelConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_from_pretrained_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(with_(LLAMA31_V4, sliding_window=1)))
    with pytest.raises(ConfigError, match="my-model/config.json"):
        ModelConfig.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(LLAMA31_V4))
    assert ModelConfig.from_pretrained(folder).name == "my-model"
