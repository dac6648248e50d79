"""``outbox consume ...`` and ``outbox replay``: the sinks' commands, built from the registry
(consumers/sink.py), plus the CRM webhook receiver. Thin wrappers over typed functions."""
from __future__ import annotations

import asyncio
from typing import Any

import click

from outbox import contract
from outbox.config import CrmWebhookSettings, ReplaySettings, options_for, settings_from
from outbox.consumers import sink
from outbox.errors import ConfigError

# The consumer group that remembers how far replay --dlq without a filter read each topic; a filter
# has a cursor of its own, REDRIVE_GROUP.<hash> (consumers/dlq.py cursor_group).
REDRIVE_GROUP = "outbox-redrive"


class SinkGroup(click.Group):
    """``outbox consume``: one command per registered sink, built (and its module imported) on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *sink.SINKS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in sink.SINKS and cmd_name not in self.commands:
            self.add_command(sink.command(sink.load(cmd_name)))
        return super().get_command(ctx, cmd_name)


@click.group(cls=SinkGroup)
def consume() -> None:
    """Apply the events on Kafka to sinks (consumer groups)."""


@consume.command("crm-webhook")
@options_for(CrmWebhookSettings)
def crm_webhook(**params: Any) -> None:
    """Receive the CRM's change notifications and put them on Kafka (the way back, step one).

    A notification is answered 204 only after Kafka acknowledged it (acks=all); 503 otherwise,
    and the CRM retries. See docs/crm.md.
    """
    from outbox.consumers.crm_inbound import run_webhook_receiver

    settings = settings_from(CrmWebhookSettings, params)
    received = asyncio.run(run_webhook_receiver(settings))
    click.echo(f"stopped: {received} notifications put on {settings.topic}", err=True)


@click.command()
@options_for(ReplaySettings)
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

    s = settings_from(ReplaySettings, params)
    if s.dlq_topics:
        _redrive(s)
        return
    if not s.group or not s.topics or not s.from_:
        raise ConfigError("outbox replay needs --group, --topic and --from (or --dlq TOPIC to re-drive dead letters)")
    if s.filters:
        raise ConfigError("--filter goes with --dlq")
    wanted = rp.parse_from(s.from_)
    if s.dry_run:
        _, plans = asyncio.run(rp.plan(s.kafka, s.group, s.topics, wanted))
        click.echo(rp.format_plan(s.group, wanted, plans))
        return
    rp.run_rewind(s.kafka, s.group, s.topics, wanted, yes=s.yes, force=s.force, echo=lambda text: click.echo(text, err=True))


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
    cursor = dlq.cursor_group(flt, REDRIVE_GROUP)
    scan = asyncio.run(dlq.redrive(s.kafka, s.dlq_topics, flt, cursor_group=cursor, from_beginning=rescan,
                                   dry_run=True, strict=True, base_group=REDRIVE_GROUP))
    click.echo(f"{scan.redriven} of {scan.scanned} parked records in {', '.join(s.dlq_topics)} match; "
               f"{scan.exhausted} are past the attempt limit and stay parked", err=True)
    if s.dry_run or not scan.redriven:
        return
    confirm(f"re-drive {scan.redriven} records?", s.yes)
    done = asyncio.run(dlq.redrive(s.kafka, s.dlq_topics, flt, cursor_group=cursor, from_beginning=rescan,
                                   base_group=REDRIVE_GROUP))
    click.echo(f"re-drove {done.redriven} records to their topics, for the groups that parked them "
               f"(this filter's cursor: consumer group {cursor})", err=True)
