"""The cluster YAML config: defaults, every key, and one actionable one-line error per mistake."""

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from cluster.config import (
    EXAMPLE_YAML, ConfigError, KVCacheSection, LayoutSection, LocalClusterSection, ServeConfig,
)

FULL_YAML = """\
model:
  path: weights/llama
  dtype: bfloat16
layout:
  tp: 2
  pp: 4
replicas: 3
kv_cache:
  block_size: 32
  memory_per_shard: 1GiB
  num_blocks: 500
  prefix_caching: false
scheduler:
  max_num_seqs: 8
  max_tokens_per_step: 256
speculative:
  method: draft
  draft_model: weights/llama-1b
  num_tokens: 6
  ngram: 4
  max_batch: 2
  min_acceptance: 0.3
timeouts:
  setup_s: 600
  step_s: 2.5
  collective_s: 30.0
  health_check_period_s: 0.5
  repair_s: 20
shard:
  device: cuda
  cpu_threads: 4
  fp8_scaled_mm_min_rows: 256
  cuda_graphs: false
local_cluster:
  nodes: 4
  gpus_per_node: 8
  cpus_per_node: 16
router:
  host: 0.0.0.0
  port: 8443
  http_port: 8080
  metrics_port: 0
  max_in_flight: 1000
  max_message_bytes: 16MiB
  drain_grace_s: 5
  max_request_s: 600
  wait_for_replica_s: 12
  auth_token_file: secrets/token
  admin_token_file: secrets/admin-token
  tls_cert_file: tls/cert.pem
  tls_key_file: tls/key.pem
  api_keys_file: secrets/api-keys
address: "10.0.0.1:6379"
name: llama-70b
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_yaml(write(tmp_path, text))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'serve.yaml'}: ")
    return message


def keys_of(tree: dict) -> dict:
    return {k: keys_of(v) if isinstance(v, dict) else None for k, v in tree.items()}


@pytest.mark.parametrize("text", ["", "# nothing set yet\n", "kv_cache:\n  # block_size: 8\n"])
def test_empty_file_and_empty_sections_are_the_defaults(tmp_path, text):
    assert ServeConfig.from_yaml(write(tmp_path, text)) == ServeConfig()


def test_example_yaml_shows_every_key_with_its_default():
    assert ServeConfig.from_dict(yaml.safe_load(EXAMPLE_YAML)) == ServeConfig()
    assert keys_of(yaml.safe_load(EXAMPLE_YAML)) == keys_of(ServeConfig().to_dict())


def test_full_file_sets_every_key(tmp_path):
    cfg = ServeConfig.from_yaml(write(tmp_path, FULL_YAML))
    assert cfg.model.path == str((tmp_path / "weights" / "llama").resolve())
    assert cfg.model.torch_dtype is torch.bfloat16
    assert (cfg.layout.tp, cfg.layout.pp, cfg.replicas) == (2, 4, 3)
    assert cfg.kv_cache == KVCacheSection(block_size=32, memory_per_shard=2**30, num_blocks=500, prefix_caching=False)
    assert (cfg.scheduler.max_num_seqs, cfg.scheduler.max_tokens_per_step) == (8, 256)
    assert dataclasses.astuple(cfg.speculative) == (
        "draft", str((tmp_path / "weights" / "llama-1b").resolve()), 6, 4, 2, 0.3)
    assert dataclasses.astuple(cfg.timeouts) == (600.0, 2.5, 30.0, 0.5, 20.0)
    assert (cfg.shard.device, cfg.shard.cpu_threads, cfg.shard.cuda_graphs, cfg.shard.fp8_scaled_mm_min_rows) == (
        "cuda", 4, False, 256)
    assert cfg.local_cluster == LocalClusterSection(nodes=4, gpus_per_node=8, cpus_per_node=16)
    assert (cfg.address, cfg.name) == ("10.0.0.1:6379", "llama-70b")
    assert cfg.router.tls_key_file == str((tmp_path / "tls" / "key.pem").resolve())
    assert cfg.router.api_keys_file == str((tmp_path / "secrets" / "api-keys").resolve())
    assert (cfg.router.port, cfg.router.max_message_bytes, cfg.router.drain_grace_s, cfg.router.wait_for_replica_s) == (
        8443, 16 * 2**20, 5, 12)
    # Every key differs from its default, so none of them was silently ignored.
    defaults = ServeConfig().to_dict()
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            assert all(values[k] != defaults[section][k] for k in values), section
        else:
            assert values != defaults[section], section


def test_round_trip_through_yaml(tmp_path):
    cfg = ServeConfig.from_yaml(write(tmp_path, FULL_YAML))
    assert ServeConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert ServeConfig.from_dict(ServeConfig().to_dict()) == ServeConfig()


def test_relative_model_path_is_resolved_against_the_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig.from_yaml(Path("conf") / write(tmp_path / "conf", "model:\n  path: ../ckpt\n").name)
    assert cfg.model.path == str(tmp_path.resolve() / "ckpt")
    absolute = ServeConfig.from_dict({"model": {"path": "/models/x"}}, base_dir=tmp_path / "conf")
    assert absolute.model.path == "/models/x"


@pytest.mark.parametrize("text, size", [
    ("1024", 1024), ("'3K'", 3 * 2**10), ("3KiB", 3 * 2**10), ("3KB", 3000),
    ("64M", 64 * 2**20), ("64MiB", 64 * 2**20), ("512MB", 512 * 10**6),
    ("2G", 2 * 2**30), ("1GiB", 2**30), ("2GB", 2 * 10**9), ("' 16 MiB '", 16 * 2**20),
])
def test_memory_per_shard_units(tmp_path, text, size):
    cfg = ServeConfig.from_yaml(write(tmp_path, f"kv_cache:\n  memory_per_shard: {text}\n"))
    assert cfg.kv_cache.memory_per_shard == size


@pytest.mark.parametrize("text, expected", [
    # Unknown keys, with the closest valid key and the section's valid keys.
    ("modle:\n  dtype: float32\n",
     ["modle: unknown key", "did you mean model?", "valid top-level keys: model, layout"]),
    ("scheduler:\n  max_num_seq: 4\n",
     ["scheduler.max_num_seq: unknown key", "did you mean scheduler.max_num_seqs?",
      "valid keys of scheduler: max_num_seqs, max_tokens_per_step"]),
    ("layout:\n  zz: 1\n", ["layout.zz: unknown key; valid keys of layout: tp, pp"]),
    ("router:\n  port: 70000\n", ["router.port: got 70000; use a port number from 0 to 65535"]),
    ("router:\n  max_in_flight: 0\n", ["router.max_in_flight: got 0; use an integer >= 1"]),
    ("router:\n  max_message_bytes: 100\n", ["router.max_message_bytes: got 100; use at least 1KiB"]),
    ("router:\n  drain_grace_s: -1\n", ["router.drain_grace_s: got -1; use a finite number of seconds >= 0"]),
    ("router:\n  tls_cert_file: cert.pem\n",
     ["router.tls_key_file: router.tls_cert_file is set but router.tls_key_file is not"]),
    # Strict types.
    ("layout:\n  tp: true\n", ["layout.tp: got True (bool); use an integer >= 1"]),
    ("layout:\n  pp: '3'\n", ["layout.pp: got '3' (str); use an integer >= 1"]),
    ("replicas: 2.0\n", ["replicas: got 2.0 (float); use an integer >= 1"]),
    ("kv_cache:\n  num_blocks: '100'\n", ["kv_cache.num_blocks: got '100' (str); use an integer >= 1, or null"]),
    ("timeouts:\n  step_s: '15s'\n", ["timeouts.step_s: got '15s' (str); use a finite number of seconds > 0"]),
    ("timeouts:\n  setup_s: null\n", ["timeouts.setup_s: got None (NoneType); use a finite number"]),
    ("address: 6379\n", ["address: got 6379 (int); use a non-empty string, or null"]),
    # Out of range.
    ("layout:\n  tp: 0\n", ["layout.tp: got 0; use an integer >= 1"]),
    ("replicas: -1\n", ["replicas: got -1; use an integer >= 1"]),
    ("kv_cache:\n  block_size: 0\n", ["kv_cache.block_size: got 0; use an integer >= 1"]),
    ("kv_cache:\n  num_blocks: 0\n", ["kv_cache.num_blocks: got 0; use an integer >= 1, or null"]),
    ("kv_cache:\n  memory_per_shard: 0MiB\n", ["kv_cache.memory_per_shard: got 0; use an integer >= 1"]),
    ("shard:\n  cpu_threads: 0\n", ["shard.cpu_threads: got 0; use an integer >= 1"]),
    ("shard:\n  fp8_scaled_mm_min_rows: 0\n", ["shard.fp8_scaled_mm_min_rows: got 0; use an integer >= 1"]),
    ("local_cluster:\n  nodes: 0\n", ["local_cluster.nodes: got 0; use an integer >= 1"]),
    ("local_cluster:\n  gpus_per_node: 0\n", ["local_cluster.gpus_per_node: got 0; use an integer >= 1, or null"]),
    ("local_cluster:\n  cpus_per_node: 0\n", ["local_cluster.cpus_per_node: got 0; use an integer >= 1"]),
    ("timeouts:\n  step_s: 0\n", ["timeouts.step_s: got 0; use a finite number of seconds > 0"]),
    ("timeouts:\n  collective_s: .inf\n", ["timeouts.collective_s: got inf; use a finite number of seconds > 0"]),
    ("timeouts:\n  health_check_period_s: .nan\n", ["timeouts.health_check_period_s: got nan;"]),
    ("name: Caravan Prod\n", ["name: got 'Caravan Prod'; use 1 to 41 lowercase letters, digits or '-'"]),
    (f"name: {'a' * 42}\n", ["name: got 'aaaa", "use 1 to 41 lowercase letters"]),
    ("model:\n  path: ''\n", ["model.path: got ''; use a non-empty string, or null"]),
    # Choices.
    ("model:\n  dtype: fp8\n", ["model.dtype: got 'fp8'; use one of float32, bfloat16, float16"]),
    ("shard:\n  device: gpu\n", ["shard.device: got 'gpu'; use one of auto, cpu, cuda"]),
    # Memory strings that do not parse list the accepted forms.
    ("kv_cache:\n  memory_per_shard: 64mb\n",
     ["kv_cache.memory_per_shard: got '64mb'; use a number of bytes or a size such as 64MiB, 1GiB, 512MB or 2G",
      "units K, KiB, KB, M, MiB, MB, G, GiB, GB"]),
    ("kv_cache:\n  memory_per_shard: 1.5GiB\n", ["kv_cache.memory_per_shard: got '1.5GiB'; use a number of bytes"]),
    ("kv_cache:\n  memory_per_shard: 1.5\n", ["kv_cache.memory_per_shard: got 1.5; use a number of bytes"]),
    # A step must fit a decode of every running sequence.
    ("scheduler:\n  max_num_seqs: 128\n  max_tokens_per_step: 64\n",
     ["scheduler.max_tokens_per_step: got 64, below scheduler.max_num_seqs=128",
      "raise scheduler.max_tokens_per_step to at least 128 or lower scheduler.max_num_seqs"]),
    # Shapes.
    ("- model\n- layout\n", ["top level: got ['model', 'layout'] (list); use a mapping with keys model, layout"]),
    ("just text\n", ["top level: got 'just text' (str); use a mapping"]),
    ("layout: 3x2\n", ["layout: got '3x2' (str); use a mapping with keys tp, pp"]),
    ("timeouts: [1, 2]\n", ["timeouts: got [1, 2] (list); use a mapping with keys setup_s, step_s"]),
    # YAML that does not parse names the line.
    ("layout:\n  tp: 2\n pp: 3\n", ["line 3, column 2: invalid YAML"]),
    ("model: {dtype: float32\n", ["line 2, column 1: invalid YAML"]),
    ("layout:\n  tp: 2\n  tp: 4\n",
     ["line 3, column 3: invalid YAML: key 'tp' appears twice in one mapping; keep one"]),
])
def test_errors_name_the_key_the_value_and_the_fix(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    for part in expected:
        assert part in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file; pass the path of a cluster config YAML"):
        ServeConfig.from_yaml(tmp_path / "nope.yaml")


def test_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^--set: replicas: got 0; use an integer >= 1$"):
        ServeConfig.from_dict({"replicas": 0}, source="--set")
    with pytest.raises(ConfigError, match=r"^<config>: layout.tp: got 0"):
        ServeConfig.from_dict({"layout": {"tp": 0}})


def test_replace_is_validated_too():
    cfg = ServeConfig()
    assert dataclasses.replace(cfg, replicas=2).replicas == 2
    with pytest.raises(ConfigError, match=r"^<config>: replicas: got 0; use an integer >= 1$"):
        dataclasses.replace(cfg, replicas=0)
    with pytest.raises(ConfigError, match=r"^<config>: layout.tp: got True \(bool\)"):
        dataclasses.replace(cfg, layout=LayoutSection(tp=True))


def test_config_error_is_a_value_error_that_survives_pickling():
    error = ConfigError("layout.tp", "got 0; use an integer >= 1", "serve.yaml")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.key, copy.source) == (str(error), "layout.tp", "serve.yaml")


def test_check_model_path(tmp_path):
    ServeConfig().check_model_path()  # no path: the embedded demo
    missing = ServeConfig.from_dict({"model": {"path": str(tmp_path / "absent")}})
    with pytest.raises(ConfigError) as e:
        missing.check_model_path("serve.yaml")
    assert str(e.value) == (
        f"serve.yaml: model.path: {tmp_path / 'absent'} does not exist; point it at a Hugging Face checkpoint "
        f"folder (config.json and *.safetensors), or remove model.path to serve the embedded "
        f"SmolLM2-135M-Instruct demo")

    (tmp_path / "empty").mkdir()
    empty = ServeConfig.from_dict({"model": {"path": str(tmp_path / "empty")}})
    with pytest.raises(ConfigError, match=r"model\.path: .*empty exists but has no config\.json; point it at"):
        empty.check_model_path()

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"model\.path: .*file is a file, not a folder; point it at"):
        ServeConfig.from_dict({"model": {"path": str(tmp_path / "file")}}).check_model_path()

    (tmp_path / "empty" / "config.json").write_text("{}")
    empty.check_model_path()


@pytest.mark.parametrize("tp, pp, replicas, nodes, gpus_per_node, expected", [
    (3, 2, 1, 2, None, 3),      # one stage per node
    (3, 2, 1, 1, None, 6),      # everything on one node
    (3, 2, 1, 4, None, 3),      # more nodes than needed: still one whole TP group
    (2, 3, 1, 2, None, 4),      # 6 shards over 2 nodes: 3 each, rounded up to whole TP groups
    (3, 2, 2, 2, None, 6),      # two replicas
    (1, 1, 1, 3, None, 1),
    (3, 2, 1, 2, 8, 8),         # set explicitly: taken as is
])
def test_gpus_for(tp, pp, replicas, nodes, gpus_per_node, expected):
    local = LocalClusterSection(nodes=nodes, gpus_per_node=gpus_per_node)
    assert local.gpus_for(LayoutSection(tp=tp, pp=pp), replicas) == expected


def test_torch_dtype():
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]:
        assert ServeConfig.from_dict({"model": {"dtype": name}}).model.torch_dtype is dtype


def test_cuda_graphs_is_a_boolean_switch_on_by_default(tmp_path):
    assert ServeConfig().shard.cuda_graphs is True
    assert ServeConfig.from_yaml(write(tmp_path, "shard:\n  cuda_graphs: false\n")).shard.cuda_graphs is False
    with pytest.raises(ConfigError, match=r"shard\.cuda_graphs: got 'off' \(str\); use true or false"):
        ServeConfig.from_yaml(write(tmp_path, "shard:\n  cuda_graphs: 'off'\n"))
