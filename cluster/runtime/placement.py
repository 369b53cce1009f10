"""Where a replica's shards run: one placement-group bundle per shard, each stage's TP ranks on one
node (TP all-reduces twice per layer; only NVLink-class links keep up), stages on as many nodes as
it takes (PP sends one activation per stage per step, which slower links carry).

Ray's PACK strategy fills a node before spilling to the next, but it does not know that bundles
come in TP groups, so ranks are assigned only once the bundles have landed: each node's bundles,
in groups of TP, become the next stages. A node whose bundle count is not a multiple of TP would
split a TP group across nodes; that is refused with the table of what landed where.

Pure functions over resource dicts, so the rules are tested without a cluster; `cluster_nodes()`,
`free_nodes()` and `places_of()` read Ray's view.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import ray
from ray._private.state import available_resources_per_node
from ray.util.placement_group import PlacementGroup, placement_group_table

from shard.errors import UserError
from shard.layout import Layout

ENGINE_BUNDLE = {"CPU": 0.1}  # bundle 0: the replica's engine, which only schedules and streams


class PlacementError(UserError, RuntimeError):
    """The cluster cannot hold the layout; the message says what is missing and what to change."""


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    resources: dict[str, float]     # total, as in `ray status`


@dataclass(frozen=True)
class ShardPlace:
    rank: int
    stage: int
    tp_rank: int
    bundle: int
    node_id: str
    ip: str


def cluster_nodes() -> list[Node]:
    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n["Alive"]]


def shard_resource(device: str, nodes: list[Node]) -> str:
    """The resource one shard takes: a GPU, or on a CPU-only cluster a CPU."""
    has_gpus = any(n.resources.get("GPU", 0) >= 1 for n in nodes)
    if device == "cuda" and not has_gpus:
        raise PlacementError("shard.device is cuda but no node of the Ray cluster has a GPU (see `ray status`); "
                             "set shard.device to cpu or auto, or add GPU nodes")
    return "GPU" if device == "cuda" or (device == "auto" and has_gpus) else "CPU"


def replica_bundles(layout: Layout, resource: str) -> list[dict[str, float]]:
    return [dict(ENGINE_BUNDLE)] + [{resource: 1.0} for _ in range(layout.world_size)]


def check_capacity(layout: Layout, replicas: int, resource: str, nodes: list[Node]) -> None:
    """Fails before anything is scheduled when no placement could hold the replicas. (An impossible
    placement group otherwise waits forever, warning every 30 s.)"""
    missing = shortfall(layout, replicas, resource, nodes)
    if missing is not None:
        raise PlacementError(f"{missing}. Lower replicas, tp or pp in the config, or add nodes with at least "
                             f"{layout.tp} {resource}s each; `ray status` shows what the cluster has")


def shortfall(layout: Layout, replicas: int, resource: str, nodes: list[Node], holder: str = "this cluster"
              ) -> str | None:
    """What `replicas` replicas of `layout` need that `nodes` (their total or their free resources,
    as `holder` says) lack, or None when they fit."""
    stages_fit = sum(int(n.resources.get(resource, 0)) // layout.tp for n in nodes)
    needed = layout.pp * replicas
    if stages_fit >= needed:
        return None
    per_node = ", ".join(f"{n.ip} ({n.node_id[:8]}): {n.resources.get(resource, 0):g} {resource}" for n in nodes)
    return (f"{replicas} replica(s) of {layout} need {needed} stages of {layout.tp} {resource}s each, every stage on "
            f"one node; {holder} holds {stages_fit} [{per_node or 'no nodes'}]")


def free_nodes() -> list[Node]:
    """Live nodes with the resources nothing holds now (`ray status`'s usage, per node)."""
    free = available_resources_per_node()
    return [Node(n.node_id, n.ip, dict(free.get(n.node_id, {}))) for n in cluster_nodes()]


def assign_ranks(layout: Layout, bundle_nodes: dict[int, str], ips: dict[str, str]) -> list[ShardPlace]:
    """Ranks for the shard bundles (1..world) of a placed group: stage by stage, each stage's TP
    ranks from one node's bundles."""
    by_node: dict[str, list[int]] = defaultdict(list)
    for bundle in range(1, layout.world_size + 1):
        by_node[bundle_nodes[bundle]].append(bundle)
    split = {n: b for n, b in by_node.items() if len(b) % layout.tp}
    if split:
        landed = "; ".join(f"{ips.get(n, '?')} ({n[:8]}): {len(b)} shard(s)" for n, b in by_node.items())
        raise PlacementError(f"Ray placed the shards of {layout} so that a TP group would span nodes ({landed}); each "
                             f"node must hold a multiple of tp={layout.tp} of them. Free whole nodes' worth of "
                             f"GPUs, or lower tp; `ray status` shows what is in use")
    places, rank = [], 0
    for node, bundles in by_node.items():
        for bundle in bundles:
            stage, tp_rank = layout.coords(rank)
            places.append(ShardPlace(rank, stage, tp_rank, bundle, node, ips.get(node, "?")))
            rank += 1
    return places


def places_of(pg: PlacementGroup, layout: Layout) -> list[ShardPlace]:
    """The ranks of a placed group's shard bundles, by the nodes Ray put them on."""
    bundle_nodes = {int(b): n for b, n in placement_group_table(pg)["bundles_to_node_id"].items()}
    return assign_ranks(layout, bundle_nodes, {n.node_id: n.ip for n in cluster_nodes()})


def format_places(places: list[ShardPlace]) -> str:
    lines = [f"{'rank':>4} {'stage':>5} {'tp':>3} {'bundle':>6}  node"]
    lines += [f"{p.rank:>4} {p.stage:>5} {p.tp_rank:>3} {p.bundle:>6}  {p.ip} ({p.node_id[:12]})" for p in places]
    return "\n".join(lines)
