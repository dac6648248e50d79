"""Exactly-once mode without servers: settings, offsets records, holding positions, grouping transactions."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from outbox import contract, metrics
from outbox.cli import cli
from outbox.config import KafkaSettings, RelaySettings, build
from outbox.consumers.kafka import topic_pattern
from outbox.errors import ConfigError
from outbox.relay.offsets import SourcePosition, decode_position, encode_position, newest
from outbox.relay.positions import PositionTracker
from outbox.relay.transactional import ExactlyOnce, TransactionalPublisher, default_transactional_id, exactly_once


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[RelaySettings]:
    """Settings the real CLI would run the relay with (the relay itself is not started)."""
    seen: list[RelaySettings] = []

    async def fake_run(settings: RelaySettings) -> Any:
        seen.append(settings)
        from outbox.relay.runner import RelayStats
        return RelayStats()

    monkeypatch.setattr("outbox.relay.runner.run_relay", fake_run)
    return seen


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, env=env, auto_envvar_prefix="OUTBOX")
    return result.exit_code, result.output


BASE = ["relay", "--dsn", "dbname=x", "--source-id", "store1", "--kafka-bootstrap", "k:9092"]


def test_delivery_defaults_to_at_least_once(captured: list[RelaySettings]) -> None:
    assert run(BASE)[0] == 0
    assert captured[0].delivery == "at-least-once" and not captured[0].exactly_once
    assert captured[0].offsets_topic == contract.DEFAULT_OFFSETS_TOPIC


def test_delivery_from_option_environment_and_config_file(tmp_path: Path, captured: list[RelaySettings]) -> None:
    assert run(BASE + ["--delivery", "exactly-once", "--transactional-id", "tx-1"])[0] == 0
    assert run(BASE, env={"OUTBOX_RELAY_DELIVERY": "exactly-once", "OUTBOX_RELAY_OFFSETS_TOPIC": "__mine"})[0] == 0
    f = tmp_path / "outbox.toml"
    f.write_text('[relay]\ndelivery = "exactly-once"\ntransaction-interval = 0.5\ntransaction-max-events = 99\n')
    assert run(["--config", str(f)] + BASE)[0] == 0
    first, second, third = captured
    assert first.exactly_once and first.transactional_id == "tx-1"
    assert second.exactly_once and second.offsets_topic == "__mine" and second.transactional_id is None
    assert third.exactly_once and third.transaction_interval == 0.5 and third.transaction_max_events == 99


def test_a_bad_delivery_mode_is_one_line_and_exit_2() -> None:
    code, out = run(BASE + ["--delivery", "twice"])
    assert code == 2 and "'twice' is not one of" in out
    with pytest.raises(ConfigError, match="invalid setting 'offsets_topic'"):
        build(RelaySettings, dsn="dbname=x", source_id="s", kafka={"bootstrap": "k:1"}, offsets_topic="a b")
    with pytest.raises(ConfigError, match="transaction_interval"):
        build(RelaySettings, dsn="dbname=x", source_id="s", kafka={"bootstrap": "k:1"}, transaction_interval=0)


def test_transactional_id_defaults_to_one_per_source() -> None:
    settings = build(RelaySettings, dsn="dbname=x", source_id="store-7", kafka={"bootstrap": "k:1"},
                     delivery="exactly-once")
    eos = exactly_once(settings, metrics.RelayMetrics("store-7"))
    assert eos.publisher.transactional_id == default_transactional_id("store-7") == "outbox-relay.store-7"


def test_default_offsets_topic_is_outside_every_consumer_pattern() -> None:
    for prefix in ("", "outbox", "shop.events", "__outbox_relay"):
        assert not re.match(topic_pattern(prefix), contract.DEFAULT_OFFSETS_TOPIC), prefix


def test_offsets_records_round_trip_and_reject_strangers() -> None:
    position = SourcePosition(commit_lsn=0x1_0000_00A0, end_lsn=0x1_0000_00C8, xid=4242)
    key, value = encode_position("store1", position)
    assert key == b"store1" and b'"commit_lsn":"1/A0"' in value
    assert decode_position(value) == position
    for bad in (b"not json", b"{}", b'{"version": 2}', b'{"version": 1, "commit_lsn": "x/y"}', b"[1]"):
        with pytest.raises(ValueError):
            decode_position(bad)


def test_the_newest_position_is_the_highest_commit_lsn() -> None:
    a, b = SourcePosition(100, 110, 1), SourcePosition(300, 310, 3)
    assert newest([b, a]) == b and newest([]) is None
    assert b.covers(300) and b.covers(100) and not b.covers(301)


def test_a_held_transaction_is_confirmed_only_when_released_in_order() -> None:
    t = PositionTracker(confirmed=50)
    first, second = t.begin(1, 100, 0), t.begin(2, 200, 0)
    t.hold(first)
    t.hold(second)
    t.sent(first)
    t.acked(first)
    t.commit(first, 110)
    t.commit(second, 210)
    t.keepalive(500)
    assert t.confirmed == 50  # acknowledged, not yet in a committed Kafka transaction
    t.release(second)
    assert t.confirmed == 50  # the first still waits
    t.release(first)
    assert t.confirmed == 210


def _eos(interval: float = 60.0, max_events: int = 3) -> ExactlyOnce:
    eos = ExactlyOnce(KafkaSettings(bootstrap="k:1"), source_id="s", transactional_id="tx", offsets_topic="__o",
                      interval=interval, max_events=max_events, metrics=metrics.RelayMetrics("unit-eos"))
    eos.reset(PositionTracker())
    return eos


def test_transactions_already_in_kafka_are_skipped_and_released() -> None:
    eos = _eos()
    eos.position = SourcePosition(200, 210, 2)
    old, new = eos.tracker.begin(1, 200, 0), None
    assert eos.begin(old) is True
    eos.tracker.commit(old, 210)
    eos.source_committed(old, skipped=True)
    assert eos.tracker.confirmed == 210 and not eos.due(force=True)
    new = eos.tracker.begin(3, 300, 0)
    assert eos.begin(new) is False


def test_kafka_transactions_hold_whole_source_transactions_until_due() -> None:
    eos = _eos(max_events=3)
    heartbeat = eos.tracker.begin(1, 100, 0)
    eos.begin(heartbeat)
    eos.tracker.commit(heartbeat, 110)
    eos.source_committed(heartbeat, skipped=False)  # nothing published: released at once
    assert eos.tracker.confirmed == 110 and eos.time_left() is None
    big = eos.tracker.begin(2, 200, 0)
    eos.begin(big)
    for _ in range(5):  # more than max_events, still one source transaction
        eos.tracker.sent(big)
        eos.publisher.sent_in_transaction += 1
        eos.tracker.acked(big)
    assert not eos.due()  # not a boundary yet: nothing complete
    eos.tracker.commit(big, 210)
    eos.source_committed(big, skipped=False)
    assert eos.due() and eos.tracker.confirmed == 110  # due by size; confirmed only after the commit
    assert 0 < (eos.time_left() or 0) <= 60


def test_commit_writes_the_last_source_transaction_and_releases_all() -> None:
    eos = _eos(interval=0.0)
    written: list[tuple[bytes, bytes, str]] = []

    def end_transaction(key: bytes, value: bytes, topic: str) -> None:
        written.append((key, value, topic))

    async def commit() -> None:
        pass

    eos.publisher.end_transaction = end_transaction  # type: ignore[method-assign]
    eos.publisher.commit = commit  # type: ignore[method-assign]
    txns = []
    for n in (1, 2):
        txn = eos.tracker.begin(n, n * 100, 0)
        eos.begin(txn)
        eos.tracker.sent(txn)
        eos.tracker.acked(txn)
        eos.tracker.commit(txn, n * 100 + 10)
        eos.source_committed(txn, skipped=False)
        txns.append(txn)
    assert eos.due()

    async def commit_in_background() -> list[Any]:
        eos.start_commit()
        assert eos.committing and not eos.due(force=True) and eos.time_left() is not None
        return await eos.settle()

    released = asyncio.run(commit_in_background())
    assert released == txns and eos.tracker.confirmed == 210 and eos.commits == 1 and not eos.committing
    assert eos.position == SourcePosition(200, 210, 2)
    assert written == [(b"s", encode_position("s", SourcePosition(200, 210, 2), "tx")[1], "__o")]


class FakeProducer:
    """Records the calls a transactional publisher makes (librdkafka itself is tested on the real broker)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def produce(self, topic: str, value: bytes, key: bytes, **_: Any) -> None:
        self.calls.append(f"{topic}:{value.decode()}")

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit")

    def poll(self, _timeout: float) -> int:  # delivery reports are served on the loop before a commit
        return 0

    def __len__(self) -> int:
        return 0


