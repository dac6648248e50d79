"""Source positions: what was received, what Kafka acknowledged, what is safe to confirm.

Pure logic, no I/O. Only commit LSNs are ordered across transactions, so the relay confirms the
end LSN of a transaction's commit record once every event of that transaction, and of every
transaction before it, has been acknowledged by Kafka. With nothing pending, a keepalive's
WAL position may be confirmed too, so a quiet slot keeps moving.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Txn:
    """One source transaction on its way to Kafka."""

    xid: int
    commit_lsn: int
    commit_time: int  # microseconds since 2000-01-01, from the Begin message
    pending: int = 0  # events sent to Kafka and not yet acknowledged
    events: int = 0  # events seen so far; the next event's index in the transaction
    end_lsn: int | None = None  # set by the Commit message
    failed: bool = False


@dataclass(slots=True)
class PositionTracker:
    """Keeps "received", "published" and "confirmed" apart."""

    confirmed: int = 0  # safe to report as flushed to PostgreSQL
    received: int = 0  # highest WAL position seen on the stream
    in_flight: int = 0  # events sent and not acknowledged, across transactions
    _open: deque[Txn] = field(default_factory=deque)

    def begin(self, xid: int, commit_lsn: int, commit_time: int) -> Txn:
        txn = Txn(xid=xid, commit_lsn=commit_lsn, commit_time=commit_time)
        self._open.append(txn)
        return txn

    def sent(self, txn: Txn) -> int:
        """An event of ``txn`` was handed to Kafka; returns its index in the transaction."""
        txn.pending += 1
        self.in_flight += 1
        seq = txn.events
        txn.events += 1
        return seq

    def acked(self, txn: Txn) -> None:
        txn.pending -= 1
        self.in_flight -= 1
        if not txn.pending:  # only the last acknowledgement of a transaction can let the front move
            self._advance()

    def failed(self, txn: Txn) -> None:
        """Kafka refused an event: this transaction, and all after it, can never be confirmed."""
        txn.failed = True
        txn.pending -= 1
        self.in_flight -= 1

    def hold(self, txn: Txn) -> None:
        """Keep ``txn`` unconfirmed, acknowledged or not, until :meth:`release` (exactly-once mode holds
        each transaction until the Kafka transaction holding it commits)."""
        txn.pending += 1

    def release(self, txn: Txn) -> None:
        txn.pending -= 1
        self._advance()

    def commit(self, txn: Txn, end_lsn: int) -> None:
        txn.end_lsn = end_lsn
        self.saw(end_lsn)
        self._advance()

    def saw(self, lsn: int) -> None:
        if lsn > self.received:
            self.received = lsn

    def keepalive(self, wal_end: int) -> None:
        """The server has sent everything up to ``wal_end``; with nothing open, that is confirmable."""
        self.saw(wal_end)
        if not self._open and wal_end > self.confirmed:
            self.confirmed = wal_end

    @property
    def open_transactions(self) -> int:
        return len(self._open)

    def _advance(self) -> None:
        while self._open:
            head = self._open[0]
            if head.end_lsn is None or head.pending or head.failed:
                return
            self._open.popleft()
            if head.end_lsn > self.confirmed:
                self.confirmed = head.end_lsn
