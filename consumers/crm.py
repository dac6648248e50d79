"""The CRM sink: events on Kafka -> upserts by external id in a CRM's HTTP API (docs/crm.md).

Pure logic (mappings, retry policy, token bucket, per-key scheduling) is in consumers.crm_logic;
this module holds the I/O edges and their wiring:

- :class:`CrmClient`: the CRM's HTTP API (the reference CRM's contract; an adapter for a real CRM
  replaces this class): batch or single upserts, each record with its idempotency key.
- :class:`Ledger`: the sink's small PostgreSQL database (a ``SinkDatabase``, consumers/sink_offsets.py):
  applied event ids and Kafka offsets, written in one transaction, so a re-delivered event is a no-op.
- :class:`CrmSink`: a :class:`consumers.kafka.PipelinedSink` (``outbox consume crm``). Records are taken as they are
  fetched; a dispatcher sends the oldest event of each key (a later event of a key waits behind
  one being retried), a flusher writes the ledger and the offsets. Calls never block polling.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Mapping as MappingABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol
from urllib.parse import quote

import psycopg
from aiokafka import TopicPartition
from prometheus_client import Counter, Histogram
from pydantic import Field, SecretStr, field_validator

from outbox import contract, metrics
from outbox import dsn as dsnmod
from outbox.config import Cli, Dsn, KafkaSettings, Secret, SinkSettings
from outbox.consumers import sink_offsets
from outbox.consumers.crm_logic import (
    AUTH,
    OK,
    ORIGIN_CRM,
    PERMANENT,
    KeyScheduler,
    Mapping,
    MappingError,
    Pending,
    TokenBucket,
    backoff,
    cap_retry_after,
    classify_status,
    counts_attempt,
    load_mappings,
    parse_retry_after,
)
from outbox.consumers.dlq import H_REDRIVE, DeadLetter, DeadLetters, DeadLetterUnavailable, for_group, header
from outbox.consumers.kafka import Progress, SinkUnavailable, run_pipelined, topic_pattern
from outbox.consumers.sink import Sink, run_sink
from outbox.errors import DatabaseUnavailable, OutboxError

if TYPE_CHECKING:  # aiohttp is imported when the sink starts: outbox consume --help does not need it
    from aiohttp import ClientSession

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2  # seconds between ledger writes while records complete
CLOSE_FLUSH_TIMEOUT = 30.0  # seconds a stopping sink tries to save its last progress
STORE_RETRY = 1.0  # seconds between attempts to write the ledger (or the dead-letter topic) when it fails


class CrmRefused(OutboxError):
    """The CRM refused the sink's credentials (401/403): never retried, the sink stops."""

    exit_code = 1


