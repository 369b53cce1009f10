"""One model replica on Ray: its shard actors, placed by rank inside the replica's placement
group, joined into process groups, loaded, and driven by an `Engine`.

Start-up is all or nothing: if any actor fails or setup runs past `timeouts.setup_s`, every actor
is killed and the error names the rank that failed (and the node it was on).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import RayExecutor, RemoteShard, ShardSpec
from cluster.config import ServeConfig
from cluster.engine import Engine
from cluster.placement import ShardPlace, assign_ranks, cluster_nodes, format_places
from cluster.tokenizer import checkpoint_eos_ids
from shard.config import ModelConfig
from shard.layout import Layout, model_stage_layers
from shard.model import kv_heads_per_rank

log = logging.getLogger(__name__)


class ReplicaStartError(RuntimeError):
    """A replica could not start; the message names the rank and node that failed."""


def kv_blocks(cfg: ServeConfig, model: ModelConfig) -> int:
    """KV blocks every shard allocates: what fits in `memory_per_shard` on the rank holding the
    most layers (block ids are shared by all stages, so every rank allocates the same count)."""
    kv = cfg.kv_cache
    if kv.num_blocks is not None:
        return kv.num_blocks
    layout = Layout(cfg.layout.tp, cfg.layout.pp)
    layers = max(len(model_stage_layers(model, layout.pp, s)) for s in range(layout.pp))
    itemsize = cfg.model.torch_dtype.itemsize
    per_block = 2 * layers * kv.block_size * kv_heads_per_rank(model, layout.tp) * model.head_dim * itemsize
    blocks = kv.memory_per_shard // per_block
    if blocks < 1:
        raise ReplicaStartError(f"kv_cache.memory_per_shard ({kv.memory_per_shard} bytes) holds no block of "
                                f"{per_block} bytes; raise it or lower kv_cache.block_size")
    return blocks


@dataclass
class RayReplica:
    name: str
    places: list[ShardPlace]
    actors: list
    engine: Engine
    num_blocks: int


def start_replica(cfg: ServeConfig, model_dir: str, pg: PlacementGroup, name: str, resource: str) -> RayReplica:
    """Starts the shards in bundles 1..world of `pg` (bundle 0 holds the caller) and their engine."""
    layout = Layout(cfg.layout.tp, cfg.layout.pp)
    model = ModelConfig.from_pretrained(model_dir)
    num_blocks = kv_blocks(cfg, model)
    bundle_nodes = {int(b): n for b, n in placement_group_table(pg)["bundles_to_node_id"].items()}
    places = assign_ranks(layout, bundle_nodes, {n.node_id: n.ip for n in cluster_nodes()})
    gpu = resource == "GPU"
    # The names are what the Ray dashboard lists: replica, stage and TP rank at a glance.
    names = [f"{name}-stage{p.stage}-tp{p.tp_rank}" for p in places]
    actors = []
    for p, actor_name in zip(places, names):
        spec = ShardSpec(model_dir, layout, p.rank, cfg.model.torch_dtype, num_blocks, cfg.kv_cache.block_size,
                         cfg.shard.device, cfg.shard.cpu_threads, cfg.timeouts.collective_s)
        actors.append(RemoteShard.options(
            name=actor_name, num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
            max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, p.bundle, True),
        ).remote(spec))
    start = time.monotonic()
    deadline = start + cfg.timeouts.setup_s
    try:
        host, port = ray.get(actors[0].open_store.remote(), timeout=cfg.timeouts.setup_s)
        pending = {a.setup.remote(host, port): p for a, p in zip(actors, places)}
        while pending:  # the first rank to fail is the one reported; the others then just wait
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks = sorted(p.rank for p in pending.values())
                raise ReplicaStartError(f"{name}: ranks {ranks} did not finish setup within timeouts.setup_s="
                                        f"{cfg.timeouts.setup_s:g} s; raise it for large checkpoints or slow disks")
            p = pending.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as e:
                raise ReplicaStartError(f"{name}: rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip} failed to "
                                        f"start: {e}") from e
    except BaseException:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    log.info("%s: %s up in %.1f s, %d KV blocks of %d tokens per shard\n%s", name, layout,
             time.monotonic() - start, num_blocks, cfg.kv_cache.block_size, format_places(places))
    eos = checkpoint_eos_ids(model_dir)
    engine = Engine(RayExecutor(actors, names, layout), model, eos, num_blocks=num_blocks, block_size=cfg.kv_cache.block_size,
                    lanes=layout.pp, max_num_seqs=cfg.scheduler.max_num_seqs,
                    max_tokens_per_step=cfg.scheduler.max_tokens_per_step, step_timeout_s=cfg.timeouts.step_s,
                    name=name, prefix_caching=cfg.kv_cache.prefix_caching)
    return RayReplica(name, places, actors, engine, num_blocks)
