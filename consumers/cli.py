"""``outbox consume ...``: the sinks' commands. Thin wrappers over consumers.readstore."""
from __future__ import annotations

import asyncio
from typing import Any

import click

from outbox import contract
from outbox.config import KafkaSettings, ReadStoreSettings, build, kafka_from_params, kafka_options, metrics_options


def _print_sql(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from consumers.readstore import migration_sql

    click.echo(migration_sql(), nl=False)
    ctx.exit(0)


@click.group()
def consume() -> None:
    """Apply the events on Kafka to sinks (consumer groups)."""


@consume.command("readstore")
@click.option("--dsn", metavar="DSN", required=True,
              help="Read store database: a libpq string ('dbname=readstore host=...') or a postgresql:// URL; "
                   "PGHOST, PGPORT, PGUSER, PGPASSWORD... fill what it leaves out, as with psql.")
@kafka_options
@click.option("--topic-prefix", default=contract.DEFAULT_TOPIC_PREFIX, show_default=True,
              help="Consume every topic <prefix>.<aggregate_type> (not *.dlq); new topics are picked up within 5 s.")
@click.option("--group", default="outbox-readstore", show_default=True, help="Kafka consumer group id.")
@click.option("--batch-size", type=int, default=2000, show_default=True,
              help="Records fetched and applied per database transaction.")
@click.option("--migrate/--no-migrate", default=True, show_default=True,
              help="Bring the readstore schema up to date before consuming.")
@click.option("--sql", is_flag=True, is_eager=True, expose_value=False, callback=_print_sql,
              help="Print the schema migration SQL for review and exit (needs no server, touches nothing).")
@metrics_options
def readstore(**params: Any) -> None:
    """Keep a central PostgreSQL read store current: one row per aggregate, in source order.

    Each batch is applied in one transaction together with its Kafka offsets; duplicates and
    older events change nothing; deletes leave tombstones (view readstore.current_entities
    hides them). Records that break the event contract are parked in <topic>.dlq. SIGTERM or
    SIGINT finishes the current batch and exits 0. See docs/readstore.md.
    """
    from consumers import readstore as rs
    from outbox import metrics

    migrate = params.pop("migrate")
    kafka = build(KafkaSettings, **kafka_from_params(params))
    settings = build(ReadStoreSettings, kafka=kafka, **params)
    if migrate:
        rs.migrate(settings.dsn)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        totals = asyncio.run(rs.run_readstore(settings))
    click.echo(f"stopped: {totals.get('records', 0)} records applied, {totals.get('rejected', 0)} rejected", err=True)
