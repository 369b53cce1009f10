"""`caravan doctor`: before a cluster serves, check what most often breaks multi-node serving, and
say how to fix each finding.

1. Capacity: the layout's stages against the nodes' GPUs (CPUs on a CPU-only cluster), by the
   rules `caravan serve` places replicas with.
2. Links: probe actors stand in for one replica's shards: the same placement group (PACK), the same
   rank assignment once the bundles land, the same process groups (`shard.parallel`). Each TP
   all-reduce and each PP hand-off is probed within `timeout_s` (`shard.links`), and every actor
   call is bounded here too, so a hang is reported as the link and the rank that hung.
3. Speed: latency and bandwidth per link; a TP group across nodes, a link much slower than the
   others of its kind, or on CUDA a link below what its hardware should do, is flagged.
4. Environment: NCCL_*, GLOO_SOCKET_IFNAME, CUDA_VISIBLE_DEVICES and the GPUs torch sees on every
   node, differences between nodes, and the usual mistakes.

Nothing is left behind: the probe actors and their placement group are removed at the end, and a
failed link's actors are killed at once (they may be stuck inside a collective). No weights are
read; the model's config.json, where this machine has it, sizes a step's PP hand-off. The probe
actors are `cluster.doctor.probes`; the findings' rules and the report's text `cluster.doctor.findings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import ray

from cluster.config import ServeConfig
from cluster.deploy.controller import serve_details
from cluster.deploy.registry import registry
from cluster.doctor.findings import MiB, Finding, Report, env_findings, link_findings, node_labels
from cluster.doctor.probes import DoctorFailure, Options, Probes
from cluster.runtime.local_cluster import ray_cluster
from cluster.runtime.placement import PlacementError, check_capacity, cluster_nodes, shard_resource
from cluster.runtime.report import replica_problems
from cluster.runtime.shard_actor import last_line
from shard.config import ModelConfig
from shard.demo import COMPLETE_MARKER, FOLDER_NAME, default_cache_dir
from shard.layout import Layout, check_layout
from shard.links import layout_links


def diagnose(config: ServeConfig, options: Options = Options(), log: Callable[[str], None] = lambda _: None,
             ) -> Report:
    """Every check, on the cluster `config` names (or a local simulated one). Raises the config errors
    (a layout the model cannot take) that `caravan doctor` exits 2 for; the rest become findings."""
    layout = config.shard_layout
    report = Report(layout)
    model = model_config(config, layout)
    if model is None:
        report.findings.append(Finding("info", "model", "the model's config.json is not on this machine, so the "
                                       "layout was not checked against the model nor a step's hand-off sized"))
    try:
        with ray_cluster(config):
            nodes = cluster_nodes()
            try:
                resource = shard_resource(config.shard.device, nodes)
                check_capacity(layout, 1, resource, nodes)
            except PlacementError as e:
                report.findings.append(Finding("fail", "capacity", str(e)))
                return report
            try:
                check_capacity(layout, config.replicas, resource, nodes)
            except PlacementError as e:  # one replica still fits: its links are worth probing
                report.findings.append(Finding("fail", "capacity", str(e)))
            serving = serving_findings(config, resource, layout)
            if serving is not None:
                report.findings += serving
                return report
            probes = Probes(config, resource, options, log)
            try:
                probes.start()
                run_links(probes, report, model, config, options)
            except DoctorFailure as e:
                report.findings.append(e.finding)
            finally:
                probes.close()
                report.ranks = probes.ranks
    except ConnectionError as e:
        report.findings.append(Finding("fail", "ray", f"cannot join the Ray cluster at {config.address}: {e}",
                                       "start Ray first, or pass its address (--address auto inside the cluster, "
                                       "as a Ray job does)"))
        return report
    labels = node_labels(report.ranks)
    for r in report.ranks:
        node = report.nodes.setdefault(labels[r["node_id"]], {"ip": r["ip"], "node_id": r["node_id"],
                                                              "host": r["host"], "ranks": []})
        node["ranks"].append(r["rank"])
    report.findings += env_findings(report.ranks, report.device, config)
    return report


def serving_findings(config: ServeConfig, resource: str, layout: Layout) -> list[Finding] | None:
    """When the application already serves and holds the resources one replica's probes need (on
    Kubernetes, `helm test` after an install that fills every GPU), its replicas' own health stands
    in for the probes: every step of a replica passes every TP all-reduce and PP hand-off it has,
    and an idle replica is probed each health check. None when the probes can be placed."""
    free = ray.available_resources().get(resource, 0)
    if free >= layout.world_size or config.name not in serve_details()["applications"]:
        return None
    findings = [Finding("warn", "placement", f"application {config.name!r} serves and holds the {resource}s ({free:g} "
                        f"free; one replica's probes need {layout.world_size}), so no link was probed and no latency "
                        "or bandwidth measured; its replicas' health is reported instead",
                        "run `caravan doctor` before the application deploys, or scale in by one replica "
                        "(`caravan scale`) while it runs")]
    try:
        infos = ray.get(registry(config.name).infos.remote(), timeout=config.timeouts.step_s)
    except (ValueError, ray.exceptions.RayError) as e:
        return findings + [Finding("fail", "replica", f"the replicas' reports cannot be read ({last_line(e)})",
                                   "see the Ray dashboard's Serve page")]
    if not infos:
        findings.append(Finding("fail", "replica", f"no replica of {config.name!r} has reported within three health "
                                "checks", "`caravan status` and the Ray dashboard's Serve page show their state"))
    for info in infos:
        problems = replica_problems(info, config.timeouts)
        if problems:
            findings.append(Finding("fail", "replica", f"replica {info.name}: {'; '.join(problems)}",
                                    "Serve replaces a failed replica; if it fails again, run `caravan doctor` with "
                                    "the GPUs free to find the link"))
        else:
            findings.append(Finding("info", "replica", f"replica {info.name} serves: its {len(info.shards)} shards "
                                    f"pass every TP all-reduce and PP hand-off at each step (progress {info.age_s:.1f} s ago)"))
    return findings


def run_links(probes: Probes, report: Report, model: ModelConfig | None, config: ServeConfig,
              options: Options) -> None:
    """The link checks of started probes, into `report` (the steps a test can take one by one)."""
    report.device = probes.device
    large = options.large_bytes or (256 * MiB if probes.device == "cuda" else 4 * MiB)
    report.sizes = (options.small_bytes, large)
    handoff = (config.scheduler.max_tokens_per_step * model.hidden_size * config.model.torch_dtype.itemsize
               if model else None)
    report.links = probes.probe_links(layout_links(probes.layout), large, handoff)
    report.findings += link_findings(report.links, report.device)


def model_config(config: ServeConfig, layout: Layout) -> ModelConfig | None:
    """The model's shape from its config.json alone: model.path's, or the demo's once converted; None
    where this machine lacks it (a Ray job's driver need not mount the checkpoint)."""
    demo = default_cache_dir() / FOLDER_NAME
    path = Path(config.model.path) if config.model.path else demo
    if not (path / "config.json").is_file() or (path == demo and not (demo / COMPLETE_MARKER).is_file()):
        return None
    model = ModelConfig.from_pretrained(path)
    check_layout(model, layout)
    return model
