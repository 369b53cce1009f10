"""The cluster config: one YAML file for `caravan serve CONFIG.yaml`, loaded into frozen dataclasses.

Every key is optional; an empty file serves the embedded demo on a simulated two-node cluster.
This is every key with its default:

```yaml
model:
  path: null                  # Hugging Face checkpoint folder, relative to this file; null: SmolLM2-135M-Instruct demo
  dtype: float32              # float32 | bfloat16 | float16
layout:
  tp: 3                       # tensor-parallel ranks per stage
  pp: 2                       # pipeline stages per replica
replicas: 1                   # copies of the model, each tp x pp shards
kv_cache:
  block_size: 16              # tokens per KV cache block
  memory_per_shard: 64MiB     # KV memory of each shard: bytes, or KiB/MiB/GiB, KB/MB/GB, K/M/G (binary)
  num_blocks: null            # exactly this many blocks per shard instead of sizing from memory_per_shard
  prefix_caching: true        # keep the KV of full blocks for later requests that start with the same tokens
scheduler:
  max_num_seqs: 64            # sequences in one step
  max_tokens_per_step: 512    # token budget of one step: decodes (1 each) + prefill chunks; >= max_num_seqs
speculative:                  # several tokens per step, the output unchanged (cluster/engine/speculative.py)
  method: null                # null: off; ngram: what followed the last tokens earlier on; draft: draft_model's
  draft_model: null           # a smaller checkpoint sharing the model's tokenizer (405B: Llama 3.2 1B), beside shard 0
  num_tokens: 4               # tokens proposed per step
  ngram: 3                    # the last 3 tokens are looked up among the earlier ones, else the last 2, ...
  max_batch: 8                # a lane running more sequences does not speculate (compute-bound steps)
  min_acceptance: 0.1         # a sequence accepting fewer of its drafts rests for 32 tokens
timeouts:
  setup_s: 300.0              # actors start, join the process group and load weights
  step_s: 15.0                # one step; past it the replica is taken out of service and rebuilt
  collective_s: 60.0          # torch.distributed timeout of every collective
  health_check_period_s: 1.0  # seconds between health checks of each replica
  repair_s: 60.0              # a replica whose shard died or hung repairs itself in place within this, or is
                              # replaced by a new one
shard:
  device: auto                # auto | cpu | cuda
  cpu_threads: 1              # torch threads per shard when it computes on CPU
  cuda_graphs: true           # on CUDA: decode steps of up to scheduler.max_num_seqs sequences replay graphs
                              # captured at start (shard/graphs.py); false runs every step eagerly, to debug
  fp8_scaled_mm_min_rows: 1024  # FP8 checkpoints on CUDA: steps of fewer rows take the weight-only FP8 GEMM,
                              # from this many the activations are quantised too (`python bench/fp8_gemm.py`
                              # prints the crossover on your GPU)
local_cluster:                # only without an address: a local Ray cluster that simulates nodes
  nodes: 2                    # simulated nodes
  gpus_per_node: null         # null: just enough for the layout, whole TP groups per node
  cpus_per_node: 1            # CPUs each simulated node advertises to Ray
router:                       # the front doors: gRPC (caravan.v1 Inference and Admin, grpc.health.v1, reflection)
                              # and the OpenAI-compatible HTTP API, on one event loop with one admission queue
  host: 127.0.0.1             # address to listen on; 0.0.0.0 (or [::]) to take connections from other hosts
  port: 50051                 # gRPC port; 0 picks a free one
  http_port: 8000             # OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
                              # /health); 0 turns it off
  metrics_port: 9464          # Prometheus /metrics; 0 picks a free one, null turns it off
  max_in_flight: 256          # requests admitted at once (streaming or queued); more get RESOURCE_EXHAUSTED
  max_message_bytes: 4MiB     # largest request the transport accepts; fields have their own limits inside it
  drain_grace_s: 30.0         # on SIGTERM or Admin.Drain: how long in-flight requests get to finish
  max_request_s: 3600.0       # the longest a request may stream, whatever deadline it asks for (or none)
  wait_for_replica_s: 30.0    # while no replica serves (one is recovering), how long a request waits for one
                              # (within its own deadline) before it gets UNAVAILABLE
  auth_token_file: null       # a file holding the bearer token every Inference RPC must carry; null: they
                              # need none (the local demo)
  admin_token_file: null      # a file holding the token Admin RPCs (status, scale, drain) need, never the
                              # inference token; null: one generated into ~/.caravan/auth_token
  tls_cert_file: null         # PEM certificate chain; with tls_key_file the router speaks TLS only
  tls_key_file: null          # PEM private key of tls_cert_file
  api_keys_file: null         # HTTP API keys, one per line, any of which a request may carry as
                              # `Authorization: Bearer <key>`; null: auth_token_file's token if that is set,
                              # else the HTTP API is open (the local demo)
address: null                 # an existing Ray cluster ("auto" or "host:port"); null: start a local one
name: caravan                 # the Serve application name; actor names start with it
```

An unknown key or an impossible value is a one-line `ConfigError` that names the source, the key
path, the value and the fix. Each field carries its rule in `field(metadata=...)` and one generic
loader and one generic validator walk the dataclasses, so adding a key is one line. A `ServeConfig`
checks itself on construction, so `dataclasses.replace` (command-line overrides) is checked too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import re
import reprlib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Callable, get_args, get_type_hints

import yaml

from shard.errors import UserError
from shard.layout import Layout

# The docstring is the one copy users read, so the example is cut from it rather than kept twice
# (which is also why this module needs its docstring: it does not import under `python -OO`).
EXAMPLE_YAML: str = __doc__.split("```yaml\n")[1].split("```")[0]

DTYPES = ("float32", "bfloat16", "float16")   # torch's names for them
DEVICES = ("auto", "cpu", "cuda")
_UNITS = {"K": 2**10, "KiB": 2**10, "KB": 10**3, "M": 2**20, "MiB": 2**20, "MB": 10**6,
          "G": 2**30, "GiB": 2**30, "GB": 10**9}


class ConfigError(UserError, ValueError):
    """A cluster config Caravan cannot serve: `source: key.path: the value and the fix`, one line."""

    def __init__(self, key: str, problem: str, source: str = "<config>"):
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.key, self.problem, self.source = key, problem, source

    def __reduce__(self):  # the default would call __init__ with the whole message only
        return ConfigError, (self.key, self.problem, self.source)


# Every field has a rule, (predicate, fix): the predicate sees a value of the right type; the fix,
# which also names the type, is the advice when the type or the predicate is wrong. A parse turns
# YAML sugar into the stored type before the rules run, raising ValueError(fix) for what it cannot read.
Rule = tuple[Callable[[Any], bool], str]
Parse = Callable[[Any, Path], Any]

_AT_LEAST_1: Rule = (lambda v: v >= 1, "use an integer >= 1")
_SECONDS: Rule = (lambda v: math.isfinite(v) and v > 0, "use a finite number of seconds > 0")
_NOT_EMPTY: Rule = (bool, "use a non-empty string")
_APP_NAME: Rule = (lambda v: re.fullmatch(r"[a-z][a-z0-9-]{0,40}", v) is not None,
                   "use 1 to 41 lowercase letters, digits or '-', starting with a letter (Ray names actors after it)")


def _one_of(choices: Any) -> Rule:
    return (lambda v: v in choices, f"use one of {', '.join(choices)}")


def _rule(default: Any, rule: Rule, parse: Parse | None = None) -> Any:
    return field(default=default, metadata={"rule": rule, "parse": parse})


def _bytes(v: Any, _base: Path) -> Any:
    if type(v) is int:
        return v
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]+)\s*", v) if isinstance(v, str) else None
    if m is None or m[2] not in _UNITS:
        raise ValueError(f"use a number of bytes or a size such as 64MiB, 1GiB, 512MB or 2G "
                         f"(units {', '.join(_UNITS)}; bare K/M/G are binary)")
    return int(m[1]) * _UNITS[m[2]]


def _path(v: Any, base: Path) -> Any:
    # Actors on other nodes never share the driver's working directory, so store it absolute.
    return str((base / Path(v).expanduser()).resolve()) if isinstance(v, str) and v else v


@dataclass(frozen=True)
class ModelSection:
    path: str | None = _rule(None, _NOT_EMPTY, _path)
    dtype: str = _rule("float32", _one_of(DTYPES))

    # torch's dtype, importing torch only when asked: `caravan`'s argument parsers read this module.
    torch_dtype = property(lambda self: getattr(importlib.import_module("torch"), self.dtype))


@dataclass(frozen=True)
class LayoutSection:
    tp: int = _rule(3, _AT_LEAST_1)
    pp: int = _rule(2, _AT_LEAST_1)


@dataclass(frozen=True)
class KVCacheSection:
    block_size: int = _rule(16, _AT_LEAST_1)
    memory_per_shard: int = _rule(64 * 2**20, _AT_LEAST_1, _bytes)
    num_blocks: int | None = _rule(None, _AT_LEAST_1)
    prefix_caching: bool = _rule(True, (lambda v: True, "use true or false"))


@dataclass(frozen=True)
class SchedulerSection:
    max_num_seqs: int = _rule(64, _AT_LEAST_1)
    max_tokens_per_step: int = _rule(512, _AT_LEAST_1)


@dataclass(frozen=True)
class SpeculativeSection:
    method: str | None = _rule(None, _one_of(("ngram", "draft")))
    draft_model: str | None = _rule(None, _NOT_EMPTY, _path)
    num_tokens: int = _rule(4, _AT_LEAST_1)
    ngram: int = _rule(3, _AT_LEAST_1)
    max_batch: int = _rule(8, _AT_LEAST_1)
    min_acceptance: float = _rule(0.1, (lambda v: 0 <= v <= 1, "use a number from 0 to 1"))


@dataclass(frozen=True)
class TimeoutsSection:
    setup_s: float = _rule(300.0, _SECONDS)
    step_s: float = _rule(15.0, _SECONDS)
    collective_s: float = _rule(60.0, _SECONDS)
    health_check_period_s: float = _rule(1.0, _SECONDS)
    repair_s: float = _rule(60.0, _SECONDS)


@dataclass(frozen=True)
class ShardSection:
    device: str = _rule("auto", _one_of(DEVICES))
    cpu_threads: int = _rule(1, _AT_LEAST_1)
    cuda_graphs: bool = _rule(True, (lambda v: True, "use true or false"))
    fp8_scaled_mm_min_rows: int = _rule(1024, _AT_LEAST_1)


@dataclass(frozen=True)
class LocalClusterSection:
    nodes: int = _rule(2, _AT_LEAST_1)
    gpus_per_node: int | None = _rule(None, _AT_LEAST_1)
    cpus_per_node: int = _rule(1, _AT_LEAST_1)

    def gpus_for(self, layout: LayoutSection, replicas: int) -> int:
        """GPUs each simulated node advertises: enough for every shard, in whole TP groups, because
        a TP group all-reduces on every layer and must not straddle two nodes."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        per_node = -(-layout.tp * layout.pp * replicas // self.nodes)
        return -(-per_node // layout.tp) * layout.tp


_PORT: Rule = (lambda v: 0 <= v <= 65535, "use a port number from 0 to 65535 (0 picks a free one)")


@dataclass(frozen=True)
class RouterSection:
    host: str = _rule("127.0.0.1", _NOT_EMPTY)
    port: int = _rule(50051, _PORT)
    http_port: int = _rule(8000, (lambda v: 0 <= v <= 65535, "use a port number from 0 to 65535 (0 turns it off)"))
    metrics_port: int | None = _rule(9464, _PORT)
    max_in_flight: int = _rule(256, _AT_LEAST_1)
    max_message_bytes: int = _rule(4 * 2**20, (lambda v: v >= 2**10, "use at least 1KiB"), _bytes)
    drain_grace_s: float = _rule(30.0, (lambda v: math.isfinite(v) and v >= 0, "use a finite number of seconds >= 0"))
    max_request_s: float = _rule(3600.0, _SECONDS)
    wait_for_replica_s: float = _rule(30.0, (lambda v: math.isfinite(v) and v >= 0,
                                             "use a finite number of seconds >= 0 (0: refuse at once)"))
    auth_token_file: str | None = _rule(None, _NOT_EMPTY, _path)
    admin_token_file: str | None = _rule(None, _NOT_EMPTY, _path)
    tls_cert_file: str | None = _rule(None, _NOT_EMPTY, _path)
    tls_key_file: str | None = _rule(None, _NOT_EMPTY, _path)
    api_keys_file: str | None = _rule(None, _NOT_EMPTY, _path)


@dataclass(frozen=True)
class ServeConfig:
    model: ModelSection = field(default_factory=ModelSection)
    layout: LayoutSection = field(default_factory=LayoutSection)
    replicas: int = _rule(1, _AT_LEAST_1)
    kv_cache: KVCacheSection = field(default_factory=KVCacheSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)
    timeouts: TimeoutsSection = field(default_factory=TimeoutsSection)
    shard: ShardSection = field(default_factory=ShardSection)
    local_cluster: LocalClusterSection = field(default_factory=LocalClusterSection)
    router: RouterSection = field(default_factory=RouterSection)
    address: str | None = _rule(None, _NOT_EMPTY)
    name: str = _rule("caravan", _APP_NAME)

    @property
    def shard_layout(self) -> Layout:
        """The layout section as the data plane takes it."""
        return Layout(self.layout.tp, self.layout.pp)

    def __post_init__(self) -> None:
        _validate(self, "")
        seqs, budget = self.scheduler.max_num_seqs, self.scheduler.max_tokens_per_step
        if budget < seqs:
            raise ConfigError("scheduler.max_tokens_per_step", (
                f"got {budget}, below scheduler.max_num_seqs={seqs}; a step must fit a decode of every running "
                f"sequence: raise scheduler.max_tokens_per_step to at least {seqs} or lower scheduler.max_num_seqs"))
        spec = self.speculative
        if (spec.method == "draft") != (spec.draft_model is not None):
            raise ConfigError("speculative.draft_model", "speculative.method is draft but no draft_model is set; point "
                              "it at a smaller checkpoint that shares the model's tokenizer, or use method: ngram"
                              if spec.method == "draft" else f"is set but speculative.method is {spec.method}; set "
                              "method: draft to use it, or remove draft_model")
        if (self.router.tls_cert_file is None) != (self.router.tls_key_file is None):
            given, missing = (("tls_cert_file", "tls_key_file") if self.router.tls_key_file is None
                              else ("tls_key_file", "tls_cert_file"))
            raise ConfigError(f"router.{missing}", f"router.{given} is set but router.{missing} is not; TLS needs "
                                                   "both the certificate chain and its private key (or neither)")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError("", "no such file; pass the path of a cluster config YAML "
                                  "(cluster/config.py shows every key)", str(path)) from None
        except OSError as e:
            raise ConfigError("", f"cannot read it ({e.strerror}); pass a readable YAML file", str(path)) from None
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError("", f"{where}invalid YAML: {problem}", str(path)) from None
        return cls.from_dict({} if data is None else data, str(path), path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>", base_dir: Path | None = None) -> ServeConfig:
        """`base_dir` anchors a relative model.path; None means the current directory."""
        try:
            return _load(cls, data, "", Path.cwd() if base_dir is None else Path(base_dir))
        except ConfigError as e:
            raise ConfigError(e.key, e.problem, source) from None

    def to_dict(self) -> dict[str, Any]: return dataclasses.asdict(self)

    def check_model_path(self, source: str = "<config>") -> None:
        """Checks that model.path and speculative.draft_model are checkpoint folders: not in from_dict, so
        a config can be checked without the weights; `caravan serve` calls it before starting Ray."""
        for key, value, fix in (
                ("model.path", self.model.path, "or remove model.path to serve the embedded SmolLM2-135M-Instruct demo"),
                ("speculative.draft_model", self.speculative.draft_model,
                 "one that shares the model's tokenizer, or use speculative.method: ngram")):
            path = Path(value or ".")
            problem = ("does not exist" if not path.exists() else "is a file, not a folder" if not path.is_dir()
                       else "exists but has no config.json" if not (path / "config.json").is_file() else None)
            if value is not None and problem is not None:
                raise ConfigError(key, f"{path} {problem}; point it at a Hugging Face checkpoint folder "
                                       f"(config.json and *.safetensors), {fix}", source)


def _load(cls: type, data: Any, prefix: str, base: Path) -> Any:
    """Builds `cls` from YAML data: keys must be fields, sections recurse, parses run; types and
    ranges are left to `_validate`, which also guards objects built in code."""
    names = [f.name for f in fields(cls)]
    if data is None and prefix:  # `kv_cache:` with every key commented out: the defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "top level",
                          f"got {_show(data)} ({type(data).__name__}); use a mapping with keys {', '.join(names)}")
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            section = f"keys of {prefix.rstrip('.')}" if prefix else "top-level keys"
            raise ConfigError(f"{prefix}{key}", f"unknown key; {hint}valid {section}: {', '.join(names)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if is_dataclass(hints[f.name]):
            value = _load(hints[f.name], value, f"{prefix}{f.name}.", base)
        elif f.metadata["parse"] is not None:
            try:
                value = f.metadata["parse"](value, base)
            except ValueError as e:
                raise ConfigError(prefix + f.name, f"got {_show(value)}; {e}") from None
        kwargs[f.name] = value
    return cls(**kwargs)


def _validate(obj: Any, prefix: str) -> None:
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        key, value, hint = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(key, f"got {_show(value)}; use a {hint.__name__}")
            _validate(value, key + ".")
            continue
        types = get_args(hint) if isinstance(hint, UnionType) else (hint,)
        if value is None and NoneType in types:
            continue
        ok, fix = f.metadata["rule"]
        fix += ", or null" if NoneType in types else ""
        # Exact types: YAML `true` is a bool, which Python would otherwise take for the int 1.
        if not any(type(value) is t or (t is float and type(value) is int) for t in types):
            raise ConfigError(key, f"got {_show(value)} ({type(value).__name__}); {fix}")
        if not ok(value):
            raise ConfigError(key, f"got {_show(value)}; {fix}")


def _show(value: Any) -> str:
    return reprlib.repr(value)  # bounded and on one line, whatever the YAML held


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`, except that a key given twice is an error instead of the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)
