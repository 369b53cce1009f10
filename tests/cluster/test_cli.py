"""`caravan` run as users run it: a subprocess, judged by its exit code, stdout and stderr."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import LLAMA31_TOKENIZER, REPO_ROOT, SHARED
from tests.synthetic import make_llama

LLAMA_405B = SHARED / "fixtures" / "llama-3.1-405b-instruct"
CONSOLE_SCRIPT = Path(sys.executable).parent / "caravan"


def caravan(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess[str], command: str, *fragments: str) -> str:
    """Exit code 2, nothing on stdout, and one line on stderr that names the problem; no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"caravan {command}: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture(scope="module")
def gqa9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's attention shape: 9 heads, 3 KV heads (TP 1, 3 or 9 fit); 2 layers; no tokenizer."""
    return make_llama(tmp_path_factory.mktemp("gqa9") / "gqa9", layers=2, heads=9, kv_heads=3, head_dim=16,
                      intermediate=288)


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic checkpoint with the Llama 3.1 tokenizer beside it (whose ids exceed its vocab of 1003:
    good enough for the errors raised before any token runs)."""
    path = make_llama(tmp_path_factory.mktemp("tok") / "llama", layers=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA31_TOKENIZER / name, path)
    return path


# --- plan ---------------------------------------------------------------------------------------------


def test_plan_405b() -> None:
    args = ["plan", "--model", "../shared/fixtures/llama-3.1-405b-instruct", "--tp", "8", "--pp", "2", "--files"]
    if CONSOLE_SCRIPT.is_file():  # the installed entry point itself
        result = subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=300)
    else:
        result = caravan(*args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "405,853,388,800" in out
    assert "50.74" in out
    assert "TP 8 x PP 2 = 16 GPUs, bfloat16" in out
    file_lines = [line for line in out.splitlines() if re.match(r"rank \d+: ", line)]
    assert len(file_lines) == 16
    assert "model-00001-of-00191.safetensors" in file_lines[0]
    assert "model-00001-of-00191.safetensors" not in file_lines[15]
    assert "model-00191-of-00191.safetensors" in file_lines[15]


def test_plan_bad_tp() -> None:
    assert_user_error(caravan("plan", "--model", LLAMA_405B, "--tp", "3"), "plan",
                      "TP=3", "128 attention heads", "use TP 1, 2, 4, 8, 16, 32, 64 or 128")


# --- generate: every user error is one line and exit code 2 -------------------------------------------


def test_tp_not_dividing_heads(gqa9: Path) -> None:
    assert_user_error(caravan("generate", "--model", gqa9, "--tp", "2", "hello"), "generate",
                      "TP=2", "9 attention heads", "use TP 1, 3 or 9")


def test_pp_above_layers(gqa9: Path) -> None:
    assert_user_error(caravan("generate", "--model", gqa9, "--pp", "3", "hello"), "generate",
                      "PP=3", "2 layers", "use PP between 1 and 2")


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_user_error(caravan("generate", "--model", missing, "hello"), "generate",
                      str(missing), "is not a folder", "Hugging Face checkpoint folder")


def test_folder_without_config(tmp_path: Path) -> None:
    assert_user_error(caravan("generate", "--model", tmp_path, "hello"), "generate",
                      "no config.json", "point --model at")


def test_missing_tokenizer(gqa9: Path) -> None:
    assert_user_error(caravan("generate", "--model", gqa9, "hello"), "generate",
                      "no tokenizer.json", str(gqa9))


def test_missing_tensor(with_tokenizer: Path, tmp_path: Path) -> None:
    path = shutil.copytree(with_tokenizer, tmp_path / "broken")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(caravan("generate", "--model", path, "--tp", "2", "hello"), "generate",
                      "model.layers.1.self_attn.k_proj.weight", "missing", "is the download complete")


def test_negative_temperature(gqa9: Path) -> None:
    assert_user_error(caravan("generate", "--model", gqa9, "--temperature", "-1", "hello"), "generate",
                      "temperature", "-1", ">= 0")


def test_max_tokens_beyond_context(with_tokenizer: Path) -> None:
    # max_position_embeddings is 4096; the chat-templated prompt is several tokens.
    line = assert_user_error(caravan("generate", "--model", with_tokenizer, "--max-tokens", "4090", "hello"),
                             "generate", "max_tokens (4090)", "context of 4096 tokens", "lower max_tokens")
    assert "prompt (" in line


def test_tokenizer_ids_beyond_vocab(with_tokenizer: Path) -> None:
    assert_user_error(caravan("generate", "--model", with_tokenizer, "--raw", "--max-tokens", "2", "hello"),
                      "generate", "vocab")


# --- generate: the normal path on the demo model ------------------------------------------------------

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def answer_tp1(smollm2_dir: Path) -> dict:
    result = caravan("generate", "--model", smollm2_dir, "--json", "--max-tokens", "16", QUESTION)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one JSON object, no streamed text
    return json.loads(lines[0])


@pytest.mark.slow
def test_generate_json(answer_tp1: dict, smollm2_dir: Path) -> None:
    from cluster.api.tokenizer import Tokenizer

    out = answer_tp1
    assert (out["tp"], out["pp"], out["dtype"]) == (1, 1, "float32")
    assert "Paris" in out["text"]
    assert 1 <= len(out["token_ids"]) <= 16
    assert len(out["logprobs"]) == len(out["token_ids"])
    assert all(lp <= 0 for lp in out["logprobs"])
    assert out["finish_reason"] in ("stop", "length")
    if out["finish_reason"] == "stop":
        assert out["token_ids"][-1] == 2  # <|im_end|>
    else:
        assert len(out["token_ids"]) == 16
    tok = Tokenizer.from_pretrained(smollm2_dir)
    prompt = tok.decode(out["prompt_token_ids"], skip_special_tokens=False)
    assert out["prompt_token_ids"][0] == 1  # <|im_start|>
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert out["text"] == tok.decode(out["token_ids"])


@pytest.mark.slow
def test_generate_tp3_pp2_matches_single_rank(answer_tp1: dict, smollm2_dir: Path) -> None:
    result = caravan("generate", "--model", smollm2_dir, "--json", "--max-tokens", "16", "--tp", "3", "--pp", "2",
                     QUESTION)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert (out["tp"], out["pp"]) == (3, 2)
    assert out["prompt_token_ids"] == answer_tp1["prompt_token_ids"]
    assert out["token_ids"] == answer_tp1["token_ids"]  # greedy by default
    assert out["text"] == answer_tp1["text"]
    assert out["logprobs"] == pytest.approx(answer_tp1["logprobs"], abs=1e-3)


@pytest.mark.slow
def test_generate_streams_text_with_progress(smollm2_dir: Path) -> None:
    result = caravan("generate", "--model", smollm2_dir, "--max-tokens", "16", QUESTION)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "loading rank 0" in result.stderr  # the progress bar while weights load
    assert "tokens/s" in result.stderr and "TP 1 x PP 1" in result.stderr


@pytest.mark.slow
def test_seeded_sampling_is_the_same_on_every_layout(smollm2_dir: Path) -> None:
    runs = []
    for layout in (("--tp", "1", "--pp", "1"), ("--tp", "3", "--pp", "2")):
        result = caravan("generate", "--model", smollm2_dir, "--json", "--max-tokens", "24", "--temperature", "0.9",
                         "--top-p", "0.95", "--seed", "11", *layout, "Tell me a story about a llama.")
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout)["token_ids"])
    assert runs[0] == runs[1]


HEAVY = ("torch", "ray", "transformers", "grpc")


def test_help_and_a_bad_flag_answer_without_importing_torch_ray_transformers_or_grpc() -> None:
    # The parsers are argparse alone; each command's module (and what it needs) is imported when it runs.
    probe = ("import sys\nfrom cluster.cli import main\n"
             "for argv in (['--help'], ['serve', '--help'], ['plan', '--dtype', 'fp4']):\n"
             "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
             f"print('loaded', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.count("exit 0") == 2 and "exit 2" in result.stdout, result.stdout + result.stderr
    assert "invalid choice: 'fp4'" in result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded []", result.stdout


def test_every_command_names_an_entry_point_that_exists() -> None:
    import argparse
    import importlib

    from cluster.cli import parsers

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for name in parsers.COMMANDS:
        getattr(parsers, name)(sub)
    assert set(sub.choices) == {"generate", "serve", "plan", "chat", "complete", "status", "scale", "drain", "doctor"}
    for command, p in sub.choices.items():
        module, function = p.get_default("run").split(":")
        assert callable(getattr(importlib.import_module(f"cluster.cli.{module}"), function)), command
