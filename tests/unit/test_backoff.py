"""The reconnect delay policy."""
from __future__ import annotations

import random

from outbox.backoff import Backoff


def test_delays_grow_exponentially_within_jitter_and_stop_at_the_cap() -> None:
    b = Backoff(initial=1.0, cap=10.0, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 10, 10, 10, 10]
    for delay, ceiling in zip(delays, ceilings):
        assert ceiling / 2 <= delay <= ceiling
    assert b.attempt == 8


def test_jitter_spreads_relays_apart_and_reset_starts_over() -> None:
    a, b = Backoff(initial=4.0, rng=random.Random(1)), Backoff(initial=4.0, rng=random.Random(2))
    assert a.next() != b.next()
    for _ in range(50):
        a.next()
    assert a.next() <= a.cap
    a.reset()
    assert a.next() <= 4.0 and a.attempt == 1


def test_connection_failures_that_retrying_cannot_fix_are_told_apart() -> None:
    from outbox.dsn import is_permanent

    permanent = [
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password authentication failed for user "relay"',
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "store9" does not exist',
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "nobody" does not exist',
        'FATAL:  no pg_hba.conf entry for replication connection from host "10.0.0.1", user "relay"',
        'FATAL:  role "relay" is not permitted to log in',
        'FATAL:  permission denied to start WAL sender',
    ]
    transient = [
        'connection to server at "127.0.0.1", port 5432 failed: Connection refused',
        "FATAL:  terminating connection due to administrator command",
        "FATAL:  the database system is starting up",
        "FATAL:  the database system is shutting down",
        "server closed the connection unexpectedly",
        "FATAL:  sorry, too many clients already",
        "timeout expired",
    ]
    assert all(is_permanent(m) for m in permanent)
    assert not any(is_permanent(m) for m in transient)
