"""What a sink is, the registry of sinks, and how one runs: every ``outbox consume <sink>`` is built here.

A sink is one module (docs/architecture.md, "Adding a sink"): a :class:`Sink` subclass with its
``name``, its ``Settings`` model (a :class:`outbox.config.SinkSettings`; each option declared
once, the command-line options are generated from it) and the way it consumes. Most sinks apply
one fetched batch at a time (:class:`BatchSink`, fed by ``consumers.kafka.run_consumer``); a sink
whose writes are slow remote calls overrides :meth:`Sink.consume` (the CRM sink: ``run_pipelined``).
Sinks with a database of their own build on ``consumers.sink_offsets.DatabaseSink``: the batch's
effect and its Kafka offsets in one transaction.

The registry maps a command name to ``"module:Class"``: nothing is imported until the command
runs or its help is shown, so ``outbox relay`` never imports a sink.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import click

from outbox.config import Decorator, RedriveSettings, SinkSettings, options_for, settings_from
from outbox.signals import stop_on_signals

if TYPE_CHECKING:
    from aiokafka import TopicPartition

    from outbox.consumers.dlq import Batch
    from outbox.consumers.kafka import Progress

#: ``outbox consume <name>`` -> the sink's class. A new sink adds its line here.
SINKS: dict[str, str] = {
    "readstore": "outbox.consumers.readstore:ReadStore",
    "crm": "outbox.consumers.crm:CrmSink",
    "crm-writeback": "outbox.consumers.crm_writeback:Writeback",
}


def register(name: str, target: str) -> None:
    """Add a sink (``"module:Class"``) to ``outbox consume``; for sinks that live outside this package."""
    SINKS[name] = target


def load(name: str) -> type[Sink]:
    module, attr = SINKS[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    assert isinstance(cls, type) and issubclass(cls, Sink), f"{SINKS[name]} is not a Sink"
    return cls


class Sink(ABC):
    """A consumer group's target. Subclasses set the class attributes and implement the abstract methods.

    Lifecycle: :meth:`create` (no I/O), :meth:`start`, :meth:`consume` until ``stop`` is set,
    :meth:`close`. ``stored_offsets`` is the sink's own record of where each partition resumes
    (the loop seeks there on assignment; the sink is the truth, never Kafka's committed offset).
    """

    name: ClassVar[str]  # the command (outbox consume <name>) and the ``sink`` label of its metrics
    Settings: ClassVar[type[SinkSettings]]  # its options
    help: ClassVar[str]  # the command's help; its first line is the summary in ``outbox consume --help``
    client_id: ClassVar[str] = "outbox-consumer"
    #: options that are not settings (``--sql``), placed after the option of the named field
    cli_options: ClassVar[Mapping[str, Sequence[Decorator]]] = {}

    group: str

    @classmethod
    @abstractmethod
    def create(cls, settings: Any) -> Sink:
        """The sink for these settings; no I/O yet."""

    @abstractmethod
    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        """Next offset to read for each partition the sink knows; others are left out."""

    @abstractmethod
    async def consume(self, settings: Any, stop: asyncio.Event, progress: Progress) -> None:
        """Feed the sink from Kafka until ``stop`` is set."""

    # -- optional hooks
    async def start(self) -> None:
        """Open connections and check what must exist (a schema) before anything is consumed."""

    async def close(self) -> None:
        """Finish what is in flight, save what is done, close connections (safe after a failed start)."""

    @classmethod
    def prepare(cls, settings: Any) -> None:
        """Runs once before the event loop starts, outside it (the read store migrates its schema)."""

    @classmethod
    def stopped(cls, totals: Mapping[str, int]) -> str:
        """The line ``outbox consume <name>`` prints when it stops."""
        return f"stopped: {totals.get('records', 0)} records done"


class BatchSink(Sink):
    """A sink fed one fetched batch at a time: ``apply`` makes it durable, then Kafka is told."""

    @abstractmethod
    async def apply(self, batch: Batch) -> Mapping[str, int]:
        """Apply ``batch.records`` durably (dead letters parked first); return counters (``skipped``:
        records that changed nothing). See ``consumers.kafka.Sink``."""

    def pattern(self, settings: Any) -> str:
        """The topics it reads, as a regex (default: ``<topic_prefix>.*`` without dead-letter topics)."""
        from outbox.consumers.kafka import topic_pattern

        return topic_pattern(settings.topic_prefix)

    async def consume(self, settings: Any, stop: asyncio.Event, progress: Progress) -> None:
        from outbox.consumers.kafka import run_consumer

        redrive = settings if isinstance(settings, RedriveSettings) else RedriveSettings()
        await run_consumer(settings.kafka, group=self.group, pattern=self.pattern(settings), sink=self, stop=stop,
                           batch_size=settings.batch_size, client_id=self.client_id, progress=progress,
                           redrive_every=redrive.redrive_every, redrive_max_attempts=redrive.redrive_max_attempts)


async def run_sink(sink: Sink, settings: Any, stop: asyncio.Event | None = None) -> Mapping[str, int]:
    """Run ``sink`` until ``stop`` is set (or SIGTERM/SIGINT when stop is None); returns the totals."""
    from outbox.consumers.kafka import Progress

    own_stop = stop is None
    stop = stop or asyncio.Event()
    progress = Progress(f"{sink.name}[{sink.group}]")
    try:
        await sink.start()
        with stop_on_signals(stop) if own_stop else contextlib.nullcontext():
            await sink.consume(settings, stop, progress)
    finally:
        await sink.close()
    return progress.totals


def command(cls: type[Sink]) -> click.Command:
    """``outbox consume <cls.name>``: its options from ``cls.Settings``, then prepare, run, one line at the end."""

    def run(**params: Any) -> None:
        from outbox import metrics

        settings = settings_from(cls.Settings, params)
        cls.prepare(settings)
        with metrics.serve(settings.metrics_host, settings.metrics_port):
            totals = asyncio.run(run_sink(cls.create(settings), settings))
        click.echo(cls.stopped(totals), err=True)

    return click.command(cls.name, help=cls.help)(options_for(cls.Settings, after=cls.cli_options)(run))
