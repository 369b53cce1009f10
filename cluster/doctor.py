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
read; the model's config.json, where this machine has it, sizes a step's PP hand-off. This is the
Ray side; the findings' rules and the report's text are `cluster.diagnosis`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import last_line, shard_device
from cluster.config import ServeConfig
from cluster.diagnosis import MiB, Finding, LinkResult, Report, env_findings, link_findings, node_labels, span
from cluster.placement import (PlacementError, assign_ranks, check_capacity, cluster_nodes, replica_bundles,
                               shard_resource)
from shard.config import ModelConfig
from shard.layout import Layout, check_layout
from shard.links import Link, LinkError, Timing, bandwidth, layout_links, probe
from shard.parallel import Endpoint, init_parallel, open_store

GRACE_S = 2.0       # past a link's timeout, for the actor calls themselves
ENV_KEYS = ("GLOO_SOCKET_IFNAME",)  # besides NCCL_*: gloo carries CPU tensors and control messages


@dataclass(frozen=True)
class Options:
    timeout_s: float = 30.0          # per link: warm-up (NCCL's communicator set-up), latency and bandwidth runs
    small_bytes: int = 4096          # latency message
    large_bytes: int | None = None   # bandwidth message; None: 256 MiB on CUDA, 4 MiB on CPU (seconds on gloo)


class DoctorFailure(Exception):
    """A check failed so that the later ones cannot run; carries its finding."""

    def __init__(self, finding: Finding):
        super().__init__(finding.message)
        self.finding = finding


