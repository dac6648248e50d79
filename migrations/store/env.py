"""Alembic environment for the store side: the ``outbox`` schema in a store database.

Driven from code (``outbox.install``), never from an alembic.ini. The version table lives in
the ``outbox`` schema itself (``outbox.alembic_version``), so the legacy application's own
``public.alembic_version`` and tables are never read or written.

``config.attributes`` carries what the caller hands over:

* ``connection``: an open SQLAlchemy Connection, already in the caller's transaction (online);
* ``outbox_before`` / ``outbox_after``: SQL statements run in the same transaction, before and
  after the revisions (the schema that holds the version table; role grants), so that
  ``--sql`` prints exactly what the online run executes;
* ``outbox_lock_timeout``: seconds (default 2). The transaction starts with ``SET LOCAL
  lock_timeout``, so that no revision (one that alters outbox.events, which every captured write
  inserts into, or a legacy table) ever waits in a lock queue with the application's statements
  queued behind it for longer than that: the caller retries the whole transaction instead.
"""
from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import DDL

from outbox import contract
from outbox.lockwait import DEFAULT_LOCK_TIMEOUT, lock_timeout_sql

VERSION_TABLE = "alembic_version"

config = context.config


def _run() -> None:
    with context.begin_transaction():
        context.execute(_ddl(lock_timeout_sql(config.attributes.get("outbox_lock_timeout", DEFAULT_LOCK_TIMEOUT))))
        for stmt in config.attributes.get("outbox_before", ()):
            context.execute(_ddl(stmt))
        context.run_migrations()
        for stmt in config.attributes.get("outbox_after", ()):
            context.execute(_ddl(stmt))


def _ddl(stmt: str) -> DDL:
    # DDL, not text(): no bind-parameter parsing of ':' inside the statement.
    return DDL(stmt.replace("%", "%%"))


common: dict[str, Any] = {
    "version_table": VERSION_TABLE,
    "version_table_schema": contract.SCHEMA,
    "transactional_ddl": True,
}

if context.is_offline_mode():
    # paramstyle "named": a '%' in a statement is printed as one '%' (pyformat would double it for a driver)
    context.configure(dialect_name="postgresql", literal_binds=True, dialect_opts={"paramstyle": "named"}, **common)
    _run()
else:
    context.configure(connection=config.attributes["connection"], **common)
    _run()
