"""The doctor's probe actors: one replica's worth of stand-ins for its shards, placed, ranked and joined
into process groups exactly as `cluster.runtime.replica.start_replica` does shards, holding no
weights, each TP all-reduce and PP hand-off probed within a deadline (`shard.links`), and every actor
call bounded, so that a hang is reported as the link and the rank that hung. `close` removes
everything, also after a failure; a failed link's actors are killed at once (they may be stuck
inside a collective).
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
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import ServeConfig
from cluster.doctor.findings import Finding, LinkResult, node_labels, span
from cluster.runtime.placement import PlacementError, places_of, replica_bundles
from cluster.runtime.rendezvous import Rendezvous
from cluster.runtime.shard_actor import last_line, shard_device
from shard.layout import Layout
from shard.links import Link, LinkError, Timing, bandwidth, probe

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
        self.ctx = None
        # The groups' own timeout, well past a link's deadline: NCCL's watchdog ends the process of an
        # operation past it, which would turn the doctor's "timed out" into "died".
        self._rendezvous = Rendezvous(layout, rank, 2 * timeout_s)
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

    def open_store(self) -> tuple[str, int]:
        return self._rendezvous.open()

    def join(self, host: str, port: int) -> str:
        self.ctx = self._rendezvous.join(host, port, shard_device(self.device))
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
        self.layout = config.shard_layout
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
        try:
            places = places_of(self.pg, self.layout)
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
