"""The cluster runtime on a simulated two-node Ray cluster (2 fake GPUs per node): placement,
equivalence through Serve, continuous batching with preemption, recovery from a dead or a stuck
shard while another replica keeps serving, routing by free capacity, cancellation that reaches the
replica, and scaling that leaves running replicas alone."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import time
from contextlib import aclosing

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from cluster.config import ConfigError, ServeConfig
from cluster.runtime.placement import PlacementError
from cluster.deploy.controller import delete, deploy, scale
from cluster.deploy.backend import ServeBackend
from cluster.deploy.controller import target_replicas
from cluster.deploy.replica_client import ReplicaClient
from shard.sampler import SamplingParams
from tests.cluster.test_equivalence import NEW_TOKENS, reference
from tests.conftest import LLAMA31_TOKENIZER
from tests.synthetic import make_llama

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for i in range(2):
        cluster.add_node(num_cpus=1, num_gpus=2, resources={f"node{i}": 1})
    ray.init(address=cluster.address)
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_llama(tmp_path_factory.mktemp("ray-llama"), layers=4)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the application's router tokenizes with it
        shutil.copy(LLAMA31_TOKENIZER / name, path / name)
    return str(path)


def config(**sections) -> ServeConfig:
    base = {"layout": {"tp": 2, "pp": 2}, "kv_cache": {"num_blocks": 128, "block_size": 4},
            "timeouts": {"step_s": 3, "health_check_period_s": 0.5},
            "router": {"port": 0, "http_port": 0, "metrics_port": None},
            "name": "test"}
    return ServeConfig.from_dict({**base, **sections})


@pytest.fixture
def app(ray_cluster):
    yield
    delete("test")


def up(cfg: ServeConfig, model_dir: str) -> ReplicaClient:
    """The application deployed as `caravan serve` deploys it, and a client of its replicas."""
    deploy(cfg, model_dir)
    return ReplicaClient(cfg.name)


async def tokens(client: ReplicaClient, prompt, params=GREEDY, delay_s=0.0) -> list[int]:
    await asyncio.sleep(delay_s)
    return [u.sample.token_id async for u in client.generate(prompt, params)]


def under_load(client: ReplicaClient, requests: list[tuple[list[int], SamplingParams]], spacing_s: float,
               fault) -> tuple[list[list[int]], float]:
    """Sends `requests` (prompt, params), one every `spacing_s`; 0.6 s in, runs `fault()` (in a
    thread). Returns every request's tokens and when the fault struck."""
    async def load():
        async def one(i):
            await asyncio.sleep(spacing_s * i)
            return await tokens(client, *requests[i])
        tasks = [asyncio.ensure_future(one(i)) for i in range(len(requests))]
        await asyncio.sleep(0.6)
        struck = time.monotonic()
        await asyncio.to_thread(fault)
        return await asyncio.gather(*tasks), struck
    return asyncio.run(load())


def test_tp2_pp2_stages_on_their_own_nodes_and_output_equals_the_reference(app, model_dir):
    client = up(config(), model_dir)
    prompts = [[5, 6, 7, 8, 9], [11, 12], list(range(20, 47))]
    got = asyncio.run(_gather(*(tokens(client, p) for p in prompts)))
    (info,) = asyncio.run(client.infos())
    nodes = {stage: {p.node_id for p in info.shards if p.stage == stage} for stage in (0, 1)}
    assert all(len(n) == 1 for n in nodes.values()), nodes  # one stage's TP ranks share a node
    assert nodes[0] != nodes[1]                             # stages on different nodes
    assert [p.rank for p in info.shards] == [0, 1, 2, 3]
    want, _ = reference(model_dir, prompts)
    assert got == want


