"""Bad input against the real servers: DDL while streaming, awkward types, tables without a
primary key, and a PostgreSQL cluster whose wal_level is not logical (a real second cluster)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.dev.pos import POS_CAPTURES, POS_SCHEMA
from outbox.dev.sandbox import find_pg_bindir, pg_os_user
from tests.support.kafka import kcat_read, wait_for_records
from tests.support.processes import RelayProcess, outbox

pytestmark = pytest.mark.integration


def values_by_id(bootstrap: str, topic: str, count: int) -> list[tuple[str, str]]:
    """(ce_id, value text) of the topic's first ``count`` records, in order."""
    got = wait_for_records(bootstrap, [topic], count)[topic]
    assert len(got) >= count, f"{len(got)} of {count} records on {topic}"
    return [(r["headers"]["ce_id"], r["payload"]) for r in got]


def change(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...], image_of: str, key: int) -> str:
    """Run one captured change and return to_jsonb of the row as it is now, in the same transaction
    (a delete returns the image before it): what the event value must be, byte for byte."""
    before = conn.execute(f"SELECT to_jsonb(t)::text FROM {image_of} t WHERE id = %s", (key,)).fetchone()
    conn.execute(sql, params)
    after = conn.execute(f"SELECT to_jsonb(t)::text FROM {image_of} t WHERE id = %s", (key,)).fetchone()
    conn.commit()
    return (after or before)[0]  # type: ignore[index]


# --------------------------------------------------------------------------- DDL while streaming
def test_ddl_on_a_captured_table_while_the_relay_streams(store: str, topic_prefix: str, kafka_bootstrap: str,
                                                         relays: Callable[..., RelayProcess]) -> None:
    relay = relays(store, "s1", topic_prefix, kafka_bootstrap).start()
    expected: list[str] = []
    with psycopg.connect(store) as conn:
        cid = conn.execute("INSERT INTO pos.customers (name, email, phone) VALUES ('Ada', 'ada@example.com', '+1') RETURNING id"
                           ).fetchone()[0]  # type: ignore[index]
        conn.commit()
        expected.append(conn.execute("SELECT to_jsonb(c)::text FROM pos.customers c WHERE id = %s", (cid,)).fetchone()[0])  # type: ignore[index]
        conn.commit()
        steps = [
            ("ALTER TABLE pos.customers ADD COLUMN tier text NOT NULL DEFAULT 'gold'", "UPDATE pos.customers SET tier = 'platinum' WHERE id = %s"),
            ("ALTER TABLE pos.customers DROP COLUMN phone", "UPDATE pos.customers SET loyalty_pts = 7 WHERE id = %s"),
            ("ALTER TABLE pos.customers RENAME COLUMN email TO mail", "UPDATE pos.customers SET mail = 'ada@example.org' WHERE id = %s"),
        ]
        for ddl, dml in steps:
            conn.execute(ddl)
            conn.commit()
            expected.append(change(conn, dml, (cid,), "pos.customers", cid))
        # orders keep flowing on another topic, and the changed table keeps its key and its deletes
        conn.execute("INSERT INTO pos.orders (customer_id) VALUES (%s)", (cid,))
        conn.commit()
        expected.append(change(conn, "DELETE FROM pos.customers WHERE id = %s", (cid,), "pos.customers", cid))
    got = values_by_id(kafka_bootstrap, f"{topic_prefix}.customer", len(expected))
    assert [value for _, value in got] == expected
    shapes = [sorted(json.loads(v)) for _, v in got]
    assert "tier" not in shapes[0] and "tier" in shapes[1] and "phone" in shapes[1]
    assert "phone" not in shapes[2] and "email" in shapes[2]
    assert "email" not in shapes[3] and "mail" in shapes[3]
    types = [r["headers"]["ce_type"] for r in kcat_read(kafka_bootstrap, f"{topic_prefix}.customer")]
    assert types == ["customer.created", "customer.updated", "customer.updated", "customer.updated", "customer.deleted"]
    assert len(wait_for_records(kafka_bootstrap, [f"{topic_prefix}.order"], 2)[f"{topic_prefix}.order"]) == 2  # created, and SET NULL
    assert relay.proc is not None and relay.proc.poll() is None, f"the relay stopped: {relay.output()}"


# --------------------------------------------------------------------------- types
TYPED = """
CREATE TABLE pos.typed (
    id serial PRIMARY KEY,
    big numeric, tenth numeric(3,1), dbl double precision, ts timestamptz, d date, iv interval,
    raw bytea, ints integer[], texts text[], grid numeric[][], doc json, docb jsonb, txt text, nothing text, u uuid
)"""

ROWS = [
    # exact decimals, big and small; a double that is not exactly 0.1
    ("big, tenth, dbl", "12345678901234567890.123456789012345678, 0.1, 0.1"),
    ("big, dbl", "-0.000000000000000000000000000001, 1e308"),
    ("big", "'NaN'"),
    # non-ASCII text: emoji (with ZWJ and skin tone), CJK, combining marks, right-to-left, escapes
    ("txt, texts", "'👩🏽‍💻 李雷 é (e + U+0301) שלום \"quoted\" back\\slash tab\tnewline\n', ARRAY['ü', NULL, '', 'a,b', '{x}']"),
    ("ts, d, iv", "'2026-03-29 01:30:00.123456+01', '0001-01-01', '1 year 2 mons 3 days 04:05:06.789'"),
    ("ts", "'infinity'"),
    ("raw", "'\\x00ff10'::bytea"),
    ("ints, grid", "ARRAY[1, NULL, -2147483648], ARRAY[[1.10, 2.2], [3, NULL]]"),
    ("doc, docb", "'{\"b\": 1, \"a\": [1.000, 2e3], \"a\": \"dup\", \"n\": 12345678901234567890.1234567890}', "
                  "'{\"z\": null, \"nested\": {\"π\": 3.14159265358979323846264338327950288}, \"emoji\": \"🎉\"}'"),
    ("docb", "'\"just a string\"'"),
    ("nothing, u", "NULL, '6c0f7d6e-1b2a-4c3d-9e8f-0123456789ab'"),
]


