"""One model replica on Ray: its shard actors, placed by rank inside the replica's placement
group, joined into process groups, loaded, and driven by an `Engine`.

Start-up is all or nothing: if any actor fails or setup runs past `timeouts.setup_s`, every actor
is killed and the error names the rank that failed (and the node it was on).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import RayExecutor, RemoteShard, ShardSpec, last_line
from cluster.config import ServeConfig
from cluster.engine import Engine
from cluster.placement import ShardPlace, assign_ranks, cluster_nodes, format_places
from cluster.tokenizer import checkpoint_eos_ids
from shard.config import ModelConfig
from shard.graphs import graph_memory_bound
from shard.worker import GRAPH_MAX_CONTEXT
from shard.layout import Layout, model_stage_layers
from shard.model import kv_heads_per_rank

log = logging.getLogger(__name__)


class ReplicaStartError(RuntimeError):
    """A replica could not start; the message names the rank and node that failed."""


def kv_blocks(cfg: ServeConfig, model: ModelConfig, gpu: bool = False) -> int:
    """KV blocks every shard allocates: what fits in `memory_per_shard` on the rank holding the
    most layers (block ids are shared by all stages, so every rank allocates the same count). On
    GPUs with `shard.cuda_graphs`, the graphs' memory comes out of that budget first
    (`shard.graphs.graph_memory_bound`)."""
    kv = cfg.kv_cache
    if kv.num_blocks is not None:
        return kv.num_blocks
    layout = Layout(cfg.layout.tp, cfg.layout.pp)
    layers = max(len(model_stage_layers(model, layout.pp, s)) for s in range(layout.pp))
    itemsize = cfg.model.torch_dtype.itemsize
    per_block = 2 * layers * kv.block_size * kv_heads_per_rank(model, layout.tp) * model.head_dim * itemsize
    graphs = graph_reserve(cfg, model, gpu)
    blocks = (kv.memory_per_shard - graphs) // per_block
    if blocks < 1:
        reserve = f", less {graphs} bytes for the CUDA graphs (shard.cuda_graphs)," if graphs else ""
        raise ReplicaStartError(f"kv_cache.memory_per_shard ({kv.memory_per_shard} bytes){reserve} holds no block of "
                                f"{per_block} bytes; raise it or lower kv_cache.block_size")
    return blocks


def graph_reserve(cfg: ServeConfig, model: ModelConfig, gpu: bool) -> int:
    """Bytes of `kv_cache.memory_per_shard` the decode graphs may take on each GPU shard."""
    if not (gpu and cfg.shard.cuda_graphs and cfg.shard.device != "cpu"):
        return 0
    context = min(GRAPH_MAX_CONTEXT, model.max_position_embeddings)
    return graph_memory_bound(model, cfg.layout.tp, cfg.scheduler.max_num_seqs, context, cfg.model.torch_dtype)


@dataclass
class RepairReport:
    """What an in-place repair did: which ranks were replaced, which kept their weights, and where
    the time went (seconds per phase, in order)."""
    replaced: list[int]
    kept: list[int]
    phases: dict[str, float]

    def __str__(self) -> str:
        return (f"ranks {self.replaced} replaced, {len(self.kept)} kept their weights; "
                f"{sum(self.phases.values()):.1f} s ({phases(self.phases)})")


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

    async def repair(self, ping_s: float) -> RepairReport:
        """Brings a replica whose engine failed back into service without leaving its placement
        group: ranks that answer a ping within `ping_s` keep their processes and weights and only
        leave their process groups; the others (dead, stuck, or blocked in a collective with a
        dead peer) are killed and started afresh in their bundles, loading their slices; then the
        whole world meets again on a new store. The engine must have failed first (every sequence
        gone), and is resumed by the caller. Raises `ReplicaStartError` (naming the rank) when a
        rank cannot come back within `timeouts.repair_s`; the caller then gives the replica up."""
        cfg, timings = self.cfg, {}
        deadline = time.monotonic() + cfg.timeouts.repair_s
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            timings[name] = now - mark
            mark = now

        alive = await self.ping(ping_s)
        left = await asyncio.gather(*(_answers(a.leave.remote(), ping_s) for a, ok in zip(self.actors, alive) if ok))
        it = iter(left)
        alive = [ok and next(it) for ok in alive]
        replaced = [i for i, ok in enumerate(alive) if not ok]
        for i in replaced:
            ray.kill(self.actors[i], no_restart=True)
        phase("ping and leave")
        gpu = self.resource == "GPU"
        for i in replaced:
            self.actors[i] = await _spawn_when_free(self.cfg, self.model_dir, self.num_blocks, self.pg, self.places[i],
                                                    self.names[i], gpu, deadline)
        await _await_setup(self.name, {self.actors[i].where.remote(): self.places[i] for i in replaced}, deadline,
                           "timeouts.repair_s", cfg.timeouts.repair_s)
        phase("new processes up")
        host, port = await _within_deadline(self.actors[0].open_store.remote(), deadline, self, 0, "open its store")
        calls = {(a.setup if i in replaced else a.rejoin).remote(host, port): self.places[i]
                 for i, a in enumerate(self.actors)}
        await _await_setup(self.name, calls, deadline, "timeouts.repair_s", cfg.timeouts.repair_s)
        phase("load and rejoin")
        self.engine.executor.actors = self.actors
        return RepairReport(replaced, [i for i in range(len(self.actors)) if i not in replaced], timings)

    async def ping(self, timeout_s: float) -> list[bool]:
        """Per rank, whether its shard answered a ping (and has its worker) within `timeout_s`."""
        return list(await asyncio.gather(*(_answers(a.ping.remote(), timeout_s) for a in self.actors)))

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)


def _spawn(cfg: ServeConfig, model_dir: str, num_blocks: int, pg: PlacementGroup, place: ShardPlace, actor_name: str,
           gpu: bool):
    layout = Layout(cfg.layout.tp, cfg.layout.pp)
    spec = ShardSpec(model_dir, layout, place.rank, cfg.model.torch_dtype, num_blocks, cfg.kv_cache.block_size,
                     cfg.shard.device, cfg.shard.cpu_threads, cfg.timeouts.collective_s, cfg.shard.cuda_graphs,
                     cfg.scheduler.max_num_seqs, cfg.shard.fp8_scaled_mm_min_rows)
    return RemoteShard.options(
        name=actor_name, num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
        max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, place.bundle, True),
    ).remote(spec)


async def _spawn_when_free(cfg, model_dir, num_blocks, pg, place, actor_name, gpu, deadline):
    """A new actor under the killed one's name, once Ray has released the name (a kill is
    asynchronous)."""
    while True:
        try:
            return _spawn(cfg, model_dir, num_blocks, pg, place, actor_name, gpu)
        except ValueError as e:  # the name is still taken
            if time.monotonic() > deadline:
                raise ReplicaStartError(f"rank {place.rank}: {e}") from None
            await asyncio.sleep(0.05)


async def _answers(ref, timeout_s: float) -> bool:
    """Whether an actor call returned within `timeout_s`, and did not return False (a ping of a shard
    without a worker)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s) is not False
    except (TimeoutError, asyncio.TimeoutError, ray.exceptions.RayError):
        return False


