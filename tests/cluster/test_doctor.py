"""`caravan doctor`: which links a layout has, the findings' rules and the report, without Ray; then on
a simulated two-node Ray cluster, the command as a user runs it, and a probe process stopped with
SIGSTOP (a real hang: its sockets stay open, its peers simply never hear from it) reported as the
link that hung, within the link timeout, with nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from transformers import LlamaConfig

from cluster.cli import main
from cluster.config import ServeConfig
from cluster.doctor.findings import _ifname_matches, env_findings, Finding, format_report, link_findings, LinkResult, Report
from shard.layout import Layout
from shard.links import Link, bandwidth, layout_links
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model's config.json and nothing else: the doctor reads no weights."""
    path = tmp_path_factory.mktemp("config-only")
    LlamaConfig(vocab_size=1003, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, head_dim=16).to_json_file(path / "config.json")
    return path


def test_a_layout_has_one_all_reduce_per_stage_and_one_hand_off_per_tp_rank_and_stage_boundary():
    links = layout_links(Layout(3, 2))
    assert [(k.kind, k.ranks) for k in links] == [("tp", (0, 1, 2)), ("tp", (3, 4, 5)),
                                                  ("pp", (0, 3)), ("pp", (1, 4)), ("pp", (2, 5))]
    assert links[3].name == "PP send stage 0->1 tp 1" and links[3].peers == "1->4"
    assert [k.ranks for k in layout_links(Layout(1, 3))] == [(0, 1), (1, 2)]  # TP 1: nothing to all-reduce
    assert [k.ranks for k in layout_links(Layout(2, 1))] == [(0, 1)]
    assert layout_links(Layout(1, 1)) == []
    # An all-reduce's bus bandwidth: each rank's link carries 2(n-1)/n of the buffer.
    assert bandwidth(links[0], 3 * 10**9, 1.0) == pytest.approx(4e9)
    assert bandwidth(links[2], 10**9, 0.5) == 2e9


def test_nccl_socket_ifname_follows_nccls_syntax():
    nics = ["lo", "eth0", "ib0"]
    assert _ifname_matches("eth", nics) and _ifname_matches("=eth0", nics) and _ifname_matches("en,eth", nics)
    assert not _ifname_matches("=eth", nics) and not _ifname_matches("ens5", nics)
    assert _ifname_matches("^lo,docker", nics) and not _ifname_matches("^lo,eth,ib", nics)


def rank(r: int, node: str, **kw) -> dict:
    env = kw.pop("env", {})
    return {"rank": r, "pid": 100 + r, "node_id": node, "ip": f"10.0.0.{node[-1]}", "host": node, "gpu_ids": ["0"],
            "env": env, "cuda_visible_devices": "0", "gpus": ["H100"], "interfaces": ["lo", "eth0"],
            "ib_devices": [], "model_found": True,
            "versions": {"torch": "2.13.0", "cuda": "12.8", "nccl": "2.27.5"}, **kw}


def test_environment_findings_on_cuda_say_what_to_set():
    ranks = [rank(0, "node1", env={"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_HCA": "mlx5_0", "NCCL_DEBUG": "WARN"}),
             rank(1, "node2", env={"NCCL_IB_HCA": "mlx5_1"}, gpus=["H100"] * 8, cuda_visible_devices=None)]
    found = env_findings(ranks, "cuda", ServeConfig(address="auto"))
    text = "\n".join(f"{f.severity} {f.message} | {f.fix}" for f in found)
    assert "warn NCCL_IB_HCA differs between nodes (n0=mlx5_0, n1=mlx5_1)" in text
    assert "warn NCCL_SOCKET_IFNAME is unset on n1 (10.0.0.2)" in text and "e.g. eth0" in text
    assert "fail rank 1 sees 8 GPUs" in text and "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES" in text
    assert "no node has InfiniBand" in text and "NCCL_DEBUG is unset" in text
    wrong = env_findings([rank(0, "node1", env={"NCCL_SOCKET_IFNAME": "ens5"}), rank(1, "node2", env={
        "NCCL_SOCKET_IFNAME": "ens5"})], "cuda", ServeConfig(address="auto"))
    assert [f.severity for f in wrong if "matches no interface" in f.message] == ["fail", "fail"]


def test_environment_findings_on_cpu_say_gloo_and_name_nodes_without_the_model():
    ranks = [rank(0, "node1", gpu_ids=[], gpus=[]), rank(1, "node2", gpu_ids=[], gpus=[], model_found=False)]
    found = env_findings(ranks, "cpu", ServeConfig.from_dict({"model": {"path": "/models/llama"}, "address": "auto"}))
    assert [(f.severity, f.check) for f in found] == [("fail", "model"), ("info", "env")]
    assert "/models/llama has no config.json on node(s) n1" in found[0].message and "same path" in found[0].fix
    assert "gloo" in found[1].message and "NCCL is not used" in found[1].message


