"""The engine over an in-process shard: continuous batching gives every request what it gets alone,
with and without preemption, and every KV block comes back after finished, aborted and failed
requests."""

from __future__ import annotations

import asyncio
import dataclasses
import contextvars
import random
import time

import pytest

from cluster.engine.engine import Engine, probe, ReplicaFailed, ReplicaUnavailable

from cluster.engine.executor import LocalExecutor
from cluster.engine.request import RequestError
from shard.parallel import ParallelContext
from shard.sampler import Sample, SamplingParams
from shard.layout import Layout
from shard.worker import ShardWorker, StepOutput
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
    assert ("step timeout" in str(results[0])) == hang
    assert stats.failed and stats.free_blocks == stats.num_blocks


def test_a_failed_engine_resumes_clean_and_a_resumed_request_continues_its_seeded_stream(worker):
    """What a replica's in-place repair relies on: after `resume()` the engine serves again from an
    empty slate, and a request sent again with the tokens it had streamed (and their count as
    `output_offset`) samples the same tokens as the uninterrupted request."""
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)

    async def run():
        engine = Engine(FailingExecutor(worker, ok_steps=3, hang=False), worker.cfg, frozenset(), num_blocks=64,
                        block_size=4, max_num_seqs=4, max_tokens_per_step=16, step_timeout_s=5)
        failures = []
        engine.on_failure = failures.append
        streamed = []
        with pytest.raises(ReplicaFailed):
            async for u in engine.generate([5, 6, 7], seeded):
                streamed.append(u.sample.token_id)
        assert engine.failed and len(failures) == 1 and 0 < len(streamed) < 24
        engine.executor = LocalExecutor(worker)  # the shards repaired
        engine.resume()
        assert engine.failed is None and engine.stats().free_blocks == engine.stats().num_blocks
        rest = dataclasses.replace(seeded, max_tokens=24 - len(streamed))
        resumed = [u.sample.token_id async for u in engine.generate([5, 6, 7] + streamed, rest, len(streamed))]
        whole = [u.sample.token_id async for u in engine.generate([5, 6, 7], seeded)]
        await engine.close()
        return streamed + resumed, whole

    stitched, whole = asyncio.run(run())
    assert stitched == whole


def test_a_probe_is_one_real_step_that_moves_progress_and_fails_with_the_engine(worker):
    async def run():
        engine = make_engine(worker)
        started = engine.last_progress
        await asyncio.sleep(0.01)
        await probe(engine)
        after = engine.stats()
        moved = engine.last_progress > started
        hung = Engine(FailingExecutor(worker, ok_steps=0, hang=True), worker.cfg, frozenset(), num_blocks=64,
                      block_size=4, step_timeout_s=5.0)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await probe(hung, timeout_s=0.2)
        waited = time.monotonic() - began
        await engine.close()
        with pytest.raises(ReplicaUnavailable, match="out of service"):
            await probe(engine)
        await hung.close()
        return after, moved, waited

    after, moved, waited = asyncio.run(run())
    assert moved and after.steps == 1 and after.free_blocks == after.num_blocks and after.queued_tokens == 0
    assert waited < 1.0


def test_stats_count_the_prompt_tokens_still_to_prefill(worker):
    async def run():
        engine = make_engine(worker)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        streams = [engine.generate([5] * n, params) for n in (7, 9)]
        first = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0)                # both added; the engine loop has not scheduled them yet
        queued = engine.stats().queued_tokens
        await asyncio.gather(*first)
        decoding = engine.stats().queued_tokens
        for s in streams:
            await s.aclose()
        await engine.close()
        return queued, decoding

    assert asyncio.run(run()) == (16, 0)


REQUEST = contextvars.ContextVar("request", default=None)


class ContextRecorder(LocalExecutor):
    """Records what the `REQUEST` context variable holds where each step is sent."""

    def __init__(self, worker):
        super().__init__(worker)
        self.seen = set()

    async def execute(self, step):
        self.seen.add(REQUEST.get())
        return await super().execute(step)