@ray.remote(max_restarts=0)
class LinkProbe:
    """Stands in for one shard: placed, named and joined like one, holding no weights."""

    def __init__(self, layout: Layout, rank: int, device: str, cpu_threads: int, timeout_s: float):
        self.layout, self.rank, self.device, self.timeout_s = layout, rank, device, timeout_s
        self.ctx, self._store = None, None
        torch.set_num_threads(cpu_threads)

    def report(self, model_path: str | None) -> dict:
        """Where this rank runs and what its process sees, before any process group exists."""
        cuda = torch.cuda.is_available()
        ib = Path("/sys/class/infiniband")
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_") or k in ENV_KEYS},
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "nccl": _nccl_version() if cuda else None},
                "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
                "interfaces": sorted(name for _, name in socket.if_nameindex()),
                "ib_devices": sorted(p.name for p in ib.iterdir()) if ib.is_dir() else [],
                "model_found": None if model_path is None else (Path(model_path) / "config.json").is_file()}

    def _endpoint(self, host: str, port: int) -> Endpoint:
        # The groups' own timeout, well past a link's deadline: NCCL's watchdog ends the process of an
        # operation past it, which would turn the doctor's "timed out" into "died".
        return Endpoint(host, port, 2 * self.timeout_s)

    def open_store(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        self._store = open_store(self._endpoint(host, 0), 0, self.layout.world_size)
        return host, self._store.port

    def join(self, host: str, port: int) -> str:
        endpoint = self._endpoint(host, port)
        store = self._store or open_store(endpoint, self.rank, self.layout.world_size)
        self.ctx = init_parallel(self.layout, self.rank, endpoint, shard_device(self.device), store=store)
        return str(self.ctx.device)

    def probe(self, link: Link, small_bytes: int, large_bytes: int) -> Timing:
        return probe(self.ctx, link, small_bytes, large_bytes, self.timeout_s)


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


class Probes:
    """One replica's worth of probe actors: `start` places and joins them as `start_replica` does
    shards, `probe_links` runs the link checks, `close` removes everything (also after a failure)."""

    def __init__(self, config: ServeConfig, resource: str, options: Options, log: Callable[[str], None]):
        self.config, self.resource, self.options, self.log = config, resource, options, log
        self.layout = Layout(config.layout.tp, config.layout.pp)
        self.pg, self.actors, self.ranks, self.device = None, {}, [], "?"

    def start(self) -> None:
        setup_s = self.config.timeouts.setup_s
        self.log(f"placing {self.layout.world_size} probe actors ({self.layout}, one {self.resource} each)")
        if (free := ray.available_resources().get(self.resource, 0)) < self.layout.world_size:
            self.log(f"only {free:g} {self.resource}s are free now: waiting up to timeouts.setup_s={setup_s:g} s")
        self.pg = placement_group(replica_bundles(self.layout, self.resource), strategy="PACK")
        if not ray.wait([self.pg.ready()], timeout=setup_s)[0]:
            raise DoctorFailure(Finding("fail", "placement", f"the placement group of {self.layout} was not placed "
                                        f"within timeouts.setup_s={setup_s:g} s", "other replicas or jobs hold the "
                                        f"{self.resource}s: `ray status` shows what is in use; stop them or add nodes"))
        bundle_nodes = {int(b): n for b, n in placement_group_table(self.pg)["bundles_to_node_id"].items()}
        try:
            places = assign_ranks(self.layout, bundle_nodes, {n.node_id: n.ip for n in cluster_nodes()})
        except PlacementError as e:
            raise DoctorFailure(Finding("fail", "placement", str(e), "see above; `ray status` shows what is in use"))
        gpu = self.resource == "GPU"
        for p in places:
            self.actors[p.rank] = LinkProbe.options(
                name=f"{self.config.name}-doctor-stage{p.stage}-tp{p.tp_rank}", num_cpus=0 if gpu else 1,
                num_gpus=1 if gpu else 0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, p.bundle, True),
            ).remote(self.layout, p.rank, self.config.shard.device, self.config.shard.cpu_threads,
                     self.options.timeout_s)
        reports = self._call_all("start", setup_s, "timeouts.setup_s",
                                 lambda a: a.report.remote(self.config.model.path))
        self.ranks = [{**dataclasses.asdict(p), **reports[p.rank]} for p in places]
        self.log("joining the process groups")
        (host, port), = self._call_all("open the rendezvous store", setup_s, "timeouts.setup_s",
                                       lambda a: a.open_store.remote(), only=[0]).values()
        devices = self._call_all("join the process groups", self.options.timeout_s + GRACE_S, "--timeout",
                                 lambda a: a.join.remote(host, port), check="link")
        self.device = devices[0].split(":")[0]

    def _call_all(self, what: str, timeout_s: float, knob: str, call, check: str = "placement",
                  only: list[int] | None = None) -> dict[int, object]:
        """One call to each probe actor (or those of `only`), all bounded by `timeout_s`; the ranks
        that do not answer, or else the first that fails, become the finding."""
        refs = {call(self.actors[r]): r for r in (self.actors if only is None else only)}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            silent = sorted(refs[r] for r in pending)
            raise DoctorFailure(Finding("fail", check, f"ranks {silent} did not {what} within {timeout_s:g} s",
                                        f"look at those nodes (`ray status`, the actors' logs in the dashboard); "
                                        f"raise {knob} if they are only slow"))
        out = {}
        for ref in ready:
            try:
                out[refs[ref]] = ray.get(ref)
            except Exception as e:
                raise DoctorFailure(Finding("fail", check, f"rank {refs[ref]} failed to {what}: {last_line(e)}",
                                            "see the error; the environment findings below may say why"))
        return out

    def probe_links(self, links: list[Link], large_bytes: int, handoff_bytes: int | None) -> list[LinkResult]:
        small, timeout = self.options.small_bytes, self.options.timeout_s
        where = {r["rank"]: r for r in self.ranks}
        labels = node_labels(self.ranks)
        out: dict[int, str] = {}   # rank -> why it is out of the game
        results = []
        for link in links:
            nodes = tuple(labels[where[r]["node_id"]] for r in link.ranks)
            if gone := [r for r in link.ranks if r in out]:
                results.append(LinkResult(link, nodes, "skipped", f"rank {gone[0]} {out[gone[0]]}"))
                continue
            self.log(f"probing {link.name} (ranks {link.peers}, {span(link, nodes)})")
            refs = {self.actors[r].probe.remote(link, small, large_bytes): r for r in link.ranks}
            ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout + GRACE_S)
            timings, problems = {}, []
            for ref in pending:
                r = where[refs[ref]]
                problems.append(f"rank {r['rank']} (pid {r['pid']} on {labels[r['node_id']]} {r['ip']}) did not "
                                f"answer within {timeout + GRACE_S:g} s")
            for ref in ready:
                try:
                    timings[refs[ref]] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    problems.append(e.cause.detail if isinstance(e.cause, LinkError) else last_line(e))
                except ray.exceptions.RayActorError as e:
                    problems.append(f"rank {refs[ref]}'s probe process died ({last_line(e)})")
            if problems:
                status = "hung" if pending or any("timed out" in p for p in problems) else "failed"
                for r in link.ranks:  # possibly stuck inside the collective: never wait for them again
                    ray.kill(self.actors[r], no_restart=True)
                    out[r] = f"was in {link.name}, which {status}"
                results.append(LinkResult(link, nodes, status, "; ".join(problems)))
                continue
            t = max(timings.values(), key=lambda t: t.large_s) if link.kind == "tp" else timings[link.ranks[0]]
            bw = bandwidth(link, large_bytes, t.large_s)
            handoff = t.small_s + handoff_bytes / bw if link.kind == "pp" and handoff_bytes else None
            results.append(LinkResult(link, nodes, "ok", "", t.small_s, bw, handoff))
        return results

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)


