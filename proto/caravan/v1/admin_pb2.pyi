from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_SERVING: _ClassVar[ReplicaState]
    REPLICA_STATE_NOT_SERVING: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_SERVING: ReplicaState
REPLICA_STATE_NOT_SERVING: ReplicaState

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStatus(_message.Message):
    __slots__ = ("rank", "stage", "tp_rank", "node_id", "node_ip", "healthy")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IP_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    rank: int
    stage: int
    tp_rank: int
    node_id: str
    node_ip: str
    healthy: bool
    def __init__(self, rank: _Optional[int] = ..., stage: _Optional[int] = ..., tp_rank: _Optional[int] = ..., node_id: _Optional[str] = ..., node_ip: _Optional[str] = ..., healthy: _Optional[bool] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("name", "state", "shards", "kv_blocks_total", "kv_blocks_free", "running", "waiting", "steps", "preemptions", "last_progress_age_s", "error", "prefix_cache_blocks", "prefix_cache_requests", "prefix_cache_hit_requests", "prefix_cache_prompt_tokens", "prefix_cache_hit_tokens", "prefix_cache_evictions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: ReplicaState
    shards: _containers.RepeatedCompositeFieldContainer[ShardStatus]
    kv_blocks_total: int
    kv_blocks_free: int
    running: int
    waiting: int
    steps: int
    preemptions: int
    last_progress_age_s: float
    error: str
    prefix_cache_blocks: int
    prefix_cache_requests: int
    prefix_cache_hit_requests: int
    prefix_cache_prompt_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_evictions: int
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., shards: _Optional[_Iterable[_Union[ShardStatus, _Mapping]]] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., steps: _Optional[int] = ..., preemptions: _Optional[int] = ..., last_progress_age_s: _Optional[float] = ..., error: _Optional[str] = ..., prefix_cache_blocks: _Optional[int] = ..., prefix_cache_requests: _Optional[int] = ..., prefix_cache_hit_requests: _Optional[int] = ..., prefix_cache_prompt_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., prefix_cache_evictions: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("serving", "draining", "in_flight", "max_in_flight", "replicas_target", "replicas", "pending")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    draining: bool
    in_flight: int
    max_in_flight: int
    replicas_target: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    pending: str
    def __init__(self, serving: _Optional[bool] = ..., draining: _Optional[bool] = ..., in_flight: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., replicas_target: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., pending: _Optional[str] = ...) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: int
    def __init__(self, replicas: _Optional[int] = ...) -> None: ...

class ScaleResponse(_message.Message):
    __slots__ = ("replicas_before", "replicas_target")
    REPLICAS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    replicas_before: int
    replicas_target: int
    def __init__(self, replicas_before: _Optional[int] = ..., replicas_target: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_period_s",)
    GRACE_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    grace_period_s: float
    def __init__(self, grace_period_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight",)
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    def __init__(self, in_flight: _Optional[int] = ...) -> None: ...
