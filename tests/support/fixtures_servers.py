"""Fixtures (a plugin, loaded by tests/conftest.py): the real servers, and throw-away databases,
topics and groups on them. Everything a test creates there is removed afterwards."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import psycopg
import pytest

from tests.support.db import admin_conn, drop_database
from tests.support.kafka import delete_groups, delete_groups_named, delete_topics
from tests.support.servers import external, make_sandbox, unavailable

if TYPE_CHECKING:
    from outbox.dev.sandbox import Sandbox


@pytest.fixture(scope="session")
def servers() -> dict[str, str]:
    """Environment for libpq and Kafka clients that reaches the test servers (tests/support/servers.py)."""
    if external():
        env = {k: os.environ[k] for k in ("PGHOST", "PGPORT", "PGUSER", "KAFKA_BOOTSTRAP_SERVERS") if k in os.environ}
        if len(env) < 4:
            unavailable("OUTBOX_TEST_EXTERNAL=1 needs PGHOST, PGPORT, PGUSER and KAFKA_BOOTSTRAP_SERVERS")
    else:
        from outbox.errors import OutboxError

        sandbox = make_sandbox()
        try:
            sandbox.up()
        except OutboxError as exc:
            unavailable(exc.message)
        env = sandbox.env()
    os.environ.update(env)  # libpq and our commands read these, as psql would
    try:
        psycopg.connect(dbname="postgres", connect_timeout=10).close()
    except psycopg.OperationalError as exc:
        unavailable(str(exc).strip().splitlines()[0])
    return env


@pytest.fixture(scope="session")
def kafka_bootstrap(servers: dict[str, str]) -> str:
    return servers["KAFKA_BOOTSTRAP_SERVERS"]


@pytest.fixture
def sandbox(servers: dict[str, str]) -> Iterator[Sandbox]:
    """The test sandbox itself, for tests that stop Kafka or restart PostgreSQL; both run again afterwards."""
    if external():
        unavailable("this test stops and starts servers: it needs the project's test sandbox, "
                    "not OUTBOX_TEST_EXTERNAL servers")
    box = make_sandbox()
    try:
        yield box
    finally:
        box.up()  # whatever the test left stopped


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

    So are topics named ``__<prefix>...`` (a relay's offsets topic in exactly-once tests) and the
    consumer groups named so (the relay's per-source position groups, ``<offsets topic>.<source id>``).
    """
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    asyncio.run(delete_topics(kafka_bootstrap, prefix))
    asyncio.run(delete_groups_named(kafka_bootstrap, "__" + prefix))


@pytest.fixture
def group(kafka_bootstrap: str) -> Iterator[Callable[..., str]]:
    """Factory of consumer group names of this test's own, deleted afterwards."""
    made: list[str] = []

    def make(name: str | None = None) -> str:
        """A new group name, or ``name`` (a group the test makes some other way) to delete afterwards."""
        made.append(name or f"g{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    if made:
        asyncio.run(delete_groups(kafka_bootstrap, made))


@pytest.fixture
def readstore_db(new_database: Callable[..., str]) -> str:
    """A database with the read store's schema migrated."""
    from outbox.consumers import readstore as rs

    dsn = new_database("rs")
    rs.migrate(dsn)
    return dsn
