"""The whole serving system as one declarative Ray Serve application: `cluster.app:build`.

One import path, with the Caravan config as its `args`, so that `caravan serve`, `serve deploy`,
the Ray dashboard's REST API (`PUT /api/serve/applications/`) and a KubeRay RayService's
`serveConfigV2` all deploy the same application, and a change of `num_replicas` through any of
them is what the router sees. The application has two deployments:

- `replica` (`cluster.serve.ReplicaServer`): one model replica each, its TP x PP shards in the
  replica's placement group. Its count lives only in the Serve config's `deployments` override,
  never in `args`: Serve restarts every replica when `args` change, but scales in place when
  `num_replicas` does.
- `router` (`RouterServer`): the gRPC router (`cluster/router.py`), one, on the Ray head node (on
  Kubernetes the head pod is where its Service and probes point). Serve restarts it if it dies
  or stops serving.

`serve_config(config)` writes the Serve config for a Caravan config; `deploy` applies it as the
dashboard does, keeping the cluster's other declarative applications; `set_replicas` changes the
replica count the same way, so the declared config and the running one never disagree.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from cluster.config import ConfigError, ServeConfig
from cluster.placement import PlacementError, check_capacity, cluster_nodes, shard_resource
from shard.layout import Layout

# Ray is imported where it is used: the CLI imports this module for AppError alone.

log = logging.getLogger(__name__)

IMPORT_PATH = "cluster.app:build"
ROUTER = "router"
DEPLOYMENT = "replica"  # the model replicas (cluster.serve.ReplicaServer)
# Keys of a Caravan config that are not the application's: the replica count is the Serve config's
# num_replicas, and the address and the simulated cluster only tell the CLI where to run.
NOT_ARGS = ("replicas", "address", "local_cluster")
# Ray gives the head node this resource; a tiny share of it pins the router there.
HEAD_NODE = {"node:__internal_head__": 0.001}
STOPPED_GRACE_S = 5.0
SCALE_APPLIED_S = 30.0


class AppError(RuntimeError):
    """The application failed to deploy or to become healthy; the message is Serve's reason."""


def app_args(config: ServeConfig) -> dict[str, Any]:
    args = config.to_dict()
    for key in NOT_ARGS:
        args.pop(key)
    return args


def serve_app_config(config: ServeConfig) -> dict[str, Any]:
    """One entry of a Serve config's `applications`: what `serve deploy` and the REST API take."""
    return {"name": config.name, "import_path": IMPORT_PATH, "args": app_args(config),
            "deployments": [{"name": DEPLOYMENT, "num_replicas": config.replicas}]}


def serve_config(config: ServeConfig) -> dict[str, Any]:
    """A whole Serve config. Serve's HTTP proxies stay off: the gRPC router is the front door. (The
    Helm chart's RayService runs one on the head, HeadOnly, because KubeRay's readiness needs it.)"""
    return {"proxy_location": "Disabled", "applications": [serve_app_config(config)]}


def build(args: dict[str, Any]):
    """The application builder Serve calls with the config's `args` (on the cluster, so a model path
    names a folder there). Waits up to timeouts.setup_s for nodes that are still joining (a new
    Kubernetes cluster's workers start with its head) before it refuses a layout that cannot fit."""
    from ray import serve

    from cluster.launch import model_dir_for
    from cluster.serve import NAMESPACE, Registry, registry_name, replica_deployment

    source = "application args"
    misplaced = [key for key in NOT_ARGS if key in args]
    if misplaced:
        raise ConfigError(misplaced[0], "does not belong in the Serve application's args; set the replica count as "
                                        f"num_replicas of the '{DEPLOYMENT}' deployment in the Serve config", source)
    config = ServeConfig.from_dict(args, source)
    model_dir = model_dir_for(config, source)
    _wait_for_capacity(config)
    # On the head, beside the router and Serve's controller: losing a worker node must not lose the reports.
    Registry.options(name=registry_name(config.name), namespace=NAMESPACE, get_if_exists=True,
                     lifetime="detached", resources=dict(HEAD_NODE)).remote(3 * config.timeouts.health_check_period_s + 2)
    t = config.timeouts
    router = serve.deployment(RouterServer, name=ROUTER).options(
        num_replicas=1,  # the router owns router.port on the head node; a second one could not bind it
        ray_actor_options={"num_cpus": 0, "resources": dict(HEAD_NODE)},
        health_check_period_s=t.health_check_period_s,
        health_check_timeout_s=t.step_s + 5,
        graceful_shutdown_timeout_s=config.router.drain_grace_s + 5,
    )
    return router.bind(config, model_dir, replica_deployment(config, model_dir))


