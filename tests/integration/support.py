"""Helpers for integration tests: a store database with the POS schema, relay processes, kcat."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from outbox.dev.demo import POS_CAPTURES, POS_SCHEMA, readstore_checksum, source_checksum

OUTBOX = [sys.executable, "-m", "outbox.cli"]


def outbox(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(OUTBOX + list(args), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"outbox {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def install_pos(dsn: str) -> None:
    """The legacy POS schema plus the outbox capturing its three tables."""
    with psycopg.connect(dsn) as conn:
        conn.execute(POS_SCHEMA)
    captures = [a for table, (agg, _) in POS_CAPTURES.items() for a in ("--capture", f"{table}={agg}")]
    outbox("install", "--dsn", dsn, *captures)


class OutboxProcess:
    """An ``outbox ...`` command as a real process, so tests can SIGKILL and SIGTERM it."""

    def __init__(self, *args: str, name: str = "outbox", env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.env = env
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "OutboxProcess":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(OUTBOX + self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env} if self.env else None)
        return self

    def wait_for_output(self, text: str, timeout: float = 30) -> str:
        """Wait until the process printed ``text``; returns the first line holding it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc is not None
            for line in self.log.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited {self.proc.returncode}: {self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.args[0]} did not print {text!r} within {timeout}s: {self.output()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.unlink(missing_ok=True)


class RelayProcess(OutboxProcess):
    """``outbox relay`` as a real process."""

    def __init__(self, dsn: str, source_id: str, prefix: str, bootstrap: str, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        super().__init__("relay", "--dsn", dsn, "--source-id", source_id, "--kafka-bootstrap", bootstrap,
                         "--topic-prefix", prefix, *extra, name="relay", env=env)
        self.dsn = dsn

    def start(self, wait: bool = True) -> "RelayProcess":
        super().start()
        if wait:
            self.wait_streaming()
        return self

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while time.time() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"relay exited {self.proc.returncode}: {self.output()}")
                if conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = current_database() AND active").fetchone():
                    return
                time.sleep(0.05)
        raise AssertionError(f"relay not streaming after {timeout}s: {self.output()}")


class ConsumerProcess(OutboxProcess):
    """``outbox consume readstore`` as a real process."""

    def __init__(self, dsn: str, prefix: str, bootstrap: str, group: str, env: dict[str, str] | None = None) -> None:
        super().__init__("consume", "readstore", "--dsn", dsn, "--kafka-bootstrap", bootstrap, "--topic-prefix", prefix,
                         "--group", group, name="readstore", env=env)
        self.dsn = dsn

    def start(self, wait: bool = False) -> "ConsumerProcess":
        super().start()
        return self


def wait_converged(readstore: str, stores: dict[str, str], procs: list[OutboxProcess], timeout: float = 120) -> dict[str, Any]:
    expected = {}
    for source, dsn in stores.items():
        with psycopg.connect(dsn) as conn:
            expected[source] = source_checksum(conn)
    deadline = time.time() + timeout
    actual: dict[str, Any] = {}
    with psycopg.connect(readstore, autocommit=True) as conn:
        while time.time() < deadline:
            for p in procs:
                assert p.proc is not None and p.proc.poll() is None, f"{p.args[0]} exited: {p.output()}"
            try:
                actual = {s: readstore_checksum(conn, s) for s in stores}
            except psycopg.errors.UndefinedTable:
                actual = {}
            if actual == expected:
                return actual
            time.sleep(0.3)
    raise AssertionError(f"read store did not converge: expected {expected}, got {actual}")


def kcat_read(bootstrap: str, topic: str, isolation: str = "read_committed") -> list[dict[str, Any]]:
    """Every record of a topic, read with kcat (an independent client), headers as a dict."""
    proc = subprocess.run(
        ["kcat", "-b", bootstrap, "-C", "-t", topic, "-J", "-e", "-q", "-o", "beginning", "-X", f"isolation.level={isolation}"],
        capture_output=True, text=True, timeout=60,
    )
    if proc.returncode != 0:
        if "Unknown topic" in proc.stderr or "UNKNOWN_TOPIC" in proc.stderr:
            return []
        raise AssertionError(f"kcat failed: {proc.stderr.strip()}")
    records = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        h = rec.get("headers") or []
        rec["headers"] = dict(zip(h[::2], h[1::2]))
        records.append(rec)
    return records


def wait_for_records(bootstrap: str, topics: list[str], count: int, timeout: float = 60) -> dict[str, list[dict[str, Any]]]:
    """Poll with kcat until the topics hold at least ``count`` records together."""
    deadline = time.time() + timeout
    while True:
        got = {t: kcat_read(bootstrap, t) for t in topics}
        total = sum(len(v) for v in got.values())
        if total >= count or time.time() > deadline:
            return got
        time.sleep(0.5)