def test_concurrent_requests_with_preemption_match_solo_runs_and_free_every_block(app, model_dir):
    # 2 lanes (PP 2) of 20 blocks of 4 tokens: 32 requests of up to 60 tokens must preempt.
    client = up(config(kv_cache={"num_blocks": 40, "block_size": 4},
                           scheduler={"max_num_seqs": 8, "max_tokens_per_step": 32}), model_dir)
    rng = random.Random(1)
    reqs = [([rng.randrange(3, 1000) for _ in range(rng.randint(2, 30))],
             SamplingParams(temperature=0, max_tokens=rng.randint(4, 30), ignore_eos=True),
             0.0 if i < 16 else rng.uniform(0.05, 1.0)) for i in range(32)]
    together = asyncio.run(_gather(*(tokens(client, p, s, d) for p, s, d in reqs)))
    alone = [asyncio.run(tokens(client, p, s)) for p, s, _ in reqs[:6]]
    assert together[:6] == alone
    want, _ = reference(model_dir, [p for p, _, _ in reqs[6:12]])
    assert together[6:12] == [w[:s.max_tokens] for w, (_, s, _) in zip(want, reqs[6:12])]
    time.sleep(1.5)  # the next health check reports the final stats
    (info,) = asyncio.run(client.infos())
    assert info.stats.preemptions > 0
    assert info.stats.free_blocks == info.stats.num_blocks and info.stats.running == info.stats.waiting == 0


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_stuck_shard_is_repaired_in_place_and_no_request_fails(app, model_dir, fault):
    cfg = config(layout={"tp": 1, "pp": 2}, replicas=2, timeouts={"step_s": 2, "health_check_period_s": 0.5})
    client = up(cfg, model_dir)
    before = asyncio.run(client.infos())
    assert len(before) == 2
    victim = before[0].name
    shard = ray.get_actor(f"{victim}-stage1-tp0")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=7, max_tokens=24, ignore_eos=True)
    # Greedy and seeded requests: a resumed stream must go on with the very tokens either would give.
    reqs = [([3 + i, 4, 5], seeded if i % 2 else params) for i in range(24)]
    want = [asyncio.run(tokens(client, *r)) for r in reqs[:4]]

    def strike():
        if fault == "kill":
            ray.kill(shard)
        else:
            shard.__ray_call__.remote(lambda actor: time.sleep(60))

    results, killed = under_load(client, reqs, 0.05, strike)
    # No request failed: those without a token were retried, those mid-stream resumed; the output
    # is the same as without the fault.
    assert all(len(r) == 24 for r in results)
    assert results[:4] == want
    while time.monotonic() < killed + 15:
        infos = {i.name: i for i in asyncio.run(client.infos())}
        if victim in infos and infos[victim].repairs == 1 and infos[victim].stats.failed is None:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"replica {victim} was not repaired within 15 s: {asyncio.run(client.infos())}")
    print(f"{fault}: {victim} serving again {time.monotonic() - killed:.1f} s after the fault; "
          f"{infos[victim].last_repair}")
    # A dead rank's peers keep their processes and weights; a stuck rank's peers, blocked in a
    # collective with it, may be replaced with it.
    assert re.match(r"ranks \[1\] replaced" if fault == "kill" else r"ranks \[(0, )?1\] replaced",
                    infos[victim].last_repair)
    assert len(infos) == 2  # repaired in place: Serve replaced no replica
    assert asyncio.run(tokens(client, *reqs[1])) == want[1]
    time.sleep(1.5)
    for info in asyncio.run(client.infos()):
        assert info.stats.free_blocks == info.stats.num_blocks, info


def test_a_burst_is_spread_over_both_replicas_and_cancelled_streams_free_every_block(app, model_dir):
    client = up(config(layout={"tp": 1, "pp": 2}, replicas=2, kv_cache={"num_blocks": 256, "block_size": 4}),
                    model_dir)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    asyncio.run(tokens(client, [3, 4, 5], params))
    idle = asyncio.run(client.infos())
    time.sleep(2.0)  # idle: routing stats reach the router, and health checks probe each replica
    before = {i.name: i.stats.steps for i in asyncio.run(client.infos())}
    for was, now in zip(idle, asyncio.run(client.infos())):
        # An idle replica shows it can serve with one-token probes: progress stays recent.
        assert now.stats.steps > was.stats.steps and now.progress_age_s < 1.5 and now.shard_healthy == [True] * 2, now
    asyncio.run(_gather(*(tokens(client, [10 + i] * 12, params) for i in range(16))))
    time.sleep(1.5)  # the next health check reports the final stats
    grown = {i.name: i.stats.steps - before[i.name] for i in asyncio.run(client.infos())}
    # A replica that got none of the burst would only have run its idle probes (one step per check).
    assert len(grown) == 2 and all(g >= params.max_tokens for g in grown.values()), grown

    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def cancel_after_first_token(i: int) -> None:
        if i % 2:  # half leave by closing the stream ...
            async with aclosing(client.generate([3 + i, 4, 5, 6, 7], long)) as stream:
                await anext(stream)
            return
        started = asyncio.Event()  # ... half by having their task cancelled mid-stream

        async def read():
            async for _ in client.generate([3 + i, 4, 5, 6, 7], long):
                started.set()
        task = asyncio.ensure_future(read())
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def cancel_all() -> float:
        await asyncio.gather(*(cancel_after_first_token(i) for i in range(100)))
        return time.monotonic()

    cancelled_at = asyncio.run(cancel_all())
    deadline = cancelled_at + 10
    while time.monotonic() < deadline:
        infos = asyncio.run(client.infos())
        if all(i.stats.free_blocks == i.stats.num_blocks and i.stats.running == i.stats.waiting == 0 for i in infos):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"KV blocks still held 10 s after 100 cancelled streams: {[i.stats for i in infos]}")
    # Cancelling aborted the sequences, not the replicas: the same two, neither failed.
    assert {i.name for i in infos} == set(grown) and all(i.stats.failed is None for i in infos), infos
    # When the reports saying so were made: an upper bound, as replicas report once per health check.
    freed_s = max(time.monotonic() - i.report_age_s for i in infos) - cancelled_at
    print(f"100 streams cancelled after their first token: every KV block free within {freed_s:.2f} s")
    assert freed_s < 1.0 + 0.5  # the router's 1 s, seen through reports every health_check_period_s


