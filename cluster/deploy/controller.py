"""A client of Serve's controller, as the Ray dashboard's REST API is: deploy, scale and delete the
application declaratively (next to the cluster's other declarative applications, so the declared
config and the running one never disagree), and read what Serve works towards.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import ray
from ray.serve._private.api import serve_start
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.schema import ServeDeploySchema

from cluster.config import ServeConfig
from cluster.deploy.names import DEPLOYMENT, IMPORT_PATH
from cluster.runtime.placement import PlacementError, check_capacity, cluster_nodes, shard_resource
from shard.errors import UserError

SCALE_APPLIED_S = 30.0
# Keys of a Caravan config that are not the application's: the replica count is the Serve config's
# num_replicas, and the address and the simulated cluster only tell the CLI where to run.
NOT_ARGS = ("replicas", "address", "local_cluster")


class AppError(UserError, RuntimeError):
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


def check_fits(config: ServeConfig, replicas: int) -> None:
    """PlacementError naming what is missing when the Ray cluster cannot hold `replicas` replicas."""
    nodes = cluster_nodes()
    check_capacity(config.shard_layout, replicas, shard_resource(config.shard.device, nodes), nodes)


def serve_controller():
    """Serve's controller actor (by Serve's private names: its Python API reads no instance details
    and applies no declarative config; the dashboard's REST API calls it the same way)."""
    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def target_replicas(app_name: str) -> int:
    """The replica count Serve is working towards; 0 when the application is not deployed."""
    app = serve_details()["applications"].get(app_name)
    return app["deployments"][DEPLOYMENT]["target_num_replicas"] if app and DEPLOYMENT in app["deployments"] else 0


def _client():
    return serve_start(proxy_location="Disabled")


def _declared(details: dict) -> dict[str, dict]:
    """The Serve config of every declaratively deployed application, by name."""
    return {name: app["deployed_app_config"] for name, app in details["applications"].items()
            if app.get("source") == "declarative" and app.get("deployed_app_config")}


def _apply(apps: dict[str, dict], details: dict) -> None:
    """Applies the declarative state `apps` (Serve deletes declarative applications not named). The
    proxy location stays what the cluster's Serve runs with (a KubeRay RayService runs HeadOnly)."""
    client = _client()
    proxy = details.get("proxy_location") or "Disabled"
    config = {"proxy_location": proxy, "applications": list(apps.values())}
    client.deploy_apps(ServeDeploySchema.model_validate(config))


def serve_details() -> dict:
    """Serve's instance details, as the dashboard's `GET /api/serve/applications/` shows them."""
    try:
        controller = serve_controller()
    except ValueError:  # Serve has not started on this cluster: nothing is deployed
        return {"applications": {}}
    return ray.get(controller.get_serve_instance_details.remote())


def deploy(config: ServeConfig, model_dir: str | None = None) -> None:
    """Deploys (or redeploys) the application from `config` declaratively, next to the cluster's
    other declarative applications, and waits until it runs (`AppError` with Serve's reason if it
    does not). `model_dir` overrides model.path (the demo model's folder, resolved by the caller)."""
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
