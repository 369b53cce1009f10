"""What a replica says of itself (`ReplicaInfo`, reported at every health check), and the one verdict
of whether it serves, which the router's health and `caravan doctor` both read."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import TimeoutsSection
from cluster.engine.engine import EngineStats
from cluster.runtime.placement import ShardPlace


@dataclass(frozen=True)
class ReplicaInfo:
    name: str
    shards: list[ShardPlace]
    stats: EngineStats
    progress_age_s: float          # at report time: since the engine last completed a step (or a probe)
    shard_healthy: list[bool]      # one per entry of `shards`, from the last health check
    report_age_s: float = 0.0      # filled by the registry: how long ago this was reported
    startup: str | None = None     # where the replica's start went, phase by phase
    repairs: int = 0               # in-place repairs since the replica started
    last_repair: str | None = None # what the last one replaced and where its time went

    @property
    def age_s(self) -> float:
        """Since the replica last showed progress, as of now."""
        return self.progress_age_s + self.report_age_s


def replica_problems(info: ReplicaInfo, timeouts: TimeoutsSection) -> list[str]:
    """Why the replica does not serve; empty when it does. A busy replica completes a step at least
    every `step_s`, and an idle one is probed every health period, so a longer silence is a fault."""
    limit = timeouts.step_s + 2 * timeouts.health_check_period_s
    silent = [f"rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip}"
              for p, ok in zip(info.shards, info.shard_healthy) if not ok]
    problems = [info.stats.failed] if info.stats.failed else []
    if silent:
        problems.append(f"no answer from {', '.join(silent)}")
    if info.age_s > limit:
        problems.append(f"no progress for {info.age_s:.1f} s")
    return problems
