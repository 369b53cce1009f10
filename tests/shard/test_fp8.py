"""Meta's FP8 checkpoints (`fbgemm_fp8`): config, recipe, strict sliced loading, dequantisation.

The synthetic FP8 checkpoint is a random Llama whose linears are quantised row-wise to
float8_e4m3fn with float32 per-row scales, as Meta's are; its "dequantised twin" is the same
checkpoint with each FP8 weight replaced by weight.float() * scale, saved as a plain checkpoint.
Loaded, the two must give the same parameters bit for bit, and served, the same tokens.
Which modules the test converts is decided by transformers' own matcher, not by `shard.quant`,
so the two are checked against each other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.quantizers.quantizers_utils import should_convert_module

import shard.loader
from shard import quant
from shard.config import ConfigError, ModelConfig, QuantizationConfig
from shard.attention import AttentionMetadata
from shard.kernels.fp8 import FP8Gemm
from shard.layers import ColumnParallelLinear, RowParallelLinear
from shard.layout import Layout
from shard.loader import Checkpoint, CheckpointError, load_weights
from shard.model import LlamaStage
from shard.parallel import ParallelContext
from shard.plan import plan_replica
from tests.cluster.test_equivalence import assert_equivalent, reference, run_layout
from tests.conftest import SHARED
from tests.shard.test_loader import SafeOpenSpy
from tests.synthetic import make_llama

LLAMA_405B = SHARED / "fixtures" / "llama-3.1-405b-instruct"
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# Layer 0 whole and one k_proj stay unconverted; everything else FP8, the LM head included (an
# explicit list replaces transformers' default, which keeps the LM head). Layer 2's q|k|v fuse
# FP8 and BF16 rows into one parameter.
NOT_CONVERTED = ["model.layers.0", "model.layers.2.self_attn.k_proj"]


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise FP8, as fbgemm's quantize_fp8_per_row: scale = max |row| / 448."""
    scale = (w.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [out, 1]
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def write(path: Path, weights: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization is not None:
        config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def make_fp8_pair(src: Path, out: Path, not_converted: list[str]) -> tuple[Path, Path]:
    """(FP8 checkpoint, its dequantised twin) from the plain checkpoint `src`."""
    fp8_dir, twin_dir = shutil.copytree(src, out / "fp8"), shutil.copytree(src, out / "twin")
    fp8, twin = {}, {}
    for name, w in load_file(src / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if name.endswith(("_proj.weight", "lm_head.weight")) and should_convert_module(module, not_converted):
            q, scale = quantize_rows(w)
            fp8 |= {name: q, f"{module}.weight_scale": scale}
            twin[name] = q.float() * scale
        else:
            fp8[name] = twin[name] = w
    quantization = {"quant_method": "fbgemm_fp8", "modules_to_not_convert": not_converted,
                    "activation_scale_ub": 1200.0}
    return write(fp8_dir, fp8, quantization), write(twin_dir, twin, None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    src = make_llama(root / "src", layers=4, heads=8, kv_heads=2)
    return make_fp8_pair(src, root, NOT_CONVERTED)


def load_rank(path: Path, layout: Layout, rank: int, dtype: torch.dtype = torch.float32, *,
              fp8_resident: bool | None = None):
    model = LlamaStage(ModelConfig.from_pretrained(path), ParallelContext(layout, rank=rank), dtype,
                       fp8_resident=fp8_resident)
    return model, load_weights(model, Checkpoint.open(path), progress=False)


# --- config ---------------------------------------------------------------------------------------


def test_config_parses_quantization(pair) -> None:
    fp8_dir, twin_dir = pair
    cfg = ModelConfig.from_pretrained(fp8_dir)
    assert cfg.quantization == QuantizationConfig(tuple(NOT_CONVERTED), 1200.0)
    assert ModelConfig.from_pretrained(twin_dir).quantization is None
    with pytest.raises(AttributeError):
        cfg.quantization.activation_scale_ub = 1.0  # frozen


@pytest.mark.parametrize("quantization,words", [
    ({"quant_method": "gptq", "bits": 4}, ["quantization_config.quant_method", "'gptq'", "fbgemm_fp8"]),
    ({"modules_to_not_convert": []}, ["quantization_config.quant_method", "None", "fbgemm_fp8"]),
    ({"quant_method": "fbgemm_fp8", "weight_block_size": [128, 128]}, ["weight_block_size", "unknown"]),
    ({"quant_method": "fbgemm_fp8", "modules_to_not_convert": "lm_head"}, ["modules_to_not_convert"]),
    ({"quant_method": "fbgemm_fp8", "activation_scale_ub": -1}, ["activation_scale_ub"]),
    ("fp8", ["quantization_config must be an object"]),
])
def test_bad_quantization_config(quantization, words) -> None:
    raw = json.loads((LLAMA_405B / "config.json").read_text()) | {"quantization_config": quantization}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(raw)
    assert all(w in str(e.value) for w in words), str(e.value)


# --- the recipe -----------------------------------------------------------------------------------


def llama_405b_fp8() -> ModelConfig:
    cfg = ModelConfig.from_pretrained(LLAMA_405B)
    return ModelConfig.from_dict(json.loads((LLAMA_405B / "config.json").read_text()) | {"quantization_config": {
        "quant_method": "fbgemm_fp8", "modules_to_not_convert": list(quant.meta_fp8_recipe(cfg)),
        "activation_scale_ub": 1200.0}})


def test_meta_recipe_converts_middle_mlps_only() -> None:
    cfg = llama_405b_fp8()
    assert cfg.num_layers == 126
    assert quant.fp8_weight_names(cfg) == {f"model.layers.{i}.mlp.{p}_proj.weight"
                                           for i in range(1, 125) for p in ("gate", "up", "down")}


def test_default_keeps_lm_head() -> None:
    # Without modules_to_not_convert, transformers converts every linear but the LM head.
    raw = json.loads((LLAMA_405B / "config.json").read_text()) | {"quantization_config": {"quant_method": "fbgemm_fp8"}}
    names = quant.fp8_weight_names(ModelConfig.from_dict(raw))
    assert len(names) == 126 * 7 and "lm_head.weight" not in names


@pytest.mark.parametrize("skip", [
    "meta", ["model.layers.1"], ["down_proj"], ["model.layers.1.mlp"], [r"model\.layers\.\d+\.self_attn"],
    ["lm_head", "model.layers.12"],
])
def test_matcher_agrees_with_transformers(skip) -> None:
    cfg = ModelConfig.from_pretrained(LLAMA_405B)
    skip = list(quant.meta_fp8_recipe(cfg)) if skip == "meta" else skip
    q = QuantizationConfig(tuple(skip))
    modules = [f"model.layers.{i}.{m}" for i in range(cfg.num_layers) for m in quant.LAYER_LINEARS] + ["lm_head"]
    assert [quant.is_converted(m, q) for m in modules] == [should_convert_module(m, skip) for m in modules]


def test_slice_bytes_for_the_planner() -> None:
    # TP 8 x PP 1 of 405B FP8, rank 0: an FP8 slice is 1 byte per element plus its scale rows.
    cfg = llama_405b_fp8()
    fp8 = quant.fp8_weight_names(cfg)
    stage = LlamaStage(cfg, ParallelContext(Layout(8, 1), rank=0), torch.bfloat16, device="meta")
    slices = stage.checkpoint_slices()
    h, inter = cfg.hidden_size, cfg.intermediate_size // 8
    gate, up = slices["layers.1.mlp.gate_up_proj.weight"]
    (down,) = slices["layers.1.mlp.down_proj.weight"]
    assert quant.slice_bytes(gate, fp8, torch.bfloat16) == inter * h + inter * 4            # its rows' scales
    assert quant.slice_bytes(down, fp8, torch.bfloat16) == h * inter + h * 4                # every row's scale
    assert quant.slice_bytes(down, fp8, torch.bfloat16, fp8_resident=False) == h * inter * 2  # dequantised
    (o,) = slices["layers.1.self_attn.o_proj.weight"]
    assert quant.slice_bytes(o, fp8, torch.bfloat16) == o.numel * 2                         # BF16 in the recipe
    (down0,) = slices["layers.0.mlp.down_proj.weight"]
    assert quant.slice_bytes(down0, fp8, torch.bfloat16) == down0.numel * 2


def test_resident_linears() -> None:
    # Meta's recipe: the MLPs of layers 1..124 stay FP8 on a GPU, fused gate|up and down alike.
    cfg = llama_405b_fp8()
    assert quant.resident_linears(cfg, 0) == {} == quant.resident_linears(cfg, 125)
    assert quant.resident_linears(cfg, 7) == {"mlp.gate_up_proj": FP8Gemm(1200.0), "mlp.down_proj": FP8Gemm(1200.0)}
    assert quant.resident_weight_names(cfg) == quant.fp8_weight_names(cfg)
    assert quant.resident_linears(ModelConfig.from_pretrained(LLAMA_405B), 7) == {}     # no quantization_config


def test_the_deployments_row_threshold_reaches_the_fp8_gemms(pair) -> None:
    """`shard.fp8_scaled_mm_min_rows` (a deployment setting, not the checkpoint's) goes into the model
    config a shard builds from, so every FP8 linear's GEMM choice uses it."""
    from shard.parallel import ParallelContext
    from shard.worker import ShardWorker
    fp8_dir, _ = pair
    worker = ShardWorker(fp8_dir, ParallelContext(Layout()), num_blocks=4, block_size=4, progress=False,
                         fp8_scaled_mm_min_rows=64)
    assert worker.cfg.quantization.scaled_mm_min_rows == 64
    gemms = {g for layer in range(worker.cfg.num_layers) for g in quant.resident_linears(worker.cfg, layer).values()}
    assert gemms and all(g.scaled_mm_min_rows == 64 for g in gemms)
    assert {g.kernel_for(rows, torch.bfloat16) for g in gemms for rows in (63, 64)} == {"weight_only", "scaled_mm"}
    default = ShardWorker(fp8_dir, ParallelContext(Layout()), num_blocks=4, block_size=4, progress=False)
    assert default.cfg.quantization.scaled_mm_min_rows == 1024


def test_mixed_fused_weight_and_lm_head_are_dequantised(pair) -> None:
    # Layer 2's q|k|v fuses FP8 q and v with a BF16 k: one tensor holds one dtype, so it is dequantised;
    # so is the FP8 LM head. The planner counts what the loader keeps (resident_weight_names).
    cfg = ModelConfig.from_pretrained(pair[0])
    assert set(quant.resident_linears(cfg, 2)) == {"self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
    assert set(quant.resident_linears(cfg, 1)) == set(quant.FUSED_LINEARS)
    dequantised = quant.fp8_weight_names(cfg) - quant.resident_weight_names(cfg)
    assert dequantised == {"lm_head.weight", "model.layers.2.self_attn.q_proj.weight",
                           "model.layers.2.self_attn.v_proj.weight"}


def test_fp8_stays_fp8_on_cuda_only() -> None:
    assert quant.keeps_fp8("cuda") and quant.keeps_fp8(torch.device("cuda", 3))
    assert not quant.keeps_fp8("cpu") and not quant.keeps_fp8("meta") and not quant.keeps_fp8(None)
    cfg = llama_405b_fp8()
    stage = LlamaStage(cfg, ParallelContext(Layout(8, 1), rank=0), torch.bfloat16, device="meta")
    assert stage.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16 and stage.layers[1].mlp.down_proj.fp8 is None
    stage = LlamaStage(cfg, ParallelContext(Layout(8, 1), rank=0), torch.bfloat16, device="meta", fp8_resident=True)
    mlp, attn = stage.layers[1].mlp, stage.layers[1].self_attn
    assert mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn and mlp.gate_up_proj.weight_scale.shape == (2 * 6656, 1)
    assert mlp.down_proj.weight.shape == (16384, 6656) and mlp.down_proj.weight_scale.shape == (16384, 1)
    assert attn.qkv_proj.weight.dtype == torch.bfloat16 and attn.qkv_proj.weight_scale is None
    assert stage.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


# --- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [Layout(), Layout(2, 2), Layout(4, 1), Layout(8, 1)])
def test_loads_as_its_dequantised_twin(pair, layout: Layout) -> None:
    # Column (q|k|v, gate|up, LM head with vocab padding) and row (o, down) splits, KV heads
    # replicated at TP 4 and 8: every rank's parameters equal the twin's, bit for bit.
    fp8_dir, twin_dir = pair
    for rank in range(layout.world_size):
        got, report = load_rank(fp8_dir, layout, rank)
        want, twin_report = load_rank(twin_dir, layout, rank)
        sg, sw = got.state_dict(), want.state_dict()
        assert sg.keys() == sw.keys()
        for k in sg:
            assert torch.equal(sg[k], sw[k]), (rank, k)
        assert report.bytes_read < twin_report.bytes_read


def test_world_size_1_reads_each_tensor_once(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    fp8_dir, _ = pair
    spy = SafeOpenSpy(forbid_data=False)
    monkeypatch.setattr(shard.loader, "safe_open", spy)
    on_disk = load_file(fp8_dir / "model.safetensors")
    _, report = load_rank(fp8_dir, Layout(), 0)
    assert dict(spy.data_reads) == {name: 1 for name in on_disk}
    assert report.tensors_read == len(on_disk)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in on_disk.values())
    scales = [n for n in on_disk if n.endswith("weight_scale")]
    assert len(scales) == 3 * 7 - 1 + 1  # layers 1-3 but layer 2's k_proj, and the LM head
    assert "model.layers.2.self_attn.k_proj.weight_scale" not in on_disk
    assert not any(n.startswith("model.layers.0.") for n in scales)


def test_bfloat16_model(pair) -> None:
    # Dequantised in float32, rounded once to bfloat16: as the twin's float32 weights rounded.
    fp8_dir, twin_dir = pair
    got, _ = load_rank(fp8_dir, Layout(2, 1), 1, torch.bfloat16)
    want, _ = load_rank(twin_dir, Layout(2, 1), 1, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))


@pytest.mark.parametrize("layout", [Layout(), Layout(2, 2)])
def test_kept_fp8_as_in_the_checkpoint(pair, layout: Layout) -> None:
    # As on a GPU: the resident linears hold the checkpoint's FP8 rows and their scale rows (all of
    # them for o and down, split by input columns), the rest is dequantised; weight * scale is the twin's.
    fp8_dir, twin_dir = pair
    for rank in range(layout.world_size):
        got, report = load_rank(fp8_dir, layout, rank, fp8_resident=True)
        want, _ = load_rank(twin_dir, layout, rank)
        _, dequantised = load_rank(fp8_dir, layout, rank)
        assert report.bytes_read == dequantised.bytes_read       # the same rows read, kept or not
        sg, sw = got.state_dict(), want.state_dict()
        scales = {k for k in sg if k.endswith("weight_scale")}
        assert sg.keys() - scales == sw.keys()
        kept = {k.removesuffix("_scale") for k in scales}
        assert kept and all(sg[k].dtype == torch.float8_e4m3fn for k in kept)
        for k in sw:
            real = sg[k].float() * sg[f"{k}_scale"] if k in kept else sg[k]
            assert torch.equal(real, sw[k]), (rank, k)


@pytest.mark.parametrize("layout", [Layout(), Layout(2, 2), Layout(4, 1)])
def test_plan_counts_what_the_loader_keeps(pair, layout: Layout) -> None:
    # `caravan plan --dtype fp8` and the loader agree: every rank's bytes on the device, FP8 weights,
    # their scales, dequantised FP8 (layer 2's q|k|v, the LM head) and vocabulary padding included.
    fp8_dir, _ = pair
    plans = plan_replica(ModelConfig.from_pretrained(fp8_dir), layout, None, torch.bfloat16)
    for rank, plan in enumerate(plans):
        model, _ = load_rank(fp8_dir, layout, rank, torch.bfloat16, fp8_resident=True)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        assert held == plan.weight_bytes, rank
        kept = sum(p.numel() for p in model.parameters() if p.dtype == torch.float8_e4m3fn)
        assert kept == plan.fp8_params > 0


def prefill_logits(model: LlamaStage, ids: list[int]) -> torch.Tensor:
    block = 4
    blocks = list(range(-(-len(ids) // block)))
    meta = AttentionMetadata.build([len(ids)], [0], [blocks], block)
    return model(torch.tensor(ids), torch.arange(len(ids)), meta, model.new_kv_cache(len(blocks), block))


def test_fp8_model_logits_match_the_twin(pair) -> None:
    # The whole model with FP8 linears, on CPU: float32 through the weight-only math equals the twin to
    # float rounding; bfloat16 through the scaled FP8 GEMM (every row count) within FP8's tolerance.
    fp8_dir, twin_dir = pair
    ids = torch.randint(3, 1003, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    got, _ = load_rank(fp8_dir, Layout(), 0, fp8_resident=True)
    want, _ = load_rank(twin_dir, Layout(), 0)
    assert torch.allclose(prefill_logits(got, ids), prefill_logits(want, ids), atol=1e-4, rtol=1e-4)

    got, _ = load_rank(fp8_dir, Layout(), 0, torch.bfloat16, fp8_resident=True)
    want = prefill_logits(load_rank(twin_dir, Layout(), 0, torch.bfloat16)[0], ids).float()

    def error() -> float:
        return ((prefill_logits(got, ids).float() - want).norm() / want.norm()).item()

    weight_only = error()               # 24 rows: below the default threshold; BF16 rounding only
    linears = [m for m in got.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.fp8]
    assert len(linears) == 3 * 4 - 1    # the 4 linears of layers 1-3 but layer 2's mixed q|k|v; layer 0 BF16
    for m in linears:
        m.fp8 = FP8Gemm(1200.0, scaled_mm_min_rows=1)
    scaled = error()                    # activations rounded to FP8 too: 3 mantissa bits
    assert weight_only < 0.01 and weight_only < scaled < 0.08, (weight_only, scaled)


@pytest.mark.slow
def test_tp2_pp2_matches_transformers_on_the_twin(pair) -> None:
    fp8_dir, twin_dir = pair
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 1003, (n,), generator=gen).tolist() for n in (5, 13)]
    want = reference(twin_dir, prompts)
    assert_equivalent(run_layout(fp8_dir, Layout(2, 2), prompts, block_size=4), want, atol=1e-4)


# --- bad FP8 checkpoints: refused from the headers, naming the tensor ----------------------------------


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> SafeOpenSpy:
    spy = SafeOpenSpy(forbid_data=True)
    monkeypatch.setattr(shard.loader, "safe_open", spy)
    return spy


def broken(pair, tmp_path: Path, *, weights=None, skip=None, quantization=...) -> Path:
    """A copy of the FP8 checkpoint with `weights(dict)` applied and/or another quantization_config."""
    path = shutil.copytree(pair[0], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    if weights:
        weights(tensors)
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    if skip is not None:
        q = q | {"modules_to_not_convert": skip}
    return write(path, tensors, q if quantization is ... else quantization)


def refused(path: Path, layout: Layout = Layout(2, 2), rank: int = 3) -> str:
    with pytest.raises(CheckpointError) as e:
        load_rank(path, layout, rank)
    return str(e.value)


def test_missing_scale(pair, tmp_path, no_data) -> None:
    path = broken(pair, tmp_path, weights=lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    msg = refused(path)  # rank 3 (stage 1) does not hold layer 1: validation is whole-model
    assert "model.layers.1.mlp.up_proj.weight_scale" in msg and "missing" in msg
    assert not no_data.data_reads


@pytest.mark.parametrize("shape", [(256,), (128, 1), (256, 2)])
def test_scale_of_wrong_shape(pair, tmp_path, no_data, shape) -> None:
    name = "model.layers.3.mlp.gate_proj.weight_scale"
    path = broken(pair, tmp_path, weights=lambda t: t.update({name: torch.ones(shape)}))
    msg = refused(path)
    assert name in msg and str(list(shape)) in msg and "[256, 1]" in msg
    assert not no_data.data_reads


def test_scale_of_wrong_dtype(pair, tmp_path, no_data) -> None:
    name = "model.layers.3.self_attn.o_proj.weight_scale"
    path = broken(pair, tmp_path, weights=lambda t: t.update({name: t[name].to(torch.bfloat16)}))
    msg = refused(path)
    assert name in msg and "BF16" in msg and "float32" in msg
    assert not no_data.data_reads


def test_fp8_weight_in_unconverted_module(pair, tmp_path, no_data) -> None:
    path = broken(pair, tmp_path, skip=NOT_CONVERTED + ["model.layers.3.mlp.down_proj"])
    msg = refused(path)
    assert "model.layers.3.mlp.down_proj.weight" in msg and "modules_to_not_convert" in msg and "F8_E4M3" in msg
    assert not no_data.data_reads


def test_unquantized_weight_where_fp8_expected(pair, tmp_path, no_data) -> None:
    path = broken(pair, tmp_path, skip=["model.layers.2.self_attn.k_proj"])  # layer 0 is F32 on disk
    msg = refused(path)
    assert "model.layers.0.mlp.down_proj.weight is F32" in msg and "FP8" in msg
    assert not no_data.data_reads


def test_fp8_checkpoint_without_quantization_config(pair, tmp_path, no_data) -> None:
    path = broken(pair, tmp_path, quantization=None)
    msg = refused(path)
    assert "lm_head.weight is FP8" in msg and "no quantization_config" in msg
    assert not no_data.data_reads


def test_stray_scale(pair, tmp_path, no_data) -> None:
    name = "model.layers.0.mlp.up_proj.weight_scale"
    path = broken(pair, tmp_path, weights=lambda t: t.update({name: torch.ones(256, 1)}))
    msg = refused(path)
    assert name in msg and "not FP8" in msg
    assert not no_data.data_reads


def test_unknown_quant_method_refused_before_any_file_is_opened(pair, tmp_path, no_data) -> None:
    path = broken(pair, tmp_path, quantization={"quant_method": "awq", "bits": 4})
    with pytest.raises(ConfigError, match=r"quantization_config\.quant_method='awq'.*fbgemm_fp8"):
        load_rank(path, Layout(), 0)
    assert no_data.opened == []
