"""The whole serving system as one declarative Ray Serve application: `cluster.deploy.app:build`.

One import path, with the Caravan config as its `args`, so that `caravan serve`, `serve deploy`,
the Ray dashboard's REST API (`PUT /api/serve/applications/`) and a KubeRay RayService's
`serveConfigV2` all deploy the same application, and a change of `num_replicas` through any of
them is what the router sees (`cluster.deploy.controller` writes and applies that config). The
application has two deployments:

- `replica` (`cluster.deploy.replica_server.ReplicaServer`): one model replica each, its TP x PP
  shards in the replica's placement group. Its count lives only in the Serve config's
  `deployments` override, never in `args`: Serve restarts every replica when `args` change, but
  scales in place when `num_replicas` does.
- `router` (`cluster.deploy.router_server.RouterServer`): the gRPC router, one, on the Ray head node.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray import serve

from cluster.config import ConfigError, ServeConfig
from cluster.deploy.controller import NOT_ARGS, check_fits
from cluster.deploy.names import DEPLOYMENT, HEAD_NODE, ROUTER
from cluster.deploy.registry import start_registry
from cluster.deploy.replica_server import replica_deployment
from cluster.deploy.router_server import RouterServer
from cluster.engine.draft_model import check_draft
from cluster.runtime.placement import PlacementError
from shard.config import ModelConfig
from shard.demo import ensure_demo_model
from shard.layout import check_layout
from shard.loader import Checkpoint

log = logging.getLogger(__name__)


def build(args: dict[str, Any]):
    """The application builder Serve calls with the config's `args` (on the cluster, so a model path
    names a folder there). Waits up to timeouts.setup_s for nodes that are still joining (a new
    Kubernetes cluster's workers start with its head) before it refuses a layout that cannot fit."""
    source = "application args"
    misplaced = [key for key in NOT_ARGS if key in args]
    if misplaced:
        raise ConfigError(misplaced[0], "does not belong in the Serve application's args; set the replica count as "
                                        f"num_replicas of the '{DEPLOYMENT}' deployment in the Serve config", source)
    config = ServeConfig.from_dict(args, source)
    model_dir = model_dir_for(config, source)
    _wait_for_capacity(config)
    start_registry(config.name, config.timeouts.health_check_period_s)
    t = config.timeouts
    router = serve.deployment(RouterServer, name=ROUTER).options(
        num_replicas=1,  # the router owns router.port on the head node; a second one could not bind it
        ray_actor_options={"num_cpus": 0, "resources": dict(HEAD_NODE)},
        health_check_period_s=t.health_check_period_s,
        health_check_timeout_s=t.step_s + 5,
        graceful_shutdown_timeout_s=config.router.drain_grace_s + 5,
    )
    return router.bind(config, model_dir, replica_deployment(config, model_dir))


def model_dir_for(config: ServeConfig, source: str) -> str:
    """The checkpoint to serve, checked (config, layout, tensor headers) before anything starts."""
    # The demo first: a draft_model may name its folder, which exists once it is converted.
    path = ensure_demo_model() if config.model.path is None else Path(config.model.path)
    config.check_model_path(source)
    model = ModelConfig.from_pretrained(path)
    check_layout(model, config.shard_layout)
    Checkpoint.open(path).validate(model)
    if config.speculative.draft_model is not None:
        draft = ModelConfig.from_pretrained(config.speculative.draft_model)
        try:
            check_draft(model, draft)
        except ValueError as e:
            raise ConfigError("speculative.draft_model", f"{config.speculative.draft_model}: {e}", source) from None
        Checkpoint.open(config.speculative.draft_model).validate(draft)
    return str(path)


def _wait_for_capacity(config: ServeConfig) -> None:
    deadline = time.monotonic() + config.timeouts.setup_s
    while True:
        try:
            return check_fits(config, config.replicas)
        except PlacementError as e:
            if time.monotonic() > deadline:
                raise
            log.warning("waiting for nodes (up to timeouts.setup_s): %s", e)
            time.sleep(5)