def table(text: str) -> dict[str, list[str]]:
    """The link table's rows by link name, split into columns."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("links ("))
    end = lines.index("findings:")
    return {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[start + 1:end])}


def result(kind: str, ranks: tuple, nodes: tuple, status: str = "ok", bw: float = 1e9, lat: float = 1e-4,
           detail: str = "") -> LinkResult:
    ok = status == "ok"
    return LinkResult(Link(kind, 0, ranks, ranks[0] if kind == "pp" else None), nodes, status, detail,
                      lat if ok else None, bw if ok else None)


def test_link_findings_name_the_link_that_hung_and_the_slow_ones():
    links = [result("tp", (0, 1), ("n0", "n1")),
             result("pp", (0, 2), ("n0", "n1"), bw=20e9), result("pp", (1, 3), ("n0", "n1"), bw=22e9),
             result("pp", (2, 4), ("n1", "n2"), bw=2e9),
             result("pp", (3, 5), ("n1", "n2"), status="hung", detail="rank 5 (pid 9 on n2 10.0.0.3) did not answer")]
    found = link_findings(links, "cuda")
    fails = [f for f in found if f.severity == "fail"]
    assert len(fails) == 1 and "PP send stage 0->1 tp 3 (ranks 3->5 on n1->n2) hung: rank 5" in fails[0].message
    assert "stuck or stopped" in fails[0].fix and "NCCL_SOCKET_IFNAME" in fails[0].fix  # across nodes: the network
    warns = [f.message for f in found if f.severity == "warn"]
    assert any("TP all-reduce stage 0 (ranks 0,1 on n0,n1) spans nodes" in w for w in warns)
    assert any("tp 2 (ranks 2->4) is much slower than the other PP links" in w for w in warns)
    assert any("tp 2 (ranks 2->4) carries 2.00 GB/s, below the 5.00 GB/s" in w for w in warns)
    assert not any("ranks 0->2" in w for w in warns)
    # On CPU (gloo) there is no hardware floor, and the fix for a hang names gloo's interface setting.
    cpu = link_findings(links, "cpu")
    assert not any("below the" in f.message for f in cpu)
    fixes = [f.fix for f in cpu if f.check == "link" or "slower" in f.message]
    assert len(fixes) == 2 and all("GLOO_SOCKET_IFNAME" in f and "NCCL" not in f for f in fixes)


def test_the_report_prints_the_link_table_and_findings_with_their_fix_and_serializes():
    report = Report(Layout(2, 2), device="cpu", sizes=(4096, 4 * 2**20),
                    nodes={"n0": {"ip": "10.0.0.1", "node_id": "a" * 40, "host": "h0", "ranks": [0, 1]}},
                    links=[result("tp", (0, 1), ("n0", "n0")), result("pp", (0, 2), ("n0", "n1"), "hung",
                                                                      detail="rank 2 did not answer")])
    report.findings = [Finding("info", "env", "gloo"), *link_findings(report.links, "cpu")]
    text = format_report(report)
    assert report.exit_code == 1 and text.endswith("FAILED: 1 check(s) failed")
    assert "latency of 4 KiB, bandwidth of 4 MiB" in text
    rows = table(text)
    assert rows["link"] == ["ranks", "nodes", "latency", "bandwidth", "step hand-off", "status"]
    assert rows["TP all-reduce stage 0"] == ["0,1", "n0", "0.10 ms", "1.00 GB/s", "-", "ok"]
    assert rows["PP send stage 0->1 tp 0"] == ["0->2", "n0->n1", "-", "-", "-", "hung"]
    assert text.index("FAIL [link]") < text.index("INFO [env]") and "       fix: " in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["ok"] is False and data["backend"] == "gloo" and data["links"][1]["status"] == "hung"
    assert data["links"][0]["name"] == "TP all-reduce stage 0" and data["findings"][1]["severity"] == "fail"


@pytest.mark.parametrize("args,yaml_text,message", [
    ([], "layout: {tp: 2, ppp: 2}\n", "layout.ppp: unknown key; did you mean layout.pp?"),
    ([], "layout: {tp: 3, pp: 2}\nmodel: {path: MODEL}\n", "TP=3 does not divide the 8 attention heads"),
    (["--large-bytes", "12XB"], "", "--large-bytes: got '12XB'; use a number of bytes or a size such as 64MiB"),
    (["--timeout", "0"], "", "--timeout: got 0; use a number of seconds > 0"),
])
def test_a_bad_config_exits_2_naming_the_key(tmp_path, model_dir, capsys, args, yaml_text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml_text.replace("MODEL", str(model_dir)))
    assert main(["doctor", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("caravan doctor: error: ") and "Traceback" not in err


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_doctor_probes_every_link_of_a_replica_placed_as_serving_places_it(cluster, model_dir, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\nlayout: {{tp: 2, pp: 2}}\n")
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "doctor", str(path), "--address", cluster.address,
                             "--timeout", "10"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "caravan doctor: TP 2 x PP 2, device cpu (gloo), 2 node(s)" in out
    rows = table(out)
    assert sorted(rows) == ["PP send stage 0->1 tp 0", "PP send stage 0->1 tp 1", "TP all-reduce stage 0",
                            "TP all-reduce stage 1", "link"]
    # Each stage's TP group on one node, the hand-offs from that node to the other (as `assign_ranks` places).
    assert rows["TP all-reduce stage 0"][:2] == ["0,1", "n0"] and rows["TP all-reduce stage 1"][:2] == ["2,3", "n1"]
    assert [rows[f"PP send stage 0->1 tp {t}"][:2] for t in (0, 1)] == [["0->2", "n0->n1"], ["1->3", "n0->n1"]]
    for name, (_, _, latency, rate, handoff, status) in rows.items():
        if name != "link":
            assert status == "ok" and latency.endswith(" ms") and re.fullmatch(r"[\d.]+ [GM]B/s", rate), rows
            # The step hand-off, sized from the model's hidden size, on PP links only.
            assert handoff.endswith(" ms") if name.startswith("PP") else handoff == "-"
    assert "INFO [env] shards compute on CPU: TP and PP use gloo" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: every check passed")
    assert "doctor: probing TP all-reduce stage 0" in result.stderr  # progress on stderr


@pytest.mark.slow
def test_a_stopped_probe_is_reported_as_the_link_that_hung_within_the_timeout(cluster, model_dir):
    import ray

    from cluster.doctor.diagnose import run_links

    from cluster.doctor.probes import GRACE_S, Options, Probes
    from cluster.runtime.placement import cluster_nodes, shard_resource

    config = ServeConfig.from_dict({"model": {"path": str(model_dir)}, "layout": {"tp": 2, "pp": 2},
                                    "address": cluster.address, "name": "hang"})
    options = Options(timeout_s=3.0)
    resource = shard_resource(config.shard.device, cluster_nodes())  # the simulated GPUs, as `diagnose` picks
    probes = Probes(config, resource, options, log=lambda line: print(line, file=sys.stderr))
    report, victim = Report(probes.layout), None
    try:
        probes.start()
        victim = next(r for r in probes.ranks if r["rank"] == 3)
        os.kill(victim["pid"], signal.SIGSTOP)
        started = time.monotonic()
        run_links(probes, report, None, config, options)
        took = time.monotonic() - started
    finally:
        probes.close()
        if victim is not None:
            try:
                os.kill(victim["pid"], signal.SIGCONT)
            except ProcessLookupError:
                pass
    text = format_report(report)
    print(f"{text}\nlinks probed in {took:.1f} s")
    assert [r.status for r in report.links] == ["ok", "hung", "skipped", "skipped"], text
    hung = report.links[1]
    assert hung.link.name == "TP all-reduce stage 1"
    assert f"rank 3 (pid {victim['pid']} on n1" in hung.detail and "did not answer within 5 s" in hung.detail
    assert "rank 2's all-reduce of 4 KiB timed out" in hung.detail  # its peer, bounded by its own deadline
    assert report.links[3].detail == "rank 3 was in TP all-reduce stage 1, which hung"
    assert report.exit_code == 1 and "FAIL [link] TP all-reduce stage 1 (ranks 2,3 on n1) hung" in text
    # The link's timeout and the actor-call grace, plus the healthy TP link before it: far from collective_s.
    assert took < options.timeout_s + GRACE_S + 3 < config.timeouts.collective_s, took
    # Nothing leaked: the stopped process was killed and every GPU and CPU is free again.
    deadline = time.monotonic() + 20
    while ray.available_resources().get("GPU") != ray.cluster_resources()["GPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU") == ray.cluster_resources()["GPU"]
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]
    # The stopped process is killed, not left behind; under load its exit can trail the resources'.
    while time.monotonic() < deadline + 10:
        try:
            os.kill(victim["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(victim["pid"], 0)


@pytest.mark.slow
def test_caravan_doctor_names_the_link_that_hung_and_exits_1(cluster, model_dir, tmp_path):
    """The same fault through the command a user runs: one probe process is stopped as soon as the
    doctor starts probing links; it must name a link that hung, with that process's pid, and exit 1
    within the link timeout, not the collective timeout."""
    import psutil

    path = tmp_path / "cluster.yaml"
    path.write_text(f"model: {{path: {model_dir}}}\nlayout: {{tp: 2, pp: 2}}\nname: hangcli\n")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "doctor", str(path), "--address", cluster.address,
                             "--timeout", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    stopped, err = None, []
    try:
        for line in proc.stderr:
            err.append(line)
            if line.startswith("doctor: probing "):
                probes = [p for p in psutil.process_iter(["cmdline"])
                          if " ".join(p.info["cmdline"] or []).startswith("ray::LinkProbe")]
                assert len(probes) == 4, [p.info["cmdline"] for p in probes]
                stopped = probes[-1].pid
                os.kill(stopped, signal.SIGSTOP)
                started = time.monotonic()
                break
        out, rest = proc.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
            except ProcessLookupError:
                pass
    print(out, "".join(err) + rest)
    assert stopped is not None, "the doctor never started probing links"
    assert proc.returncode == 1
    assert re.search(rf"FAIL \[link\] .* hung: .*pid {stopped} on n\d .* did not answer within 5 s", out), out
    assert out.rstrip().splitlines()[-1].startswith("FAIL")
    assert took < 30, took  # links of 3 s each, far from the 60 s collective timeout
