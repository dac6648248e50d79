"""``python -m bench delivery``: what exactly-once costs, as interleaved A/B runs of both delivery modes.

Each run measures both modes back to back, alternating which goes first (A B, B A, A B, ...),
so that drifts of a shared machine fall on both alike; figures are medians over runs.

- throughput: the ``relay`` benchmark's backlog measurement (relay only, no baselines): N
  events of mixed transaction sizes committed while nothing reads the slot, then the relay's
  time from process start until every event is visible to a ``read_committed`` consumer (end
  offsets grew by N and a last sentinel event arrived: in exactly-once mode end offsets also
  count transaction markers);
- latency: the ``latency`` benchmark's pipeline (relay → Kafka → read store) at fixed rates;
  commit→consumer is when a ``read_committed`` consumer received the event (in exactly-once mode
  only committed Kafka transactions are visible), commit→read store when its row was applied.
"""
from __future__ import annotations

from typing import Any

from bench import latency, relay_throughput
from bench.common import DELIVERIES, Result, figure, median, say, spread

NAME = "delivery"
SHORT = {"at-least-once": "ALO", "exactly-once": "EOS"}


async def run(quick: bool, runs: int | None = None) -> Result:
    runs = runs or (1 if quick else 3)
    events = 10_000 if quick else 100_000
    rates = [1000] if quick else [1000, 5000]
    seconds = 3.0 if quick else 10.0
    result = Result(NAME, quick, params={"runs": runs, "order": "interleaved, alternating which mode goes first",
                                          "throughput_events": events, "latency_rates": rates,
                                          "latency_seconds": seconds, "relay_defaults": "transaction interval 0.1 s, "
                                          "10,000 events max per Kafka transaction (exactly-once)"})
    for i in range(runs):
        order = DELIVERIES if i % 2 == 0 else tuple(reversed(DELIVERIES))
        for mode in order:
            measured = await relay_throughput.run(quick, events=events, runs=1, delivery=mode, baselines=False)
            result.runs.append({"run": i + 1, "delivery": mode, "kind": "throughput", **measured.runs[0]})
            say(f"run {i + 1}/{runs} {mode}: {measured.runs[0]['relay_events_per_s']:,.0f} events/s (backlog)")
        for mode in order:
            measured = await latency.run(quick, rates=rates, seconds=seconds, runs=1, delivery=mode, report=False)
            result.runs.extend({"delivery": mode, "kind": "latency", **r, "run": i + 1} for r in measured.runs)

    print(f"delivery: at-least-once (ALO) vs exactly-once (EOS), {runs} interleaved run(s), medians")
    for mode in DELIVERIES:
        rows = [r for r in result.runs if r["delivery"] == mode and r["kind"] == "throughput"]
        values = [r["relay_events_per_s"] for r in rows]
        result.figures[f"{mode} events_per_s"] = median(values)
        figure(NAME, f"{SHORT[mode]} relay backlog throughput", median(values), "events/s", spread(values))
    alo, eos = (result.figures[f"{m} events_per_s"] for m in DELIVERIES)
    result.figures["eos_throughput_ratio"] = eos / alo
    figure(NAME, "EOS / ALO throughput", eos / alo, "x")
    for rate in rates:
        for mode in DELIVERIES:
            rows = [r for r in result.runs if r["delivery"] == mode and r["kind"] == "latency" and r["rate"] == rate]
            fig: dict[str, Any] = {}
            for hop, label in (("consumer_ms", "commit→consumer"), ("readstore_ms", "commit→read store")):
                fig[hop] = {q: median([r[hop][q] for r in rows]) for q in ("p50", "p95", "p99")}
                for q in ("p50", "p99"):
                    figure(NAME, f"{rate // 1000}k/s {SHORT[mode]} {label} {q}", fig[hop][q], "ms",
                           spread([r[hop][q] for r in rows]))
            result.figures[f"{mode} {rate}"] = fig
    result.save()
    return result
