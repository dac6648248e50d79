"""A CHECK constraint on outbox.events.aggregatetype: it must be able to name a Kafka topic.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

An application may INSERT into outbox.events itself; a row whose ``aggregatetype`` cannot name a
topic (``'bad topic!'``) used to stop the relay for good, since the row stays in the WAL (issue
#19 item 6). The relay now parks such rows (outbox.parked, a marker to
``<prefix>.__unroutable.dlq``); this constraint keeps new ones out at the INSERT.

It is added ``NOT VALID``: that takes outbox.events' ACCESS EXCLUSIVE lock only for an instant
(under install's lock_timeout, retried) and checks only new rows. ``outbox install`` then
validates it in a transaction of its own (``VALIDATE CONSTRAINT`` takes SHARE UPDATE EXCLUSIVE,
which writers do not wait for); when existing rows break it, the constraint stays NOT VALID, new
rows are still checked, and install says so (``outbox.install.validate_constraints``).

Downgrade drops the constraint.
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import DDL

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLE = "outbox.events"
NAME = "events_aggregatetype_names_a_topic"  # outbox.contract.AGGREGATE_TYPE_CONSTRAINT
# outbox.contract.topic_for's rule; the length bound assumes the default prefix "outbox" (the relay
# parks what a longer --topic-prefix makes too long)
CHECK = "aggregatetype ~ '^[A-Za-z0-9_-][A-Za-z0-9._-]*$' AND length(aggregatetype) <= 242"


def upgrade() -> None:
    op.execute(DDL(f"ALTER TABLE {TABLE} ADD CONSTRAINT {NAME} CHECK ({CHECK}) NOT VALID"))


def downgrade() -> None:
    op.execute(DDL(f"ALTER TABLE {TABLE} DROP CONSTRAINT {NAME}"))
