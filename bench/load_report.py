"""What `bench/load.py` prints and draws from its results: a table per system, the OpenAI / gRPC and
Caravan / peer ratios per point, and the sweep and TTFT plots (matplotlib, from `pip install -e .[bench]`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from load_client import PERCENTILES


def api_ratios(results: dict, xname: str) -> str:
    """OpenAI over HTTP / gRPC at each point: output tok/s ratio and the TTFT p50 difference."""
    systems = results["systems"]
    if "caravan-openai" not in systems or "caravan" not in systems:
        return ""
    rows = [f"OpenAI HTTP / gRPC: {xname} | output tok/s ratio | TTFT p50 HTTP - gRPC (ms)"]
    for g, h in zip(systems["caravan"]["points"], systems["caravan-openai"]["points"]):
        tok = h["output_tokens_per_s"] / g["output_tokens_per_s"] if g["output_tokens_per_s"] else float("nan")
        gt, ht = g["ttft_s"]["p50"], h["ttft_s"]["p50"]
        diff = f"{1e3 * (ht - gt):+.1f}" if gt is not None and ht is not None else "-"
        rows.append(f"  {g['x']:g} | {tok:.3f}x | {diff}")
    return "\n".join(rows)


def table(name: str, points: list[dict], xname: str) -> str:
    ms = lambda p, k: "/".join("-" if p[k][f"p{q}"] is None else f"{1e3 * p[k][f'p{q}']:.0f}" for q in PERCENTILES)  # noqa: E731
    rows = [f"{name}: {xname} | ok/sent | req/s | out tok/s | TTFT p50/90/99 ms | TPOT p50/90/99 ms | "
            "latency p50/90/99 ms"]
    for p in points:
        rows.append(f"  {p['x']:g} | {p['ok']}/{p['requests']} | {p['requests_per_s']:.2f} | "
                    f"{p['output_tokens_per_s']:.1f} | {ms(p, 'ttft_s')} | {ms(p, 'tpot_s')} | {ms(p, 'latency_s')}")
        rows += [f"    error: {e}" for e in p["first_errors"]]
    return "\n".join(rows)


def ratios(results: dict, xname: str) -> str:
    """Caravan / peer at each point: throughput (higher is better for Caravan) and p50 latency (lower is)."""
    caravan = results["systems"]["caravan"]["points"]
    rows = []
    for peer, data in results["systems"].items():
        if peer.startswith("caravan") or "skipped" in data:
            continue
        for c in caravan:
            if "points" in data:
                q = next((p for p in data["points"] if p["x"] == c["x"]), None)
                if q is None or not q["output_tokens_per_s"]:
                    continue
                cl, ql = c["latency_s"]["p50"], q["latency_s"]["p50"]
                lat = f"{cl / ql:.2f}x" if cl and ql else "-"
                rows.append(f"  {peer} | {c['x']:g} | {c['output_tokens_per_s'] / q['output_tokens_per_s']:.2f}x | {lat}")
            else:  # whole-batch throughput only
                rows.append(f"  {peer} (whole batch of {data['batch']['requests']}) | {c['x']:g} | "
                            f"{c['output_tokens_per_s'] / data['batch']['output_tokens_per_s']:.2f}x | -")
    head = f"Caravan / peer: peer | {xname} | output tok/s ratio (>1: Caravan faster) | p50 latency ratio (<1: Caravan faster)"
    return "\n".join([head, *rows]) if rows else ""


def plot(results: dict, stem: Path) -> list[Path]:
    """-sweep.png (output tok/s, latency and TTFT percentiles per point, every system) and -ttft.png (the TTFT
    distribution of each system at each point, as an empirical CDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xname = results["workload"]["x"]
    systems = {k: v for k, v in results["systems"].items() if "skipped" not in v}
    colors = dict(zip(systems, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, data in systems.items():
        if "batch" in data:
            axes[0].axhline(data["batch"]["output_tokens_per_s"], color=colors[name], linestyle=":",
                            label=f"{name} (whole batch of {data['batch']['requests']})")
            continue
        xs = [p["x"] for p in data["points"]]
        axes[0].plot(xs, [p["output_tokens_per_s"] for p in data["points"]], "o-", color=colors[name], label=name)
        for ax, key in ((axes[1], "latency_s"), (axes[2], "ttft_s")):
            for q, style in zip(PERCENTILES, ("o-", "s--", "^:")):
                ys = [p[key][f"p{q}"] for p in data["points"]]
                ax.plot(xs, [np.nan if y is None else y for y in ys], style, color=colors[name], label=f"{name} p{q}")
    for ax, title, unit in ((axes[0], "throughput", "output tokens / s"), (axes[1], "end-to-end latency", "s"),
                            (axes[2], "time to first token", "s")):
        ax.set(title=title, xlabel=xname, ylabel=unit)
        ax.set_xticks(results["workload"]["points"] if "points" in results["workload"] else ax.get_xticks())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    w = results["workload"]
    fig.suptitle(f"{results['model']}: prompt {w['input_tokens']} tokens, {w['output_tokens']} output tokens, "
                 f"{w['requests_per_point']} requests per point")
    fig.tight_layout()
    paths = [stem.with_name(stem.name + "-sweep.png"), stem.with_name(stem.name + "-ttft.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, data in systems.items():
        for p, style in zip(data.get("points", []), ("-", "--", ":", "-.") * 8):
            ttft = sorted(r["ttft_s"] for r in p["per_request"] if r["ttft_s"] is not None)
            if ttft:
                ax.step(ttft, np.arange(1, len(ttft) + 1) / len(ttft), style, where="post", color=colors[name],
                        label=f"{name}, {xname} {p['x']:g}")
    ax.set(title="TTFT distribution", xlabel="time to first token (s)", ylabel="fraction of requests", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
