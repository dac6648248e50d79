"""The reference CRM (``outbox dev crm``) as a process in tests, and its database for the checks."""
from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import psycopg

from tests.support.processes import OutboxProcess


class Crm:
    """The reference CRM as a process, and its database for the checks."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.proc = OutboxProcess("dev", "crm", "--port", "0", "--dsn", dsn, "--seed", "7", name="crm")
        self.url = ""

    def start(self) -> Crm:
        self.proc.start()
        line = self.proc.wait_for_output("listening on http://")
        self.url = re.search(r"(http://127\.0\.0\.1:\d+)", line).group(1)  # type: ignore[union-attr]
        return self

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def faults(self, **faults: Any) -> None:
        self.call("PUT", "/admin/faults", faults)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()
