"""The CRM sink's decisions after a call (no servers: a scripted CRM answer, no ledger I/O)."""
from __future__ import annotations

import time
from typing import Any

import pytest

from outbox.config import KafkaSettings
from outbox.consumers.crm import CallResult, CrmRefused, CrmSink, CrmSinkSettings
from outbox.consumers.crm_logic import DEFAULT_MAPPINGS, Pending


def sink(**settings: Any) -> CrmSink:
    s = CrmSinkSettings(crm_url="http://crm.invalid", dsn="dbname=x", kafka=KafkaSettings(bootstrap="k:9092"),
                        group=f"g{time.monotonic_ns()}", **settings)
    return CrmSink(s, client=None, ledger=None, mappings=DEFAULT_MAPPINGS, seed=1)  # type: ignore[arg-type]


def batch(s: CrmSink, n: int) -> list[Pending]:
    items = [Pending(("t", 0), i, ("t", f"k{i}".encode()), "contacts", {"idempotency_key": f"e{i}"}) for i in range(n)]
    for p in items:
        s.sched.add(p)
    assert s.sched.take("contacts", n, time.monotonic()) == items
    return items


def test_per_record_answers_apply_retry_and_park_each_record() -> None:
    s = sink()
    ok, retry, bad = batch(s, 3)
    s._outcome([ok, retry, bad], CallResult(200, items=[(201, None), (503, "busy"), (400, "invalid email")]))
    assert s._applied == [ok]
    assert [(p, reason) for p, reason, _ in s._dead] == [(bad, "permanent")]
    assert retry.attempts == 1 and s.sched.next_due() is not None  # waits for its backoff, nothing else of its key goes


def test_a_batch_refused_whole_is_retried_record_by_record() -> None:
    s = sink()
    items = batch(s, 3)
    s._outcome(items, CallResult(400, error="HTTP 400: duplicate external_id"))
    assert all(p.single and p.attempts == 0 for p in items) and not s._dead
    alone = items[0]
    assert s.sched.take("contacts", 10, time.monotonic()) == items  # due at once, each to be sent alone
    s._outcome([alone], CallResult(400, error="HTTP 400: nope"))
    assert [p for p, _, _ in s._dead] == [alone]


def test_attempts_run_out_into_the_dead_letter_topic() -> None:
    s = sink(max_attempts=2)
    p, other = batch(s, 2)
    s._outcome([p], CallResult(None, reason="timeout", error="no answer within 10 s"))
    assert not s._dead
    s._outcome([other], CallResult(200, items=[(200, None)]))  # the CRM answers others: p's failures count
    s._outcome([p], CallResult(502, reason="server_error", error="HTTP 502: bad gateway"))
    s._outcome([p], CallResult(502, reason="server_error", error="HTTP 502: bad gateway"))
    [(dead, reason, error)] = s._dead
    assert dead is p and reason == "attempts" and "gave up after 2 attempts" in error


def test_an_outage_longer_than_the_attempt_limit_parks_nothing() -> None:
    s = sink(max_attempts=2)
    [p] = batch(s, 1)
    for result in [CallResult(None, reason="timeout", error="no answer")] * 20 + \
            [CallResult(503, reason="server_error", error="HTTP 503")] * 20 + \
            [CallResult(429, retry_after=0.0, reason="rate_limited", error="HTTP 429")] * 20:
        s._outcome([p], result)  # every call fails: the CRM is down, records back off
    assert not s._dead and p.attempts == 0 and p.failures == 60
    assert s.sched.next_due() is not None


def test_retry_after_is_capped() -> None:
    s = sink(retry_after_max=5)
    [p] = batch(s, 1)
    s._outcome([p], CallResult(429, retry_after=86400.0, reason="rate_limited", error="HTTP 429"))
    assert 4 < s._throttled_until - time.monotonic() <= 5
    assert s.sched.next_due() - time.monotonic() <= 5  # type: ignore[operator]


def test_a_401_for_one_record_of_a_batch_stops_the_sink_and_parks_nothing() -> None:
    s = sink()
    ok, refused = batch(s, 2)
    s._outcome([ok, refused], CallResult(200, items=[(200, None), (403, "forbidden for this token")]))
    assert not s._dead
    with pytest.raises(CrmRefused, match="forbidden for this token"):
        s.check()


def test_429_holds_every_call_for_retry_after_and_401_stops_the_sink() -> None:
    s = sink()
    [p] = batch(s, 1)
    s._outcome([p], CallResult(429, retry_after=7.0, reason="rate_limited", error="HTTP 429"))
    assert s._throttled_until - time.monotonic() > 6.5
    assert s.sched.next_due() is not None and s.sched.next_due() - time.monotonic() > 6.5  # type: ignore[operator]
    s.sched.add(Pending(("t", 0), 9, ("t", b"z"), "contacts", {"idempotency_key": "z"}))
    s._outcome(s.sched.take("contacts", 1, time.monotonic()), CallResult(401, error="HTTP 401: wrong token"))
    with pytest.raises(CrmRefused, match="wrong token.*OUTBOX_CRM_TOKEN"):
        s.check()
