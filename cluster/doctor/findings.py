"""What `caravan doctor` found, and how it reads: findings from the probes' results and environments,
each with its fix, and the report as text or JSON. Pure functions over plain data, tested without Ray.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

import torch

from cluster.config import ConfigError, ServeConfig, _bytes
from shard.layout import Layout
from shard.links import Link
from shard.parallel import backend_for

MiB = 2**20
SLOW_FACTOR = 3.0   # a link this many times slower than the median of its kind is flagged
# Bus bandwidth a healthy CUDA link should reach with large messages: NVLink-class inside a node (an
# H100 node all-reduces at 300+ GB/s; PCIe without NVLink stays near 20), a 100 Gb/s-class NIC or
# better between nodes (InfiniBand or RoCE at 200-400 Gb/s carries 20-45 GB/s; TCP sockets far less).
CUDA_FLOOR = {"tp": 50e9, "pp": 5e9}


def parse_size(option: str, text: str) -> int:
    """A message size from the command line: bytes, or a size such as 4KiB or 256MiB, as in the config."""
    try:
        size = _bytes(int(text) if text.isdigit() else text, None)
    except ValueError as e:
        raise ConfigError(option, f"got {text!r}; {e}", "command line") from None
    if size < 4:
        raise ConfigError(option, f"got {text!r}; use at least 4 bytes (one float32)", "command line")
    return size


@dataclass(frozen=True)
class Finding:
    severity: str   # fail (exit 1) | warn | info
    check: str      # ray | capacity | placement | link | speed | env | model | replica
    message: str
    fix: str = ""


@dataclass
class LinkResult:
    link: Link
    nodes: tuple[str, ...]              # node label of each rank
    status: str                         # ok | hung | failed | skipped
    detail: str = ""
    latency_s: float | None = None
    bandwidth: float | None = None      # bytes/s; bus bandwidth for an all-reduce
    handoff_s: float | None = None      # pp: one full step's activations at this link's speed

    @property
    def span(self) -> str:
        return span(self.link, self.nodes)


def span(link: Link, nodes: tuple[str, ...]) -> str:
    """The nodes a link joins: n0->n1 for a hand-off, n0 (or n0,n1) for a TP group."""
    return ("->" if link.kind == "pp" else ",").join(dict.fromkeys(nodes))


@dataclass
class Report:
    layout: Layout
    device: str = "?"
    sizes: tuple[int, int] = (0, 0)     # latency and bandwidth message bytes
    nodes: dict[str, dict] = field(default_factory=dict)   # label -> ip, node id, host, ranks
    ranks: list[dict] = field(default_factory=list)        # each probe actor's placement and environment
    links: list[LinkResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if any(f.severity == "fail" for f in self.findings) else 0

    def to_json(self) -> dict:
        links = [{**dataclasses.asdict(r), "name": r.link.name} for r in self.links]
        return {"ok": self.exit_code == 0, "layout": {"tp": self.layout.tp, "pp": self.layout.pp},
                "device": self.device, "backend": _backend(self.device), "latency_bytes": self.sizes[0],
                "bandwidth_bytes": self.sizes[1], "nodes": self.nodes, "ranks": self.ranks, "links": links,
                "findings": [dataclasses.asdict(f) for f in self.findings]}


def node_labels(ranks: list[dict]) -> dict[str, str]:
    """Short names for the nodes, n0, n1, ... in rank order (node ids are long, and simulated nodes share an IP)."""
    return {node: f"n{i}" for i, node in enumerate(dict.fromkeys(r["node_id"] for r in ranks))}


def _backend(device: str) -> str:
    return backend_for(torch.device(device)) if device in ("cpu", "cuda") else "?"


def link_findings(links: list[LinkResult], device: str) -> list[Finding]:
    out = []
    for r in links:
        where = f"{r.link.name} (ranks {r.link.peers} on {r.span})"
        if r.status in ("hung", "failed"):
            out.append(Finding("fail", "link", f"{where} {r.status}: {r.detail}", _link_fix(r, device)))
        if r.link.kind == "tp" and len(set(r.nodes)) > 1:
            out.append(Finding("warn", "speed", f"{where} spans nodes: its two all-reduces per layer cross the "
                               "network", "give every node a multiple of layout.tp GPUs, or lower layout.tp"))
    for kind in ("tp", "pp"):
        ok = [r for r in links if r.link.kind == kind and r.status == "ok"]
        if len(ok) > 1:
            bw, lat = (statistics.median(getattr(r, a) for r in ok) for a in ("bandwidth", "latency_s"))
            for r in ok:
                if r.bandwidth * SLOW_FACTOR < bw or r.latency_s > SLOW_FACTOR * lat:
                    out.append(Finding("warn", "speed", f"{r.link.name} (ranks {r.link.peers}) is much slower than "
                                       f"the other {kind.upper()} links: {_rate(r.bandwidth)} and {_ms(r.latency_s)} "
                                       f"against a median of {_rate(bw)} and {_ms(lat)}", _slow_fix(kind, device)))
        for r in ok if device == "cuda" else []:
            if r.bandwidth < CUDA_FLOOR[kind]:
                out.append(Finding("warn", "speed", f"{r.link.name} (ranks {r.link.peers}) carries "
                                   f"{_rate(r.bandwidth)}, below the {_rate(CUDA_FLOOR[kind])} a healthy "
                                   f"{kind.upper()} link reaches", _slow_fix(kind, device)))
    return out


def _link_fix(r: LinkResult, device: str) -> str:
    stuck = "did not answer" in r.detail
    first = ("a rank that did not answer is stuck or stopped: look at its node (`ray logs`, `dmesg` for OOM kills "
             "or GPU Xid errors, `nvidia-smi`). " if stuck else "")
    if device == "cpu":
        return first + "Gloo reaches peers through the interface of the node's hostname; set GLOO_SOCKET_IFNAME " \
                       "to the pod network interface (e.g. eth0) on every node, and allow traffic between nodes"
    if len(set(r.nodes)) == 1:
        return first + "inside one node NCCL needs GPU peer access and shared memory: check `nvidia-smi topo -m`, " \
                       "give the pod a large /dev/shm (an emptyDir with medium Memory), and rerun with NCCL_DEBUG=INFO"
    return first + "between nodes NCCL needs every port open between the pods (NetworkPolicy, firewall), " \
                   "NCCL_SOCKET_IFNAME naming the pod network interface and NCCL_IB_HCA the right HCAs; rerun " \
                   "with NCCL_DEBUG=INFO to see the interface and transport NCCL picks"


def _slow_fix(kind: str, device: str) -> str:
    if device != "cuda":
        return ("gloo sends through the interface of the node's hostname: check GLOO_SOCKET_IFNAME and that "
                "the slow link's nodes are not busy with other work")
    if kind == "tp":
        return "a TP group should sit on NVLink-connected GPUs of one node: check `nvidia-smi topo -m`"
    return ("check that NCCL uses InfiniBand/RoCE (NCCL_DEBUG=INFO shows NET/IB, not NET/Socket), NCCL_IB_HCA, "
            "and the NIC of the slow nodes")


def env_findings(ranks: list[dict], device: str, config: ServeConfig) -> list[Finding]:
    """What the probe actors' environments say, node by node."""
    out = []
    nodes = {}  # node id -> its first rank's report (CUDA_VISIBLE_DEVICES aside, ranks of a node share it)
    for r in ranks:
        nodes.setdefault(r["node_id"], r)
    label = node_labels(ranks)
    multi = len({r["node_id"] for r in ranks}) > 1
    for key in sorted({k for r in nodes.values() for k in r["env"]}):
        values = {r["env"].get(key) for r in nodes.values()}
        if len(values) > 1:
            seen = ", ".join(f"{label[n]}={r['env'].get(key, 'unset')}" for n, r in nodes.items())
            out.append(Finding("warn", "env", f"{key} differs between nodes ({seen})",
                               "set the same NCCL_* variables on every node (the Ray worker pods' env)"))
    for what in ("torch", "cuda", "nccl"):
        if len({r["versions"][what] for r in nodes.values()}) > 1:
            seen = ", ".join(f"{label[n]}={r['versions'][what]}" for n, r in nodes.items())
            out.append(Finding("warn", "env", f"{what} versions differ between nodes ({seen})",
                               "run one image on every node: mismatched NCCL builds can hang or corrupt collectives"))
    if config.model.path and (missing := [label[r["node_id"]] for r in nodes.values() if not r["model_found"]]):
        out.append(Finding("fail", "model", f"model.path {config.model.path} has no config.json on node(s) "
                           f"{', '.join(missing)}", "mount the checkpoint at the same path on every node "
                           "(the worker pods' volume)"))
    simulated = config.address is None
    blind = [r for r in ranks if r["gpu_ids"] and device == "cpu"]
    if blind and not simulated:
        out.append(Finding("warn", "env", f"Ray gave rank {blind[0]['rank']} GPU {','.join(blind[0]['gpu_ids'])} but "
                           "torch sees no CUDA device there, so the shards compute on CPU (expected only where "
                           "Ray's GPUs are simulated)", "install a CUDA build of torch and check the driver "
                           "(`nvidia-smi`); shard.device: cuda refuses to fall back"))
    for r in ranks:
        if len(r["gpus"]) > 1:
            out.append(Finding("fail", "env", f"rank {r['rank']} sees {len(r['gpus'])} GPUs (CUDA_VISIBLE_DEVICES="
                               f"{r['cuda_visible_devices']}), so every shard of its node would use GPU 0",
                               "let Ray narrow CUDA_VISIBLE_DEVICES per actor: unset "
                               "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"))
    if device == "cpu":
        out.append(Finding("info", "env", "shards compute on CPU: TP and PP use gloo" + (
            " (the local cluster's GPUs are simulated)" if simulated else "") + "; NCCL is not used"))
    if device != "cuda":
        return out
    for n, r in nodes.items():
        ifname = r["env"].get("NCCL_SOCKET_IFNAME")
        if multi and ifname is None:
            nics = ", ".join(i for i in r["interfaces"] if i != "lo")
            out.append(Finding("warn", "env", f"NCCL_SOCKET_IFNAME is unset on {label[n]} ({r['ip']}), across nodes "
                               f"NCCL may pick the wrong interface (there: {nics})", "set NCCL_SOCKET_IFNAME (and "
                               "GLOO_SOCKET_IFNAME) to the pod network interface, e.g. eth0, on every node"))
        elif ifname is not None and not _ifname_matches(ifname, r["interfaces"]):
            out.append(Finding("fail", "env", f"NCCL_SOCKET_IFNAME={ifname} matches no interface of {label[n]} "
                               f"({', '.join(r['interfaces'])})", "set it to an interface every node has, e.g. eth0"))
        if r["ib_devices"] and r["env"].get("NCCL_IB_DISABLE") == "1":
            out.append(Finding("warn", "env", f"{label[n]} has InfiniBand/RoCE devices ({', '.join(r['ib_devices'])}) "
                               "but NCCL_IB_DISABLE=1 sends across nodes over TCP", "unset NCCL_IB_DISABLE"))
    if multi and not any(r["ib_devices"] for r in nodes.values()):
        out.append(Finding("info", "env", "no node has InfiniBand/RoCE devices: NCCL crosses nodes over TCP sockets"))
    if any("NCCL_DEBUG" not in r["env"] for r in nodes.values()):
        out.append(Finding("info", "env", "NCCL_DEBUG is unset: set NCCL_DEBUG=WARN so NCCL's own errors reach the "
                           "worker logs (INFO also shows the interface and transport it picks)"))
    return out