def test_a_step_that_raises_keeps_its_shard_and_one_that_always_raises_is_left_to_serve(app, model_dir):
    """A shard whose step raised (a CUDA error, say) still answers: the repair keeps it (here a world
    of one rank, which has no groups to re-form). A fault that repairs cannot cure fails the replica
    again and again: after MAX_REPAIRS, the replica gives itself up and Serve starts a fresh one."""
    cfg = config(layout={"tp": 1, "pp": 1}, timeouts={"step_s": 2, "health_check_period_s": 0.5, "repair_s": 30})
    client = up(cfg, model_dir)
    (first,) = asyncio.run(client.infos())
    shard = ray.get_actor(f"{first.name}-stage0-tp0")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = asyncio.run(tokens(client, [3, 4, 5], params))

    def raise_once(actor):
        real = actor.worker.execute

        def broken(step):
            actor.worker.execute = real
            raise RuntimeError("injected: an illegal memory access was encountered")
        actor.worker.execute = broken

    ray.get(shard.__ray_call__.remote(raise_once))
    assert asyncio.run(tokens(client, [3, 4, 5], params)) == want  # sent again once the replica was repaired
    time.sleep(1.5)
    (info,) = asyncio.run(client.infos())
    assert (info.name, info.repairs, info.stats.failed) == (first.name, 1, None)
    assert info.last_repair.startswith("ranks [] replaced, 1 kept their weights"), info.last_repair

    def raise_always(actor):
        def broken(step):
            raise RuntimeError("injected: every step fails")
        actor.worker.execute = broken

    ray.get(shard.__ray_call__.remote(raise_always))
    started = time.monotonic()
    assert asyncio.run(tokens(client, [3, 4, 5], params)) == want  # answered by the fresh replica
    infos = asyncio.run(client.infos())
    print(f"a replica that failed at every step was replaced; a request sent then was answered after "
          f"{time.monotonic() - started:.1f} s")
    assert [i.name for i in infos] != [first.name] and all(i.repairs == 0 for i in infos if i.name != first.name)


def test_through_serve_each_conversations_turns_go_where_its_prefix_is_cached(app, model_dir):
    """Cache-aware routing on the real path: replicas report their cached block hashes to Serve, and
    the CapacityRouter in this process sends each later turn to the replica holding its history."""
    client = up(config(layout={"tp": 1, "pp": 2}, replicas=2, kv_cache={"num_blocks": 256, "block_size": 4}),
                model_dir)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    rng = random.Random(5)
    conversations = [[rng.randrange(3, 1000) for _ in range(40)] for _ in range(4)]
    previous: list[list[int]] = [[] for _ in conversations]

    def hits() -> dict[str, int]:
        return {i.name: i.stats.prefix_hit_tokens for i in asyncio.run(client.infos())}

    for turn in range(3):
        for c, history in enumerate(conversations):
            before = hits()
            answer = asyncio.run(tokens(client, history, params))
            time.sleep(1.2)  # the replicas' next reports (health, and routing stats to Serve)
            gained = {name: n - before.get(name, 0) for name, n in hits().items()}
            if turn:
                # The replica holding the previous turn served this one: it alone found (nearly) all of the
                # history cached, the previous prompt and answer, to the last full block.
                low, high = sorted(gained.values())
                assert low == 0 and high >= len(previous[c]) - 4, (turn, c, gained, len(previous[c]))
            previous[c] = history + answer
            conversations[c] = history + answer + [rng.randrange(3, 1000) for _ in range(6)]