def diagnose(config: ServeConfig, options: Options = Options(), log: Callable[[str], None] = lambda _: None,
             ) -> Report:
    """Every check, on the cluster `config` names (or a local simulated one). Raises the config errors
    (a layout the model cannot take) that `caravan doctor` exits 2 for; the rest become findings."""
    from cluster.launch import ray_cluster

    layout = Layout(config.layout.tp, config.layout.pp)
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
    from cluster.app import serve_details
    from cluster.serve import NAMESPACE, registry_name

    free = ray.available_resources().get(resource, 0)
    if free >= layout.world_size or config.name not in serve_details()["applications"]:
        return None
    findings = [Finding("warn", "placement", f"application {config.name!r} serves and holds the {resource}s ({free:g} "
                        f"free; one replica's probes need {layout.world_size}), so no link was probed and no latency "
                        "or bandwidth measured; its replicas' health is reported instead",
                        "run `caravan doctor` before the application deploys, or scale in by one replica "
                        "(`caravan scale`) while it runs")]
    try:
        registry = ray.get_actor(registry_name(config.name), namespace=NAMESPACE)
        infos = ray.get(registry.infos.remote(), timeout=config.timeouts.step_s)
    except (ValueError, ray.exceptions.RayError) as e:
        return findings + [Finding("fail", "replica", f"the replicas' reports cannot be read ({last_line(e)})",
                                   "see the Ray dashboard's Serve page")]
    if not infos:
        findings.append(Finding("fail", "replica", f"no replica of {config.name!r} has reported within three health "
                                "checks", "`caravan status` and the Ray dashboard's Serve page show their state"))
    limit = config.timeouts.step_s + 2 * config.timeouts.health_check_period_s
    for info in infos:
        age = info.progress_age_s + info.report_age_s
        silent = [f"rank {p.rank} (stage {p.stage}, tp {p.tp_rank}) on {p.ip}"
                  for p, ok in zip(info.shards, info.shard_healthy) if not ok]
        problems = [info.stats.failed or ""] + ([f"no answer from {', '.join(silent)}"] if silent else []) + (
            [f"no progress for {age:.1f} s"] if age > limit else [])
        problems = [p for p in problems if p]
        if problems:
            findings.append(Finding("fail", "replica", f"replica {info.name}: {'; '.join(problems)}",
                                    "Serve replaces a failed replica; if it fails again, run `caravan doctor` with "
                                    "the GPUs free to find the link"))
        else:
            findings.append(Finding("info", "replica", f"replica {info.name} serves: its {len(info.shards)} shards "
                                    f"pass every TP all-reduce and PP hand-off at each step (progress {age:.1f} s ago)"))
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
    from shard.demo import COMPLETE_MARKER, FOLDER_NAME, default_cache_dir

    demo = default_cache_dir() / FOLDER_NAME
    path = Path(config.model.path) if config.model.path else demo
    if not (path / "config.json").is_file() or (path == demo and not (demo / COMPLETE_MARKER).is_file()):
        return None
    model = ModelConfig.from_pretrained(path)
    check_layout(model, layout)
    return model
