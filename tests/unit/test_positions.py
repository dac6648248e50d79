from outbox.relay.positions import PositionTracker


def test_confirms_a_transaction_only_when_committed_and_fully_acked() -> None:
    t = PositionTracker(confirmed=100, received=100)
    txn = t.begin(xid=7, commit_lsn=200, commit_time=0)
    assert [t.sent(txn), t.sent(txn)] == [0, 1]
    t.acked(txn)
    t.acked(txn)
    assert t.confirmed == 100  # no commit seen yet
    t.commit(txn, end_lsn=210)
    assert t.confirmed == 210
    assert t.in_flight == 0


def test_a_later_transaction_waits_for_an_earlier_one() -> None:
    t = PositionTracker()
    first = t.begin(1, 100, 0)
    t.sent(first)
    t.commit(first, 110)
    second = t.begin(2, 200, 0)
    t.sent(second)
    t.commit(second, 210)
    t.acked(second)
    assert t.confirmed == 0  # the first is still in flight
    t.acked(first)
    assert t.confirmed == 210


def test_keepalive_confirms_only_when_nothing_is_open() -> None:
    t = PositionTracker(confirmed=50)
    txn = t.begin(1, 100, 0)
    t.sent(txn)
    t.keepalive(500)
    assert t.confirmed == 50 and t.received == 500
    t.commit(txn, 110)
    t.acked(txn)
    assert t.confirmed == 110
    t.keepalive(600)
    assert t.confirmed == 600


def test_a_failed_event_blocks_confirmation_forever() -> None:
    t = PositionTracker()
    txn = t.begin(1, 100, 0)
    t.sent(txn)
    t.sent(txn)
    t.failed(txn)
    t.acked(txn)
    t.commit(txn, 110)
    later = t.begin(2, 200, 0)
    t.commit(later, 210)
    t.keepalive(900)
    assert t.confirmed == 0


def test_empty_transaction_is_confirmed_at_commit() -> None:
    t = PositionTracker()
    txn = t.begin(1, 100, 0)
    t.commit(txn, 120)
    assert t.confirmed == 120