def test_scaling_out_and_in_leaves_running_replicas_alone(app, model_dir):
    cfg = config(layout={"tp": 1, "pp": 2})
    assert target_replicas("test") == 0
    with pytest.raises(PlacementError, match="is not deployed declaratively"):
        scale(cfg, 1)
    client = up(cfg, model_dir)
    with pytest.raises(PlacementError, match="replicas must be at least 1, got 0"):
        scale(cfg, 0)
    with pytest.raises(PlacementError, match=r"3 replica\(s\) .* need 6 stages of 1 GPUs"):
        scale(cfg, 3)
    (first,) = [i.name for i in asyncio.run(client.infos())]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = asyncio.run(tokens(client, [7, 8, 9], params))

    def wait_for(n: int) -> tuple[set[str], float]:
        started = time.monotonic()
        while time.monotonic() < started + 60:
            names = {i.name for i in asyncio.run(client.infos())}
            running = serve.status().applications["test"].deployments["replica"].replica_states
            if len(names) == n and running == {"RUNNING": n}:
                return names, time.monotonic() - started
            time.sleep(0.1)
        pytest.fail(f"not {n} replicas after 60 s: {names}, {running}")

    assert scale(cfg, 2) == 1 and target_replicas("test") == 2
    both, up_s = wait_for(2)
    assert first in both
    assert asyncio.run(_gather(*(tokens(client, [7, 8, 9], params) for _ in range(4)))) == [want] * 4
    assert scale(cfg, 1) == 2
    (left,), down_s = wait_for(1)
    assert left in both  # one of the two kept running; Serve picks which one to stop
    print(f"scaled 1 -> 2 in {up_s:.1f} s, 2 -> 1 in {down_s:.1f} s; {'the first' if left == first else 'the second'} "
          f"replica kept running")
    assert asyncio.run(tokens(client, [7, 8, 9], params)) == want


def test_a_layout_larger_than_the_cluster_is_refused_with_what_is_missing(ray_cluster, model_dir):
    with pytest.raises(PlacementError, match=r"need 6 stages of 2 GPUs each.*holds 2.*Lower replicas"):
        up(config(replicas=3), model_dir)
    with pytest.raises(PlacementError, match=r"need 1 stages of 8 GPUs"):
        up(config(layout={"tp": 8, "pp": 1}), model_dir)


def test_a_missing_model_folder_is_refused_with_the_fix(tmp_path):
    cfg = ServeConfig.from_dict({"model": {"path": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="model.path.*does not exist; point it at a Hugging Face checkpoint"):
        cfg.check_model_path()


async def _gather(*coros):
    return await asyncio.gather(*coros)


def test_a_removed_node_costs_only_its_replica_which_is_rebuilt_on_the_nodes_that_remain(ray_cluster, app,
                                                                                          model_dir):
    """Last in this file: it changes the cluster (a spare node in, a serving node out)."""
    ray_cluster.add_node(num_cpus=1, num_gpus=2, resources={"spare": 1})
    ray_cluster.wait_for_nodes()
    cfg = config(layout={"tp": 1, "pp": 2}, replicas=2)
    client = up(cfg, model_dir)
    infos = before = asyncio.run(client.infos())
    victim = infos[0]
    node_ids = {p.node_id for p in victim.shards}
    others = {p.node_id for i in infos[1:] for p in i.shards}
    assert not node_ids & others, "each replica packs onto a node of its own"
    (node,) = [n for n in ray_cluster.worker_nodes if n._node_id in node_ids]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reqs = [([30 + i, 4, 5], params) for i in range(16)]
    want = [asyncio.run(tokens(client, *r)) for r in reqs[:3]]

    results, removed = under_load(client, reqs, 0.1, lambda: ray_cluster.remove_node(node))
    assert all(len(r) == 24 for r in results) and results[:3] == want  # nothing failed, output unchanged
    while time.monotonic() < removed + 60:
        infos = asyncio.run(client.infos())
        if len(infos) == 2 and victim.name not in {i.name for i in infos} and all(i.stats.failed is None for i in infos):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replica took {victim.name}'s place: {asyncio.run(client.infos())}")
    (new,) = [i for i in infos if i.name not in {v.name for v in before}]
    print(f"a replica replaced the one on the removed node {time.monotonic() - removed:.1f} s after the removal; its "
          f"start: {new.startup}")
    assert re.fullmatch(r"replica process up [\d.]+ s, shard processes up [\d.]+ s, process groups, weights, KV "
                        r"[\d.]+ s", new.startup), new.startup
    assert all(p.node_id not in node_ids for i in infos for p in i.shards)
    assert asyncio.run(tokens(client, *reqs[0])) == want[0]

    # One node more lost: the cluster can no longer hold both replicas, and status says what is missing.
    (second,) = [n for n in ray_cluster.worker_nodes if n._node_id == infos[0].shards[0].node_id]
    ray_cluster.remove_node(second)
    deadline = time.monotonic() + 30
    while len(asyncio.run(client.infos())) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    pending = asyncio.run(ServeBackend(cfg, model_dir).pending(1))
    print(f"status: pending: {pending}")
    assert re.fullmatch(r"cannot be placed now: 1 replica\(s\) of .* need 2 stages of 1 GPUs each, every stage on one "
                        r"node; what is free holds 0 \[.*\]; Serve places them when nodes come back or are added",
                        pending), pending
    assert asyncio.run(tokens(client, *reqs[1])) == results[1]  # the other replica serves on
