"""Where `caravan serve` and `caravan doctor` run: the Ray cluster the config names, or a local one that
simulates nodes.

The local cluster is `ray.cluster_utils.Cluster`: a head node for Serve and the engines, plus
`local_cluster.nodes` worker nodes, each with fake GPUs (Ray only counts them; the shards compute
on CPU), so placement runs exactly as on a real multi-node cluster. Token authentication stays
on: the local cluster is started with it, and a token is created in ~/.ray/auth_token if missing.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.config import ServeConfig
from cluster.tokens import write_secret
from cluster.runtime.ports import dashboard_port

log = logging.getLogger(__name__)


@contextmanager
def ray_cluster(config: ServeConfig) -> Iterator[tuple[str, str | None]]:
    """Connects to `config.address`, or starts the simulated local cluster; yields (address,
    dashboard URL) and disconnects (and stops a cluster it started) on exit."""
    if config.address is None:
        _enable_token_auth()
    # Imported here, after the auth mode is set: Ray reads its config when it is first imported.
    import ray
    from ray.cluster_utils import Cluster

    if config.address is not None:
        ctx = ray.init(address=config.address, logging_level=logging.WARNING)
        try:
            yield config.address, ctx.dashboard_url
        finally:
            ray.shutdown()
        return
    local = config.local_cluster
    gpus = local.gpus_for(config.layout, config.replicas)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_port": dashboard_port()})
    try:
        for _ in range(local.nodes):
            cluster.add_node(num_cpus=local.cpus_per_node, num_gpus=gpus)
        log.info("local Ray cluster: head + %d nodes with %d simulated GPUs each", local.nodes, gpus)
        ctx = ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster.address, ctx.dashboard_url
    finally:
        ray.shutdown()
        cluster.shutdown()


def _enable_token_auth() -> None:
    """Ray's own `ray.init()` turns token auth on for a new cluster; `Cluster` does not, so do it
    the same way: the mode for this process and its children, and a token on disk."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if "ray" in sys.modules:  # Ray caches its config at import; read the mode again
        from ray._raylet import Config
        Config.initialize("")
    if os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ:
        write_secret(Path.home() / ".ray" / "auth_token", secrets.token_hex(32))
