"""Our DDL in someone else's busy database, without queueing the application behind it.

A ``CREATE TRIGGER`` or ``DROP TRIGGER`` that waits for a table lock is itself in the lock queue:
every later INSERT (or, for ACCESS EXCLUSIVE, every SELECT) on that table queues behind it. So each
such transaction runs with ``SET LOCAL lock_timeout`` (short: the longest the application may be
held up), is rolled back when the lock is not granted in time, and is tried again after a
backoff, until a total wait (``--lock-wait``) is spent. While it waits, a second connection asks
``pg_blocking_pids()`` who is in the way, so each retry prints one line naming the session, and
giving up is one line naming it too.

Creating a logical slot waits too, for the transactions running when it starts (it takes no
table lock, so nobody queues behind it): it runs once, watched the same way, and is cancelled
when the total wait is spent.

The wording (``describe_blocker``, ``lock_timeout_sql``...) is pure and unit-tested; ``watched``
and ``retry_on_lock_timeout`` are the thin I/O around it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from outbox.backoff import Backoff
from outbox.errors import PreconditionFailed

DEFAULT_LOCK_TIMEOUT = 2.0  # seconds: the longest one attempt may hold the application up
DEFAULT_LOCK_WAIT = 300.0  # seconds: the total wait for one table's lock (or for the slot) before giving up
POLL = 0.1  # seconds between two looks at who blocks the attempt

T = TypeVar("T")
Echo = Callable[[str], None]


class LockWaitExceeded(PreconditionFailed):
    """A lock (or the running transactions a new slot waits for) was not had within --lock-wait."""


# =========================================================================== pure
@dataclass(frozen=True)
class Blocker:
    """A session in the way, as pg_stat_activity shows it."""

    pid: int
    state: str | None = None  # active, idle in transaction, ...
    seconds: float | None = None  # in that state for
    user: str | None = None
    application: str | None = None


@dataclass(frozen=True)
class Waiting:
    """What one look at a waiting backend found: whom it waits for, on which table (if a table)."""

    blockers: tuple[Blocker, ...] = ()
    relation: str | None = None


def lock_timeout_value(seconds: float) -> str:
    """``2s``, ``500ms``: the value PostgreSQL's lock_timeout takes; 0 means no timeout."""
    ms = max(0, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 and ms else f"{ms}ms" if ms else "0"


def lock_timeout_sql(seconds: float) -> str:
    return f"SET LOCAL lock_timeout = '{lock_timeout_value(seconds)}'"


def duration(seconds: float | None) -> str:
    """``12 s``, ``3 min``, ``2 h 5 min``: how long a session has been in its state."""
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def describe_blocker(b: Blocker) -> str:
    """``pid 123 (idle in transaction for 3 min, user pos_app, application batch)``; no query text (it may hold PII)."""
    parts = [f"{b.state or 'unknown state'} for {duration(b.seconds)}"]
    if b.user:
        parts.append(f"user {b.user}")
    if b.application:
        parts.append(f"application {b.application}")
    return f"pid {b.pid} ({', '.join(parts)})"


def describe_blockers(blockers: tuple[Blocker, ...]) -> str:
    if not blockers:
        return "a session that has gone since"
    shown = ", ".join(describe_blocker(b) for b in blockers[:3])
    return shown + (f" and {len(blockers) - 3} more" if len(blockers) > 3 else "")


def seconds_text(seconds: float) -> str:
    return f"{seconds:g} s"


# =========================================================================== I/O
_WAITING_SQL = """
SELECT a.pid, a.state, extract(epoch FROM now() - a.state_change)::float8, a.usename::text, a.application_name,
       (SELECT l.relation::regclass::text FROM pg_locks l
        WHERE l.pid = %(pid)s AND NOT l.granted AND l.relation IS NOT NULL LIMIT 1)
FROM unnest(pg_blocking_pids(%(pid)s)) AS b(pid) JOIN pg_stat_activity a ON a.pid = b.pid
ORDER BY a.state_change NULLS LAST, a.pid
"""


def look(monitor: psycopg.Connection[Any], pid: int) -> Waiting:
    """Whom backend ``pid`` waits for right now (empty when it waits for nobody)."""
    rows = monitor.execute(_WAITING_SQL, {"pid": pid}).fetchall()
    if not rows:
        return Waiting()
    return Waiting(tuple(Blocker(r[0], r[1], r[2], r[3] or None, r[4] or None) for r in rows), rows[0][5])


def watched(work: psycopg.Connection[Any], monitor: psycopg.Connection[Any], attempt: Callable[[], T], *,
            deadline: float | None = None, on_wait: Callable[[Waiting], None] | None = None) -> tuple[T | BaseException, Waiting]:
    """Run ``attempt`` (statements on ``work``) in a thread and watch, from ``monitor``, whom it waits for.

    Returns what it returned or raised, and the last non-empty look. Past ``deadline``
    (``time.monotonic()``), the attempt is cancelled (it then raises QueryCanceled).
    ``on_wait`` is called with each look that found a blocker.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(attempt())
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    pid = work.info.backend_pid
    thread = threading.Thread(target=run, name="outbox-ddl", daemon=True)
    thread.start()
    seen = Waiting()
    cancelled = False
    while True:
        thread.join(POLL)
        if not thread.is_alive():
            break
        try:
            now = look(monitor, pid)
        except psycopg.Error:
            now = Waiting()
        if now.blockers:
            seen = now
            if on_wait is not None:
                on_wait(now)
        if deadline is not None and not cancelled and time.monotonic() >= deadline:
            work.cancel_safe()
            cancelled = True
    return outcome[0], seen


def retry_on_lock_timeout(work: psycopg.Connection[Any], monitor: psycopg.Connection[Any], attempt: Callable[[], T], *,
                          what: str, lock_timeout: float, lock_wait: float, echo: Echo,
                          give_up: Callable[[str], str], backoff: Backoff | None = None) -> T:
    """Run ``attempt`` (one transaction that began with ``SET LOCAL lock_timeout``) until it gets its locks.

    ``what`` names the table(s) for the progress line when PostgreSQL does not say; ``give_up``
    turns the blocker's description into the one-line error raised after ``lock_wait`` seconds.
    """
    backoff = backoff or Backoff(initial=0.5, cap=10.0)
    started = time.monotonic()
    tries = 0
    while True:
        result, seen = watched(work, monitor, attempt)
        if not isinstance(result, BaseException):
            return result
        if not isinstance(getattr(result, "orig", None) or result, psycopg.errors.LockNotAvailable):
            raise result  # SQLAlchemy wraps psycopg's error in .orig
        tries += 1
        where = seen.relation or what
        left = lock_wait - (time.monotonic() - started)
        if left <= 0:
            raise LockWaitExceeded(give_up(f"gave up after {seconds_text(lock_wait)} (--lock-wait) waiting for a lock on "
                                           f"{where}, held or awaited by {describe_blockers(seen.blockers)}"))
        delay = min(backoff.next(), left)
        echo(f"waiting for {describe_blockers(seen.blockers)} on {where}: lock not granted within "
             f"{seconds_text(lock_timeout)} (--lock-timeout); try {tries + 1} in {delay:.1f} s, giving up in {left:.0f} s")
        time.sleep(delay)


__all__ = ["Blocker", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_LOCK_WAIT", "LockWaitExceeded", "Waiting", "describe_blocker",
           "describe_blockers", "duration", "lock_timeout_sql", "lock_timeout_value", "look", "retry_on_lock_timeout",
           "watched"]