def _ifname_matches(spec: str, interfaces: list[str]) -> bool:
    """NCCL_SOCKET_IFNAME's syntax: comma-separated prefixes; `=` for exact names, `^` to exclude."""
    exclude, spec = spec.startswith("^"), spec.lstrip("^")
    exact, spec = spec.startswith("="), spec.lstrip("=")
    names = [s for s in spec.split(",") if s]
    hit = [i for i in interfaces if any(i == s if exact else i.startswith(s) for s in names)]
    return len(hit) < len(interfaces) if exclude else bool(hit)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _rate(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e9:.2f} GB/s" if bps >= 1e8 else f"{bps / 1e6:.1f} MB/s"


def _size_text(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B"


def format_report(report: Report) -> str:
    layout = report.layout
    lines = [f"caravan doctor: {layout}, device {report.device} ({_backend(report.device)}), "
             f"{len(report.nodes)} node(s)"]
    if report.nodes:
        lines.append("nodes:")
        lines += [f"  {k}  {n['ip']:<15} node {n['node_id'][:12]}  host {n['host']}  ranks "
                  f"{','.join(map(str, n['ranks']))}" for k, n in report.nodes.items()]
    if report.links:
        small, large = report.sizes
        lines.append(f"links (latency of {_size_text(small)}, bandwidth of {_size_text(large)}, all-reduce as bus "
                     "bandwidth; step hand-off: max_tokens_per_step tokens' hidden states):")
        rows = [("link", "ranks", "nodes", "latency", "bandwidth", "step hand-off", "status")]
        rows += [(r.link.name, r.link.peers, r.span, _ms(r.latency_s), _rate(r.bandwidth), _ms(r.handoff_s),
                  r.status) for r in report.links]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    elif layout.world_size > 1:
        lines.append("links: none probed")
    else:
        lines.append("links: none (TP 1 x PP 1 has no TP group and no hand-off)")
    lines.append("findings:" if report.findings else "findings: none")
    for f in sorted(report.findings, key=lambda f: ("fail", "warn", "info").index(f.severity)):
        lines.append(f"  {f.severity.upper():<4} [{f.check}] {f.message}")
        if f.fix:
            lines.append(f"       fix: {f.fix}")
    fails = sum(f.severity == "fail" for f in report.findings)
    warns = sum(f.severity == "warn" for f in report.findings)
    lines.append(f"FAILED: {fails} check(s) failed" if fails else f"OK: every check passed ({warns} warning(s))")
    return "\n".join(lines)