def test_types_are_preserved_exactly_in_the_event_value(new_database: Callable[..., str], topic_prefix: str,
                                                          kafka_bootstrap: str, relays: Callable[..., RelayProcess]) -> None:
    dsn = new_database("types")
    with psycopg.connect(dsn) as conn:
        conn.execute(POS_SCHEMA)
        conn.execute(TYPED)
    outbox("install", "--dsn", dsn, "--capture", "pos.typed=typed")
    relay = relays(dsn, "s1", topic_prefix, kafka_bootstrap).start()
    expected: dict[str, str] = {}
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")  # the image is rendered in the writer's zone, offset included
        for columns, values in ROWS:
            key = conn.execute(f"INSERT INTO pos.typed ({columns}) VALUES ({values}) RETURNING id").fetchone()[0]  # type: ignore[index]
            expected[str(key)] = conn.execute("SELECT to_jsonb(t)::text FROM pos.typed t WHERE id = %s", (key,)).fetchone()[0]  # type: ignore[index]
            conn.commit()
    topic = f"{topic_prefix}.typed"
    records = wait_for_records(kafka_bootstrap, [topic], len(expected))[topic]
    got = {r["headers"]["ce_subject"]: r["payload"] for r in records}
    assert got == expected  # the JSON text, compared as text: no float parsing anywhere
    text = "\n".join(got.values())
    for exact in ('"big": 12345678901234567890.123456789012345678', '"tenth": 0.1', '"dbl": 0.1', '"dbl": 1' + '0' * 308 + ',',
                  '"big": -0.000000000000000000000000000001', '"big": "NaN"', '"raw": "\\\\x00ff10"',
                  '"ts": "2026-03-29T06:00:00.123456+05:30"', '"ts": "infinity"', '"ints": [1, null, -2147483648]',
                  '"grid": [[1.10, 2.2], [3, null]]',
                  '"doc": {"a": "dup", "b": 1, "n": 12345678901234567890.1234567890}',
                  '"π": 3.14159265358979323846264338327950288', '"emoji": "🎉"', '"docb": "just a string"',
                  '"nothing": null', '👩🏽\u200d💻 李雷 é'):
        assert exact in text, f"{exact!r} not in the event values"
    assert relay.proc is not None and relay.proc.poll() is None


# --------------------------------------------------------------------------- a table without a primary key
def test_a_table_with_only_a_unique_index_is_refused_in_one_line(new_database: Callable[..., str]) -> None:
    """(test_install.py covers a table with no key at all.) A unique index is not a primary key:
    its columns may be NULL, so it cannot name an aggregate; install says so and changes nothing."""
    dsn = new_database("nopk")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE SCHEMA pos; CREATE TABLE pos.tills (code text UNIQUE, opened_at timestamptz)")
    proc = outbox("install", "--dsn", dsn, "--capture", "pos.tills=till", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "table pos.tills has no primary key: add one" in proc.stderr
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'").fetchone()[0] == 0  # type: ignore[index]


# --------------------------------------------------------------------------- wal_level = replica
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def replica_cluster() -> Iterator[str]:
    """A real second PostgreSQL 15 cluster with wal_level = replica, in a temporary directory,
    run as the PostgreSQL OS user; stopped and removed afterwards. Yields a DSN of its database 'store'."""
    bindir = find_pg_bindir(os.environ, os.geteuid())
    user = pg_os_user(os.geteuid())
    root = Path(tempfile.mkdtemp(prefix="outbox-replica-"))
    root.chmod(0o755)
    data = root / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def run(*cmd: str) -> None:
        done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=120,
                              user=user.uid if user.switch else None, group=user.gid if user.switch else None,
                              extra_groups=[] if user.switch else None)
        assert done.returncode == 0, f"{Path(cmd[0]).name} failed: {done.stdout}{done.stderr}"

    user.chown(root)
    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "outbox", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "-o",
            f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -c wal_level=replica",
            "start")
        started = True
        base = f"host=127.0.0.1 port={port} user=outbox"
        with psycopg.connect(f"{base} dbname=postgres", autocommit=True) as conn:
            assert conn.execute("SHOW wal_level").fetchone()[0] == "replica"  # type: ignore[index]
            conn.execute("CREATE DATABASE store")
        with psycopg.connect(f"{base} dbname=store") as conn:
            conn.execute(POS_SCHEMA)
        yield f"{base} dbname=store"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_wal_level_replica_is_refused_at_install_in_one_line(replica_cluster: str) -> None:
    captures = [a for table, (agg, _) in POS_CAPTURES.items() for a in ("--capture", f"{table}={agg}")]
    proc = outbox("install", "--dsn", replica_cluster, *captures, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "wal_level is 'replica'" in proc.stderr and "set wal_level = logical" in proc.stderr
    with psycopg.connect(replica_cluster) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'").fetchone()[0] == 0  # type: ignore[index]


def test_wal_level_replica_is_refused_at_relay_start_in_one_line(replica_cluster: str, kafka_bootstrap: str) -> None:
    started = time.monotonic()
    proc = outbox("relay", "--dsn", replica_cluster, "--source-id", "s1", "--kafka-bootstrap", kafka_bootstrap, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "wal_level is 'replica'" in lines[0] and "set wal_level = logical" in lines[0], proc.stderr
    assert time.monotonic() - started < 60  # refused, not retried as if the server were down
