"""``python -m bench plot``: PNG plots in docs/ from the newest saved results of each benchmark.

Full runs are preferred; when a benchmark has only --quick results, those are drawn and the
title says so. Needs matplotlib (``pip install -e '.[bench]'``); nothing else in bench does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT

TARGETS = {"kafka_ms": 50.0, "readstore_ms": 100.0, "apply": 20_000.0, "rss_mb": 100.0, "overhead_pct": 15.0}


def newest(benchmark: str, results: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The newest full result of a benchmark, else its newest quick one, else None."""
    found = []
    for path in results.glob(f"{benchmark}-*.json"):
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if body.get("benchmark") == benchmark:
            found.append((not body.get("quick"), body.get("started", ""), path.name, body))
    return max(found, key=lambda t: t[:3])[3] if found else None


def _title(body: dict[str, Any], text: str) -> str:
    m = body.get("machine", {})
    quick = " (QUICK RUN)" if body.get("quick") else ""
    return f"{text}{quick}\n{m.get('cores')} cores, PostgreSQL {str(m.get('postgresql', '?')).split()[0]}, " \
           f"Kafka {str(m.get('kafka', '?')).split()[0]}, {body.get('started', '')[:10]}"


def _bar_runs(ax: Any, labels: list[str], medians: list[float], runs: list[list[float]], colors: list[str]) -> None:
    xs = range(len(labels))
    ax.bar(xs, medians, color=colors, alpha=0.85)
    for x, values in zip(xs, runs):
        ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
    for x, v in zip(xs, medians):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=9, xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(xs), labels, fontsize=9)


