"""Model configuration: a Hugging Face `config.json` for `LlamaForCausalLM`, read strictly.

Every number Caravan plans with (shard shapes, KV bytes, parameter counts) derives from this
object, so it refuses what it does not understand instead of guessing: an unknown key, an
architecture that is not Llama, or fields that contradict each other is a `ConfigError` that
names the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shard.errors import UserError


class ConfigError(UserError, ValueError):
    """A model config Caravan cannot serve; the message names the field and the fix."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 / 3.1 frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class QuantizationConfig:
    """`quantization_config` of a checkpoint stored in Meta's FP8 format (`quant_method: fbgemm_fp8`):
    the converted linears hold float8_e4m3fn weights with one float32 scale per output row.
    Which tensors that makes FP8 is decided in one place, `shard.quant`."""

    modules_to_not_convert: tuple[str, ...] | None  # None: transformers' default, the LM head stays BF16
    activation_scale_ub: float = 1200.0             # clamp of the dynamic activation scale (FP8 GEMM path)
    # Rows from which a GPU's FP8 GEMM quantises the activations too (`shard.kernels.fp8.FP8Gemm`): not
    # the checkpoint's, the deployment's (`shard.fp8_scaled_mm_min_rows`), set where the shard is built.
    scaled_mm_min_rows: int = 1024
    quant_method: str = "fbgemm_fp8"


