"""The strict sliced loader, on synthetic checkpoints saved by transformers."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import shard.loader
from shard.config import ModelConfig
from shard.layers import TensorSlice
from shard.layout import Layout
from shard.loader import Checkpoint, CheckpointError, load_weights
from shard.model import LlamaStage, checkpoint_shapes
from shard.parallel import ParallelContext
from tests.synthetic import make_llama


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, 8 heads, 2 KV heads, vocab 1003 (divisible by no TP degree above 1), untied."""
    return make_llama(tmp_path_factory.mktemp("llama") / "m", layers=2)


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tied") / "m", layers=2, tie=True, seed=1)


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    """The same weights as `ckpt` over several files with an index."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "m"
    LlamaForCausalLM.from_pretrained(ckpt).save_pretrained(out, max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, single file or indexed."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def load_rank(path: Path, layout: Layout, rank: int, dtype: torch.dtype = torch.float32):
    cfg = ModelConfig.from_pretrained(path)
    model = LlamaStage(cfg, ParallelContext(layout, rank=rank), dtype)
    report = load_weights(model, Checkpoint.open(path), progress=False)
    return model, report


# --- safetensors spies --------------------------------------------------------------------------------


class DataRead(Exception):
    """Raised by the spy when tensor data is read while it is forbidden."""


class _SliceSpy:
    def __init__(self, inner, name: str, file: str, spy: "SafeOpenSpy") -> None:
        self._inner, self._name, self._file, self._spy = inner, name, file, spy

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()

    def __getitem__(self, index):
        if self._spy.forbid_data:
            raise DataRead(f"{self._name} read from {self._file}")
        self._spy.data_reads[self._name] += 1
        self._spy.data_files.add(self._file)
        return self._inner[index]


class _HandleSpy:
    def __init__(self, inner, file: str, spy: "SafeOpenSpy") -> None:
        self._inner, self._file, self._spy = inner, file, spy

    def keys(self):
        return self._inner.keys()

    def metadata(self):
        return self._inner.metadata()

    def get_slice(self, name: str):
        return _SliceSpy(self._inner.get_slice(name), name, self._file, self._spy)

    def get_tensor(self, name: str):
        if self._spy.forbid_data:
            raise DataRead(f"{name} read whole from {self._file}")
        self._spy.data_reads[name] += 1
        self._spy.data_files.add(self._file)
        return self._inner.get_tensor(name)


class SafeOpenSpy:
    """Stands in for `shard.loader.safe_open`: records (or forbids) every read of tensor data."""

    def __init__(self, forbid_data: bool) -> None:
        self.forbid_data = forbid_data
        self.data_reads: Counter[str] = Counter()
        self.data_files: set[str] = set()
        self.opened: list[str] = []

    @contextmanager
    def __call__(self, path, framework: str = "pt", device: str = "cpu"):
        self.opened.append(Path(path).name)
        with safe_open(path, framework=framework, device=device) as f:
            yield _HandleSpy(f, Path(path).name, self)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> SafeOpenSpy:
    spy = SafeOpenSpy(forbid_data=True)
    monkeypatch.setattr(shard.loader, "safe_open", spy)
    return spy


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> SafeOpenSpy:
    spy = SafeOpenSpy(forbid_data=False)
    monkeypatch.setattr(shard.loader, "safe_open", spy)
    return spy


# --- world size 1 -------------------------------------------------------------------------------------


def test_world_size_1_matches_transformers(ckpt: Path, counting: SafeOpenSpy) -> None:
    from transformers import LlamaForCausalLM

    model, report = load_rank(ckpt, Layout(), 0)
    ref = {k: v.detach() for k, v in LlamaForCausalLM.from_pretrained(ckpt).state_dict().items()}
    on_disk = tensors(ckpt)
    # Every checkpoint tensor is read, once, whole.
    assert dict(counting.data_reads) == {name: 1 for name in on_disk}
    assert report.tensors_read == len(on_disk) == 2 + 1 + 2 * 9
    assert report.files == ["model.safetensors"]
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in on_disk.values())

    p = dict(model.named_parameters())
    assert torch.equal(p["embed_tokens.weight"], ref["model.embed_tokens.weight"])
    assert torch.equal(p["lm_head.weight"], ref["lm_head.weight"])
    assert torch.equal(p["norm.weight"], ref["model.norm.weight"])
    for i in range(2):
        m = f"model.layers.{i}"
        qkv = torch.cat([ref[f"{m}.self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(p[f"layers.{i}.self_attn.qkv_proj.weight"], qkv)
        assert torch.equal(p[f"layers.{i}.self_attn.o_proj.weight"], ref[f"{m}.self_attn.o_proj.weight"])
        gate_up = torch.cat([ref[f"{m}.mlp.gate_proj.weight"], ref[f"{m}.mlp.up_proj.weight"]])
        assert torch.equal(p[f"layers.{i}.mlp.gate_up_proj.weight"], gate_up)
        assert torch.equal(p[f"layers.{i}.mlp.down_proj.weight"], ref[f"{m}.mlp.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(p[f"layers.{i}.{norm}.weight"], ref[f"{m}.{norm}.weight"])
    # Nothing else: 21 checkpoint tensors, q|k|v and gate|up fused into one parameter per layer.
    assert len(p) == len(ref) - 2 * (2 + 1) == 15


def test_tied_embeddings_world_size_1(tied_ckpt: Path) -> None:
    assert "lm_head.weight" not in tensors(tied_ckpt)
    model, report = load_rank(tied_ckpt, Layout(), 0)
    assert model.lm_head is model.embed_tokens
    assert report.tensors_read == 2 + 2 * 9  # the shared table read once
    assert torch.equal(model.embed_tokens.weight, tensors(tied_ckpt)["model.embed_tokens.weight"])


def test_tied_embeddings_on_two_stages(tied_ckpt: Path) -> None:
    # With PP 2 the last stage has no embedding: its LM head reads the embedding tensor.
    embed = tensors(tied_ckpt)["model.embed_tokens.weight"]
    first, _ = load_rank(tied_ckpt, Layout(1, 2), 0)
    last, _ = load_rank(tied_ckpt, Layout(1, 2), 1)
    assert first.lm_head is None and last.embed_tokens is None
    assert torch.equal(first.embed_tokens.weight, embed)
    assert torch.equal(last.lm_head.weight, embed)


def test_bf16_checkpoint_into_float32_model(ckpt: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "bf16")
    bf16 = {k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_file(bf16, path / "model.safetensors", metadata={"format": "pt"})
    model, report = load_rank(path, Layout(), 0)
    assert report.bytes_read == sum(t.numel() * 2 for t in bf16.values())
    assert torch.equal(model.norm.weight, bf16["model.norm.weight"].float())


def test_recomputed_rotary_buffer_is_ignored(ckpt: Path, tmp_path: Path) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "old")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    model, report = load_rank(path, Layout(), 0)
    assert report.tensors_read == len(weights) - 1


# --- tensor parallel: the shards put together are the checkpoint --------------------------------------


def assert_shards_reassemble(path: Path, layout: Layout) -> None:
    cfg = ModelConfig.from_pretrained(path)
    full = tensors(path)
    tp, d = layout.tp, cfg.head_dim
    q_local = cfg.q_size // tp
    kv_local = max(1, cfg.num_kv_heads // tp) * d
    inter_local = cfg.intermediate_size // tp
    for pp_rank in range(layout.pp):
        stages = [load_rank(path, layout, layout.rank(pp_rank, t))[0] for t in range(tp)]
        ranges = {s.layer_range for s in stages}
        assert len(ranges) == 1
        for local, layer in enumerate(ranges.pop()):
            m = f"model.layers.{layer}"
            qkv = [dict(s.named_parameters())[f"layers.{local}.self_attn.qkv_proj.weight"] for s in stages]
            assert all(w.shape == (q_local + 2 * kv_local, cfg.hidden_size) for w in qkv)
            assert torch.equal(torch.cat([w[:q_local] for w in qkv]), full[f"{m}.self_attn.q_proj.weight"])
            for which, offset in (("k", q_local), ("v", q_local + kv_local)):
                local_kv = [w[offset:offset + kv_local] for w in qkv]
                ref = full[f"{m}.self_attn.{which}_proj.weight"]
                if tp <= cfg.num_kv_heads:
                    assert torch.equal(torch.cat(local_kv), ref)
                else:  # each KV head replicated on tp / kv_heads consecutive ranks
                    share = tp // cfg.num_kv_heads
                    for t, w in enumerate(local_kv):
                        head = t // share
                        assert torch.equal(w, ref[head * d:(head + 1) * d]), (which, t)
            o = torch.cat([s.layers[local].self_attn.o_proj.weight for s in stages], dim=1)
            assert torch.equal(o, full[f"{m}.self_attn.o_proj.weight"])
            gate_up = [s.layers[local].mlp.gate_up_proj.weight for s in stages]
            assert torch.equal(torch.cat([w[:inter_local] for w in gate_up]), full[f"{m}.mlp.gate_proj.weight"])
            assert torch.equal(torch.cat([w[inter_local:] for w in gate_up]), full[f"{m}.mlp.up_proj.weight"])
            down = torch.cat([s.layers[local].mlp.down_proj.weight for s in stages], dim=1)
            assert torch.equal(down, full[f"{m}.mlp.down_proj.weight"])
            for s in stages:  # norms are replicated whole
                assert torch.equal(s.layers[local].input_layernorm.weight, full[f"{m}.input_layernorm.weight"])
        tables = []
        if pp_rank == 0:
            tables.append(("embed_tokens", "model.embed_tokens.weight"))
        if pp_rank == layout.pp - 1:
            tables.append(("lm_head", "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"))
            for s in stages:
                assert torch.equal(s.norm.weight, full["model.norm.weight"])
        for attr, name in tables:
            rows = -(-cfg.vocab_size // tp)
            shards = [getattr(s, attr).weight for s in stages]
            assert all(w.shape == (rows, cfg.hidden_size) for w in shards)
            stacked = torch.cat(shards)
            assert torch.equal(stacked[:cfg.vocab_size], full[name])
            padding = stacked[cfg.vocab_size:]
            assert len(padding) == rows * tp - cfg.vocab_size
            assert not padding.any()  # zero padding, never read from the checkpoint


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2)])
def test_tp_shards_reassemble(ckpt: Path, tp: int, pp: int) -> None:
    # 8 heads, 2 KV heads: TP 4 and 8 replicate the KV heads; vocab 1003 pads the last rank.
    assert_shards_reassemble(ckpt, Layout(tp, pp))


def test_tp_shards_reassemble_tied(tied_ckpt: Path) -> None:
    assert_shards_reassemble(tied_ckpt, Layout(4, 2))


def test_tiny_vocab_leaves_last_ranks_empty(tmp_path: Path) -> None:
    # vocab 10 over TP 8: 2 rows per rank, ranks 5-7 hold only padding and read nothing.
    path = make_llama(tmp_path / "tiny", layers=1, vocab=10)
    assert_shards_reassemble(path, Layout(8, 1))
    _, report = load_rank(path, Layout(8, 1), 7)
    _, report0 = load_rank(path, Layout(8, 1), 0)
    assert report.tensors_read == report0.tensors_read - 2  # no embedding, no LM head slice


def test_tp_rank_reads_only_its_share(ckpt: Path) -> None:
    _, whole = load_rank(ckpt, Layout(), 0)
    reports = [load_rank(ckpt, Layout(2, 2), r)[1] for r in range(4)]
    # The replicated norms are the only bytes read twice.
    cfg = ModelConfig.from_pretrained(ckpt)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size * 4
    assert sum(r.bytes_read for r in reports) == whole.bytes_read + norms


# --- which files a rank opens -------------------------------------------------------------------------


def test_pp_stage_opens_only_its_files(sharded_ckpt: Path, counting: SafeOpenSpy) -> None:
    weight_map = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    all_files = set(weight_map.values())
    assert len(all_files) > 3
    full = tensors(sharded_ckpt)
    needs = {
        0: [n for n in weight_map if n.startswith(("model.embed_tokens.", "model.layers.0."))],
        1: [n for n in weight_map if n.startswith(("model.layers.1.", "model.norm.", "lm_head."))],
    }
    for pp_rank in (0, 1):
        counting.data_reads.clear()
        counting.data_files.clear()
        model, report = load_rank(sharded_ckpt, Layout(1, 2), pp_rank)
        expected = sorted({weight_map[n] for n in needs[pp_rank]})
        assert report.files == expected
        assert set(report.files) < all_files  # a strict subset
        assert counting.data_files == set(expected)  # data came from those files only
        assert set(counting.data_reads) == set(needs[pp_rank])
        if pp_rank == 0:
            assert torch.equal(model.layers[0].self_attn.o_proj.weight, full["model.layers.0.self_attn.o_proj.weight"])
        else:
            assert torch.equal(model.lm_head.weight, full["lm_head.weight"])


def test_sharded_equals_single_file(ckpt: Path, sharded_ckpt: Path) -> None:
    a, _ = load_rank(ckpt, Layout(2, 1), 1)
    b, _ = load_rank(sharded_ckpt, Layout(2, 1), 1)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- every parameter written exactly once --------------------------------------------------------------


def tamper(model: LlamaStage, monkeypatch: pytest.MonkeyPatch, edit) -> None:
    slices = model.checkpoint_slices()
    edit(slices)
    monkeypatch.setattr(model, "checkpoint_slices", lambda: slices)


@pytest.mark.parametrize("layout,rank", [(Layout(), 0), (Layout(2, 1), 1)])
def test_dropped_slice_fails(ckpt: Path, monkeypatch: pytest.MonkeyPatch, layout: Layout, rank: int) -> None:
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(layout, rank=rank))
    tamper(model, monkeypatch, lambda s: s["layers.1.self_attn.qkv_proj.weight"].pop())  # the v slice
    with pytest.raises(AssertionError, match=r"layers\.1\.self_attn\.qkv_proj\.weight.*never loaded"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


def test_dropped_column_slice_fails(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(Layout(2, 1), rank=0))

    def halve(slices):
        (s,) = slices["layers.0.mlp.down_proj.weight"]
        slices["layers.0.mlp.down_proj.weight"] = [TensorSlice(s.name, s.shape, s.dim, s.start, s.length // 2)]

    tamper(model, monkeypatch, halve)
    with pytest.raises(AssertionError, match=r"layers\.0\.mlp\.down_proj\.weight.*never loaded"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


def test_parameter_without_source_fails(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(Layout()))
    tamper(model, monkeypatch, lambda s: s.pop("norm.weight"))
    with pytest.raises(AssertionError, match=r"norm\.weight"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


def test_emptied_parameter_fails(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(Layout()))
    tamper(model, monkeypatch, lambda s: s["layers.0.input_layernorm.weight"].clear())
    with pytest.raises(AssertionError, match=r"layers\.0\.input_layernorm\.weight.*never loaded"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


@pytest.mark.parametrize("param", ["layers.0.mlp.gate_up_proj.weight", "embed_tokens.weight",
                                   "layers.1.self_attn.o_proj.weight"])
def test_duplicated_slice_fails(ckpt: Path, monkeypatch: pytest.MonkeyPatch, param: str) -> None:
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(Layout(2, 1), rank=1))
    tamper(model, monkeypatch, lambda s: s[param].append(s[param][0]))
    with pytest.raises(AssertionError, match=rf"{param.replace('.', '[.]')} rows .* written twice"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


def test_overlapping_slices_fail(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # q and k both aimed at offset 0: every row count adds up, but some rows are written twice.
    model = LlamaStage(ModelConfig.from_pretrained(ckpt), ParallelContext(Layout()))

    def overlap(slices):
        group = slices["layers.0.self_attn.qkv_proj.weight"]
        k = group[1]
        group[1] = TensorSlice(k.name, k.shape, k.dim, k.start, k.length, dst_offset=0)

    tamper(model, monkeypatch, overlap)
    with pytest.raises(AssertionError, match="written twice"):
        load_weights(model, Checkpoint.open(ckpt), progress=False)


# --- bad checkpoints fail before any data is read ------------------------------------------------------


def test_spy_catches_data_reads(ckpt: Path, no_data: SafeOpenSpy) -> None:
    """The spy works: a good checkpoint does get to reading data."""
    with pytest.raises(DataRead):
        load_rank(ckpt, Layout(), 0)


def resave_without(path: Path, drop: str = "", add: dict[str, torch.Tensor] | None = None) -> None:
    weights = load_file(path / "model.safetensors")
    weights.pop(drop, None)
    weights |= add or {}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def checkpoint_error(path: Path, layout: Layout = Layout(), rank: int = 0) -> str:
    with pytest.raises(CheckpointError) as e:
        load_rank(path, layout, rank)
    return str(e.value)


@pytest.mark.parametrize("layout,rank", [(Layout(), 0), (Layout(1, 2), 0)])
def test_missing_tensor(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy, layout: Layout, rank: int) -> None:
    # Missing from stage 1's layers: stage 0 must refuse the checkpoint too (validation is whole-model).
    path = copy_checkpoint(ckpt, tmp_path / "m")
    resave_without(path, drop="model.layers.1.mlp.up_proj.weight")
    msg = checkpoint_error(path, layout, rank)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "missing" in msg
    assert not no_data.data_reads


def test_missing_lm_head(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    # An untied config over tied weights.
    path = copy_checkpoint(ckpt, tmp_path / "m")
    resave_without(path, drop="lm_head.weight")
    msg = checkpoint_error(path)
    assert "lm_head.weight" in msg and "tie_word_embeddings=False" in msg


def test_unexpected_tensor(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "m")
    resave_without(path, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(128)})
    msg = checkpoint_error(path)
    assert "model.layers.0.self_attn.q_proj.bias" in msg and "does not use" in msg


def test_extra_layer(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    # config.json says 1 layer, the weights have 2.
    path = copy_checkpoint(ckpt, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    msg = checkpoint_error(path)
    assert "model.layers.1." in msg


def test_wrong_shape(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    msg = checkpoint_error(path)
    assert "model.layers.0.mlp." in msg and "model.safetensors" in msg
    assert "[256, 128]" in msg or "[128, 256]" in msg
    assert "512" in msg


def test_missing_shard_file(sharded_ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(sharded_ckpt, tmp_path / "m")
    (path / "model-00007-of-00010.safetensors").unlink()
    msg = checkpoint_error(path, Layout(1, 2), 0)  # stage 0 does not even need that file
    assert "model-00007-of-00010.safetensors" in msg and "missing" in msg


def test_no_safetensors(ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(ckpt / "config.json", path)
    msg = checkpoint_error(path)
    assert str(path) in msg and "model.safetensors" in msg and "model.safetensors.index.json" in msg
    assert no_data.opened == []


def test_invalid_index(sharded_ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(sharded_ckpt, tmp_path / "m")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert "model.safetensors.index.json" in checkpoint_error(path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": ')
    assert "model.safetensors.index.json" in checkpoint_error(path)


def test_validate_reads_headers_only(sharded_ckpt: Path, no_data: SafeOpenSpy) -> None:
    cfg = ModelConfig.from_pretrained(sharded_ckpt)
    dtypes = Checkpoint.open(sharded_ckpt).validate(cfg)
    assert dtypes == {name: "F32" for name in checkpoint_shapes(cfg)}
    assert sorted(no_data.opened) == sorted(p.name for p in sharded_ckpt.glob("*.safetensors"))


def test_index_points_at_wrong_file(sharded_ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(sharded_ckpt, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    wrong = index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"][name] != wrong
    index["weight_map"][name] = wrong
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = checkpoint_error(path)
    assert name in msg and wrong in msg


def test_index_lists_tensor_its_file_lacks(sharded_ckpt: Path, tmp_path: Path, no_data: SafeOpenSpy) -> None:
    path = copy_checkpoint(sharded_ckpt, tmp_path / "m")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    file = path / index["weight_map"][name]
    weights = load_file(file)
    del weights[name]
    save_file(weights, file, metadata={"format": "pt"})
    msg = checkpoint_error(path)
    assert name in msg and file.name in msg