def plot_relay(body: dict[str, Any], out: Path, plt: Any) -> Path:
    keys = [("relay_events_per_s", "outbox relay\n(from start)"), ("relay_streaming_events_per_s", "outbox relay\n(after 1st event)"),
            ("pg_recvlogical_events_per_s", "pg_recvlogical\n(same slot)"), ("kcat_events_per_s", "kcat -P\n(acks=all)")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bar_runs(ax, [label for _, label in keys], [body["figures"][k] for k, _ in keys],
              [[r[k] for r in body["runs"]] for k, _ in keys], ["#d62728", "#ff9896", "#1f77b4", "#2ca02c"])
    slower = min(body["figures"]["pg_recvlogical_events_per_s"], body["figures"]["kcat_events_per_s"])
    ax.axhline(0.5 * slower, color="gray", ls="--", lw=1, label="target: 0.5 × slower baseline")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylabel("events/s (bars: median, dots: runs)")
    ax.set_title(_title(body, f"Backlog throughput, {body['params']['events']:,} events"), fontsize=10)
    return _save(fig, out / "bench-relay.png", plt)


def plot_latency(body: dict[str, Any], out: Path, plt: Any) -> Path:
    rates = [int(r) for r in body["figures"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=False)
    for ax, hop, label, target in ((axes[0], "kafka_ms", "commit → Kafka (LogAppendTime)", TARGETS["kafka_ms"]),
                                   (axes[1], "readstore_ms", "commit → read store (applied_at)", TARGETS["readstore_ms"])):
        width = 0.2
        for j, q in enumerate(("p50", "p95", "p99", "max")):
            values = [body["figures"][str(r)][hop][q] for r in rates]
            xs = [i + (j - 1.5) * width for i in range(len(rates))]
            ax.bar(xs, values, width, label=q)
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target: p99 ≤ {target:.0f} ms at 5k/s")
        ax.set_xticks(range(len(rates)), [f"{r // 1000}k events/s" for r in rates])
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale, median over runs)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(_title(body, f"Latency at fixed rates, {body['params']['seconds']:.0f} s each"), fontsize=10)
    return _save(fig, out / "bench-latency.png", plt)


def plot_overhead(body: dict[str, Any], out: Path, plt: Any) -> Path:
    runs = body["runs"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [r["pair"] for r in runs]
    ax.plot(xs, [r["tps_without"] for r in runs], "o-", label="without capture triggers (A)")
    ax.plot(xs, [r["tps_with"] for r in runs], "s-", label="with capture triggers (B)")
    for r in runs:
        ax.annotate(f"−{r['overhead_pct']:.0f}%", (r["pair"], r["tps_with"]), ha="center", va="top", fontsize=8,
                    xytext=(0, -6), textcoords="offset points")
    ax.set_ylim(bottom=0)
    ax.set_xticks(xs)
    ax.set_xlabel("pair (runs interleaved A B A B …)")
    ax.set_ylabel("pgbench TPS")
    ax.legend(fontsize=8, loc="lower right")
    f = body["figures"]
    ax.set_title(_title(body, f"Capture overhead on a POS transaction: median {f['overhead_pct']:.1f}% (target ≤ 15%)"),
                 fontsize=10)
    return _save(fig, out / "bench-overhead.png", plt)


def plot_resources(consumer: dict[str, Any] | None, memory: dict[str, Any] | None, relay: dict[str, Any] | None,
                   out: Path, plt: Any) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    any_body = consumer or memory or relay
    if consumer:
        keys = [("steady_events_per_s", "after first batch"), ("events_per_s", "from start")]
        _bar_runs(axes[0], [label for _, label in keys], [consumer["figures"][k] for k, _ in keys],
                  [[r[k] for r in consumer["runs"]] for k, _ in keys], ["#9467bd", "#c5b0d5"])
        axes[0].axhline(TARGETS["apply"], color="gray", ls="--", lw=1, label="target ≥ 20k events/s")
        axes[0].legend(fontsize=8, loc="lower right")
        axes[0].set_ylabel("events/s")
        axes[0].set_title(f"Read-store apply, {consumer['params']['events']:,} events"
                          f"{' (QUICK)' if consumer.get('quick') else ''}", fontsize=10)
    labels, medians, runs = [], [], []
    if memory:
        for k, label in (("idle_mb", "idle"), ("load_peak_mb", "peak, live load"), ("after_mb", "after load")):
            labels.append(label)
            medians.append(memory["figures"][k])
            runs.append([r[k] for r in memory["runs"]])
    if relay:
        labels.append("peak, backlog")
        medians.append(relay["figures"]["relay_peak_rss_mb"])
        runs.append([r["relay_peak_rss_mb"] for r in relay["runs"]])
    if labels:
        _bar_runs(axes[1], labels, medians, runs, ["#8c564b"] * len(labels))
        axes[1].axhline(TARGETS["rss_mb"], color="gray", ls="--", lw=1, label="target ≤ 100 MB")
        axes[1].legend(fontsize=8, loc="lower right")
        axes[1].set_ylabel("relay VmRSS, MB")
        axes[1].set_title(f"Relay memory{' (QUICK)' if memory and memory.get('quick') else ''}", fontsize=10)
    if any_body:
        fig.suptitle(_title(any_body, "Read store and relay resources"), fontsize=10)
    return _save(fig, out / "bench-resources.png", plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(out_dir: str | None = None, results: Path = RESULTS_DIR) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("bench plot needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    out = Path(out_dir) if out_dir else ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bodies = {name: newest(name, results) for name in ("relay", "latency", "overhead", "consumer", "memory")}
    if bodies["relay"]:
        written.append(plot_relay(bodies["relay"], out, plt))
    if bodies["latency"]:
        written.append(plot_latency(bodies["latency"], out, plt))
    if bodies["overhead"]:
        written.append(plot_overhead(bodies["overhead"], out, plt))
    if bodies["consumer"] or bodies["memory"]:
        written.append(plot_resources(bodies["consumer"], bodies["memory"], bodies["relay"], out, plt))
    if not written:
        raise SystemExit(f"no results in {results}: run python -m bench all first")
    return written
