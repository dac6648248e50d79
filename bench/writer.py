"""A paced writer, run as its own process: ``python -m bench.writer DBNAME RATE SECONDS``.

Every 10 ms tick it commits the events due by then (rate x elapsed time, so a late tick catches
up), split into transactions of at most ``--txn-size`` events, each one INSERT ... SELECT
statement (PostgreSQL builds the ~400-byte payloads). The transactions of a tick go out
pipelined; ``synchronous_commit`` stays at the server's setting (on), as in a real store.
Prints one JSON line: events and transactions committed, seconds, late ticks.
"""
from __future__ import annotations

import argparse
import json
import time

import psycopg

from bench.common import INSERT_EVENTS_SQL

TICK = 0.010


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dbname")
    parser.add_argument("rate", type=float, help="events per second")
    parser.add_argument("seconds", type=float)
    parser.add_argument("--txn-size", type=int, default=20)
    args = parser.parse_args()
    sent = transactions = late = 0
    with psycopg.connect(dbname=args.dbname, autocommit=True) as conn:
        conn.execute(INSERT_EVENTS_SQL, (1,), prepare=True)  # warm the plan; one event, not counted below
        started = time.perf_counter()
        first_wall = time.time()
        tick = 0
        while True:
            tick += 1
            due_at = started + tick * TICK
            now = time.perf_counter()
            if due_at > started + args.seconds:
                break
            if now < due_at:
                time.sleep(due_at - now)
            elif now - due_at > TICK:
                late += 1
            due = int(args.rate * tick * TICK) - sent
            if due <= 0:
                continue
            with conn.pipeline():
                while due > 0:
                    k = min(due, args.txn_size)
                    conn.execute(INSERT_EVENTS_SQL, (k,), prepare=True)
                    due -= k
                    sent += k
                    transactions += 1
        elapsed = time.perf_counter() - started
    print(json.dumps({"events": sent + 1, "transactions": transactions + 1, "seconds": elapsed,
                      "rate": sent / elapsed, "late_ticks": late, "ticks": tick - 1, "started": first_wall}))


if __name__ == "__main__":
    main()
