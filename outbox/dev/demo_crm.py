"""``outbox demo --crm``: the reference CRM kept current from the stores, and an agent's edit back.

Started next to the demo's relays and read store: the reference CRM (database demo_crm), the CRM
sink (ledger demo_crmsink), the webhook receiver and one writeback per store. After the workload
the demo waits until the CRM holds every customer and order of every store, then edits one
contact as a sales agent would and waits until the edit is in the store's legacy table.
"""
from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from outbox import contract
from outbox.dev import oracles
from outbox.errors import OutboxError

CRM_DB = "demo_crm"
LEDGER_DB = "demo_crmsink"


def _wait_line(log: Path, pattern: str, procs: list[Any], timeout: float = 30) -> re.Match[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := re.search(pattern, log.read_text(errors="replace")):
            return found
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    raise OutboxError(f"a CRM process did not start: see {log}")


def call(url: str, method: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


class CrmDemo:
    """The CRM side of the demo: ``start`` spawns its processes through the demo's ``spawn``."""

    def __init__(self, spawn: Callable[[list[str], str], None], procs: list[Any], logdir: Path, bootstrap: str,
                 prefix: str, sources: dict[str, str]) -> None:
        self.spawn, self.procs, self.logdir = spawn, procs, logdir
        self.bootstrap, self.prefix, self.sources = bootstrap, prefix, sources  # source id -> store database
        self.url = ""

    def start(self) -> None:
        from outbox.dev.pos import recreate_database

        for name in (CRM_DB, LEDGER_DB):
            recreate_database(name)
        self.spawn(["dev", "crm", "--port", "0", "--dsn", f"dbname={CRM_DB}"], "crm.log")
        self.url = _wait_line(self.logdir / "crm.log", r"(http://127\.0\.0\.1:\d+)", self.procs).group(1)
        self.spawn(["consume", "crm", "--crm-url", self.url, "--dsn", f"dbname={LEDGER_DB}", "--kafka-bootstrap",
                    self.bootstrap, "--topic-prefix", self.prefix, "--group", f"{self.prefix}-crm", "--rate", "200",
                    "--burst", "20"], "crm-sink.log")
        topic = f"{self.prefix}-crm.changes"  # outside the event topics' pattern <prefix>.*
        self.spawn(["consume", "crm-webhook", "--kafka-bootstrap", self.bootstrap, "--port", "0", "--topic", topic],
                   "crm-webhook.log")
        port = _wait_line(self.logdir / "crm-webhook.log", r"127\.0\.0\.1:(\d+)/webhook", self.procs).group(1)
        call(f"{self.url}/admin/webhook", "PUT", {"url": f"http://127.0.0.1:{port}/webhook"})
        for source, db in self.sources.items():
            self.spawn(["consume", "crm-writeback", "--dsn", f"dbname={db}", "--source-id", source, "--kafka-bootstrap",
                        self.bootstrap, "--topic", topic, "--group", f"{self.prefix}-writeback-{source}"],
                       f"crm-writeback-{source}.log")

    def wait_converged(self, timeout: float) -> int:
        expected: dict[tuple[str, str], dict[str, Any]] = {}
        for source, db in self.sources.items():
            expected.update(oracles.expected_records(f"dbname={db}", source))
        deadline = time.time() + timeout
        while problems := oracles.differences(expected, f"dbname={CRM_DB}"):
            if time.time() > deadline:
                raise OutboxError(f"the CRM did not converge within {timeout:.0f} s ({len(problems)} differences, "
                                  f"e.g. {problems[0]}): see {self.logdir / 'crm-sink.log'}")
            time.sleep(0.5)
        return len(expected)

    def agent_edit(self, timeout: float = 60) -> tuple[str, float]:
        """Edit one contact as a sales agent; returns its external id and the seconds until the store had it."""
        source, db = next(iter(self.sources.items()))
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            cid = conn.execute("SELECT min(id) FROM pos.customers").fetchone()[0]  # type: ignore[index]
            external = contract.key_for(source, str(cid))
            phone = f"+49 30 {int(time.time()) % 10_000_000:07d}"
            started = time.time()
            call(f"{self.url}/v1/contacts/{external}", "PATCH", {"fields": {"phone": phone}}, {"X-CRM-Actor": "agent"})
            while conn.execute("SELECT phone FROM pos.customers WHERE id = %s", (cid,)).fetchone()[0] != phone:  # type: ignore[index]
                if time.time() - started > timeout:
                    raise OutboxError(f"the agent's edit did not reach {db} within {timeout:.0f} s: see the logs in "
                                      f"{self.logdir}")
                time.sleep(0.05)
        return external, time.time() - started