async def _within_deadline(ref, deadline: float, replica: RayReplica, index: int, what: str):
    p = replica.places[index]
    try:
        return await asyncio.wait_for(asyncio.wrap_future(ref.future()), max(0.0, deadline - time.monotonic()))
    except (TimeoutError, asyncio.TimeoutError):
        raise ReplicaStartError(f"{replica.name}: rank {p.rank} did not {what} within timeouts.repair_s="
                                f"{replica.cfg.timeouts.repair_s:g} s") from None
    except ray.exceptions.RayError as e:
        raise ReplicaStartError(f"{replica.name}: rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip} failed "
                                f"to {what}: {last_line(e)}") from e


async def _await_setup(name: str, calls: dict, deadline: float, setting: str, limit_s: float) -> None:
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
    layout = Layout(cfg.layout.tp, cfg.layout.pp)
    model = ModelConfig.from_pretrained(model_dir)
    gpu = resource == "GPU"
    num_blocks = kv_blocks(cfg, model, gpu)
    bundle_nodes = {int(b): n for b, n in placement_group_table(pg)["bundles_to_node_id"].items()}
    places = assign_ranks(layout, bundle_nodes, {n.node_id: n.ip for n in cluster_nodes()})
    replica = RayReplica(name, places, [], None, num_blocks, cfg, model_dir, pg, resource)
    replica.actors = [_spawn(cfg, model_dir, num_blocks, pg, p, n, gpu) for p, n in zip(places, replica.names)]
    start = time.monotonic()
    deadline = start + cfg.timeouts.setup_s
    try:
        # Their processes first (Python, torch, this package): the part of a start that does not grow with
        # the model, timed apart from the part that does.
        ready = {a.where.remote(): p for a, p in zip(replica.actors, places)}
        _run(_await_setup(name, ready, deadline, "timeouts.setup_s", cfg.timeouts.setup_s))
        replica.startup["shard processes up"] = time.monotonic() - start
        host, port = ray.get(replica.actors[0].open_store.remote(), timeout=cfg.timeouts.setup_s)
        calls = {a.setup.remote(host, port): p for a, p in zip(replica.actors, places)}
        _run(_await_setup(name, calls, deadline, "timeouts.setup_s", cfg.timeouts.setup_s))
        replica.startup["process groups, weights, KV"] = time.monotonic() - start - replica.startup["shard processes up"]
    except BaseException:
        replica.kill()
        raise
    log.info("%s: %s up in %.1f s (%s), %d KV blocks of %d tokens per shard\n%s", name, layout,
             time.monotonic() - start, phases(replica.startup), num_blocks, cfg.kv_cache.block_size,
             format_places(places))
    eos = checkpoint_eos_ids(model_dir)
    replica.engine = Engine(RayExecutor(replica.actors, replica.names, layout), model, eos, num_blocks=num_blocks,
                            block_size=cfg.kv_cache.block_size, lanes=layout.pp,
                            max_num_seqs=cfg.scheduler.max_num_seqs,
                            max_tokens_per_step=cfg.scheduler.max_tokens_per_step,
                            step_timeout_s=cfg.timeouts.step_s, name=name,
                            prefix_caching=cfg.kv_cache.prefix_caching)
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
