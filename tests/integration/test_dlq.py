"""Dead letters on the real servers: parked by the read store, fixed, re-driven; periodic re-drive."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from outbox import contract
from outbox.consumers import kafka as consumer_loop
from outbox.consumers import readstore as rs
from outbox.consumers.dlq import Redriven
from tests.support.kafka import committed_offsets, end_offsets, kcat_read
from tests.support.processes import outbox
from tests.support.readstore import caught_up, ev, produce, run_until, settings, wait_for

pytestmark = pytest.mark.integration

# The read store's DBA adds a rule the sink enforces: customer "bad" is refused (a data exception,
# SQLSTATE 22023), as a store-side constraint or a bad deploy would. Every write is counted.
REFUSE = """
CREATE TABLE public.writes (aggregate_id text, event_id uuid);
CREATE FUNCTION public.refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.aggregate_id = 'bad' THEN
        RAISE EXCEPTION 'customer bad is refused' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO public.writes VALUES (NEW.aggregate_id, NEW.event_id);
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_bad BEFORE INSERT OR UPDATE ON readstore.entities FOR EACH ROW EXECUTE FUNCTION public.refuse_bad();
"""


FIXED = """
CREATE OR REPLACE FUNCTION public.refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.writes VALUES (NEW.aggregate_id, NEW.event_id);
    RETURN NEW;
