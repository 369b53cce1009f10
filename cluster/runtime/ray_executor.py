"""`RayExecutor`: the engine's executor on Ray, one actor call per shard per step.

Control goes over Ray, tensors over torch.distributed. Every actor gets each step as a plain
actor call, in the same order (Ray runs one caller's calls to a sync actor in submission order),
so stage k starts batch B as soon as it has passed batch A on to stage k+1: the pipeline fills
without any extra scheduling. Why actor calls rather than a broadcast from rank 0 or a compiled
graph: see the README (measured per-step costs).
"""

from __future__ import annotations

import asyncio

import ray

from cluster.runtime.shard_actor import last_line
from shard.layout import Layout
from shard.worker import StepInput, StepOutput


class ShardDied(RuntimeError):
    """A shard actor died or raised during a step."""


class RayExecutor:
    """Sends each step to every actor of the replica and returns the last stage's output. Waiting
    on every actor, not only the last, is what turns a dead actor into an error at once."""

    def __init__(self, actors: list, names: list[str], layout: Layout):
        self.actors, self.names, self.layout = actors, names, layout
        self._last = layout.rank(layout.pp - 1, 0)

    async def execute(self, step: StepInput) -> StepOutput:
        # Every call is sent before the first await: the engine relies on the step being on its way
        # as soon as this coroutine starts (`cluster.engine.executor.Executor`).
        refs = [actor.execute.remote(step) for actor in self.actors]
        outputs = await asyncio.gather(*(self._wait(ref, name) for ref, name in zip(refs, self.names)))
        return outputs[self._last]

    async def draft(self, step: StepInput) -> StepOutput:
        """A step of the draft model, which sits beside rank 0 (`cluster.engine.draft_model`)."""
        return await self._wait(self.actors[0].draft.remote(step), self.names[0])

    @staticmethod
    async def _wait(ref, name: str) -> StepOutput | None:
        try:
            return await ref
        except ray.exceptions.RayActorError as e:
            # Ray's message goes on for a paragraph on possible causes; its first sentence says what happened.
            raise ShardDied(f"shard {name} died ({last_line(e).split('. ')[0]})") from None
        except ray.exceptions.RayTaskError as e:
            raise ShardDied(f"shard {name} failed a step: {last_line(e)}") from None

    async def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
