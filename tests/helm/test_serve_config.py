"""The RayService's serveConfigV2 is the application cluster/deploy/app.py builds: `cluster.deploy.app:build` with
the Caravan config as args (loaded strictly, as Serve will), the replica count only as the `replica`
deployment's num_replicas, and a layout the worker group holds by the runtime's own placement rule."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.deploy.controller import NOT_ARGS

from cluster.deploy.names import DEPLOYMENT, IMPORT_PATH
from cluster.config import ServeConfig
from cluster.runtime.placement import check_capacity, Node, shard_resource
from shard.layout import Layout
from tests.helm.chart import VALUE_SETS, Helm, app_args, one, serve_config, values


@pytest.mark.parametrize("example", VALUE_SETS)
def test_serve_config_is_the_application(helm: Helm, example: str | None) -> None:
    docs = helm.render(example)
    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)  # what the dashboard's PUT /api/serve/applications/ takes
    (app,) = config["applications"]
    v = values(example)
    assert app["name"] == v["caravan"]["name"]
    assert app["import_path"] == IMPORT_PATH
    assert app["deployments"] == [{"name": DEPLOYMENT, "num_replicas": v["replicas"]}]


@pytest.mark.parametrize("example", VALUE_SETS)
def test_args_load_as_a_caravan_config(helm: Helm, example: str | None) -> None:
    args = app_args(helm.render(example))
    assert not set(args) & set(NOT_ARGS)
    config = ServeConfig.from_dict(args, "serveConfigV2 args")  # strict: an unknown key is an error
    assert (config.router.host, config.router.port) == ("0.0.0.0", 50051)
    assert config.router.metrics_port == 9464 and config.replicas == 1  # the default: args never carry it


@pytest.mark.parametrize("example", VALUE_SETS)
def test_config_file_is_the_args_and_the_replicas(helm: Helm, example: str | None) -> None:
    nodes = 2 * values(example)["workers"]["nodes"]
    docs = helm.render(example, "--set", "replicas=2", "--set", f"workers.nodes={nodes}")
    file = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert file.pop("replicas") == 2
    assert file == app_args(docs)
    ServeConfig.from_dict(file, "config.yaml")


def test_replicas_change_only_num_replicas(helm: Helm) -> None:
    """Serve restarts every replica when args change and scales in place when num_replicas does."""
    one_replica = serve_config(helm.render(None))
    two = serve_config(helm.render(None, "--set", "replicas=2", "--set", "workers.nodes=2"))
    assert one_replica["applications"][0]["args"] == two["applications"][0]["args"]
    assert two["applications"][0]["deployments"] == [{"name": DEPLOYMENT, "num_replicas": 2}]


@pytest.mark.parametrize("example", VALUE_SETS)
@pytest.mark.parametrize("replicas", [1, 2])
def test_worker_group_holds_the_layout(helm: Helm, example: str | None, replicas: int) -> None:
    """The rendered worker group, as Ray nodes, passes cluster.placement's capacity check for the
    rendered layout, with no node left idle, and every TP group fits one node."""
    nodes = values(example)["workers"]["nodes"] * replicas
    docs = helm.render(example, "--set", f"replicas={replicas}", "--set", f"workers.nodes={nodes}")
    config = ServeConfig.from_dict(app_args(docs))
    layout = Layout(config.layout.tp, config.layout.pp)
    (app,) = serve_config(docs)["applications"]
    count = app["deployments"][0]["num_replicas"]
    (group,) = one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    params = group["rayStartParams"]
    gpus = int(params.get("num-gpus", 0))
    assert gpus == int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
    resources = {"GPU": float(gpus), "CPU": 96.0} if gpus else {"CPU": float(params["num-cpus"])}
    ray_nodes = [Node(f"node{i}", f"10.0.0.{i}", resources) for i in range(group["replicas"])]
    resource = shard_resource(config.shard.device, ray_nodes)
    assert resource == ("GPU" if gpus else "CPU")
    check_capacity(layout, count, resource, ray_nodes)
    per_node = gpus or int(params["num-cpus"]) - 1  # a CPU node keeps one Ray CPU for the engines
    assert per_node % layout.tp == 0, "a TP group would straddle two nodes"
    assert (len(ray_nodes) - 1) * (per_node // layout.tp) < count * layout.pp, "a node would stay idle"


def test_the_old_import_path_still_builds_the_application(caplog):
    """Serve configs written before cluster/ had layers name `cluster.app:build`: it builds the same
    application (here: refuses the same bad args with the same message), with a warning naming the new path."""
    from ray.serve._private.utils import import_attr

    from cluster.config import ConfigError

    old = import_attr("cluster.app:build")
    new = import_attr(IMPORT_PATH)
    messages = []
    for build in (old, new):
        with pytest.raises(ConfigError) as e:
            build({"replicas": 2})
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "num_replicas" in messages[0]
    assert any("cluster.deploy.app:build" in r.getMessage() for r in caplog.records)
