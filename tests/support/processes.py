"""``outbox`` commands as real processes (so tests can SIGKILL, SIGSTOP and SIGTERM them)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psycopg

from tests.support.checksums import readstore_checksum, source_checksum
from tests.support.wait import wait_until

OUTBOX = [sys.executable, "-m", "outbox.cli"]
NO_CONFIG = {"OUTBOX_CONFIG": ""}  # a developer's configuration file never leaks into a test


def outbox(*args: str, check: bool = True, timeout: float = 180, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``outbox ARGS`` to its end; ``check``: fail, with its stderr, unless it exits 0.

    Its stdin is ``stdin`` (no terminal: a command that would ask refuses instead).
    """
    proc = subprocess.run(OUTBOX + list(args), capture_output=True, text=True, timeout=timeout, input=stdin,
                          env={**os.environ, **NO_CONFIG})
    if check and proc.returncode != 0:
        raise AssertionError(f"outbox {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


class OutboxProcess:
    """An ``outbox ...`` command running in the background, its output in a log file."""

    def __init__(self, *args: str, name: str = "outbox", env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.env = env
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OutboxProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(OUTBOX + self.args, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **NO_CONFIG, **(self.env or {})})
        return self

    def assert_running(self) -> None:
        """AssertionError, with its output, unless the process was started and has not exited."""
        assert self.proc is not None, f"{self.args[0]} was never started"
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.args[0]} exited {self.proc.returncode}: {self.output()}")

    def wait_for_output(self, text: str, timeout: float = 30) -> str:
        """Wait until the process printed ``text``; returns the first line holding it."""
        def line() -> str | None:
            found = next((ln for ln in self.log.read_text(errors="replace").splitlines() if text in ln), None)
            if found is None:
                self.assert_running()
            return found

        found = wait_until(line, timeout=timeout, interval=0.05,
                           message=lambda: f"{self.args[0]} to print {text!r}: {self.output()}")
        assert found is not None  # a falsy value does not end the wait
        return found

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

    def start(self, wait: bool = True) -> RelayProcess:
        super().start()
        if wait:
            self.wait_streaming()
        return self

    def wait_streaming(self, timeout: float = 30) -> None:
        """Wait until the store's slot is active (this relay, or one it replaced, streams it)."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            def active() -> bool:
                self.assert_running()
                return conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = current_database() AND active"
                                    ).fetchone() is not None

            wait_until(active, timeout=timeout, interval=0.05, message=lambda: f"the relay to stream: {self.output()}")


class ConsumerProcess(OutboxProcess):
    """``outbox consume readstore`` as a real process."""

    def __init__(self, dsn: str, prefix: str, bootstrap: str, group: str, env: dict[str, str] | None = None) -> None:
        super().__init__("consume", "readstore", "--dsn", dsn, "--kafka-bootstrap", bootstrap, "--topic-prefix", prefix,
                         "--group", group, name="readstore", env=env)
        self.dsn = dsn

    def start(self) -> ConsumerProcess:
        super().start()
        return self


def wait_converged(readstore: str, stores: dict[str, str], procs: list[OutboxProcess], timeout: float = 120) -> dict[str, Any]:
    """Wait until the read store holds exactly the stores' legacy rows; every process must keep running."""
    expected = {}
    for source, dsn in stores.items():
        with psycopg.connect(dsn) as conn:
            expected[source] = source_checksum(conn)
    with psycopg.connect(readstore, autocommit=True) as conn:
        def actual() -> dict[str, Any]:
            for p in procs:
                p.assert_running()
            try:
                return {s: readstore_checksum(conn, s) for s in stores}
            except psycopg.errors.UndefinedTable:  # the consumer has not migrated the read store yet
                return {}

        return wait_until(actual, timeout=timeout, interval=0.3, until=lambda got: got == expected,
                          message=f"the read store to converge to {expected}")
