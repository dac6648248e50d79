"""Alembic environment of the read store (schema ``readstore``, its own version table inside it).

Run through ``consumers.readstore.migrate()`` / ``outbox consume readstore`` (online) or
``outbox consume readstore --sql`` (offline: prints the SQL for review). The connection or the
DSN comes in ``config.attributes``; there is no alembic.ini.
"""
from __future__ import annotations

from alembic import context
from sqlalchemy import text

SCHEMA = "readstore"
VERSION_TABLE = "alembic_version"
# One migrator at a time: consumers of a group often start together. Any constant will do;
# this one is "readstore" read as ASCII bytes.
LOCK_KEY = 0x7265616473746F72


def run_offline() -> None:
    context.configure(
        dialect_name="postgresql",
        literal_binds=True,
        version_table=VERSION_TABLE,
        version_table_schema=SCHEMA,
        transactional_ddl=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes["connection"]
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
    try:
        connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        connection.commit()
        context.configure(
            connection=connection,
            version_table=VERSION_TABLE,
            version_table_schema=SCHEMA,
            transactional_ddl=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
        connection.commit()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
