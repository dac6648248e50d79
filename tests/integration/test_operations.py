"""outbox doctor, outbox status and the least-privilege relay role, on the real servers."""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.support.db import admin_conn, install_pos
from tests.support.kafka import wait_for_records
from tests.support.processes import RelayProcess, outbox

pytestmark = pytest.mark.integration


@pytest.fixture
def relay_role(servers: dict[str, str]) -> Iterator[str]:
    """A role name of this test's own; the role is dropped afterwards (roles are cluster-wide)."""
    name = f"t_relay_{uuid.uuid4().hex[:8]}"
    yield name
    with admin_conn() as conn:
        databases = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datallowconn")]
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
            return
    for db in databases:  # its privileges in every database go first, then the role
        with psycopg.connect(dbname=db, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{name}"')
    with admin_conn() as conn:
        conn.execute(f'DROP ROLE "{name}"')


def doctor(*args: str) -> tuple[int, dict[str, dict[str, str]]]:
    proc = outbox("doctor", "--json", *args, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)["checks"]}


def test_relay_runs_as_least_privilege_role(new_database: Callable[..., str], relay_role: str,
                                            kafka_bootstrap: str, topic_prefix: str) -> None:
    dsn = new_database("ops")
    # before install: the outbox is missing (one failing check, with its fix), the server checks still run
    code, checks = doctor("--dsn", dsn)
    assert code == 1
    assert [n for n, c in checks.items() if c["status"] == "fail"] == ["outbox installed"]
    assert "outbox install" in checks["outbox installed"]["fix"]
    assert checks["wal_level"]["status"] == "pass" and "max_wal_senders" in checks

    install_pos(dsn)
    sql = outbox("install", "--dsn", dsn, "--relay-role", relay_role, "--sql").stdout
    assert f"CREATE ROLE {relay_role} LOGIN REPLICATION" in sql
    assert f"GRANT SELECT, INSERT, DELETE ON outbox.events TO {relay_role}" in sql
    out = outbox("install", "--dsn", dsn, "--capture", "pos.customers=customer", "--relay-role", relay_role).stdout
    assert f"relay role {relay_role} created" in out
    with admin_conn() as conn:
        row = conn.execute("SELECT rolsuper, rolreplication, rolcanlogin, rolcreatedb, rolcreaterole FROM pg_roles "
                           "WHERE rolname = %s", (relay_role,)).fetchone()
    assert row == (False, True, True, False, False)

    code, checks = doctor("--dsn", dsn, "--role", relay_role)
    assert code == 0, checks
    assert checks[f"role {relay_role}"]["detail"] == "REPLICATION"
    assert checks[f"role {relay_role} DELETE"]["status"] == "pass"
    assert checks[f"role {relay_role} INSERT"]["status"] == "pass"  # heartbeats
    assert checks["replication slot"]["status"] == "warn"  # inactive before the relay starts

    role_dsn = f"{dsn} user={relay_role}"
    relay = RelayProcess(role_dsn, "store1", topic_prefix, kafka_bootstrap, "--retention", "1").start()
    try:
        with psycopg.connect(dsn) as conn:
            conn.execute("INSERT INTO pos.customers (name) VALUES ('Zoë'), ('Ada')")
        got = wait_for_records(kafka_bootstrap, [f"{topic_prefix}.customer"], 2, timeout=30)
        assert len(got[f"{topic_prefix}.customer"]) == 2, relay.output()
        with admin_conn() as conn:
            user = conn.execute("SELECT usename FROM pg_stat_replication WHERE application_name = 'outbox-relay' "
                                "AND usename = %s", (relay_role,)).fetchone()
        assert user == (relay_role,)

        code, checks = doctor("--dsn", dsn, "--role", relay_role)
        assert code == 0 and "active (pid" in checks["replication slot"]["detail"], checks
        code, checks = doctor("--dsn", role_dsn)  # the role cannot read the outbox's own tables: one clear line
        assert code == 1 and "permission denied" in checks["read access"]["detail"]

        status = json.loads(outbox("status", "--json", "--dsn", dsn, "--dsn", "host=127.0.0.1 port=1 dbname=x").stdout)
        first, second = status["stores"]
        assert first["error"].startswith("unreachable: ") and "\n" not in first["error"]
        assert second["relay"] == "up" and second["slot"].startswith("outbox_ops_")
        assert isinstance(second["slot_lag_bytes"], int)
        assert relay.terminate() == 0, relay.output()
        assert "could not purge" not in relay.output() and "cannot write a heartbeat" not in relay.output()
    finally:
        relay.close()
    out = outbox("uninstall", "--dsn", dsn).stdout
    assert f"role {relay_role} is kept" in out and f"DROP ROLE {relay_role}" in out
    with admin_conn() as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (relay_role,)).fetchone()


def test_status_screen_and_missing_stores(new_database: Callable[..., str]) -> None:
    bare = new_database("ops")
    proc = outbox("status", "--dsn", bare, "--dsn", "host=127.0.0.1 port=1 dbname=x")
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("STORE")
    assert lines[2].startswith("127.0.0.1:1/x") and "unreachable:" in lines[2]
    assert "no slot" in lines[3]
    proc = outbox("status", check=False)
    assert proc.returncode == 2 and "--dsn" in proc.stderr and "Traceback" not in proc.stderr
