"""One model replica on Ray: its shard actors, placed by rank inside the replica's placement group,
joined into process groups, loaded, and driven by an `Engine`.

Start-up is all or nothing: if any actor fails or setup runs past `timeouts.setup_s`, every actor
is killed and the error names the rank that failed (and the node it was on). A replica whose engine
failed repairs itself in place (`cluster.runtime.repair`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ServeConfig
from cluster.engine import heap
from cluster.engine.engine import Engine
from cluster.engine.grammar import Grammars
from cluster.engine.request import checkpoint_eos_ids
from cluster.runtime.kv_budget import kv_blocks
from cluster.runtime.placement import ShardPlace, format_places, places_of
from cluster.runtime.ray_executor import RayExecutor
from cluster.runtime.shard_actor import RemoteShard, ShardSpec, last_line
from shard.config import ModelConfig

log = logging.getLogger(__name__)


class ReplicaStartError(RuntimeError):
    """A replica could not start; the message names the rank and node that failed."""


def phases(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())


@dataclass
class RayReplica:
    name: str
    places: list[ShardPlace]
    actors: list
    engine: Engine
    num_blocks: int
    cfg: ServeConfig
    model_dir: str
    pg: PlacementGroup
    resource: str
    startup: dict[str, float] = field(default_factory=dict)   # seconds per phase of `start_replica`

    @property
    def names(self) -> list[str]:
        # The names are what the Ray dashboard lists: replica, stage and TP rank at a glance.
        return [f"{self.name}-stage{p.stage}-tp{p.tp_rank}" for p in self.places]

    def spawn(self, index: int):
        """A new shard actor for `places[index]`, in its bundle, under its name."""
        cfg, place, gpu = self.cfg, self.places[index], self.resource == "GPU"
        spec = ShardSpec(model_dir=self.model_dir, layout=cfg.shard_layout, rank=place.rank,
                         dtype=cfg.model.torch_dtype, num_blocks=self.num_blocks, block_size=cfg.kv_cache.block_size,
                         device=cfg.shard.device, cpu_threads=cfg.shard.cpu_threads,
                         collective_timeout_s=cfg.timeouts.collective_s, cuda_graphs=cfg.shard.cuda_graphs,
                         graph_max_batch=cfg.scheduler.max_num_seqs,
                         fp8_scaled_mm_min_rows=cfg.shard.fp8_scaled_mm_min_rows,
                         draft_model_dir=cfg.speculative.draft_model if place.rank == 0 else None)
        return RemoteShard.options(
            name=self.names[index], num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, place.bundle, True),
        ).remote(spec)

    async def ping(self, timeout_s: float) -> list[bool]:
        """Per rank, whether its shard answered a ping (and has its worker) within `timeout_s`."""
        return list(await asyncio.gather(*(answers(a.ping.remote(), timeout_s) for a in self.actors)))

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


async def answers(ref, timeout_s: float) -> bool:
    """Whether an actor call returned within `timeout_s`, and did not return False (a ping of a shard
    without a worker)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s) is not False
    except (TimeoutError, asyncio.TimeoutError, ray.exceptions.RayError):
        return False


async def await_setup(name: str, calls: dict, deadline: float, setting: str, limit_s: float) -> None:
    """Waits for every rank's setup (or rejoin) call; the first rank to fail is the one reported."""
    pending = {asyncio.wrap_future(ref.future()): p for ref, p in calls.items()}
    while pending:
        done, _ = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            for f in pending:
                f.cancel()
            ranks = sorted(p.rank for p in pending.values())
            raise ReplicaStartError(f"{name}: ranks {ranks} did not finish setup within {setting}={limit_s:g} s; "
                                    f"raise it for large checkpoints or slow disks")
        for f in done:
            p = pending.pop(f)
            try:
                f.result()
            except Exception as e:
                raise ReplicaStartError(f"{name}: rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip} failed to "
                                        f"start: {last_line(e)}") from e


def start_replica(cfg: ServeConfig, model_dir: str, pg: PlacementGroup, name: str, resource: str) -> RayReplica:
    """Starts the shards in bundles 1..world of `pg` (bundle 0 holds the caller) and their engine."""
    layout = cfg.shard_layout
    model = ModelConfig.from_pretrained(model_dir)
    draft = ModelConfig.from_pretrained(cfg.speculative.draft_model) if cfg.speculative.draft_model else None
    num_blocks = kv_blocks(cfg, model, resource == "GPU", draft)
    places = places_of(pg, layout)
    replica = RayReplica(name, places, [], None, num_blocks, cfg, model_dir, pg, resource)
    replica.actors = [replica.spawn(i) for i in range(len(places))]
    start = time.monotonic()
    deadline = start + cfg.timeouts.setup_s
    limit = ("timeouts.setup_s", cfg.timeouts.setup_s)
    try:
        # Their processes first (Python, torch, this package): the part of a start that does not grow with
        # the model, timed apart from the part that does.
        _run(await_setup(name, {a.where.remote(): p for a, p in zip(replica.actors, places)}, deadline, *limit))
        replica.startup["shard processes up"] = time.monotonic() - start
        host, port = ray.get(replica.actors[0].open_store.remote(), timeout=cfg.timeouts.setup_s)
        _run(await_setup(name, {a.setup.remote(host, port): p for a, p in zip(replica.actors, places)}, deadline,
                         *limit))
        up = replica.startup["shard processes up"]
        replica.startup["process groups, weights, KV"] = time.monotonic() - start - up
    except BaseException:
        replica.kill()
        raise
    log.info("%s: %s up in %.1f s (%s), %d KV blocks of %d tokens per shard\n%s", name, layout,
             time.monotonic() - start, phases(replica.startup), num_blocks, cfg.kv_cache.block_size,
             format_places(places))
    replica.engine = Engine(RayExecutor(replica.actors, replica.names, layout), model, checkpoint_eos_ids(model_dir),
                            num_blocks=num_blocks, block_size=cfg.kv_cache.block_size, lanes=layout.pp,
                            max_num_seqs=cfg.scheduler.max_num_seqs,
                            max_tokens_per_step=cfg.scheduler.max_tokens_per_step,
                            step_timeout_s=cfg.timeouts.step_s, name=name,
                            prefix_caching=cfg.kv_cache.prefix_caching, speculative=cfg.speculative,
                            grammars=Grammars(model_dir, model.vocab_size, checkpoint_eos_ids(model_dir)))
    heap.settle()  # the engine's process is ready to serve: keep collections out of its steps
    return replica


def _run(coro):
    """Runs a coroutine to the end from synchronous code, whether or not this thread has a loop
    running (a Serve replica's constructor runs inside one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
