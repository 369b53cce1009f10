"""`ReplicaClient`: the in-process API over the replica deployment that the router uses. It streams a
request's tokens, sends a request whose replica failed again (resuming after the tokens it had
streamed) within `router.wait_for_replica_s`, and cancels the request on its replica when the
caller stops reading. `cluster.deploy.request_router.CapacityRouter`, in this process, picks the
replica.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import replace
from typing import AsyncIterator

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from cluster.deploy.names import DEPLOYMENT
from cluster.deploy.registry import registry
from cluster.engine.engine import ReplicaFailed, ReplicaUnavailable
from cluster.engine.grammar import Constraint
from cluster.engine.scheduler import TokenUpdate
from cluster.runtime.report import ReplicaInfo
from cluster.runtime.shard_actor import last_line
from shard.sampler import SamplingParams

log = logging.getLogger(__name__)


class ReplicaClient:
    """Streams requests to the application's replicas."""

    RETRYABLE = (ReplicaFailed, RayActorError, ActorDiedError, ActorUnavailableError)
    MAX_BACKOFF_S = 1.0

    def __init__(self, app_name: str, *, handle=None, wait_s: float = 30.0, backoff_s: float = 0.1):
        self.handle = handle if handle is not None else serve.get_deployment_handle(DEPLOYMENT, app_name)
        self.registry = registry(app_name)
        self.wait_s, self.backoff_s = wait_s, backoff_s

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       constraint: Constraint | None = None) -> AsyncIterator[TokenUpdate]:
        """A request's tokens. One whose replica fails (a shard died or hung, or the replica is out
        of service while it repairs itself) goes to a replica again, with a growing pause, for up
        to `wait_s` (`router.wait_for_replica_s`) in all. One that had streamed tokens resumes: the
        prompt goes again with the tokens already streamed appended and the rest of its max_tokens,
        and seeded sampling goes on at the same output index: the caller sees one unbroken stream,
        the same tokens as without the failure (a constrained one's replica rebuilds its grammar state
        from those tokens). Leaving early (closing this iterator, or
        cancelling its task) cancels the request on its replica, which aborts the sequence and frees
        its KV blocks."""
        start, streamed = time.monotonic(), []
        for attempt in itertools.count(1):
            ids, rest = prompt_ids + streamed, replace(params, max_tokens=params.max_tokens - len(streamed))
            stream = self.handle.options(stream=True).generate.remote(ids, rest, len(streamed), constraint)
            try:
                async for update in stream:
                    streamed.append(update.sample.token_id)
                    yield update
                return
            except (GeneratorExit, asyncio.CancelledError):
                stream.cancel()  # otherwise the replica generates on, for no one, holding its blocks
                raise
            except self.RETRYABLE as e:
                waited = time.monotonic() - start
                pause = min(self.backoff_s * 2 ** (attempt - 1), self.MAX_BACKOFF_S)
                if waited + pause > self.wait_s:
                    raise ReplicaUnavailable(
                        f"no replica could finish the request within router.wait_for_replica_s={self.wait_s:g} "
                        f"({attempt} attempts over {waited:.1f} s, {len(streamed)} tokens streamed); the cluster is "
                        f"recovering, retry shortly. Last error: {_cause(e)}") from e
                log.info("request failed after %d tokens (%s); %s in %.1f s", len(streamed), _cause(e),
                         "resuming" if streamed else "retrying", pause)
                await asyncio.sleep(pause)

    async def infos(self) -> list[ReplicaInfo]:
        """What each live replica last reported (within three health-check periods)."""
        return await self.registry.infos.remote()


def _cause(e: BaseException) -> str:
    """The original error's message: Ray wraps what a replica raised in a RayTaskError."""
    return last_line(getattr(e, "cause", None) or e)