END $$
"""


def writes(dsn: str, aggregate_id: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [str(r[0]) for r in conn.execute("SELECT event_id FROM public.writes WHERE aggregate_id = %s",
                                                (aggregate_id,))]


def test_a_dead_letter_fixed_then_redriven_is_applied_once_with_its_id(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str]) -> None:
    dsn, g = readstore_db, group()
    group("outbox-redrive")  # the CLI's cursor group, deleted afterwards
    with psycopg.connect(dsn) as conn:
        conn.execute(REFUSE)
    bad = ev(topic_prefix, "customer", "bad", "created", 0x20)
    bad_id = dict(bad.headers)[contract.H_ID].decode()
    ends = asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", "a", "created", 0x10), bad,
                                                  ev(topic_prefix, "customer", "c", "created", 0x30)]))
    s = settings(dsn, kafka_bootstrap, topic_prefix, g)
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends)))
    assert totals["refused"] == 1 and writes(dsn, "bad") == [] and writes(dsn, "a") != []
    dlq_topic = f"{topic_prefix}.customer.dlq"
    parked = kcat_read(kafka_bootstrap, dlq_topic)
    assert len(parked) == 1 and parked[0]["headers"]["dlq_group"] == g
    assert "customer bad is refused" in parked[0]["headers"]["dlq_error"]

    # the DBA fixes the cause, the operator re-drives
    with psycopg.connect(dsn) as conn:
        conn.execute(FIXED)
        conn.execute("DELETE FROM public.writes")
    dry = outbox("replay", "--dlq", dlq_topic, "--filter", "type=customer.*", "--kafka-bootstrap", kafka_bootstrap,
                 "--dry-run")
    assert "1 of 1 parked records" in dry.stderr, dry.stderr
    nothing = outbox("replay", "--dlq", dlq_topic, "--filter", f"group={g}-other", "--kafka-bootstrap", kafka_bootstrap,
                     "--yes")
    assert "0 of 1 parked records" in nothing.stderr, nothing.stderr
    res = outbox("replay", "--dlq", dlq_topic, "--from", "earliest", "--filter", f"group={g}",
                 "--filter", "error=refused", "--kafka-bootstrap", kafka_bootstrap, "--yes")
    assert res.returncode == 0 and "re-drove 1 records" in res.stderr, res.stderr
    again = outbox("replay", "--dlq", dlq_topic, "--kafka-bootstrap", kafka_bootstrap, "--yes")
    assert "0 of 0 parked records" in again.stderr, again.stderr  # the cursor moved past it

    back = [r for r in kcat_read(kafka_bootstrap, f"{topic_prefix}.customer") if r["key"] == "s1:bad"]
    assert len(back) == 2 and back[1]["headers"]["dlq_redrive"] == g and back[1]["headers"][contract.H_ID] == bad_id
    other = group()  # another group of the same topics skips the re-driven copy
    asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", "z", "created", 0x40)]))
    ends_all = asyncio.run(end_offsets(kafka_bootstrap, f"{topic_prefix}.customer"))
    assert sum(ends_all.values()) == 5
    totals = asyncio.run(run_until(s, caught_up(dsn, g, ends_all)))
    assert totals["changed"] == 2  # bad, at last, and z
    assert writes(dsn, "bad") == [bad_id]  # applied once, with its original id
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT event_id::text FROM readstore.entities WHERE aggregate_id = 'bad'").fetchone() == (bad_id,)
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM public.writes")
    other_totals = asyncio.run(run_until(settings(dsn, kafka_bootstrap, topic_prefix, other), caught_up(dsn, other, ends_all)))
    assert other_totals["records"] == 5 and other_totals["skipped"] >= 1
    # it never parked "bad": it tried the original record (now fine), and skipped the re-driven copy
    assert writes(dsn, "bad") == [bad_id]


def sample(name: str, group: str) -> float:
    return REGISTRY.get_sample_value(name, {"group": group, "sink": "readstore"}) or 0.0


def test_periodic_redrive_gives_up_after_the_attempt_limit(
        readstore_db: str, kafka_bootstrap: str, topic_prefix: str, group: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dsn, g = readstore_db, group()
    rounds: list[Redriven] = []  # every periodic re-drive round, as it ended
    redrive = consumer_loop.redrive

    async def counted(*args: Any, **kw: Any) -> Redriven:
        done = await redrive(*args, **kw)
        rounds.append(done)
        return done

    monkeypatch.setattr(consumer_loop, "redrive", counted)
    group(f"{g}.redrive")
    with psycopg.connect(dsn) as conn:
        conn.execute(REFUSE)  # never fixed
    asyncio.run(produce(kafka_bootstrap, [ev(topic_prefix, "customer", "bad", "created", 0x20)]))
    dlq_topic = f"{topic_prefix}.customer.dlq"
    s = settings(dsn, kafka_bootstrap, topic_prefix, g).model_copy(update={"redrive_every": 0.02, "redrive_max_attempts": 3})

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(rs.run_readstore(s, stop))
        try:
            await wait_for(lambda: sample("outbox_consumer_dead_letters_exhausted_total", g) >= 1, task, timeout=90)
            exhausted_in = len(rounds)
            # the cursor is past every dead letter, the consumer past every re-driven copy: nothing is left to
            # re-drive; two more rounds end without re-driving anything
            dlq_ends = await end_offsets(kafka_bootstrap, dlq_topic)
            cursor = await committed_offsets(kafka_bootstrap, f"{g}.redrive")
            assert {tp: cursor.get(tp) for tp in dlq_ends} == dlq_ends
            await wait_for(caught_up(dsn, g, await end_offsets(kafka_bootstrap, f"{topic_prefix}.customer")), task)
            await wait_for(lambda: len(rounds) >= exhausted_in + 2, task, timeout=30,
                           message="two more re-drive rounds")
            assert [(r.redriven, r.exhausted) for r in rounds[exhausted_in:]] == [(0, 0)] * (len(rounds) - exhausted_in)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    asyncio.run(scenario())
    attempts = [r["headers"]["dlq_attempts"] for r in kcat_read(kafka_bootstrap, dlq_topic)]
    assert attempts == ["1", "2", "3"]
    assert sample("outbox_consumer_dead_letters_redriven_total", g) == 2
    assert sample("outbox_consumer_dead_letters_exhausted_total", g) == 1
    assert sample("outbox_consumer_events_rejected_total", g) == 3
