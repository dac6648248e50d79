"""``outbox relay``: one relay per store database."""
from __future__ import annotations

import asyncio
from typing import Any

import click

from outbox import contract
from outbox.config import RelaySettings, build, dsn_option, kafka_from_params, kafka_options, metrics_options


@click.command()
@dsn_option
@click.option("--source-id", required=True, metavar="ID",
              help="Name of this store in the event stream: keys are '<ID>:<aggregate id>', ce_source is /stores/<ID>.")
@kafka_options
@click.option("--topic-prefix", default=contract.DEFAULT_TOPIC_PREFIX, show_default=True,
              help="Events go to '<prefix>.<aggregate type>'.")
@click.option("--slot", default=None, metavar="NAME",
              help="Replication slot (default: outbox_<database name>, as created by 'outbox install').")
@click.option("--max-in-flight", default=20_000, show_default=True, type=int,
              help="Events sent and not yet acknowledged before the relay stops reading the WAL.")
@click.option("--status-interval", default=10.0, show_default=True, type=float,
              help="Seconds between standby status updates to PostgreSQL when nothing moves.")
@click.option("--retention", default=3600.0, show_default=True, type=float,
              help="Seconds to keep published rows in outbox.events as an audit trail (0: keep forever). "
                   "Events travel through the WAL, so purging never loses one.")
@click.option("--heartbeat-interval", default=10.0, show_default=True, type=float,
              help="Seconds between heartbeat rows written into outbox.events (0: none). A heartbeat goes "
                   "through the WAL like an event, is never published, proves the path end to end "
                   "(metric outbox_relay_heartbeat_age_seconds) and lets an idle database's slot advance.")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM, seconds to wait for Kafka to acknowledge in-flight events before exiting anyway "
                   "(unacknowledged events are not confirmed: a restarted relay sends them again).")
@click.option("--kafka-message-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Seconds the producer keeps retrying an event while Kafka is unreachable (librdkafka "
                   "message.timeout.ms). Past it the relay drops its producer and replays from its slot's "
                   "confirmed position once Kafka is back: nothing is lost or skipped, some events repeat.")
@click.option("--delivery", type=click.Choice(["at-least-once", "exactly-once"]), default="at-least-once",
              show_default=True,
              help="at-least-once: idempotent producer, acks=all, a crash may publish events again. exactly-once: "
                   "Kafka transactions that also record the source position in --offsets-topic; read_committed "
                   "consumers see each event once across crashes (docs/delivery.md).")
@click.option("--transactional-id", default=None, metavar="ID",
              help="exactly-once: the producer's transactional.id; a newer relay with the same id fences this one. "
                   "One per source: a relay whose source was published with another id refuses to start "
                   "[default: outbox-relay.<source id>].")
@click.option("--offsets-topic", default=contract.DEFAULT_OFFSETS_TOPIC, show_default=True, metavar="TOPIC",
              help="exactly-once: compacted topic holding each source's published position, keyed by source id "
                   "(created if missing; keep it outside consumers' topic patterns).")
@click.option("--transaction-interval", default=0.1, show_default=True, type=float, metavar="SECONDS",
              help="exactly-once: commit the open Kafka transaction this often (at a source transaction boundary). "
                   "Longer: more throughput, more latency.")
@click.option("--transaction-max-events", default=10_000, show_default=True, type=int, metavar="N",
              help="exactly-once: start committing the open Kafka transaction once it holds this many events. "
                   "A trigger, not a cap: whole source transactions only, and what is read while a commit runs "
                   "goes into the next transaction.")
@click.option("--transaction-timeout", default=None, type=click.FloatRange(min=0.001), metavar="SECONDS",
              help="exactly-once: the broker aborts a Kafka transaction open this long (transaction.timeout.ms; at "
                   "most the broker's transaction.max.timeout.ms). A source transaction is never split, so one that "
                   "takes longer than most of this to produce stops the relay with one line "
                   "[default: --kafka-message-timeout, at least 120].")
@metrics_options
def relay(**params: Any) -> None:
    """Stream the outbox of one store database to Kafka.

    Reads the outbox publication through its logical replication slot (pgoutput, streaming
    replication protocol) and publishes every event to Kafka (acks=all, idempotent producer).
    An LSN is confirmed to PostgreSQL only after Kafka acknowledged every event up to it, so a
    relay killed at any moment resumes from its slot without losing anything.

    When Kafka is unreachable it stops reading once --max-in-flight events wait, keeps the
    replication connection alive and confirms nothing unacknowledged; when PostgreSQL restarts it
    reconnects with capped, jittered backoff; both resume from the slot by themselves.

    With --delivery exactly-once the events go out in Kafka transactions that also record the
    source position in a compacted offsets topic; the LSN is confirmed after the Kafka commit,
    and a restarted relay skips what the offsets topic says is already published.

    SIGTERM or Ctrl-C: stop reading, wait up to --drain-timeout for in-flight events, confirm
    what Kafka acknowledged (exactly-once: commit the open Kafka transaction if it holds only
    whole source transactions, else abort it), exit 0.
    """
    from outbox import metrics
    from outbox.relay.runner import run_relay

    kafka = kafka_from_params(params)
    settings = build(RelaySettings, kafka=kafka, **params)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        stats = asyncio.run(run_relay(settings))
    parked = f", {stats.parked} parked in outbox.parked" if stats.parked else ""
    click.echo(f"relay stopped: {stats.events} events in {stats.transactions} transactions published{parked}", err=True)
