"""The engine over an in-process shard: continuous batching gives every request what it gets alone,
with and without preemption, and every KV block comes back after finished, aborted and failed
requests."""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.engine import Engine, LocalExecutor, ReplicaFailed, ReplicaUnavailable
from cluster.offline import RequestError
from shard.parallel import ParallelContext
from shard.sampler import SamplingParams
from shard.layout import Layout
from shard.worker import ShardWorker
from tests.synthetic import make_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("engine-llama"), layers=2, heads=4, kv_heads=2, intermediate=128)


@pytest.fixture(scope="module")
def worker(model_dir):
    return ShardWorker(model_dir, ParallelContext(Layout()), num_blocks=256, block_size=4, progress=False)


def make_engine(worker, num_blocks=256, **kw) -> Engine:
    kw = {"max_num_seqs": 16, "max_tokens_per_step": 64, **kw}
    return Engine(LocalExecutor(worker), worker.cfg, frozenset(), num_blocks=num_blocks, block_size=4, **kw)


async def collect(engine: Engine, prompt, max_tokens, delay_s=0.0) -> list[int]:
    await asyncio.sleep(delay_s)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [u.sample.token_id async for u in engine.generate(prompt, params)]


def requests(n=32, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(3, 1000) for _ in range(rng.randint(2, 40))], rng.randint(1, 20),
             0.0 if i < n // 2 else rng.uniform(0.01, 0.3)) for i in range(n)]


def solo(worker, reqs):
    async def run():
        engine = make_engine(worker)
        out = [await collect(engine, p, m) for p, m, _ in reqs]
        await engine.close()
        return out
    return asyncio.run(run())


@pytest.mark.parametrize("num_blocks", [256, 24])
def test_concurrent_requests_match_their_solo_runs(worker, num_blocks):
    reqs = requests()
    alone = solo(worker, reqs)

    async def run():
        engine = make_engine(worker, num_blocks=num_blocks)
        out = await asyncio.gather(*(collect(engine, p, m, d) for p, m, d in reqs))
        stats = engine.stats()
        await engine.close()
        return out, stats

    together, stats = asyncio.run(run())
    assert together == alone
    assert stats.free_blocks == stats.num_blocks == num_blocks and stats.running == stats.waiting == 0
    assert (stats.preemptions > 0) == (num_blocks == 24)  # a tight KV budget does preempt


def test_leaving_early_and_abort_free_every_block(worker):
    async def run():
        engine = make_engine(worker)
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        async def take(n):
            got = []
            async for u in engine.generate([5, 6, 7], params):
                got.append(u.sample.token_id)
                if len(got) == n:
                    break
            return got
        assert len(await take(3)) == 3
        stream = engine.generate([5, 6, 7, 8], params)
        await stream.__anext__()
        assert engine.abort(1) and not engine.abort(1)
        with pytest.raises(asyncio.CancelledError):
            await stream.__anext__()
        task = asyncio.ensure_future(collect(engine, [9, 9, 9], 50))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)  # the next step frees what an in-flight batch still held
        stats = engine.stats()
        await engine.close()
        return stats

    stats = asyncio.run(run())
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_bad_requests_are_refused_before_queueing(worker):
    async def run():
        engine = make_engine(worker)
        with pytest.raises(RequestError, match="outside the model's vocabulary of 1003"):
            await collect(engine, [5, 5000], 4)
        with pytest.raises(RequestError, match="exceeds the model's context of 4096"):
            await collect(engine, [5] * 10, 4090)
        stats = engine.stats()
        await engine.close()
        return stats

    stats = asyncio.run(run())
    assert stats.waiting == stats.running == 0 and stats.free_blocks == stats.num_blocks


class FailingExecutor:
    """Runs `ok_steps` steps on the real shard, then fails or hangs."""

    def __init__(self, worker, ok_steps: int, hang: bool):
        self.inner, self.ok_steps, self.hang = LocalExecutor(worker), ok_steps, hang

    async def execute(self, step):
        if self.ok_steps == 0:
            if self.hang:
                await asyncio.sleep(3600)
            raise ConnectionError("Connection closed by peer")
        self.ok_steps -= 1
        return await self.inner.execute(step)

    async def close(self):
        await self.inner.close()


@pytest.mark.parametrize("hang", [False, True])
def test_a_failed_or_stuck_step_fails_every_request_and_refuses_new_ones(worker, hang):
    async def run():
        engine = Engine(FailingExecutor(worker, ok_steps=3, hang=hang), worker.cfg, frozenset(), num_blocks=64,
                        block_size=4, max_num_seqs=4, max_tokens_per_step=16, step_timeout_s=0.5)
        early = asyncio.ensure_future(collect(engine, [5, 6, 7], 30))
        await asyncio.sleep(0)
        late = [asyncio.ensure_future(collect(engine, [8] * 5, 30)) for _ in range(6)]  # max_num_seqs: some wait
        results = await asyncio.gather(early, *late, return_exceptions=True)
        with pytest.raises(ReplicaUnavailable, match="out of service"):
            await collect(engine, [1, 2], 2)
        stats = engine.stats()
        await engine.close()
        return results, stats

    results, stats = asyncio.run(run())
    assert all(isinstance(r, ReplicaFailed) for r in results)
    assert not results[0].retryable                      # it had produced tokens
    assert any(r.retryable for r in results[1:])         # those that never ran can go elsewhere
    assert ("step timeout" in str(results[0])) == hang
    assert stats.failed and stats.free_blocks == stats.num_blocks
