"""``outbox consume ...``: the sinks' commands. Thin wrappers over consumers.readstore."""
from __future__ import annotations

import asyncio
from typing import Any

import click

from outbox import contract
from outbox.errors import ConfigError

REDRIVE_GROUP = "outbox-redrive"  # the consumer group that remembers how far replay --dlq read each topic
from outbox.config import (KafkaSettings, ReadStoreSettings, ReplaySettings, build, kafka_from_params, kafka_options, metrics_options,
                           redrive_options)


def _print_sql(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from outbox.consumers.readstore import migration_sql

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
@redrive_options
@metrics_options
def readstore(**params: Any) -> None:
    """Keep a central PostgreSQL read store current: one row per aggregate, in source order.

    Each batch is applied in one transaction together with its Kafka offsets; duplicates and
    older events change nothing; deletes leave tombstones (view readstore.current_entities
    hides them). Records that break the event contract are parked in <topic>.dlq. SIGTERM or
    SIGINT finishes the current batch and exits 0. See docs/readstore.md.
    """
    from outbox.consumers import readstore as rs
    from outbox import metrics

    migrate = params.pop("migrate")
    kafka = build(KafkaSettings, **kafka_from_params(params))
    settings = build(ReadStoreSettings, kafka=kafka, **params)
    if migrate:
        rs.migrate(settings.dsn)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        totals = asyncio.run(rs.run_readstore(settings))
    click.echo(f"stopped: {totals.get('records', 0)} records applied, {totals.get('rejected', 0)} rejected", err=True)


def _secret(env: str, path: str | None, what: str) -> str | None:
    from outbox.secret import read_secret

    return read_secret(env, path, what)


@consume.command("crm")
@click.option("--crm-url", metavar="URL", required=True, help="Base URL of the CRM API (the reference CRM: http://127.0.0.1:8480).")
@click.option("--dsn", metavar="DSN", required=True,
              help="The sink's own small database for its ledger (applied event ids) and Kafka offsets; "
                   "PGHOST, PGPORT, PGUSER... fill what it leaves out.")
@kafka_options
@click.option("--crm-token-file", type=click.Path(dir_okay=False), default=None,
              help="File whose first line is the CRM bearer token [default: $OUTBOX_CRM_TOKEN, else none]. "
                   "Never on the command line.")
@click.option("--topic-prefix", default=contract.DEFAULT_TOPIC_PREFIX, show_default=True,
              help="Consume every topic <prefix>.<aggregate_type> (not *.dlq).")
@click.option("--group", default="outbox-crm", show_default=True, help="Kafka consumer group id (and ledger scope).")
@click.option("--mapping", type=click.Path(dir_okay=False), default=None,
              help="TOML file: one table per aggregate type (kind, fields, references) [default: the POS demo's "
                   "customer -> contacts, order -> orders]. Unmapped aggregate types are skipped.")
@click.option("--batch-size", type=click.IntRange(1, 100), default=50, show_default=True,
              help="Records per CRM call (batch upsert); 1 sends single upserts.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True, help="CRM calls in flight.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="CRM calls per second on average (token bucket).")
@click.option("--burst", type=click.IntRange(min=1), default=None, help="Calls allowed at once [default: the rate].")
@click.option("--max-attempts", type=click.IntRange(min=1), default=10, show_default=True,
              help="Attempts per record before it is dead-lettered to <topic>.dlq.")
@click.option("--retry-base", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="First retry delay in seconds; doubles per attempt, with jitter.")
@click.option("--retry-max", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Longest retry delay in seconds.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a CRM call may take before it counts as failed (and is retried).")
@click.option("--max-buffered", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Records of one partition held while the CRM is slow; above it the partition is paused.")
@metrics_options
def crm(**params: Any) -> None:
    """Keep a CRM current: upsert by external id <source_id>:<aggregate_id>, one mapping per aggregate type.

    Each record is sent with its event id as idempotency key; transient failures (timeouts,
    connection errors, 5xx, 408, 429 with Retry-After) are retried with exponential backoff and
    jitter while polling goes on; a later event of a key waits behind an earlier one being retried.
    Permanent failures (other 4xx) and records past --max-attempts are parked in <topic>.dlq.
    A ledger of applied event ids makes re-delivery a no-op. Changes that came from the CRM
    (origin crm) are not sent back. SIGTERM or SIGINT ends the calls in flight and exits 0.
    See docs/crm.md.
    """
    from outbox.consumers.crm import run_crm
    from outbox import metrics
    from outbox.config import CrmSinkSettings

    kafka = build(KafkaSettings, **kafka_from_params(params))
    token = _secret("OUTBOX_CRM_TOKEN", params.pop("crm_token_file"), "CRM token")
    settings = build(CrmSinkSettings, kafka=kafka, crm_token=token, **params)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        totals = asyncio.run(run_crm(settings))
    click.echo(f"stopped: {totals.get('records', 0)} records done", err=True)


@consume.command("crm-webhook")
@kafka_options
@click.option("--port", type=click.IntRange(0, 65535), default=8481, show_default=True,
              help="Port of the webhook endpoint POST /webhook (0: any free port, logged).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--topic", default="crm.changes", show_default=True,
              help="Kafka topic the notifications go to (key: the record's external id). Keep it outside "
                   "the event topics' prefix.")
@click.option("--secret-file", type=click.Path(dir_okay=False), default=None,
              help="Verify X-CRM-Signature (HMAC-SHA256) with this secret [default: $OUTBOX_CRM_WEBHOOK_SECRET, "
                   "else unchecked].")
def crm_webhook(**params: Any) -> None:
    """Receive the CRM's change notifications and put them on Kafka (the way back, step one).

    A notification is answered 204 only after Kafka acknowledged it (acks=all); 503 otherwise,
    and the CRM retries. See docs/crm.md.
    """
    from outbox.consumers.crm_inbound import run_webhook_receiver
    from outbox.config import CrmWebhookSettings

    kafka = build(KafkaSettings, **kafka_from_params(params))
    secret = _secret("OUTBOX_CRM_WEBHOOK_SECRET", params.pop("secret_file"), "webhook secret")
    settings = build(CrmWebhookSettings, kafka=kafka, secret=secret, **params)
    received = asyncio.run(run_webhook_receiver(settings))
    click.echo(f"stopped: {received} notifications put on {settings.topic}", err=True)


@consume.command("crm-writeback")
@click.option("--dsn", metavar="DSN", required=True,
              help="The store database whose legacy tables receive the CRM's changes.")
@click.option("--source-id", required=True, help="This store's source id: only records <source_id>:<id> are applied here.")
@kafka_options
@click.option("--topic", default="crm.changes", show_default=True, help="Kafka topic of the CRM's notifications.")
@click.option("--group", default=None, help="Kafka consumer group id [default: outbox-crm-writeback-<source-id>].")
@click.option("--mapping", type=click.Path(dir_okay=False), default=None,
              help="The sink's mapping file (CRM fields -> columns; 'table' names the legacy table) "
                   "[default: contacts -> pos.customers, orders -> pos.orders].")
@click.option("--batch-size", type=int, default=500, show_default=True, help="Notifications per database transaction.")
@metrics_options
def crm_writeback(**params: Any) -> None:
    """Apply CRM changes to a store database's legacy tables (the way back, step two).

    Writes run with outbox.origin = 'crm', so the capture trigger marks their events and the
    CRM sink does not send them back. A notification applied once is never applied again.
    See docs/crm.md.
    """
    from outbox.consumers.crm_inbound import run_writeback
    from outbox import metrics
    from outbox.config import CrmWritebackSettings

    kafka = build(KafkaSettings, **kafka_from_params(params))
    settings = build(CrmWritebackSettings, kafka=kafka, **params)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        totals = asyncio.run(run_writeback(settings))
    click.echo(f"stopped: {totals.get('changed', 0)} rows changed", err=True)


@click.command()
@click.option("--group", metavar="G", help="The consumer group to rewind (with --dlq: only its dead letters).")
@click.option("--topic", "topics", metavar="T", multiple=True, help="A topic to rewind (repeat for several).")
@click.option("--from", "from_", metavar="WHEN",
              help="earliest, an offset (every partition), or a time (2026-01-31T12:00:00Z; the first record at or "
                   "after it). With --dlq: earliest re-scans the whole dead-letter topic.")
@click.option("--dlq", "dlq_topics", metavar="TOPIC", multiple=True,
              help="Re-drive the records parked in this dead-letter topic (<topic>.dlq) back to the group that "
                   "parked them, with their original ids (repeat for several).")
@click.option("--filter", "filters", metavar="NAME=VALUE", multiple=True,
              help="With --dlq, only matching records: group=G, error=TEXT (in dlq_error), type=PATTERN (ce_type, "
                   "e.g. 'customer.*'), key=PATTERN, id=CE_ID (repeatable), attempts-below=N.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed without a terminal).")
@click.option("--force", is_flag=True,
              help="Rewind even though the group lists active members: wait (up to 90 s) for them to leave, as a "
                   "killed consumer does when its session times out.")
@click.option("--dry-run", is_flag=True, help="Show what would be rewound or re-driven; change nothing.")
@kafka_options
def replay(**params: Any) -> None:
    """Re-deliver events to a consumer group, or re-drive its dead letters.

    \b
    outbox replay --group G --topic T --from earliest|TIMESTAMP|OFFSET [--yes] [--force]
    outbox replay --dlq T.dlq [--filter type='customer.*'] [--yes]

    A rewind shows, per partition, how many records will be re-delivered and asks before it
    changes anything; it refuses while the group has active members (stop its consumers first).
    Sinks that keep their own offsets (the read store) follow the rewind too. Replayed and
    re-driven events keep their ce_id. See docs/backfill.md.
    """
    from outbox.consumers import replay as rp

    kafka = build(KafkaSettings, **kafka_from_params(params))
    s = build(ReplaySettings, kafka=kafka, **params)
    if s.dlq_topics:
        _redrive(s)
        return
    if not s.group or not s.topics or not s.from_:
        raise ConfigError("outbox replay needs --group, --topic and --from (or --dlq TOPIC to re-drive dead letters)")
    if s.filters:
        raise ConfigError("--filter goes with --dlq")
    wanted = rp.parse_from(s.from_)
    if s.dry_run:
        _, plans = asyncio.run(rp.plan(kafka, s.group, s.topics, wanted))
        click.echo(rp.format_plan(s.group, wanted, plans))
        return
    rp.run_rewind(kafka, s.group, s.topics, wanted, yes=s.yes, force=s.force, echo=lambda text: click.echo(text, err=True))


def _redrive(s: ReplaySettings) -> None:
    from outbox.consumers import dlq
    from outbox.consumers.replay import confirm

    bad = [t for t in s.dlq_topics if not t.endswith(contract.DLQ_SUFFIX)]
    if bad:
        raise ConfigError(f"--dlq {bad[0]}: not a dead-letter topic (its name ends with {contract.DLQ_SUFFIX})")
    if s.from_ not in (None, "earliest") or s.topics:
        raise ConfigError("with --dlq, --from can only be earliest and --topic is not used")
    flt = dlq.Filter.parse(s.filters, s.group)
    rescan = s.from_ == "earliest"
    scan = asyncio.run(dlq.redrive(s.kafka, s.dlq_topics, flt, cursor_group=REDRIVE_GROUP, from_beginning=rescan,
                                   dry_run=True, strict=True))
    click.echo(f"{scan.redriven} of {scan.scanned} parked records in {', '.join(s.dlq_topics)} match; "
               f"{scan.exhausted} are past the attempt limit and stay parked", err=True)
    if s.dry_run or not scan.redriven:
        return
    confirm(f"re-drive {scan.redriven} records?", s.yes)
    done = asyncio.run(dlq.redrive(s.kafka, s.dlq_topics, flt, cursor_group=REDRIVE_GROUP, from_beginning=rescan))
    click.echo(f"re-drove {done.redriven} records to their topics, for the groups that parked them", err=True)