def test_records_sent_while_a_commit_runs_go_in_order_into_the_next_transaction() -> None:
    publisher = TransactionalPublisher(KafkaSettings(bootstrap="k:1"), "tx")
    fake = FakeProducer()
    publisher._producer = fake  # type: ignore[assignment]

    def record(n: int) -> contract.Record:
        return contract.Record(topic="t", key=b"k", value=str(n).encode(), headers=[])

    async def scenario() -> None:
        await publisher.send(record(1), lambda _: None)
        publisher.end_transaction(b"s", b"pos", "__o")
        await publisher.send(record(2), lambda _: None)  # before the commit even started: held
        commit = asyncio.create_task(publisher.commit())
        await asyncio.sleep(0)
        await publisher.send(record(3), lambda _: None)  # while it runs: held behind 2
        await commit
        await publisher.send(record(4), lambda _: None)  # after: straight into the new transaction

    asyncio.run(scenario())
    assert fake.calls == ["begin", "t:1", "__o:pos", "commit", "begin", "t:2", "t:3", "t:4"]
    assert publisher.sent_in_transaction == 3 and publisher.in_transaction


def test_the_position_names_its_transactional_id_and_the_source_has_its_own_group() -> None:
    from outbox.relay.offsets import group_id, writer_of

    position = SourcePosition(0x100, 0x110, 7)
    _, value = encode_position("store1", position, "outbox-relay.store1")
    assert decode_position(value) == position and writer_of(value) == "outbox-relay.store1"
    assert writer_of(encode_position("store1", position)[1]) is None  # an older relay's record
    assert writer_of(b"not json") is None
    assert group_id("__outbox_relay_offsets", "store1") == "__outbox_relay_offsets.store1"


def test_the_kafka_transaction_timeout_and_when_a_source_transaction_outlives_it() -> None:
    from outbox.relay import policy
    from outbox.relay.transactional import transaction_timeout_ms

    def settings(**kw: Any) -> RelaySettings:
        return build(RelaySettings, dsn="dbname=x", source_id="s", kafka={"bootstrap": "k:1"}, **kw)

    assert transaction_timeout_ms(settings()) == 300_000  # the message timeout's default
    assert transaction_timeout_ms(settings(kafka_message_timeout=5)) == 120_000  # at least 120 s
    assert transaction_timeout_ms(settings(transaction_timeout=2.5)) == 2_500
    publisher = TransactionalPublisher(KafkaSettings(bootstrap="k:1"), "tx", transaction_timeout_ms=2_500,
                                       message_timeout_ms=300_000)
    assert publisher._message_timeout_ms == 2_500 and publisher.transaction_timeout == 2.5  # librdkafka's rule
    assert not policy.kafka_transaction_overdue(0.0, 2.5)  # none open
    assert not policy.kafka_transaction_overdue(1.9, 2.5)
    assert policy.kafka_transaction_overdue(2.0, 2.5)
