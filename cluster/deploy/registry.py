"""The registry actor: where replicas say how they are, so that status and routing can see each one
(Serve's handle hides which replica answers)."""

from __future__ import annotations

import time
from dataclasses import replace

import ray

from cluster.deploy.names import HEAD_NODE, NAMESPACE, registry_name
from cluster.runtime.report import ReplicaInfo


@ray.remote(num_cpus=0)
class Registry:
    """Each replica reports at every health check; an entry not refreshed for `max_age_s` belongs to
    a replica that is gone."""

    def __init__(self, max_age_s: float):
        self.max_age_s = max_age_s
        self._seen: dict[str, tuple[float, ReplicaInfo]] = {}

    def report(self, info: ReplicaInfo) -> None:
        self._seen[info.name] = (time.monotonic(), info)

    def drop(self, name: str) -> None:
        self._seen.pop(name, None)

    def infos(self) -> list[ReplicaInfo]:
        """Live replicas' last reports, by name, each with its age (this actor's clock: replicas'
        clocks are on other nodes, so a report's age is the one comparison that needs none)."""
        now = time.monotonic()
        self._seen = {k: (t, i) for k, (t, i) in self._seen.items() if now - t <= self.max_age_s}
        return [replace(i, report_age_s=now - t) for t, i in sorted(self._seen.values(), key=lambda ti: ti[1].name)]


def start_registry(app_name: str, health_check_period_s: float) -> None:
    """The application's registry, on the head beside the router and Serve's controller (losing a
    worker node must not lose the reports); an existing one is kept."""
    Registry.options(name=registry_name(app_name), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                     resources=dict(HEAD_NODE)).remote(3 * health_check_period_s + 2)


def registry(app_name: str):
    """The application's registry actor (ValueError when it is not running)."""
    return ray.get_actor(registry_name(app_name), namespace=NAMESPACE)
