"""The session's wait for room in a full producer queue (no I/O: a producer that refuses, a stream that
records status updates). It must keep telling PostgreSQL where it stands and give up on stop."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from outbox import contract, metrics
from outbox.config import RelaySettings, build
from outbox.relay.replication import SlotInfo
from outbox.relay.session import Session
from outbox.relay.state import RelayState


class FullQueue:
    """A producer whose queue has room only after ``room_after`` attempts (None: never)."""

    def __init__(self, room_after: int | None) -> None:
        self.room_after = room_after
        self.tries = 0

    def try_send(self, record: contract.Record, report: Any) -> bool:
        self.tries += 1
        return self.room_after is not None and self.tries > self.room_after


class Stream:
    def __init__(self) -> None:
        self.statuses: list[int] = []

    def send_status(self, write_lsn: int, flush_lsn: int, now_us: int) -> None:
        self.statuses.append(flush_lsn)


def session(room_after: int | None) -> tuple[Session, FullQueue, Stream, asyncio.Event]:
    settings = build(RelaySettings, dsn="dbname=x", source_id="s", kafka={"bootstrap": "k:1"}, status_interval=0.02)
    state = RelayState(settings, metrics.RelayMetrics(f"room-{uuid.uuid4().hex[:6]}"))
    s = Session(settings, state, SlotInfo("slot", "db", 100), parker=None, eos=None)  # type: ignore[arg-type]
    queue, stream, stop = FullQueue(room_after), Stream(), asyncio.Event()
    s._publisher, s._stream, s._stop = queue, stream, stop  # type: ignore[assignment]
    return s, queue, stream, stop


RECORD = contract.Record(topic="t.pad", key=b"s:1", value=b"x" * 8_000, headers=[])


def test_waiting_for_room_keeps_sending_status_and_gives_up_on_stop() -> None:
    async def scenario() -> None:
        s, queue, stream, stop = session(room_after=None)
        txn = s.tracker.begin(1, 200, 0)
        seq = s.tracker.sent(txn)
        waiting = asyncio.ensure_future(s._send_when_room(None, RECORD, txn, seq, None))  # type: ignore[arg-type]
        while len(stream.statuses) < 3:  # status_interval 0.02 s: several updates while the queue stays full
            await asyncio.sleep(0.01)
            assert not waiting.done()
        assert set(stream.statuses) == {100}  # the confirmed position, nothing unacknowledged
        stop.set()
        await asyncio.wait_for(waiting, 1)  # gives up: the record was never queued
        assert s.stats.events == 0 and s._in_flight_bytes == 0 and s.tracker.confirmed == 100

    asyncio.run(scenario())


def test_a_record_queued_once_there_is_room_counts_its_bytes() -> None:
    async def scenario() -> None:
        s, queue, _, _ = session(room_after=3)
        txn = s.tracker.begin(1, 200, 0)
        await asyncio.wait_for(s._send_when_room(None, RECORD, txn, s.tracker.sent(txn), None), 1)  # type: ignore[arg-type]
        assert queue.tries == 4 and s.stats.events == 1 and s._in_flight_bytes == 8_000

    asyncio.run(scenario())
