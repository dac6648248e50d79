"""``outbox relay``: one relay per store database."""
from __future__ import annotations

import asyncio
from typing import Any

import click

from outbox.config import RelaySettings, RepublishSettings, options_for, settings_from


@click.command()
@options_for(RelaySettings)  # every option is declared once, in outbox/config.py
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

    settings = settings_from(RelaySettings, params)
    with metrics.serve(settings.metrics_host, settings.metrics_port):
        stats = asyncio.run(run_relay(settings))
    parked = f", {stats.parked} parked in outbox.parked" if stats.parked else ""
    click.echo(f"relay stopped: {stats.events} events in {stats.transactions} transactions published{parked}", err=True)


@click.command("republish-parked")
@options_for(RepublishSettings)
def republish_parked(**params: Any) -> None:
    """Publish events the relay parked in outbox.parked, as they would have been published.

    Each goes to its topic with its own ce_id, ce_commitlsn, ce_txseq and ce_xid, the same key
    and payload, so sinks that deduplicate by id or guard by position treat it as the event it
    always was; its outbox.parked row is deleted once Kafka acknowledged it. Running it again
    after a failure publishes the same copies again (sinks drop the duplicate). Fix the cause
    first: raise Kafka's limits, or correct the row's aggregatetype. See docs/operations.md.
    """
    from outbox.relay.republish import republish

    settings = settings_from(RepublishSettings, params)
    done = republish(settings, echo=click.echo)
    verb = "would re-publish" if settings.dry_run else "re-published"
    click.echo(f"{verb} {done} parked event{'s' if done != 1 else ''}")
