"""The engine of one model replica: an asyncio loop that turns requests into steps.

Each iteration takes the scheduler's next batch for every idle lane, hands it to the executor
(which runs it on the replica's shards) and, as the oldest batch returns, streams the sampled
tokens to their requests. With PP stages there are as many lanes as stages, so while stage 1
runs batch A, stage 0 already runs batch B.

Overlapped scheduling: while a lane's batch runs, the engine schedules the lane's next batch. When
the running one returns, its sampled tokens are written into the next one's decodes and it is
submitted at once; only then are the returned tokens streamed and the batch after scheduled, while
the shards compute. The shards wait on one round trip and the token copy, not on the control plane.
A request that stops on a stop token has one more token computed, which is dropped; new requests
join one step later than they would without it.

A step that fails or runs past `step_timeout_s` fails the engine: every request gets
`ReplicaFailed` (its caller sends it again, resuming after the tokens it had streamed), and new
requests get `ReplicaUnavailable`, until whoever owns the replica has repaired its shards and calls
`resume()` (`cluster.deploy.replica_server.ReplicaServer`; `on_failure` tells it).

API, for the router and for tests: `generate(prompt_ids, params)` is an async iterator of
`TokenUpdate`s; leaving it early (break, cancellation, client gone) aborts the sequence, whose
blocks are free at the next step. `abort(request_id)` does the same from elsewhere. `last_progress`
is when a step last completed; `probe(engine)` runs a one-token request through an idle engine to
show that it still can (a health check's real forward pass, where a ping proves only a live process).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import itertools
import logging
import time
from collections import deque
from dataclasses import astuple, dataclass
from typing import AsyncIterator, Callable

from cluster.config import SpeculativeSection
from cluster.engine import draft_model
from cluster.engine.executor import Executor
from cluster.engine.grammar import Constraint, GrammarError, Grammars, Matcher, accept_samples, fill_masks
from cluster.engine.request import RequestError
from cluster.engine.scheduler import Batch, Scheduler, TokenUpdate
from cluster.engine.speculative import SpecStats
from shard.config import ModelConfig
from shard.sampler import SamplingParams

log = logging.getLogger(__name__)


class ReplicaFailed(RuntimeError):
    """The replica died under a request. The caller may send the request again (to this replica once
    it is repaired, or to another), resuming after the tokens it had streamed."""


class ReplicaUnavailable(ReplicaFailed):
    """The replica is out of service (failed, repairing or closing), or no replica could finish the
    request in time."""


@dataclass(frozen=True)
class EngineStats:
    num_blocks: int
    free_blocks: int
    running: int
    waiting: int
    steps: int                 # includes the one-token steps of health probes (at most one per idle check)
    preemptions: int
    failed: str | None
    queued_tokens: int         # prompt tokens not yet prefilled: work owed beyond what the blocks show
    # The prefix cache (`cluster.engine.kv_cache.CacheStats`), counted since the replica started.
    # `free_blocks` counts the cached blocks no sequence holds: they are taken back when needed.
    prefix_cached_blocks: int = 0
    prefix_requests: int = 0
    prefix_hit_requests: int = 0
    prefix_prompt_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_evictions: int = 0
    # The most tokens one sequence can hold: a lane's share of the blocks (a request needing more is
    # refused), so that the router can refuse it first, naming the limit.
    sequence_kv_tokens: int = 0
    # Speculative decoding (`cluster.engine.speculative.SpecStats`), counted since the replica started.
    spec_steps: int = 0
    spec_proposed: int = 0
    spec_accepted: int = 0
    spec_emitted: int = 0
    # Constrained decoding, since the replica started: requests admitted with a constraint (a resumed
    # one again), and seconds spent filling their token bitmasks (the engine's share of each step).
    constrained_requests: int = 0
    mask_seconds: float = 0.0


class Engine:
    def __init__(self, executor: Executor, cfg: ModelConfig, eos_token_ids: frozenset[int], *, num_blocks: int,
                 grammars: Grammars | None = None,
                 block_size: int, lanes: int = 1, max_num_seqs: int = 64, max_tokens_per_step: int = 512,
                 step_timeout_s: float = 15.0, name: str = "replica", prefix_caching: bool = True,
                 speculative: SpeculativeSection | None = None):
        self.executor, self.cfg, self.name = executor, cfg, name
        self.sched = Scheduler(num_blocks, block_size, max_num_seqs=max_num_seqs,
                               max_tokens_per_step=max_tokens_per_step,
                               max_model_len=cfg.max_position_embeddings, eos_token_ids=eos_token_ids, lanes=lanes,
                               vocab_size=cfg.vocab_size, prefix_caching=prefix_caching, speculative=speculative)
        self.step_timeout_s = step_timeout_s
        self.steps = 0
        self.last_progress = time.monotonic()   # when a step last completed (or the engine started)
        self.failed: str | None = None
        # Called once with the reason when a step fails (not on close): the replica starts its repair.
        self.on_failure: Callable[[str], None] | None = None
        # Constrained decoding (`cluster.engine.grammar`): None refuses constrained requests.
        self.grammars = grammars
        self._matchers: dict[int, Matcher] = {}
        self.constrained_requests = 0
        self.mask_seconds = 0.0        # filling bitmasks, summed over the steps (the engine's share of a step)
        # Speculation with a draft model (`cluster.engine.draft_model`): its forwards, and seconds spent in them.
        self._drafting = speculative is not None and speculative.method == "draft"
        self.draft_steps, self.draft_seconds = 0, 0.0
        self._ids = itertools.count()
        self._streams: dict[int, _Stream] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def stats(self) -> EngineStats:
        s, c = self.sched, self.sched.cache_stats()
        return EngineStats(s.num_blocks, s.num_free_blocks, s.num_running, s.num_waiting, self.steps,
                           s.preemptions, self.failed, s.queued_tokens, c.cached_blocks, c.requests, c.hit_requests,
                           c.prompt_tokens, c.hit_tokens, c.evictions,
                           s.pools[0].num_blocks * s.block_size, *astuple(s.spec.stats if s.spec else SpecStats()),
                           constrained_requests=self.constrained_requests, mask_seconds=self.mask_seconds)

    def needs_probe(self, quiet_s: float) -> bool:
        """Healthy as far as it knows, but idle (nothing running or waiting) with no step for
        `quiet_s`: only a probe can show it still works. While sequences run, steps show it, and a
        step past the step timeout fails the engine."""
        s = self.sched
        return (self.failed is None and s.num_running == s.num_waiting == 0
                and time.monotonic() - self.last_progress > quiet_s)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, output_offset: int = 0,
                       constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]:
        """`output_offset`: see `Scheduler.add` (a request resumed after its replica failed; a
        constrained one's grammar accepts those tokens first). `constraint`: what the output must match."""
        if self.failed is not None:
            raise ReplicaUnavailable(f"{self.name} is out of service: {self.failed}")
        seq_id = next(self._ids)
        if constraint is not None:
            # A mask is for a chunk's first sample only: speculative drafts would go unchecked.
            params = dataclasses.replace(params, speculate=False)
            self._matchers[seq_id] = await self._matcher(constraint, prompt_ids[len(prompt_ids) - output_offset:])
        try:
            self.sched.add(seq_id, prompt_ids, params, output_offset)
        except BaseException:
            self._matchers.pop(seq_id, None)
            raise
        queue = _Stream()
        self._streams[seq_id] = queue
        self._ensure_loop()
        self._wake.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._matchers.pop(seq_id, None)
            if self._streams.pop(seq_id, None) is not None and self.failed is None:
                self.sched.abort(seq_id)  # left early: free its blocks now, or when its batch returns

    async def _matcher(self, constraint: Constraint, produced: list[int]) -> Matcher:
        if self.grammars is None:
            raise RequestError("this replica cannot constrain its output (it was built without grammars)")
        try:
            matcher = await asyncio.to_thread(self.grammars.matcher, constraint, produced)
        except GrammarError as e:
            raise RequestError(f"response_format: {e}") from None
        self.constrained_requests += 1
        return matcher

    def _submit(self, batch: Batch) -> asyncio.Future:
        """Sends a batch whose inputs are all known, its constrained chunks' bitmasks filled first."""
        if self._matchers:
            start = time.perf_counter()
            fill_masks(self._matchers, batch.step.seqs)
            self.mask_seconds += time.perf_counter() - start
        if self._drafting and draft_model.wants_drafts(batch):
            return asyncio.ensure_future(self._drafted(batch))
        return asyncio.ensure_future(self.executor.execute(batch.step))

    async def _drafted(self, batch: Batch):
        """Runs the draft model for the batch's drafts, then the batch (the step timeout covers both)."""
        start = time.perf_counter()
        self.draft_steps += await draft_model.fill(batch, self.executor)
        self.draft_seconds += time.perf_counter() - start
        return await self.executor.execute(batch.step)

    def abort(self, request_id: int) -> bool:
        """Ends a request from outside its iterator; it sees `asyncio.CancelledError`."""
        queue = self._streams.pop(request_id, None)
        if queue is None:
            return False
        self.sched.abort(request_id)
        queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))
        return True

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self._fail("the replica is shutting down", unavailable=True)
        await self.executor.close()

    def _ensure_loop(self) -> None:
        """Starts the loop in a context of its own, not the first request's: in a Ray async actor
        the context holds the current task's id, so every shard call of a loop that inherited it
        would be that request's child, and cancelling the request (Ray cancels recursively) would
        cancel the steps of every request and fail the engine."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-engine",
                                                                     context=contextvars.Context())

    async def _run(self) -> None:
        in_flight: deque[tuple[Batch, asyncio.Future]] = deque()
        ready: dict[int, Batch] = {}   # lane -> its batch scheduled ahead, submitted as the lane's batch returns
        try:
            while True:
                self._schedule(in_flight, ready)
                if not in_flight:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, future = in_flight[0]
                started = time.monotonic()
                # asyncio.wait, not wait_for: on Python 3.11 wait_for swallows a cancel that lands as
                # its future completes, and close() would then wait on a loop that never ends.
                await asyncio.wait((future,), timeout=self.step_timeout_s)
                if not future.done():
                    raise ReplicaFailed(f"a step of {len(batch.seqs)} sequences ({batch.num_tokens} tokens) ran past "
                                        f"the {self.step_timeout_s:g} s step timeout")
                in_flight.popleft()
                out = future.result()
                if self._matchers:
                    self._refuse(accept_samples(self._matchers, batch.step.seqs, out.samples, self._live))
                # The lane's next step first, so that the shards wait on nothing but this: then the
                # tokens of the step that returned go to their requests while the next one runs.
                if (following := ready.pop(batch.lane, None)) is not None:
                    following.feed(out.samples)
                    in_flight.append((following, self._submit(following)))
                    await asyncio.sleep(0)  # lets the executor's call start (send the step) before the work below
                self.steps += 1
                self.last_progress = time.monotonic()
                for update in self.sched.update(batch, out.samples, out.verified):
                    queue = self._streams.get(update.seq_id)
                    if queue is not None:
                        queue.put_nowait(update)
                        if update.finish_reason is not None:
                            self._streams.pop(update.seq_id)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s step %d: %d seqs, %d tokens, %.1f ms", self.name, self.steps, len(batch.seqs),
                              batch.num_tokens, 1e3 * (time.monotonic() - started))
        except asyncio.CancelledError:
            for _, future in in_flight:
                future.cancel()
            raise
        except BaseException as e:
            for _, future in in_flight:
                future.cancel()
            log.error("%s failed: %s", self.name, e)
            self._fail(str(e) or repr(e))

    def _schedule(self, in_flight: deque[tuple[Batch, asyncio.Future]], ready: dict[int, Batch]) -> None:
        """Submits a batch for every lane with nothing in flight, and schedules ahead the next batch
        of every lane with one in flight (see `Scheduler.schedule`)."""
        busy = {batch.lane for batch, _ in in_flight}
        for lane in range(self.sched.lanes):
            if lane not in busy and (batch := self.sched.schedule(lane)) is not None:
                in_flight.append((batch, self._submit(batch)))
                busy.add(lane)
            if lane in busy and lane not in ready and (ahead := self.sched.schedule(lane)) is not None:
                ready[lane] = ahead

    def _live(self, seq_id: int) -> bool:
        seq = self.sched.seqs.get(seq_id)
        return seq is not None and not seq.done

    def _refuse(self, seq_ids: list[int]) -> None:
        """Ends the sequences whose sampled token their grammar refused (an internal error: the mask
        allows only tokens it accepts) rather than stream output that breaks their format."""
        for seq_id in seq_ids:
            log.error("%s: sequence %d sampled a token its grammar refuses", self.name, seq_id)
            queue = self._streams.pop(seq_id, None)
            self.sched.abort(seq_id)
            if queue is not None:
                queue.put_nowait(RequestError("the sampled token does not fit the request's grammar"))

    def fail(self, reason: str) -> None:
        """Takes the engine out of service from outside a step (an idle replica's ping or probe
        failed): as if a step had failed."""
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
        self._fail(reason)

    def resume(self) -> None:
        """Back in service after the replica repaired its shards: `_fail` already ended every
        sequence and freed every block, so the engine starts from a clean slate."""
        assert self._loop_task is None or self._loop_task.done(), "resume() of an engine whose loop still runs"
        self.failed = None
        self.last_progress = time.monotonic()

    def _fail(self, reason: str, unavailable: bool = False) -> None:
        """Fails every request and forgets every sequence."""
        first = self.failed is None
        if first:
            self.failed = reason
        cls = ReplicaUnavailable if unavailable else ReplicaFailed
        for queue in self._streams.values():
            queue.put_nowait(cls(f"{self.name} failed: {reason}"))
        self._streams.clear()
        self.sched.fail_all()
        if first and not unavailable and self.on_failure is not None:
            self.on_failure(reason)


async def probe(engine: Engine, timeout_s: float | None = None) -> None:
    """One greedy token from a one-token prompt, through the whole engine (scheduler, every shard,
    sampling): what an idle replica runs to show it can still serve. Raises `ReplicaFailed` or
    `TimeoutError` (after `timeout_s`, by default the step timeout) when it cannot. It is an
    ordinary request, so it counts in `steps`; a successful one moves `last_progress`."""
    token = engine.cfg.bos_token_id if engine.cfg.bos_token_id is not None else 0
    params = SamplingParams(temperature=0, max_tokens=1)

    async def run() -> None:
        async for _ in engine.generate([token], params):
            pass

    await asyncio.wait_for(run(), engine.step_timeout_s if timeout_s is None else timeout_s)


class _Stream:
    """One request's updates in order, from the engine's loop to the request's task: what an
    asyncio.Queue gives here, at about half its cost per item (no task accounting, no waiting
    putters, at most one waiting getter), which every sequence pays on every step."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: the getter was cancelled
            waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()