# --------------------------------------------------------------------------- settings
class CrmSinkSettings(SinkSettings):
    """``outbox consume crm``: Kafka -> the CRM's HTTP API, with a ledger in a small database of its own."""

    crm_url: Annotated[str, Field(description=(
        "Base URL of the CRM API (the reference CRM: http://127.0.0.1:8480).")), Cli(metavar="URL")]
    dsn: Annotated[Dsn, Field(description=(  # the sink's ledger database
        "The sink's own small database for its ledger (applied event ids) and Kafka offsets; PGHOST, PGPORT, "
        "PGUSER... fill what it leaves out."))]
    kafka: KafkaSettings
    crm_token: Annotated[SecretStr | None, Field(description=(
        "File whose first line is the CRM bearer token [default: $OUTBOX_CRM_TOKEN, else none]. Never on the "
        "command line.")), Secret(env="OUTBOX_CRM_TOKEN", file_flag="--crm-token-file", what="CRM token")] = None
    topic_prefix: Annotated[str, Field(description="Consume every topic <prefix>.<aggregate_type> (not *.dlq).")] = \
        contract.DEFAULT_TOPIC_PREFIX
    group: Annotated[str, Field(description="Kafka consumer group id (and ledger scope).")] = "outbox-crm"
    mapping: Annotated[str | None, Field(description=(  # None: the POS demo's customer and order mappings
        "TOML file: one table per aggregate type (kind, fields, references) [default: the POS demo's customer -> "
        "contacts, order -> orders]. Unmapped aggregate types are skipped.")), Cli(file=True)] = None
    batch_size: Annotated[int, Field(ge=1, le=100, description=(
        "Records per CRM call (batch upsert); 1 sends single upserts.")), Cli(checked=True)] = 50
    concurrency: Annotated[int, Field(ge=1, le=64, description="CRM calls in flight."), Cli(checked=True)] = 4
    rate: Annotated[float, Field(gt=0, description="CRM calls per second on average (token bucket)."),
                    Cli(checked=True)] = 10.0
    burst: Annotated[int | None, Field(ge=1, description="Calls allowed at once [default: the rate]."),
                     Cli(checked=True)] = None  # None: max(1, rate)
    max_attempts: Annotated[int, Field(ge=1, description=(
        "Failed attempts per record before it is dead-lettered to <topic>.dlq. Only failures while the CRM "
        "answers other calls count: during an outage (every call failing) and on 429s records back off "
        "without using up attempts.")), Cli(checked=True)] = 10
    retry_base: Annotated[float, Field(gt=0, description=(
        "First retry delay in seconds; doubles per attempt, with jitter.")), Cli(checked=True)] = 0.5
    retry_max: Annotated[float, Field(gt=0, description="Longest retry delay in seconds."), Cli(checked=True)] = 60.0
    retry_after_max: Annotated[float, Field(gt=0, description=(
        "Longest Retry-After honoured, in seconds: a longer one (or an HTTP-date far ahead, a CRM clock running "
        "ahead) holds calls this long, then they are tried again.")), Cli(checked=True)] = 300.0
    timeout: Annotated[float, Field(gt=0, description=(
        "Seconds a CRM call may take before it counts as failed (and is retried).")), Cli(checked=True)] = 10.0
    max_buffered: Annotated[int, Field(ge=1, description=(  # records per partition held before it is paused
        "Records of one partition held while the CRM is slow; above it the partition is paused.")),
        Cli(checked=True)] = 5000

    @field_validator("crm_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


# --------------------------------------------------------------------------- metrics (docs/operations.md)
CRM_CALLS = metrics.sink_metric(Counter, "outbox_crm_calls_total",
                    "Calls to the CRM API by outcome: the HTTP status class (2xx, 4xx), 429, or timeout/connection.",
                    ["group", "outcome"])
CRM_CALL_SECONDS = metrics.sink_metric(Histogram, "outbox_crm_call_seconds", "Duration of one CRM API call (a batch or a single upsert).",
                             ["group"], buckets=metrics.APPLY_BUCKETS)
CRM_RECORDS_SENT = metrics.sink_metric(Counter, "outbox_crm_records_sent_total", "Records sent to the CRM (a batch counts each record).",
                           ["group"])
CRM_RETRIES = metrics.sink_metric(Counter, "outbox_crm_retries_total",
                      "Records scheduled for another attempt, by reason: rate_limited (429), server_error (5xx, 408), "
                      "timeout, connection, bad_response, split (a refused batch retried record by record).",
                      ["group", "reason"])
CRM_DEAD_LETTERED = metrics.sink_metric(Counter, "outbox_crm_dead_lettered_total",
                            "Records sent to the dead-letter topic, by reason: permanent (a 4xx), attempts (past "
                            "--max-attempts), invalid (breaks the event contract or the mapping).", ["group", "reason"])
CRM_SKIPPED = metrics.sink_metric(Counter, "outbox_crm_skipped_total",
                      "Records not sent, by reason: echo (the change came from the CRM), unmapped (no mapping for "
                      "its aggregate type), applied (already in the ledger: a re-delivery), older (a newer event of "
                      "its record was applied already: a re-drive or a replay of an old image), redrive (re-driven "
                      "for another group).", ["group", "reason"])
CRM_THROTTLED = metrics.sink_metric(Counter, "outbox_crm_throttled_seconds_total",
                        "Seconds the sink held all calls back because the CRM answered 429 with Retry-After.", ["group"])
CRM_PARK_FAILURES = metrics.sink_metric(Counter, "outbox_crm_park_failures_total",
                        "Failed attempts to save the CRM sink's progress, by what failed: dead_letters (the dead-letter "
                        "topic cannot be written) or ledger. While they fail the sink holds its records and pauses its "
                        "partitions at --max-buffered.", ["group", "reason"])



class CrmMetrics:
    """The CRM sink's metrics with ``group`` bound once."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.call_seconds = CRM_CALL_SECONDS.labels(group)
        self.records_sent = CRM_RECORDS_SENT.labels(group)
        self.throttled = CRM_THROTTLED.labels(group)

    def call(self, outcome: str) -> None:
        CRM_CALLS.labels(self.group, outcome).inc()

    def retried(self, reason: str, n: int = 1) -> None:
        CRM_RETRIES.labels(self.group, reason).inc(n)

    def dead_lettered(self, reason: str, n: int = 1) -> None:
        CRM_DEAD_LETTERED.labels(self.group, reason).inc(n)

    def skipped(self, reason: str, n: int = 1) -> None:
        CRM_SKIPPED.labels(self.group, reason).inc(n)


# --------------------------------------------------------------------------- I/O: the CRM
@dataclass(slots=True)
class CallResult:
    """What one call gave: ``status`` (None: no answer), one (status, error) per record when the CRM
    answered per record, Retry-After in seconds, and the retry reason for the metrics."""

    status: int | None
    items: list[tuple[int, str | None]] | None = None
    retry_after: float | None = None
    reason: str = ""
    error: str = ""


class CrmApi(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def upsert(self, kind: str, items: Sequence[dict[str, Any]]) -> CallResult: ...


class CrmClient:
    """The reference CRM's API (docs/crm.md): ``POST /v1/{kind}/batch`` or ``PUT /v1/{kind}/{external_id}``."""

    def __init__(self, url: str, token: str | None, *, timeout: float, concurrency: int, batch: bool) -> None:
        self.url = url
        self._token = token
        self._timeout = timeout
        self._concurrency = concurrency
        self.batch = batch
        self._http: ClientSession | None = None

    async def start(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector

        headers = {"User-Agent": "outbox-relay-crm-sink"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._http = ClientSession(base_url=self.url + "/", headers=headers, timeout=ClientTimeout(total=self._timeout),
                                   connector=TCPConnector(limit=self._concurrency * 2))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def upsert(self, kind: str, items: Sequence[dict[str, Any]]) -> CallResult:
        from aiohttp import ClientConnectionError, ClientError

        assert self._http is not None
        try:
            if self.batch:
                request = self._http.post(f"v1/{quote(kind, safe='')}/batch", json={"records": list(items)})
            else:
                [item] = items
                body = {"fields": item["fields"], "active": item["active"], "meta": item.get("meta")}
                request = self._http.put(f"v1/{quote(kind, safe='')}/{quote(item['external_id'], safe='')}", json=body,
                                         headers={"Idempotency-Key": item["idempotency_key"]})
            async with request as response:
                text = await response.text()
                result = CallResult(response.status, retry_after=parse_retry_after(response.headers.get("Retry-After")))
                if 200 <= response.status < 300:
                    result.items = self._items(text, len(items)) if self.batch else [(response.status, None)]
                else:
                    result.error = f"HTTP {response.status}: {_error_text(text)}"
                    result.reason = "rate_limited" if response.status == 429 else "server_error"
                return result
        except TimeoutError:
            return CallResult(None, reason="timeout", error=f"no answer within {self._timeout:g} s")
        except ClientConnectionError as exc:
            return CallResult(None, reason="connection", error=f"{type(exc).__name__}: {exc}")
        except (ClientError, ValueError) as exc:
            return CallResult(None, reason="bad_response", error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _items(text: str, count: int) -> list[tuple[int, str | None]]:
        try:
            results = json.loads(text)["results"]
            if len(results) != count:
                raise ValueError(f"{len(results)} results for {count} records")
            return [(int(r["status"]), r.get("error")) for r in results]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable batch answer ({type(exc).__name__}: {exc})") from None


def _error_text(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text).get("error", text))[:200]
    return text[:200]


# --------------------------------------------------------------------------- I/O: the ledger
LEDGER_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS crm_sink;
CREATE TABLE IF NOT EXISTS crm_sink.ledger (
    group_id    text NOT NULL,
    event_id    text NOT NULL,
    external_id text,
    outcome     text NOT NULL,  -- applied | dead_lettered
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (group_id, event_id)
);
-- per CRM record, the source position of the newest event applied to it: the position guard
CREATE TABLE IF NOT EXISTS crm_sink.positions (
    group_id    text NOT NULL,
    kind        text NOT NULL,
    external_id text NOT NULL,
    commit_lsn  pg_lsn NOT NULL,
    txseq       integer NOT NULL,
    event_id    text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (group_id, kind, external_id)
);
""" + sink_offsets.table_sql("crm_sink")
SEEN = "SELECT event_id, outcome FROM crm_sink.ledger WHERE group_id = %s AND event_id = ANY(%s::text[])"
# a re-driven dead letter that is applied turns its ledger row from dead_lettered into applied
RECORD = """
INSERT INTO crm_sink.ledger AS l (group_id, event_id, external_id, outcome)
SELECT %s, u.event_id, u.external_id, u.outcome FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(event_id, external_id, outcome)
ON CONFLICT (group_id, event_id) DO UPDATE SET outcome = EXCLUDED.outcome, at = clock_timestamp()
 WHERE l.outcome = 'dead_lettered' AND EXCLUDED.outcome = 'applied'
"""
LATEST = """
SELECT p.kind, p.external_id, p.commit_lsn::text, p.txseq FROM crm_sink.positions p
  JOIN unnest(%s::text[], %s::text[]) AS u(kind, external_id) USING (kind, external_id) WHERE p.group_id = %s
"""
ADVANCE = """
INSERT INTO crm_sink.positions AS p (group_id, kind, external_id, commit_lsn, txseq, event_id)
SELECT %s, u.kind, u.external_id, u.commit_lsn::pg_lsn, u.txseq, u.event_id
  FROM unnest(%s::text[], %s::text[], %s::text[], %s::int4[], %s::text[]) AS u(kind, external_id, commit_lsn, txseq, event_id)
ON CONFLICT (group_id, kind, external_id) DO UPDATE SET
       commit_lsn = EXCLUDED.commit_lsn, txseq = EXCLUDED.txseq, event_id = EXCLUDED.event_id, at = clock_timestamp()
 WHERE (p.commit_lsn, p.txseq) < (EXCLUDED.commit_lsn, EXCLUDED.txseq)
"""
Position = tuple[int, int]
RecordKey = tuple[str, str]  # (CRM kind, external id)


class Ledger(sink_offsets.SinkDatabase):
    """Applied (and dead-lettered) event ids plus Kafka offsets, in the sink's own database."""

    schema = "crm_sink"
    application_name = "outbox-crm-sink"
    what = "ledger database"
    described_as = "the ledger database "
    setup_sql = LEDGER_SCHEMA

    def __init__(self, dsn: str, group: str) -> None:
        super().__init__(dsn, group)
        self._lock = asyncio.Lock()  # the poll loop (seen) and the flusher (record) share the connection

    async def seen(self, event_ids: list[str], keys: Sequence[RecordKey]) -> tuple[dict[str, str], dict[RecordKey, Position]]:
        """The outcome of each event id the ledger knows, and the newest applied position of each record."""
        async with self._lock:
            conn = await self.connection()
            async with conn.transaction():
                rows = await (await conn.execute(SEEN, (self.group, event_ids))).fetchall()
                latest = await (await conn.execute(LATEST, ([k for k, _ in keys], [e for _, e in keys], self.group))).fetchall()
        return ({r[0]: r[1] for r in rows},
                {(kind, ext): (contract.parse_lsn(lsn), seq) for kind, ext, lsn, seq in latest})

    async def record(self, rows: list[tuple[str, str | None, str]], offsets: MappingABC[tuple[str, int], int],
                     positions: MappingABC[RecordKey, tuple[Position, str]] | None = None) -> None:
        """The ledger rows, the records' newest positions and the offsets they make safe, in one transaction."""
        async with self._lock, self.transaction(offsets) as conn:
            if rows:
                await conn.execute(RECORD, (self.group, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
            if positions:
                keys = sorted(positions)
                await conn.execute(ADVANCE, (self.group, [k for k, _ in keys], [e for _, e in keys],
                                             [contract.format_lsn(positions[k][0][0]) for k in keys],
                                             [positions[k][0][1] for k in keys], [positions[k][1] for k in keys]))


# --------------------------------------------------------------------------- the sink
class CrmSink(Sink):
    """Kafka records -> CRM upserts, retried per key without blocking the poll loop (see module doc)."""

    name = "crm"
    Settings = CrmSinkSettings
    client_id = "outbox-crm"
    help = """Keep a CRM current: upsert by external id <source_id>:<aggregate_id>, one mapping per aggregate type.

    Each record is sent with its event id as idempotency key; transient failures (timeouts,
    connection errors, 5xx, 408, 429 with Retry-After) are retried with exponential backoff and
    jitter while polling goes on; a later event of a key waits behind an earlier one being retried.
    Permanent failures (other 4xx) and records past --max-attempts are parked in <topic>.dlq.
    A ledger of applied event ids makes re-delivery a no-op. Changes that came from the CRM
    (origin crm) are not sent back. SIGTERM or SIGINT ends the calls in flight and exits 0.
    See docs/crm.md.
    """

    def __init__(self, settings: CrmSinkSettings, client: CrmApi, ledger: Ledger, mappings: dict[str, Mapping], *,
                 seed: int | None = None) -> None:
        self.s = settings
        self.client = client
        self.ledger = ledger
        self.dlq: DeadLetters | None = None  # the loop's, handed over with every batch
        self.mappings = mappings
        self.group = settings.group
        self.m = CrmMetrics(settings.group)
        self.sched = KeyScheduler()
        self.bucket = TokenBucket(settings.rate, settings.burst or max(1, int(settings.rate)), time.monotonic())
        self.rng = random.Random(seed)
        self._inflight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._flush_due = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._open_gate = asyncio.Event()
        self._open_gate.set()
        self._throttled_until = 0.0
        self._applied: list[Pending] = []
        self._dead: list[tuple[Pending, str, str]] = []  # (pending, reason label, error text)
        self._skipped = False
        self._safe: dict[TopicPartition, int] = {}
        self._done_records: list[Any] = []
        # the newest position taken on per CRM record, until the ledger holds it (see _newest)
        self._latest: dict[RecordKey, tuple[Position, tuple[str, bytes | None]]] = {}
        self._successes = 0  # calls the CRM answered 2xx: transient failures count only while it does
        self._saving_failed_since: float | None = None
        self._failure: OutboxError | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle
    @classmethod
    def create(cls, settings: CrmSinkSettings) -> CrmSink:
        token = settings.crm_token.get_secret_value() if settings.crm_token else None
        client = CrmClient(settings.crm_url, token, timeout=settings.timeout, concurrency=settings.concurrency,
                           batch=settings.batch_size > 1)
        return cls(settings, client, Ledger(settings.dsn, settings.group).bounded(settings), load_mappings(settings.mapping))

    async def start(self) -> None:
        """Open the ledger (creating its schema) and the CRM client, then start sending."""
        await self.ledger.start()
        await self.client.start()
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._flush_loop())]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """The dispatcher and the flusher run until close: ending earlier is a bug, and stops the sink."""
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        log.error("CRM sink task %s ended: %r", task.get_coro(), exc, exc_info=exc)
        self._failure = self._failure or OutboxError(f"CRM sink failed: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Stop sending, let calls in flight end (bounded by --timeout), save what is done, close."""
        if self._closing:
            return
        try:
            await self._stop_sending()
        finally:
            await self.client.close()
            await self.ledger.close()

    async def _stop_sending(self) -> None:
        self._closing = True
        self._wake.set()
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._failure is None:
            try:
                await asyncio.wait_for(self._flush(), CLOSE_FLUSH_TIMEOUT)
            except TimeoutError:  # nothing is lost: what the ledger lacks is sent again, same keys
                log.warning("could not save the CRM sink's last progress within %.0f s", CLOSE_FLUSH_TIMEOUT)

    async def consume(self, settings: CrmSinkSettings, stop: asyncio.Event, progress: Progress) -> None:
        await run_pipelined(settings.kafka, group=self.group, pattern=topic_pattern(settings.topic_prefix), sink=self,
                            stop=stop, batch_size=500, max_buffered=settings.max_buffered, client_id=self.client_id,
                            progress=progress)

    # -- PipelinedSink
    async def stored_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        return await self.ledger.stored_offsets(partitions)

    async def submit(self, records: Sequence[Any], dead_letters: DeadLetters) -> None:
        """Classify the records, ask the ledger once which were applied before, then queue them in
        offset order (the partitions' done-up-to offsets rely on that order)."""
        self.dlq = dead_letters
        mine = {id(r) for r in for_group(records, self.s.group)}
        plan: list[tuple[str, Any, str]] = []  # (action, pending or record, reason/error)
        for r in records:
            if id(r) not in mine:  # re-driven from the dead-letter topic for another group
                plan.append(("skip", r, "redrive"))
                continue
            tp = (r.topic, r.partition)
            try:
                event = contract.parse_record(list(r.headers), r.value)
            except ValueError as exc:  # ContractError: a poison record
                p = Pending(tp, r.offset, (r.topic, r.key), "", {"idempotency_key": _coordinates(r)}, r)
                plan.append(("dead", p, f"{type(exc).__name__}: {exc}"))
                continue
            mapping = self.mappings.get(event.aggregate_type)
            if contract.is_truncation(event.type):  # a store's TRUNCATE does not deactivate CRM records wholesale
                plan.append(("skip", r, "truncated"))
                continue
            if event.origin == ORIGIN_CRM or mapping is None:
                plan.append(("skip", r, "echo" if event.origin == ORIGIN_CRM else "unmapped"))
                continue
            try:
                item = mapping.item(event)
            except MappingError as exc:
                p = Pending(tp, r.offset, (r.topic, r.key), "", {"idempotency_key": event.id}, r)
                plan.append(("dead", p, f"MappingError: {exc}"))
                continue
            pending = Pending(tp, r.offset, (r.topic, r.key), mapping.kind, item, r)
            pending.position = (event.position.commit_lsn, event.position.seq)
            plan.append(("send", pending, ""))
        sends = [p for action, p, _ in plan if action == "send"]
        ids = [p.item["idempotency_key"] for p in sends]
        keys = sorted({(p.kind, p.item["external_id"]) for p in sends})
        seen, latest = await self._store_retrying(lambda: self.ledger.seen(ids, keys)) if ids else ({}, {})
        # no await from here on: the flusher prunes self._latest only after its ledger write, so a
        # position is either in what the ledger answered or still in self._latest
        for action, p, why in plan:
            if action == "send":
                outcome = seen.get(p.item["idempotency_key"])
                if outcome == "applied" or (outcome is not None and not _redriven(p.record)):
                    action, why = "skip", "applied"  # re-delivered (a re-drive of a dead letter goes again)
                elif not self._newest(p, latest):
                    action, why = "skip", "older"  # an old image must not overwrite the record's newer state
            if action == "skip":
                tp, offset = (p.tp, p.offset) if isinstance(p, Pending) else ((p.topic, p.partition), p.offset)
                self.sched.skip(tp, offset)
                self.m.skipped(why)
                self._done_records.append(p.record if isinstance(p, Pending) else p)  # done: counted like applied records
                self._skipped = True
                self._flush_due.set()
            elif action == "dead":
                self.sched.hold(p)
                self._dead.append((p, "invalid", why))
                self._flush_due.set()
            else:
                self.sched.add(p)
        self._wake.set()

    def _newest(self, p: Pending, latest: MappingABC[RecordKey, Position]) -> bool:
        """The position guard: whether ``p`` is newer than every event of its record applied (the ledger)
        or taken on before it (waiting, in flight, applied but not yet saved); if so it becomes the newest."""
        assert p.position is not None
        key = (p.kind, p.item["external_id"])
        applied = latest.get(key)
        taken = self._latest.get(key)
        if (applied is not None and p.position <= applied) or (taken is not None and p.position <= taken[0]):
            return False
        self._latest[key] = (p.position, p.key)
        return True

    def buffered(self, tp: TopicPartition) -> int:
        return self.sched.buffered((tp.topic, tp.partition))

    def completed(self) -> tuple[dict[TopicPartition, int], list[Any]]:
        safe, self._safe = self._safe, {}
        done, self._done_records = self._done_records, []
        return safe, done

    def check(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def release(self, partitions: set[TopicPartition]) -> None:
        """Revocation: hold new calls, let those in flight end, save what is done, forget the rest."""
        self._open_gate.clear()
        try:
            if self._inflight:
                await asyncio.wait(set(self._inflight))
            await self._flush()
            self.sched.drop((tp.topic, tp.partition) for tp in partitions)
            for tp in partitions:  # their next owner commits them
                self._safe.pop(tp, None)
            self._latest = {k: v for k, v in self._latest.items() if self.sched.queued(v[1])}
        finally:
            self._open_gate.set()

    # -- sending
    async def _dispatch(self) -> None:
        while not self._closing:
            await self._open_gate.wait()
            self._wake.clear()  # before looking: a completion from now on wakes the wait below
            now = time.monotonic()
            timeout = 1.0
            if now < self._throttled_until:
                timeout = self._throttled_until - now
            elif len(self._inflight) < self.s.concurrency:
                for kind in self.sched.kinds_ready(now):
                    while len(self._inflight) < self.s.concurrency:
                        batch = self.sched.take(kind, self.s.batch_size, now)
                        if not batch:
                            break
                        singles = [p for p in batch if p.single] if len(batch) > 1 else []
                        groups = [[p] for p in singles] + ([rest] if (rest := [p for p in batch if not p.single]) else [])
                        for group in groups:
                            task = asyncio.create_task(self._call(kind, group))
                            self._inflight.add(task)
                            task.add_done_callback(self._inflight.discard)
                due = self.sched.next_due()
                if due is not None:
                    timeout = min(timeout, max(0.0, due - now))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(timeout, 0.001))

    async def _call(self, kind: str, batch: list[Pending]) -> None:
        try:
            wait = self.bucket.reserve(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            for p in batch:
                p.mark = self._successes
            started = time.perf_counter()
            result = await self.client.upsert(kind, [p.item for p in batch])
            self.m.call_seconds.observe(time.perf_counter() - started)
            self.m.records_sent.inc(len(batch))
            self._outcome(batch, result)
        except Exception as exc:  # noqa: BLE001 - a bug must stop the sink, not vanish in a task
            self._failure = self._failure or OutboxError(f"CRM sink failed: {type(exc).__name__}: {exc}")
            log.exception("CRM sink call failed")
        finally:
            self._wake.set()

    def _outcome(self, batch: list[Pending], result: CallResult) -> None:
        now = time.monotonic()
        status = result.status
        retry_after = cap_retry_after(result.retry_after, self.s.retry_after_max)
        self.m.call(("429" if status == 429 else f"{status // 100}xx") if status is not None else result.reason)
        verdict = classify_status(status) if status is not None else "retry"
        if verdict == OK and result.items is not None and any(classify_status(st) == AUTH for st, _ in result.items):
            status, error = next((st, e) for st, e in result.items if classify_status(st) == AUTH)
            verdict, result.error = AUTH, f"HTTP {status} for a record of a batch: {error or ''}".strip()
        if verdict == AUTH:  # for the call or for one of its records: never retried, never parked
            self._failure = CrmRefused(f"the CRM at {self.s.crm_url} refused the sink's credentials ({result.error}): "
                                       "check OUTBOX_CRM_TOKEN or --crm-token-file")
            return
        if verdict == OK and result.items is not None:
            self._successes += 1
            for p, (item_status, error) in zip(batch, result.items):
                item_verdict = classify_status(item_status)
                if item_verdict == OK:
                    self.sched.release(p)
                    self._applied.append(p)
                elif item_verdict == PERMANENT:
                    self._dead_after_call(p, "permanent", f"HTTP {item_status}: {error or ''}".strip())
                else:  # the CRM answers, this record fails: it counts (unless throttled)
                    self._retry(p, "server_error" if item_status != 429 else "rate_limited",
                                f"HTTP {item_status}: {error or ''}", now, None, counts=item_status != 429)
            self._flush_due.set()
            return
        if verdict == PERMANENT:
            if len(batch) > 1:  # which record is bad? send each alone, at once, no attempt counted
                for p in batch:
                    p.single = True
                    self.sched.retry(p, now)
                self.m.retried("split", len(batch))
                return
            self._dead_after_call(batch[0], "permanent", result.error)
            self._flush_due.set()
            return
        if status == 429:
            wait = retry_after if retry_after is not None else backoff(1, self.s.retry_base, self.s.retry_max, self.rng)
            if now + wait > self._throttled_until:
                self.m.throttled.inc(now + wait - max(now, self._throttled_until))
                self._throttled_until = now + wait
                log.log(logging.INFO if wait >= 1 else logging.DEBUG, "CRM answered 429: holding all calls for %.1f s", wait)
        for p in batch:
            self._retry(p, result.reason or "server_error", result.error, now, retry_after,
                        counts=status != 429 and counts_attempt(self._successes, p.mark))
        self._flush_due.set()

    def _retry(self, p: Pending, reason: str, error: str, now: float, retry_after: float | None, *,
               counts: bool = True) -> None:
        p.failures += 1
        if counts:
            p.attempts += 1
            if p.attempts >= self.s.max_attempts:
                self._dead_after_call(p, "attempts", f"gave up after {p.attempts} attempts; last: {error}")
                return
        delay = max(backoff(p.failures, self.s.retry_base, self.s.retry_max, self.rng), retry_after or 0.0)
        self.m.retried(reason)
        self.sched.retry(p, now + delay)

    def _dead_after_call(self, p: Pending, reason: str, error: str) -> None:
        p.attempts = max(p.attempts, 1)
        self.sched.release(p)
        self._dead.append((p, reason, error))

    # -- saving: dead letters first, then ledger rows and offsets in one transaction
    async def _flush_loop(self) -> None:
        while True:
            await self._flush_due.wait()
            await asyncio.sleep(FLUSH_INTERVAL)  # gather what completes meanwhile into one transaction
            self._flush_due.clear()
            await self._flush()

    async def _flush(self) -> None:
        async with self._flushing:  # one at a time: the offsets written only ever grow
            await self._flush_now()

    async def _flush_now(self) -> None:
        applied, self._applied = self._applied, []
        dead, self._dead = self._dead, []
        if not applied and not dead and not self._skipped:
            return
        self._skipped = False
        if dead:
            for p, _reason, error in dead:
                log.error("dead-lettered %s[%d]@%d (%s) after %d attempt(s): %s", p.tp[0], p.tp[1], p.offset,
                          p.item.get("external_id", "?"), p.attempts, error)
            assert self.dlq is not None
            dlq = self.dlq
            await self._store_retrying(lambda: dlq.park([DeadLetter.of(p.record, error) for p, _, error in dead]),
                                       "dead_letters")
            for _, reason, _ in dead:
                self.m.dead_lettered(reason)
        finished = applied + [p for p, _, _ in dead]
        self.sched.finish(finished)
        safe = self.sched.committable()
        rows = [(p.item["idempotency_key"], p.item.get("external_id"), "applied") for p in applied]
        rows += [(p.item["idempotency_key"], p.item.get("external_id"), "dead_lettered") for p, _, _ in dead]
        positions: dict[RecordKey, tuple[Position, str]] = {}
        for p in applied:
            key = (p.kind, p.item["external_id"])
            if p.position is not None and (key not in positions or positions[key][0] < p.position):
                positions[key] = (p.position, p.item["idempotency_key"])
        await self._store_retrying(lambda: self.ledger.record(rows, safe, positions), "ledger")
        for p in finished:  # the ledger holds their positions now (or they were parked): forget idle records
            key = (p.kind, p.item.get("external_id", ""))
            taken = self._latest.get(key)
            if taken is not None and taken[0] == p.position and not self.sched.queued(p.key):
                del self._latest[key]
        self._safe.update({TopicPartition(t, p): o for (t, p), o in safe.items()})
        self._done_records.extend(p.record for p in finished if not p.dropped)

    async def _store_retrying(self, write: Any, what: str = "ledger") -> Any:
        """The ledger database or Kafka may be away for a while: keep trying (the loop keeps polling;
        the records held meanwhile count as buffered, so their partitions pause at --max-buffered)."""
        while True:
            try:
                result = await write()
            except (psycopg.OperationalError, DatabaseUnavailable, SinkUnavailable, DeadLetterUnavailable, OSError) as exc:
                CRM_PARK_FAILURES.labels(self.group, what).inc()
                now = time.monotonic()
                if self._saving_failed_since is None:
                    self._saving_failed_since = now
                    target = "the dead-letter topic" if what == "dead_letters" else "the ledger database"
                    log.error("cannot write %s (%s): the CRM sink holds its records and retries every %.0f s; "
                              "partitions pause at --max-buffered until it works", target, dsnmod.first_line(exc),
                              STORE_RETRY)
                else:
                    log.debug("still cannot save the CRM sink's progress: %s", dsnmod.first_line(exc))
            else:
                if self._saving_failed_since is not None:
                    log.warning("the CRM sink saves its progress again after %.0f s",
                                time.monotonic() - self._saving_failed_since)
                    self._saving_failed_since = None
                return result
            await asyncio.sleep(STORE_RETRY)


def _redriven(record: Any) -> bool:
    """A record re-driven from the dead-letter topic (consumers/dlq.py; for_group kept only ours)."""
    return bool(record.headers) and header(record.headers, H_REDRIVE) is not None


def _coordinates(record: Any) -> str:
    """A ledger id for a record without a readable event id."""
    return f"{record.topic}:{record.partition}:{record.offset}"


# --------------------------------------------------------------------------- wiring
async def run_crm(settings: CrmSinkSettings, stop: asyncio.Event | None = None) -> MappingABC[str, int]:
    """Send events to the CRM until ``stop`` is set (or SIGTERM/SIGINT when stop is None)."""
    return await run_sink(CrmSink.create(settings), settings, stop)