@dataclass(frozen=True)
class ModelConfig:
    """The shape of one Llama-architecture model. Head counts are totals, never per rank."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ConfigError(f"{self.name}: {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.name}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; grouped-query attention needs it to be")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes for one token over all layers, whole model (K and V)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "llama") -> "ModelConfig":
        return _parse(dict(raw), name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no config.json in {path}: point --model at a Hugging Face checkpoint folder")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return _parse(raw, name=file.parent.name)


# Keys that do not change inference: training-time settings and bookkeeping. Anything not here and
# not parsed below is an error, so that a new feature in a config is noticed, never dropped.
_IGNORED = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "use_cache", "attention_dropout", "pad_token_id", "unk_token_id",
    "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict", "tokenizer_class",
    "is_decoder", "chunk_size_feed_forward", "add_cross_attention", "id2label", "label2id",
    "problem_type", "tie_encoder_decoder", "cross_attention_hidden_size", "prefix",
    "task_specific_params", "finetuning_task", "sep_token_id", "decoder_start_token_id",
}

# Keys whose only supported value is the Llama default; another value is a different model.
_REQUIRED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _parse(raw: dict[str, Any], name: str) -> ModelConfig:
    where = f"{name}/config.json"

    archs = raw.get("architectures") or []
    if raw.get("model_type", "llama") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ConfigError(
            f"{where}: architecture {archs or raw.get('model_type')} is not supported; Caravan serves "
            f"LlamaForCausalLM checkpoints (Llama 3, 3.1, 3.2, SmolLM2)")

    def take(key: str, default: Any = ...) -> Any:
        if key in raw:
            return raw.pop(key)
        if default is ...:
            raise ConfigError(f"{where}: required field {key!r} is missing")
        return default

    for key, expected in _REQUIRED_VALUES.items():
        value = take(key, expected)
        if value != expected:
            raise ConfigError(f"{where}: {key}={value!r} is not supported (Llama uses {expected!r})")

    hidden = take("hidden_size")
    heads = take("num_attention_heads")
    kv_heads = take("num_key_value_heads", heads)
    head_dim = take("head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads="
                              f"{heads} and no head_dim is given")
        head_dim = hidden // heads

    theta, scaling = _parse_rope(raw, where)
    quantization = _parse_quantization(take("quantization_config", None), where)
    eos = take("eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for key in _IGNORED:
        raw.pop(key, None)
    cfg = ModelConfig(
        vocab_size=take("vocab_size"),
        hidden_size=hidden,
        intermediate_size=take("intermediate_size"),
        num_layers=take("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(take("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=take("max_position_embeddings", 2048),
        tie_word_embeddings=bool(take("tie_word_embeddings", False)),
        bos_token_id=take("bos_token_id", None),
        eos_token_ids=eos_ids,
        name=name,
        quantization=quantization,
    )
    if raw:
        raise ConfigError(f"{where}: unknown field(s) {sorted(raw)}; Caravan does not know how they change "
                          f"the model, so it will not guess. Remove them if they do not apply to inference.")
    return cfg


def _parse_rope(raw: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Reads RoPE in both spellings: transformers 4 (`rope_theta` + `rope_scaling`) and
    transformers 5 (`rope_parameters`, which holds theta and the scaling together)."""
    params = raw.pop("rope_parameters", None)
    theta_v4 = raw.pop("rope_theta", None)
    scaling_v4 = raw.pop("rope_scaling", None)
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, got {params!r}")
    if params is not None and (scaling_v4 is not None or
                               (theta_v4 is not None and theta_v4 != params.get("rope_theta", theta_v4))):
        raise ConfigError(f"{where}: rope_parameters contradicts rope_theta/rope_scaling; keep one spelling")
    rope = dict(params if params is not None else (scaling_v4 or {}))
    theta = rope.pop("rope_theta", theta_v4 if theta_v4 is not None else 10000.0)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type == "default":
        if rope:
            raise ConfigError(f"{where}: RoPE fields {sorted(rope)} given with rope_type 'default'")
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported; use 'default' or 'llama3'")
    try:
        scaling = RopeScaling(
            factor=float(rope.pop("factor")),
            low_freq_factor=float(rope.pop("low_freq_factor")),
            high_freq_factor=float(rope.pop("high_freq_factor")),
            original_max_position_embeddings=int(rope.pop("original_max_position_embeddings")),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: llama3 RoPE scaling is missing {e.args[0]!r}") from None
    if rope:
        raise ConfigError(f"{where}: unknown llama3 RoPE field(s) {sorted(rope)}")
    if not scaling.high_freq_factor > scaling.low_freq_factor or not math.isfinite(scaling.factor):
        raise ConfigError(f"{where}: llama3 RoPE needs high_freq_factor > low_freq_factor")
    return float(theta), scaling


SUPPORTED_QUANT_METHODS = ("fbgemm_fp8",)


def _parse_quantization(raw: Any, where: str) -> QuantizationConfig | None:
    """Meta's FP8 checkpoints (`fbgemm_fp8`, as transformers' FbgemmFp8Config writes it); any other
    method stores its weights differently, and reading them as if they were BF16 would be garbage."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: quantization_config must be an object, got {raw!r}")
    raw = dict(raw)
    method = raw.pop("quant_method", None)
    if method not in SUPPORTED_QUANT_METHODS:
        raise ConfigError(f"{where}: quantization_config.quant_method={method!r} is not supported; Caravan reads "
                          f"{' and '.join(SUPPORTED_QUANT_METHODS)} (Meta's FP8 Llama 3.1 checkpoints) or unquantized "
                          f"checkpoints (no quantization_config)")
    skip = raw.pop("modules_to_not_convert", None)
    if skip is not None and (not isinstance(skip, list) or not all(isinstance(m, str) and m for m in skip)):
        raise ConfigError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names, "
                          f"got {skip!r}")
    ub = raw.pop("activation_scale_ub", 1200.0)
    if isinstance(ub, bool) or not isinstance(ub, (int, float)) or not 0 < ub < math.inf:
        raise ConfigError(f"{where}: quantization_config.activation_scale_ub must be a positive number, got {ub!r}")
    if raw:
        raise ConfigError(f"{where}: unknown quantization_config field(s) {sorted(raw)} for fbgemm_fp8; Caravan "
                          f"knows quant_method, modules_to_not_convert and activation_scale_ub")
    return QuantizationConfig(None if skip is None else tuple(skip), float(ub))
