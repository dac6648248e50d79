"""Shared fixtures: real PostgreSQL and Kafka servers, throw-away databases and topics.

By default the session starts the project's own test sandbox (ports 25439 and 29192, apart from
a developer's sandbox) in ``$OUTBOX_TEST_SANDBOX_DIR``, else ``/var/lib/outbox-relay/test-sandbox``
as root or ``.pytest-sandbox/`` otherwise, and leaves it running for the next run;
``make clean-sandbox`` stops it. With ``OUTBOX_TEST_EXTERNAL=1`` the tests use the servers
named by PGHOST/PGPORT/PGUSER and KAFKA_BOOTSTRAP_SERVERS instead.

When a server cannot be had, integration tests fail under CI (CI=true) and skip elsewhere.
Everything a test creates on the servers (databases, replication slots, topics) is removed.
"""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.dev.demo import drop_database

ROOT = Path(__file__).resolve().parent.parent
# As root, PostgreSQL runs as the postgres user, which may not be able to enter the checkout
# (a clone under /root, say): the test sandbox then lives under /var/lib like the default one.
TEST_SANDBOX_DIR = Path(os.environ.get("OUTBOX_TEST_SANDBOX_DIR")
                        or ("/var/lib/outbox-relay/test-sandbox" if os.geteuid() == 0 else ROOT / ".pytest-sandbox"))
# Below Linux's ephemeral range (32768-60999): the fault tests stop and start the servers, and a
# client socket that happened to take a port of that range meanwhile made the restart fail to bind.
TEST_PG_PORT = int(os.environ.get("OUTBOX_TEST_PG_PORT", "25439"))
TEST_KAFKA_PORT = int(os.environ.get("OUTBOX_TEST_KAFKA_PORT", "29192"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"integration servers unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"integration servers unavailable: {reason}")


@pytest.fixture(scope="session")
def servers() -> dict[str, str]:
    """Environment for libpq and Kafka clients that reaches the test servers."""
    if os.environ.get("OUTBOX_TEST_EXTERNAL") == "1":
        env = {k: os.environ[k] for k in ("PGHOST", "PGPORT", "PGUSER", "KAFKA_BOOTSTRAP_SERVERS") if k in os.environ}
        if len(env) < 4:
            _unavailable("OUTBOX_TEST_EXTERNAL=1 needs PGHOST, PGPORT, PGUSER and KAFKA_BOOTSTRAP_SERVERS")
    else:
        from outbox.errors import OutboxError
        from outbox.dev.sandbox import Sandbox

        sandbox = Sandbox(TEST_SANDBOX_DIR, pg_port=TEST_PG_PORT, kafka_port=TEST_KAFKA_PORT)
        try:
            sandbox.up()
        except OutboxError as exc:
            _unavailable(exc.message)
        env = sandbox.env()
    os.environ.update(env)  # libpq and our commands read these, as psql would
    try:
        psycopg.connect(dbname="postgres", connect_timeout=10).close()
    except psycopg.OperationalError as exc:
        _unavailable(str(exc).strip().splitlines()[0])
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap(servers: dict[str, str]) -> str:
    return servers["KAFKA_BOOTSTRAP_SERVERS"]


def admin_conn() -> psycopg.Connection[Any]:
    return psycopg.connect(dbname="postgres", autocommit=True)


@pytest.fixture
def new_database(servers: dict[str, str]) -> Iterator[Callable[..., str]]:
    """Factory: ``dsn = new_database()`` creates an empty database and returns its DSN."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with admin_conn() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return f"dbname={name}"

    yield make
    for name in created:
        drop_database(name)


@pytest.fixture
def topic_prefix(kafka_bootstrap: str) -> Iterator[str]:
    """A topic prefix of this test's own; its topics are deleted afterwards.

    So are topics named ``__<prefix>...`` (a relay's offsets topic in exactly-once tests).
    """
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    asyncio.run(delete_topics(kafka_bootstrap, prefix))


async def delete_topics(bootstrap: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith((prefix + ".", "__" + prefix))]
        if topics:
            await admin.delete_topics(topics)
    finally:
        await admin.close()


@pytest.fixture
def readstore_db(new_database: Callable[..., str]) -> str:
    from outbox.consumers import readstore as rs

    dsn = new_database("rs")
    rs.migrate(dsn)
    return dsn


@pytest.fixture
def group(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory of consumer group names of this test's own, deleted afterwards."""
    made: list[str] = []

    def make(name: str | None = None) -> str:
        """A new group name, or ``name`` (a group the test makes some other way) to delete afterwards."""
        made.append(name or f"g{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make

    async def delete() -> None:
        # aiokafka 0.14's admin client has no delete_consumer_groups: send DeleteGroups to each
        # group's coordinator. Best effort: a group that never committed may be unknown.
        from aiokafka.protocol.admin import DeleteGroupsRequest

        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            for name in made:
                try:
                    node = await admin.find_coordinator(name)
                    await admin._send_request_to_node(node, DeleteGroupsRequest([name]))
                except Exception:  # noqa: BLE001
                    pass
        finally:
            await admin.close()

    if made:
        asyncio.run(delete())


@pytest.fixture
def sandbox(servers: dict[str, str]) -> Iterator[Any]:
    """The test sandbox itself, for tests that stop Kafka or restart PostgreSQL; both run again afterwards."""
    if os.environ.get("OUTBOX_TEST_EXTERNAL") == "1":
        _unavailable("this test stops and starts servers: it needs the project's test sandbox")
    from outbox.dev.sandbox import Sandbox

    box = Sandbox(TEST_SANDBOX_DIR, pg_port=TEST_PG_PORT, kafka_port=TEST_KAFKA_PORT)
    try:
        yield box
    finally:
        box.up()  # whatever the test left stopped
