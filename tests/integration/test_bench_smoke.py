"""Smoke test of the benchmarks: ``python -m bench all --quick`` runs, prints every figure, cleans up.

No timing is asserted: the figures depend on the machine. Only that each benchmark ran against
the test servers (never a sandbox of its own), printed its figure lines, saved its results, and
left no database, replication slot or topic behind.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.db import admin_conn
from tests.support.servers import ROOT
from tests.support.wait import wait_until

pytestmark = pytest.mark.integration

NUMBER = r"[\d,]+(\.\d+)?"
FIGURES = [
    rf"^relay\s+outbox relay \(backlog, from process start\)\s+{NUMBER} events/s",
    rf"^relay\s+outbox relay \(after first event\)\s+{NUMBER} events/s",
    rf"^relay\s+pg_recvlogical \(same slot type, /dev/null\)\s+{NUMBER} events/s",
    rf"^relay\s+kcat -P \(acks=all, idempotent\)\s+{NUMBER} events/s",
    rf"^relay\s+ratio to slower baseline \((pg_recvlogical|kcat)\)\s+{NUMBER} x",
    rf"^relay\s+relay peak RSS \(backlog\)\s+{NUMBER} MB",
    *[rf"^latency\s+{rate}k/s commit→{hop} {q}\s+{NUMBER} ms"
      for rate in (1, 5) for hop in ("Kafka", "read store") for q in ("p50", "p95", "p99", "max")],
    rf"^latency\s+5k/s achieved write rate\s+{NUMBER} events/s",
    rf"^overhead\s+TPS without capture triggers\s+{NUMBER} TPS",
    rf"^overhead\s+TPS with capture triggers\s+{NUMBER} TPS",
    rf"^overhead\s+capture overhead \(1 - with/without\)\s+-?{NUMBER} %",
    rf"^consumer\s+read-store apply \(after first batch\)\s+{NUMBER} events/s",
    rf"^consumer\s+read-store apply \(from start, group join incl\.\)\s+{NUMBER} events/s",
    rf"^memory\s+relay RSS idle\s+{NUMBER} MB",
    rf"^memory\s+relay RSS peak under load\s+{NUMBER} MB",
    *[rf"^crm\s+CRM sink at {f} failures\s+{NUMBER} events/s" for f in ("0%", "30%", r"30% \(Retry-After 0\)")],
    *[rf"^crm\s+calls retried at {f} failures\s+{NUMBER} %" for f in ("0%", "30%", r"30% \(Retry-After 0\)")],
    rf"^backfill\s+backfill alone\s+{NUMBER} rows/s",
    rf"^backfill\s+backfill with a concurrent writer\s+{NUMBER} rows/s",
    rf"^backfill\s+writer during the backfill\s+{NUMBER} tx/s",
    rf"^backfill\s+writer without a backfill\s+{NUMBER} tx/s",
    rf"^replay\s+full replay into the read store\s+{NUMBER} s",
    rf"^replay\s+full replay rate\s+{NUMBER} events/s",
    *[rf"^delivery\s+{mode} relay backlog throughput\s+{NUMBER} events/s" for mode in ("ALO", "EOS")],
    rf"^delivery\s+EOS / ALO throughput\s+{NUMBER} x",
    *[rf"^delivery\s+1k/s {mode} commit→{hop} {q}\s+{NUMBER} ms"
      for mode in ("ALO", "EOS") for hop in ("consumer", "read store") for q in ("p50", "p99")],
]


async def _bench_topics(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return [t for t in await admin.list_topics() if t.startswith(("bench-", "__bench-"))]
    finally:
        await admin.close()


def test_quick_suite_prints_every_figure_and_cleans_up(servers: dict[str, str], tmp_path: Path) -> None:
    env = dict(os.environ, OUTBOX_BENCH_RESULTS=str(tmp_path), PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", "bench", "all", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    missing = [p for p in FIGURES if not re.search(p, proc.stdout, re.MULTILINE)]
    assert not missing, f"figure lines missing: {missing}\n{proc.stdout}"
    saved = sorted(p.name.split("-")[0] for p in tmp_path.glob("*-quick.json"))
    assert saved == ["backfill", "consumer", "crm", "delivery", "latency", "memory", "overhead", "relay", "replay"]

    with admin_conn() as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%'").fetchall()
        slots = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE '%bench%'").fetchall()
    assert left == [] and slots == []
    # a deleted topic may stay listed for a moment
    wait_until(lambda: asyncio.run(_bench_topics(servers["KAFKA_BOOTSTRAP_SERVERS"])), timeout=15, interval=0.5,
               until=lambda topics: topics == [], message="the benchmarks' topics to be gone")
