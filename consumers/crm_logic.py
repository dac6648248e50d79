"""The CRM sink's pure logic (no I/O): mappings, retry policy, rate limit and per-key scheduling.

- :class:`Mapping` turns an event into a CRM upsert item (and a CRM change back into columns).
- :func:`parse_retry_after`, :func:`backoff`, :func:`classify_status`: what to do after a call.
- :class:`TokenBucket`: the configured request rate.
- :func:`parse_change`: a CRM change notification (the way back, consumers/crm_inbound.py and
  consumers/crm_writeback.py).
- :class:`KeyScheduler`: per-key order (a later event of a key waits behind an earlier one
  being retried, other keys flow), and per-partition "done up to" offsets.

Everything here is tested on values in tests/unit/test_crm_logic.py.
"""
from __future__ import annotations

import heapq
import json
import random
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

from outbox import contract
from outbox.backoff import Backoff
from outbox.errors import ConfigError

ORIGIN_CRM = "crm"  # outbox.origin of a change that came from the CRM: never sent back to it


# --------------------------------------------------------------------------- mapping
class MappingError(ValueError):
    """An event that cannot become a CRM record (a permanent failure: dead-lettered)."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """How one aggregate type becomes a CRM record.

    ``fields``: CRM field -> payload key (the row image's column). ``references``: CRM field ->
    payload key holding another aggregate's id in the same store; sent as its external id
    ``<source_id>:<id>``. ``table``/``key_column``: the legacy table the way back writes to.
    """

    aggregate_type: str
    kind: str
    fields: dict[str, str]
    references: dict[str, str] = field(default_factory=dict)
    table: str | None = None
    key_column: str = "id"

    def item(self, event: contract.ReceivedEvent) -> dict[str, Any]:
        """The upsert item for one event: external id, mapped fields, active flag, idempotency key, meta."""
        try:
            image = json.loads(event.payload)
        except ValueError as exc:
            raise MappingError(f"payload is not JSON: {exc}") from None
        except RecursionError:  # about 1,000 levels: a poison record, parked, not a crash loop
            raise MappingError("payload is JSON nested too deeply") from None
        deleted = contract.is_deletion(event.type)
        if not isinstance(image, dict):
            if deleted and image is None:
                image = {}
            else:
                raise MappingError(f"payload is a JSON {type(image).__name__}, not an object")
        out: dict[str, Any] = {k: image.get(src) for k, src in self.fields.items() if src in image}
        for k, src in self.references.items():
            if image.get(src) is not None:
                out[k] = contract.key_for(event.source_id, str(image[src]))
        return {
            "external_id": contract.key_for(event.source_id, event.aggregate_id),
            "fields": out,
            "active": not deleted,
            "idempotency_key": event.id,
            "meta": {"event_id": event.id, "type": event.type, "position": str(event.position)},
        }

    def columns(self, crm_fields: MappingABC[str, Any]) -> dict[str, Any]:
        """The way back: CRM fields -> legacy columns (references and unknown fields are left out)."""
        return {src: crm_fields[k] for k, src in self.fields.items() if k in crm_fields}

    def previous_columns(self, change: Change) -> dict[str, Any] | None:
        """What the CRM held before the edit, for the columns the change writes (None: the CRM did not
        say; a field it did not have is null)."""
        if change.previous is None:
            return None
        return {src: change.previous.get(k) for k, src in self.fields.items() if k in change.fields}


DEFAULT_MAPPINGS: dict[str, Mapping] = {
    "customer": Mapping("customer", "contacts",
                        {"name": "name", "email": "email", "phone": "phone", "loyalty_points": "loyalty_pts",
                         "balance": "balance"},
                        table="pos.customers"),
    "order": Mapping("order", "orders",
                     {"status": "status", "total": "total", "placed_at": "placed_at", "note": "note"},
                     references={"contact": "customer_id"}, table="pos.orders"),
}


def load_mappings(path: str | None) -> dict[str, Mapping]:
    """Mappings from a TOML file (one table per aggregate type), or the defaults for the POS demo.

    ``[customer]`` ``kind = "contacts"`` ``fields = { name = "name", loyalty_points = "loyalty_pts" }``
    ``references = { ... }`` ``table = "pos.customers"`` ``key_column = "id"``.
    """
    if path is None:
        return dict(DEFAULT_MAPPINGS)
    from outbox.tomlfile import load_file

    data = load_file(path)
    mappings = {}
    for aggregate, spec in data.items():
        where = f"mapping file {path}, [{aggregate}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(spec) - {"kind", "fields", "references", "table", "key_column"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        kind, fields_, refs = spec.get("kind"), spec.get("fields"), spec.get("references", {})
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}: 'kind' (the CRM record kind, e.g. contacts) is required")
        for name, table in (("fields", fields_), ("references", refs)):
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise ConfigError(f"{where}: '{name}' must be a table of CRM field = payload key")
        assert isinstance(fields_, dict) and isinstance(refs, dict)
        mappings[aggregate] = Mapping(aggregate, kind, dict(fields_), dict(refs), spec.get("table"),
                                      spec.get("key_column", "id"))
    return mappings


# --------------------------------------------------------------------------- retry policy
OK, RETRY, PERMANENT, AUTH = "ok", "retry", "permanent", "auth"


def classify_status(status: int) -> str:
    """2xx ok; 408, 429 and 5xx retry; 401 and 403 stop the sink (never retried); other 4xx permanent."""
    if 200 <= status < 300:
        return OK
    if status in (401, 403):
        return AUTH
    if status in (408, 429) or status >= 500:
        return RETRY
    return PERMANENT


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def cap_retry_after(seconds: float | None, cap: float) -> float | None:
    """A Retry-After is the CRM's wish, not an order: never hold calls longer than ``cap`` seconds
    (a value of a day, or a CRM clock running ahead, would stop the sink that long)."""
    return None if seconds is None else min(max(0.0, seconds), cap)


def counts_attempt(successes_now: int, mark: int) -> bool:
    """Whether a transient failure (no answer, 5xx, 408) counts toward ``--max-attempts``: only when
    the CRM answered other calls with success since this record was sent (``successes_now > mark``).
    While every call fails the CRM is down, and records back off without using up their attempts,
    so an outage of any length parks nothing. 429s never count (the CRM throttles the client)."""
    return successes_now > mark


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """The delay before retry number ``attempt`` (from 1): base*2^(attempt-1) capped, jittered into its
    upper half: the relay's reconnect policy (outbox/backoff.py), per record."""
    return Backoff(initial=base, cap=cap, attempt=max(0, attempt - 1), rng=rng).next()


class TokenBucket:
    """``rate`` calls a second on average, ``burst`` at once. :meth:`reserve` takes a token and says how
    long to wait before using it (tokens may be borrowed: callers that wait keep the average)."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._at = now

    def reserve(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# --------------------------------------------------------------------------- per-key scheduling
TP = tuple[str, int]


@dataclass(slots=True, eq=False)
class Pending:
    """One event on its way to the CRM."""

    tp: TP
    offset: int
    key: tuple[str, bytes | None]  # (topic, Kafka key): events of one key go one at a time, in order
    kind: str
    item: dict[str, Any]
    record: Any = None  # the Kafka record, for the dead-letter topic
    attempts: int = 0  # failures that count toward --max-attempts (see counts_attempt)
    failures: int = 0  # every failed try: the backoff's exponent
    position: tuple[int, int] | None = None  # the event's source position (commit LSN, index)
    mark: int = 0  # successful calls the sink had seen when this record was last sent (see counts_attempt)
    single: bool = False  # sent alone (a batch call refused as a whole is retried item by item)
    dropped: bool = False  # its partition was revoked while it was in flight


class _Offsets:
    """Offsets of one partition in order, each done or not: the next offset to commit is the first not done."""

    def __init__(self) -> None:
        self.entries: deque[list[int]] = deque()  # [offset, done]
        self.index: dict[int, list[int]] = {}
        self.next: int | None = None

    def add(self, offset: int) -> None:
        entry = [offset, 0]
        self.entries.append(entry)
        self.index[offset] = entry

    def finish(self, offset: int) -> None:
        entry = self.index.pop(offset, None)
        if entry is not None:
            entry[1] = 1
        while self.entries and self.entries[0][1]:
            self.next = self.entries.popleft()[0] + 1


class KeyScheduler:
    """Which events may be sent now, which partitions are done up to where."""

    def __init__(self) -> None:
        self._queues: dict[tuple[str, bytes | None], deque[Pending]] = {}
        self._ready: dict[str, deque[tuple[str, bytes | None]]] = {}  # kind -> keys whose head may go
        self._waiting: list[tuple[float, int, tuple[str, bytes | None]]] = []  # heads backing off
        self._seq = 0
        self._offsets: dict[TP, _Offsets] = {}
        self._buffered: dict[TP, int] = {}

    # -- intake
    def add(self, p: Pending) -> None:
        self._track(p.tp).add(p.offset)
        self._buffered[p.tp] = self._buffered.get(p.tp, 0) + 1
        queue = self._queues.get(p.key)
        if queue is None:
            self._queues[p.key] = deque([p])
            self._ready.setdefault(p.kind, deque()).append(p.key)
        else:
            queue.append(p)

    def skip(self, tp: TP, offset: int) -> None:
        """A record that needs no call (already applied, an echo, an unmapped type): done at once."""
        track = self._track(tp)
        track.add(offset)
        track.finish(offset)

    def hold(self, p: Pending) -> None:
        """Track an offset that completes later, through :meth:`finish` (a record bound for the dead-letter topic)."""
        self._track(p.tp).add(p.offset)
        self._buffered[p.tp] = self._buffered.get(p.tp, 0) + 1

    def _track(self, tp: TP) -> _Offsets:
        track = self._offsets.get(tp)
        if track is None:
            track = self._offsets[tp] = _Offsets()
        return track

    # -- sending
    def kinds_ready(self, now: float) -> list[str]:
        self._wake(now)
        return [k for k, keys in self._ready.items() if keys]

    def take(self, kind: str, limit: int, now: float) -> list[Pending]:
        """Up to ``limit`` events of ``kind``, at most one per key, each the oldest of its key."""
        self._wake(now)
        keys = self._ready.get(kind)
        out: list[Pending] = []
        while keys and len(out) < limit:
            queue = self._queues.get(keys.popleft())
            if queue:
                out.append(queue[0])
        return out

    def _wake(self, now: float) -> None:
        while self._waiting and self._waiting[0][0] <= now:
            _, _, key = heapq.heappop(self._waiting)
            queue = self._queues.get(key)
            if queue:
                self._ready.setdefault(queue[0].kind, deque()).append(key)

    def next_due(self) -> float | None:
        return self._waiting[0][0] if self._waiting else None

    # -- outcomes
    def retry(self, p: Pending, at: float) -> None:
        """The key's head goes again at ``at``; its later events keep waiting behind it."""
        if p.dropped:
            return
        self._seq += 1
        heapq.heappush(self._waiting, (at, self._seq, p.key))

    def release(self, p: Pending) -> None:
        """The call for ``p`` is over (applied or dead-lettered): the key's next event may go.
        Its offset counts as done only after :meth:`finish` (once the ledger holds it)."""
        if p.dropped:
            return
        queue = self._queues[p.key]
        assert queue[0] is p
        queue.popleft()
        if queue:
            self._ready.setdefault(queue[0].kind, deque()).append(p.key)
        else:
            del self._queues[p.key]

    def finish(self, done: Iterable[Pending]) -> dict[TP, int]:
        """Mark offsets done; returns the next offset to commit of every partition that moved."""
        moved = {}
        for p in done:
            if p.dropped:
                continue
            track = self._offsets[p.tp]
            before = track.next
            track.finish(p.offset)
            self._buffered[p.tp] -= 1
            if track.next != before and track.next is not None:
                moved[p.tp] = track.next
        return moved

    def committable(self) -> dict[TP, int]:
        return {tp: t.next for tp, t in self._offsets.items() if t.next is not None}

    def buffered(self, tp: TP) -> int:
        """Records of ``tp`` held until :meth:`finish` (waiting, in flight, or done but not yet saved:
        a ledger or dead-letter topic that cannot be written keeps them, and the partition pauses)."""
        return self._buffered.get(tp, 0)

    def queued(self, key: tuple[str, bytes | None]) -> bool:
        """Whether events of ``key`` wait or are in flight."""
        return key in self._queues

    def drop(self, tps: Iterable[TP]) -> None:
        """Forget revoked partitions: their events are re-fetched by the partitions' next owner."""
        gone = set(tps)
        for key in [k for k, q in self._queues.items() if q[0].tp in gone]:
            for p in self._queues.pop(key):
                p.dropped = True
        for kind, keys in self._ready.items():
            self._ready[kind] = deque(k for k in keys if k in self._queues)
        self._waiting = [w for w in self._waiting if w[2] in self._queues]
        heapq.heapify(self._waiting)
        for tp in gone:
            self._offsets.pop(tp, None)
            self._buffered.pop(tp, None)

    def idle(self) -> bool:
        return not self._queues


H_DELIVERY = "crm_delivery_id"  # the Kafka header of a notification's delivery id


# --------------------------------------------------------------------------- the way back: a CRM change
@dataclass(frozen=True, slots=True)
class Change:
    """One CRM change notification, as the writeback applies it."""

    delivery_id: str
    kind: str
    source_id: str
    aggregate_id: str
    fields: dict[str, Any]  # the fields the agent changed, with their new values
    previous: dict[str, Any] | None = None  # their values in the CRM before the edit (None: not given)


def parse_change(value: bytes | None) -> Change:
    """Read a notification (the reference CRM's webhook body); ValueError says why it is unusable.

    Numbers are read as :class:`~decimal.Decimal` (never through a float): the write-back hands
    them to PostgreSQL as their exact digits (see :func:`column_json`).
    """
    try:
        body = json.loads(value or b"", parse_float=Decimal)
    except RecursionError:
        raise ValueError("the notification is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ValueError("the notification is not a JSON object")
    delivery, kind, external_id, fields = (body.get(k) for k in ("id", "kind", "external_id", "fields"))
    if not all(isinstance(v, str) and v for v in (delivery, kind, external_id)) or not isinstance(fields, dict):
        raise ValueError("the notification needs id, kind, external_id (strings) and fields (an object)")
    source_id, sep, aggregate_id = str(external_id).partition(":")
    if not sep or not source_id or not aggregate_id:
        raise ValueError(f"external id {external_id!r} is not <source_id>:<aggregate_id>")
    previous = body.get("previous")
    if previous is not None and not isinstance(previous, dict):
        raise ValueError("the notification's previous values must be an object")
    return Change(str(delivery), str(kind), source_id, aggregate_id, fields, previous)


def column_json(columns: MappingABC[str, Any]) -> str:
    """Column values as the JSON object jsonb_populate_record types: a Decimal goes as its exact
    digits in a JSON string (PostgreSQL's input function of the column's type reads it)."""
    return json.dumps(columns, default=_exact)


def _exact(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def mapping_for_kind(mappings: MappingABC[str, Mapping], kind: str) -> Mapping | None:
    for m in mappings.values():
        if m.kind == kind and m.table:
            return m
    return None
