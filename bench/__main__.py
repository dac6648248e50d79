"""``python -m bench <name> [--quick]``: run a benchmark, print its figures, save them under bench/results/.

``python -m bench all [--quick]`` runs every benchmark; ``python -m bench plot`` draws the PNG
plots in docs/ from the newest saved full runs (needs matplotlib: pip install -e '.[bench]').
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from bench.common import DELIVERIES, ensure_servers, quiet_logs

BENCHMARKS = ("relay", "latency", "overhead", "consumer", "memory", "delivery", "backfill", "replay", "crm")


def _runner(name: str) -> Callable[[bool], Any]:
    if name == "relay":
        from bench import relay_throughput as mod
    elif name == "latency":
        from bench import latency as mod  # type: ignore[no-redef]
    elif name == "overhead":
        from bench import overhead as mod  # type: ignore[no-redef]
    elif name == "consumer":
        from bench import consumer as mod  # type: ignore[no-redef]
    elif name == "memory":
        from bench import memory as mod  # type: ignore[no-redef]
    elif name == "crm":
        from bench import crm as mod  # type: ignore[no-redef]
    elif name == "delivery":
        from bench import delivery as mod  # type: ignore[no-redef]
    elif name == "backfill":
        from bench import backfill as mod  # type: ignore[no-redef]
    elif name == "replay":
        from bench import replay as mod  # type: ignore[no-redef]
    else:
        raise click.UsageError(f"unknown benchmark {name}")
    return lambda quick, **kw: asyncio.run(mod.run(quick, **kw))


def _run(names: tuple[str, ...], quick: bool, **kw: Any) -> None:
    ensure_servers()
    with quiet_logs():
        for name in names:
            started = time.monotonic()
            print(f"== {name}{' (quick)' if quick else ''}", flush=True)
            _runner(name)(quick, **kw)
            print(f"== {name} took {time.monotonic() - started:.1f} s", flush=True)


@click.group()
def main() -> None:
    """Benchmarks of the outbox relay against the physical limits of the machine."""


def _command(name: str, doc: str, delivery: bool = False) -> None:
    @click.option("--quick", is_flag=True, help="A short run printing the same figures (CI smoke test).")
    def command(quick: bool, **kw: Any) -> None:
        _run((name,) if name != "all" else BENCHMARKS, quick, **kw)

    if delivery:
        command = click.option("--delivery", type=click.Choice(DELIVERIES), default=DELIVERIES[0], show_default=True,
                               help="The relay's --delivery mode ('python -m bench delivery' compares both).")(command)
    main.command(name, help=doc)(command)


_command("relay", "Backlog throughput of outbox relay vs pg_recvlogical and kcat.", delivery=True)
_command("latency", "Commit-to-Kafka and commit-to-read-store latency at fixed rates.", delivery=True)
_command("overhead", "pgbench TPS of a POS workload with and without capture triggers.")
_command("consumer", "Read-store apply rate.")
_command("memory", "Relay RSS idle and under load.")
_command("crm", "CRM sink throughput against the reference CRM at 0% and 30% failures.")
_command("delivery", "At-least-once vs exactly-once: throughput and latency, interleaved A/B runs.")
_command("backfill", "outbox backfill rows/s, alone and with a concurrent writer.")
_command("replay", "Time of a full replay of demo-like topics into the read store.")
_command("all", "Every benchmark, one after the other.")


@main.command("bigtxn")
@click.option("--rows", type=click.IntRange(min=1), default=None,
              help="Rows in the one transaction [default: 1,000,000; 50,000 with --quick].")
@click.option("--quick", is_flag=True, help="A short run printing the same figures (CI smoke test).")
def bigtxn(rows: int | None, quick: bool) -> None:
    """One transaction of N outbox rows: nothing in Kafka before its commit, peak relay RSS and time."""
    from bench import bigtxn as mod

    ensure_servers()
    with quiet_logs():
        started = time.monotonic()
        print(f"== bigtxn{' (quick)' if quick else ''}", flush=True)
        asyncio.run(mod.run(quick, rows))
        print(f"== bigtxn took {time.monotonic() - started:.1f} s", flush=True)


@main.command("plot")
@click.option("--out", "out_dir", default=None, help="Directory for the PNG files [default: docs/].")
def plot(out_dir: str | None) -> None:
    """Draw PNG plots into docs/ from the newest saved full (not --quick) results."""
    from bench.plot import plot_all

    for path in plot_all(out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
