"""The one interface between an engine and the shards that run its steps.

`Engine` and the offline driver (`cluster.engine.offline`) both drive an `Executor`: on Ray it is
`cluster.runtime.ray_executor.RayExecutor` (an actor call per shard); in one process it is
`LocalExecutor` over anything with a synchronous `execute(step)`: a world-size-1 `ShardWorker`, or a
`cluster.runtime.processes.LocalReplica` whose other ranks are local processes.

`draft(step)` runs a step on the replica's draft model (`speculative.method: draft`,
`cluster.engine.draft_model`), which sits beside its first rank.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from shard.worker import StepInput, StepOutput


class Executor(Protocol):
    """Runs steps on a replica's shards. Calls may overlap (one per lane in flight); results come
    back in call order. `execute` sends the step before its first await: the engine starts it and
    yields once, then prepares the next step while this one runs."""

    async def execute(self, step: StepInput) -> StepOutput: ...

    async def draft(self, step: StepInput) -> StepOutput: ...

    async def close(self) -> None: ...


class Stepper(Protocol):
    def execute(self, step: StepInput) -> StepOutput | None: ...


class LocalExecutor:
    """A stepper in this process, on a thread of its own so that the event loop stays free to take
    requests while a step runs. One thread: steps run one after another, in call order. `draft`:
    the draft model's stepper (a world-size-1 `ShardWorker`), on the same thread."""

    def __init__(self, stepper: Stepper, draft: Stepper | None = None):
        self.stepper, self.drafter = stepper, draft
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="caravan-step")

    async def execute(self, step: StepInput) -> StepOutput:
        out = await asyncio.get_running_loop().run_in_executor(self._thread, self.stepper.execute, step)
        assert out is not None, "a stepper that is not the last stage returned no samples"
        return out

    async def draft(self, step: StepInput) -> StepOutput:
        if self.drafter is None:
            raise RuntimeError("this executor has no draft model (speculative.method: draft needs one)")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.drafter.execute, step)

    async def close(self) -> None:
        self._thread.shutdown(wait=True)
