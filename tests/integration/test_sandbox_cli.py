"""``outbox dev`` for real: a throw-away sandbox on ports of its own, driven through the CLI.

It starts PostgreSQL and Kafka in a temporary directory, checks them with psql and kcat, stops
and restarts them (data survives), and always stops them and removes the directory at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox.dev import sandbox as sb
from outbox.errors import SandboxError

pytestmark = pytest.mark.integration

PG_PORT = int(os.environ.get("OUTBOX_TEST_SANDBOX_CLI_PG_PORT", "54349"))
KAFKA_PORT = int(os.environ.get("OUTBOX_TEST_SANDBOX_CLI_KAFKA_PORT", "39292"))
OUTBOX = [sys.executable, "-m", "outbox.cli"]


def _clean_env() -> dict[str, str]:
    """Our environment without anything that points at another sandbox or server."""
    drop = ("PG", "KAFKA_", "OUTBOX_SANDBOX_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env=env if env is not None else _clean_env())


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    return run(*OUTBOX, "dev", *args)


def _require_tools() -> None:
    try:
        sb.find_pg_bindir(os.environ, os.geteuid())
        sb.find_java(os.environ, os.geteuid())
    except SandboxError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(exc.message, pytrace=False)
        pytest.skip(exc.message)
    for tool in ("psql", "kcat"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not on PATH")
    busy = [p for p in (PG_PORT, KAFKA_PORT, KAFKA_PORT + 1) if sb.port_in_use(p)]
    if busy:
        pytest.fail(f"ports {busy} on 127.0.0.1 are taken: free them or set OUTBOX_TEST_SANDBOX_CLI_*_PORT",
                    pytrace=False)


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A fresh sandbox directory under /tmp (reachable by the postgres OS user when we are root)."""
    _require_tools()
    directory = Path(tempfile.mkdtemp(prefix="outbox-sbx-"))
    try:
        yield directory
    finally:
        done = dev("down", "--dir", str(directory))
        shutil.rmtree(directory, ignore_errors=True)
        assert done.returncode == 0, done.stderr


def exports(directory: Path) -> dict[str, str]:
    out = dev("env", "--dir", str(directory))
    assert out.returncode == 0, out.stderr
    return dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())


def psql(directory: Path, sql: str) -> str:
    """psql after ``eval "$(outbox dev env)"``, exactly as a developer would run it."""
    script = f'eval "$({" ".join(OUTBOX)} dev env --dir {directory})" && psql -X -v ON_ERROR_STOP=1 -Atc "$1"'
    out = run("bash", "-c", script, "bash", sql)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def kcat(*args: str, stdin: str = "") -> str:
    out = subprocess.run(["kcat", "-b", f"127.0.0.1:{KAFKA_PORT}", *args], input=stdin, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_up_status_env_down_up_keeps_data(sandbox_dir: Path) -> None:
    d = str(sandbox_dir)
    first = dev("up", "--dir", d, "--pg-port", str(PG_PORT), "--kafka-port", str(KAFKA_PORT))
    assert first.returncode == 0, first.stderr
    assert f"Kafka ready on 127.0.0.1:{KAFKA_PORT}" in first.stderr

    again = dev("up", "--dir", d)  # ports come from the record now
    assert again.returncode == 0, again.stderr
    assert "PostgreSQL already running" in again.stderr and "Kafka already running" in again.stderr
    moved = dev("up", "--dir", d, "--kafka-port", str(KAFKA_PORT + 10))
    assert moved.returncode == 1 and len(moved.stderr.strip().splitlines()) == 1
    assert moved.stderr.startswith(f"Error: the sandbox in {d} uses PostgreSQL port {PG_PORT}")

    status = dev("status", "--dir", d)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running (pid") == 2

    env = exports(sandbox_dir)
    assert env["PGPORT"] == str(PG_PORT) and env["PGUSER"] == "outbox"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{KAFKA_PORT}"
    assert psql(sandbox_dir, "SHOW wal_level") == "logical"
    assert psql(sandbox_dir, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == "t"
    psql(sandbox_dir, "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('before down')")

    metadata = json.loads(kcat("-L", "-J", "-m", "30"))
    assert [(b["id"], b["name"]) for b in metadata["brokers"]] == [(1, f"127.0.0.1:{KAFKA_PORT}")]
    assert sb.kafka_metadata_ok(KAFKA_PORT)  # the readiness probe `up` waits on
    assert not sb.kafka_metadata_ok(PG_PORT, timeout=0.5)  # not Kafka: no Metadata answer
    topic = f"sbx{uuid.uuid4().hex[:8]}"
    kcat("-P", "-t", topic, "-m", "30", stdin="hello\n")  # auto-creates the topic

    down = dev("down", "--dir", d)
    assert down.returncode == 0, down.stderr
    stopped = dev("status", "--dir", d)
    assert stopped.returncode == 3 and stopped.stdout.count("stopped") == 2
    assert not any(sb.port_in_use(p) for p in (PG_PORT, KAFKA_PORT, KAFKA_PORT + 1))
    assert dev("down", "--dir", d).returncode == 0  # idempotent

    restart = dev("up", "--dir", d)
    assert restart.returncode == 0, restart.stderr
    assert psql(sandbox_dir, "SELECT note FROM kept") == "before down"
    assert kcat("-C", "-t", topic, "-o", "beginning", "-c", "1", "-e", "-m", "30").strip() == "hello"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands PostgreSQL to the postgres OS user")
def test_root_refuses_a_directory_postgres_cannot_enter(sandbox_dir: Path) -> None:
    sandbox_dir.chmod(0o755)
    private = sandbox_dir / "private"
    private.mkdir(mode=0o700)
    out = dev("up", "--dir", str(private / "sbx"), "--pg-port", str(PG_PORT), "--kafka-port", str(KAFKA_PORT))
    assert out.returncode == 1
    line = out.stderr.strip()
    assert "cannot enter" in line and str(private) in line and len(line.splitlines()) == 1
    assert not sb.port_in_use(PG_PORT)