def test_steps_run_outside_the_context_of_the_request_that_started_the_loop(worker):
    # In a Ray async actor the context names the current task: a loop inheriting the first request's
    # would make every shard call that request's child, and cancelling it would cancel them all.
    async def run():
        executor = ContextRecorder(worker)
        engine = Engine(executor, worker.cfg, frozenset(), num_blocks=64, block_size=4)

        async def request(name):
            REQUEST.set(name)
            return await collect(engine, [5, 6, 7], 3)
        await asyncio.gather(request("first"), request("second"))
        await engine.close()
        return executor.seen

    assert asyncio.run(run()) == {None}


def test_needs_probe_only_when_idle_and_quiet(worker):
    async def run():
        engine = make_engine(worker)
        assert not engine.needs_probe(60)                # just started: quiet for less than that
        await asyncio.sleep(0.01)
        assert engine.needs_probe(0.005)                 # idle and quiet
        stream = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        await stream.__anext__()
        await asyncio.sleep(0.01)
        assert not engine.needs_probe(0)                 # a sequence runs: its steps show health
        await stream.aclose()
        await engine.close()
        assert not engine.needs_probe(0)                 # failed (closed): no probe can help
    asyncio.run(run())


class GatedExecutor:
    """Each step is a future the test completes by hand, so it can time a close against a step."""

    def __init__(self):
        self.pending: list[asyncio.Future] = []
        self.steps = []

    def execute(self, step):
        future = asyncio.get_running_loop().create_future()
        self.pending.append(future)
        self.steps.append(step)
        return future

    async def close(self):
        pass


def test_close_ends_the_loop_even_when_a_step_completes_in_the_same_instant(worker):
    # close() cancels the loop in the same event-loop pass in which its step completes. A wait that
    # then hands back the result and drops the cancel (asyncio.wait_for on 3.11) leaves the loop
    # running and close() waiting for ever: the hang CI once hit at random.

    async def run():
        executor = GatedExecutor()
        engine = Engine(executor, worker.cfg, frozenset(), num_blocks=64, block_size=4)
        stream = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        first = asyncio.ensure_future(stream.__anext__())
        while not executor.pending:
            await asyncio.sleep(0)
        seq_ids = [chunk.seq_id for chunk in executor.steps[0].seqs]
        closing = asyncio.ensure_future(engine.close())   # its cancel reaches the loop in the same pass
        executor.pending[0].set_result(StepOutput(samples={i: Sample(9) for i in seq_ids}))
        await asyncio.wait_for(closing, 5)
        outcome = await asyncio.gather(first, return_exceptions=True)
        return engine.stats(), outcome[0]

    stats, outcome = asyncio.run(run())
    assert stats.failed == "the replica is shutting down" and stats.free_blocks == stats.num_blocks
    assert isinstance(outcome, ReplicaUnavailable) or outcome.sample.token_id == 9


def test_a_stop_token_found_one_step_late_is_never_emitted(worker):
    """With the next step scheduled while one runs, a request that stops on a stop token is in the
    step already sent; that step's token for it is dropped, and its blocks all come back."""
    prompt = [5, 6, 7, 8]
    (alone,) = solo(worker, [(prompt, 8, 0.0)])

    async def run():
        engine = make_engine(worker)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids={alone[2]})
        others = [asyncio.ensure_future(collect(engine, [9, 10, 11], 8)) for _ in range(3)]
        got = [(u.sample.token_id, u.finish_reason) async for u in engine.generate(prompt, params)]
        await asyncio.gather(*others)
        stats = engine.stats()
        await engine.close()
        return got, stats

    got, stats = asyncio.run(run())
    stop_at = alone.index(alone[2])
    assert [t for t, _ in got] == alone[:stop_at + 1] and got[-1][1] == "stop"
    assert stats.free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_settling_the_heap_freezes_start_up_objects_and_spaces_collections():
    """What a replica's and a shard's process do once they are up (`cluster.engine.heap`): what
    start-up left is frozen out of every later collection, and the youngest generation is collected
    every 50,000 allocations rather than 700, so a decode step of thousands of sequences meets one
    collection, not dozens."""
    import gc

    from cluster.engine import heap

    before = gc.get_threshold()
    try:
        gc.unfreeze()
        survivor = [object() for _ in range(1000)]
        heap.settle()
        assert gc.get_freeze_count() >= len(survivor)
        assert gc.get_threshold() == (heap.GEN0_THRESHOLD, heap.GEN1_EVERY, heap.GEN2_EVERY)
        assert not any(o is survivor for o in gc.get_objects())  # frozen objects are outside every generation
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