def check_fits(config: ServeConfig, replicas: int) -> None:
    """PlacementError naming what is missing when the Ray cluster cannot hold `replicas` replicas."""
    nodes = cluster_nodes()
    check_capacity(Layout(config.layout.tp, config.layout.pp), replicas, shard_resource(config.shard.device, nodes),
                   nodes)


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


class RouterServer:
    """The gRPC router inside a Serve replica. It runs on its own thread and event loop, as it does
    in a process of its own: its server and health loop never wait on Serve's calls to this actor."""

    def __init__(self, config: ServeConfig, model_dir: str, replicas):
        from cluster.backends import ServeBackend
        from cluster.router import build_router

        _log_to_stderr()
        self.config = config
        self._stopped_at: float | None = None
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="caravan-router", daemon=True).start()
        self.router = build_router(config, model_dir, ServeBackend(config, model_dir, handle=replicas))
        self._call(self._start(), timeout_s=config.timeouts.setup_s)

    async def _start(self) -> None:
        """Binds router.port. After a restart the previous router may hold it for a few seconds more
        (it drains first), so a port in use is tried again for a while before it is an error."""
        deadline = time.monotonic() + self.config.router.drain_grace_s + 10
        while True:
            try:
                return await self.router.start()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)

    def _call(self, coro, timeout_s: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    async def _await(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def endpoint(self) -> dict[str, Any]:
        """Where clients reach this router, and the file holding its token (on the head node)."""
        rc = self.config.router
        return {"host": rc.host, "port": self.router.port, "metrics_port": self.router.metrics_port,
                "tls_cert_file": rc.tls_cert_file, "token_file": str(self.router.token_file)}

    def serving(self) -> bool:
        return self.router.serving

    async def drain(self, grace_s: float | None = None) -> int:
        """Refuses new requests and finishes in-flight ones (up to the grace), then stops the server.
        Returns how many were in flight. Serve then replaces this replica (`check_health` fails)."""
        in_flight = self.router.in_flight
        await self._await(self.router.drain(grace_s))
        return in_flight

    async def wait_stopped(self, timeout_s: float) -> bool:
        """True once the router has stopped (drained); False after `timeout_s` (callers poll)."""
        async def wait() -> bool:
            try:
                await asyncio.wait_for(self.router.stopped.wait(), timeout_s)
                return True
            except TimeoutError:
                return False
        return await self._await(wait())

    def check_health(self) -> None:
        """A drained router is replaced, but not at once: whoever drained it (`caravan serve`, waiting
        in `wait_stopped`) hears that it stopped first."""
        if self.router.stopped.is_set():
            self._stopped_at = self._stopped_at or time.monotonic()
            if time.monotonic() - self._stopped_at > STOPPED_GRACE_S:
                raise RuntimeError("the router has stopped (drained); Serve starts a new one")

    async def __del__(self):
        """Serve stops this replica (the application is deleted or redeployed): drain first."""
        if not hasattr(self, "router"):  # the constructor failed
            return
        if not self.router.stopped.is_set():
            await self._await(self.router.drain())
        self._loop.call_soon_threadsafe(self._loop.stop)


def _log_to_stderr() -> None:
    """Serve configures its own logger only; Caravan's INFO lines (health changes, draining) go to the
    replica's stderr, which Ray keeps in its logs and forwards to the driver."""
    logger = logging.getLogger("cluster")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# ---- deploying and scaling, as the dashboard does ----

def _client():
    from ray.serve._private.api import serve_start

    return serve_start(proxy_location="Disabled")


def _declared(details: dict) -> dict[str, dict]:
    """The Serve config of every declaratively deployed application, by name."""
    return {name: app["deployed_app_config"] for name, app in details["applications"].items()
            if app.get("source") == "declarative" and app.get("deployed_app_config")}


def _apply(apps: dict[str, dict], details: dict) -> None:
    """Applies the declarative state `apps` (Serve deletes declarative applications not named). The
    proxy location stays what the cluster's Serve runs with (a KubeRay RayService runs HeadOnly)."""
    from ray.serve.schema import ServeDeploySchema

    client = _client()
    proxy = details.get("proxy_location") or "Disabled"
    config = {"proxy_location": proxy, "applications": list(apps.values())}
    client.deploy_apps(ServeDeploySchema.model_validate(config))


def serve_details() -> dict:
    """Serve's instance details, as the dashboard's `GET /api/serve/applications/` shows them."""
    import ray

    from cluster.serve import serve_controller
    try:
        controller = serve_controller()
    except ValueError:  # Serve has not started on this cluster: nothing is deployed
        return {"applications": {}}
    return ray.get(controller.get_serve_instance_details.remote())


def deploy(config: ServeConfig, model_dir: str | None = None) -> None:
    """Deploys (or redeploys) the application from `config` declaratively, next to the cluster's
    other declarative applications, and waits until it runs (`AppError` with Serve's reason if it
    does not). `model_dir` overrides model.path (the demo model's folder, resolved by the caller)."""
    from dataclasses import replace

    check_fits(config, config.replicas)
    if model_dir is not None:
        config = replace(config, model=replace(config.model, path=model_dir))
    details = serve_details()
    apps = _declared(details)
    apps[config.name] = serve_app_config(config)
    _apply(apps, details)
    wait_running(config.name, config.timeouts.setup_s)


def wait_running(app_name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve_details()["applications"].get(app_name)
        status = str(getattr(app["status"], "value", app["status"])) if app else "NOT_STARTED"
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AppError(f"application {app_name!r} is {status}: {_reason(app)}")
        if time.monotonic() > deadline:
            raise AppError(f"application {app_name!r} still {status} after timeouts.setup_s={timeout_s:g} s: "
                           f"{_reason(app) if app else 'not deployed'}; see the Ray dashboard's Serve page")
        time.sleep(0.5)


def _reason(app: dict) -> str:
    messages = [app.get("message") or ""] + [f"{name}: {d['message']}" for name, d in app["deployments"].items()
                                             if d.get("message")]
    text = "; ".join(m.strip() for m in messages if m.strip()) or "no message from Serve"
    return text.splitlines()[-1] if len(text) > 2000 else text


def scale(config: ServeConfig, replicas: int) -> int:
    """Sets how many replicas the running application has and returns the previous count, once the
    cluster is known to hold them. Serve starts or stops only the difference, after this returns;
    a replica being removed first finishes its in-flight requests."""
    if replicas < 1:
        raise PlacementError(f"replicas must be at least 1, got {replicas}; to stop serving, delete the application "
                             f"({config.name!r}: `serve shutdown`, or stop `caravan serve`)")
    check_fits(config, replicas)
    return set_replicas(config.name, replicas)


def set_replicas(app_name: str, replicas: int) -> int:
    """Sets the `replica` deployment's num_replicas in the application's declared Serve config and
    applies it, as a dashboard PUT with a new count does: replicas that stay keep serving. Returns
    the previous count."""
    details = serve_details()
    apps = _declared(details)
    if app_name not in apps:
        raise PlacementError(f"application {app_name!r} is not deployed declaratively on this Ray cluster; deploy it "
                             "with `caravan serve`, `serve deploy` or a RayService first")
    deployments = apps[app_name].setdefault("deployments", [])
    entry = next((d for d in deployments if d["name"] == DEPLOYMENT), None)
    if entry is None:
        entry = {"name": DEPLOYMENT}
        deployments.append(entry)
    previous = entry.get("num_replicas", 1)
    entry["num_replicas"] = replicas
    _apply(apps, details)
    # Serve applies a config on its own loop; wait until it works towards the new count, so that a
    # status read next (Admin.Status, `caravan status`) shows it.
    deadline = time.monotonic() + SCALE_APPLIED_S
    while time.monotonic() < deadline:
        app = serve_details()["applications"].get(app_name)
        if app and app["deployments"].get(DEPLOYMENT, {}).get("target_num_replicas") == replicas:
            return previous
        time.sleep(0.2)
    raise AppError(f"Serve took the new replica count for {app_name!r} but does not work towards it after "
                   f"{SCALE_APPLIED_S:g} s; see the Ray dashboard's Serve page")


def delete(app_name: str, timeout_s: float = 120.0) -> None:
    """Removes the application, keeping the cluster's other declarative applications, and waits
    until Serve has stopped its replicas (each first finishes its in-flight requests)."""
    details = serve_details()
    apps = _declared(details)
    if apps.pop(app_name, None) is None:
        return
    _apply(apps, details)
    deadline = time.monotonic() + timeout_s
    while app_name in serve_details()["applications"]:
        if time.monotonic() > deadline:
            raise AppError(f"application {app_name!r} is still being deleted after {timeout_s:g} s; see the Ray "
                           "dashboard's Serve page")
        time.sleep(0.5)
