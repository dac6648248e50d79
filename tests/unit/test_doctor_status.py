"""outbox doctor and outbox status, pure parts: facts in, checks and tables out."""
from __future__ import annotations

import dataclasses

import pytest

from outbox import install as inst
from outbox.doctor import DoctorFacts, PublicationFacts, SlotHealth, diagnose
from outbox.errors import ConfigError
from outbox.status import GroupStatus, Report, StoreStatus, group_lags, parse_source_ids, rank, render

BASE = inst.Facts(
    where="h:5432/store1", database="store1", server_version=150000, wal_level="logical",
    max_replication_slots=10, slots_used=1, can_create=True, can_replicate=True, schema_exists=True,
    schema_empty=False, publication_exists=True, revision=inst.store_head(), slot=None,
    captured={"pos.customers": ("customer", ("id",))}, triggered=frozenset({"pos.customers"}),
)
ROLE = inst.RoleFacts("relay", True, replication=True, can_login=True, connect=True, outbox_usage=True,
                      events_select=True, events_delete=True, events_insert=True)
HEALTHY = DoctorFacts(
    base=BASE, slot_name="outbox_store1", role=ROLE, server_version_text="15.18", server_encoding="UTF8",
    max_wal_senders=10, wal_senders_used=1, max_slot_wal_keep_size_mb=10240,
    slot=SlotHealth("outbox_store1", "store1", "pgoutput", "logical", 42, "reserved", 1000, 10),
    publication=PublicationFacts(("outbox.events",), False, ("insert",)),
    triggers={"pos.customers": "O"},
)


def by_name(facts: DoctorFacts) -> dict[str, inst.Facts | object]:
    return {c.name: c for c in diagnose(facts)}


def test_a_healthy_store_passes_everything() -> None:
    checks = diagnose(HEALTHY)
    assert [c for c in checks if c.status != "pass"] == []
    assert {c.name for c in checks} >= {"wal_level", "max_replication_slots", "max_wal_senders",
                                        "max_slot_wal_keep_size", "server_encoding", "role relay", "replication slot",
                                        "publication", "capture pos.customers"}


def test_before_install_one_failing_check_and_the_server_checks() -> None:
    bare = dataclasses.replace(HEALTHY, base=dataclasses.replace(BASE, revision=None, schema_exists=False,
                                                                 publication_exists=False, captured={}),
                               role=dataclasses.replace(ROLE, outbox_usage=None, events_select=None, events_delete=None),
                               slot=None, publication=None, triggers={})
    checks = diagnose(bare)
    failed = [c for c in checks if c.status == "fail"]
    assert [c.name for c in failed] == ["outbox installed"]
    assert failed[0].fix and "outbox install" in failed[0].fix
    assert "wal_level" in {c.name for c in checks}


@pytest.mark.parametrize("change, name, status, fix_part", [
    (dict(base=dataclasses.replace(BASE, wal_level="replica")), "wal_level", "fail", "wal_level = logical"),
    (dict(max_slot_wal_keep_size_mb=-1), "max_slot_wal_keep_size", "warn", "ALTER SYSTEM SET max_slot_wal_keep_size"),
    (dict(server_encoding="LATIN1"), "server_encoding", "fail", "UTF8"),
    (dict(wal_senders_used=10, slot=dataclasses.replace(HEALTHY.slot, active_pid=None)),  # type: ignore[arg-type]
     "max_wal_senders", "fail", "max_wal_senders"),
    (dict(role=dataclasses.replace(ROLE, replication=False)), "role relay", "fail", "ALTER ROLE relay REPLICATION"),
    (dict(role=dataclasses.replace(ROLE, events_delete=False)), "role relay DELETE", "warn", "GRANT DELETE"),
    (dict(role=dataclasses.replace(ROLE, events_select=False)), "role relay SELECT", "fail", "GRANT SELECT"),
    (dict(role=inst.RoleFacts("relay", False)), "role relay", "fail", "--relay-role relay"),
    (dict(slot=None), "replication slot", "fail", "outbox install"),
    (dict(slot=dataclasses.replace(HEALTHY.slot, wal_status="lost")), "replication slot", "fail", "backfill"),  # type: ignore[arg-type]
    (dict(slot=dataclasses.replace(HEALTHY.slot, active_pid=None)), "replication slot", "warn", "outbox relay"),  # type: ignore[arg-type]
    (dict(slot=dataclasses.replace(HEALTHY.slot, retained_bytes=5 << 30)), "replication slot", "warn", "outbox status"),  # type: ignore[arg-type]
    (dict(publication=None), "publication", "fail", "outbox install"),
    (dict(publication=PublicationFacts((), False, ("insert",))), "publication", "fail", "ADD TABLE outbox.events"),
    (dict(publication=PublicationFacts(("outbox.events",), False, ("insert", "update"))), "publication", "fail",
     "publish = 'insert'"),
    (dict(triggers={}), "capture pos.customers", "fail", "--capture pos.customers=customer"),
    (dict(triggers={"pos.customers": "D"}), "capture pos.customers", "fail", "ENABLE TRIGGER outbox_capture"),
])
def test_each_problem_names_its_fix(change: dict[str, object], name: str, status: str, fix_part: str) -> None:
    check = {c.name: c for c in diagnose(dataclasses.replace(HEALTHY, **change))}[name]  # type: ignore[arg-type]
    assert check.status == status, check
    assert check.fix and fix_part in check.fix, check


def test_status_ranks_unreachable_then_down_then_furthest_behind() -> None:
    stores = [StoreStatus("a", relay="up", seconds_behind=1.0, slot_lag_bytes=10),
              StoreStatus("b", relay="up", seconds_behind=9.0, slot_lag_bytes=1),
              StoreStatus("c", relay="down", seconds_behind=0.0),
              StoreStatus("d", error="unreachable: refused")]
    assert [s.store for s in rank(stores)] == ["d", "c", "b", "a"]


def test_status_table_and_unreachable_row() -> None:
    report = Report("now", tuple(rank([StoreStatus("h:1/s1", "s1", "store1", "outbox_s1", "up", "reserved", 2048, 0.5),
                                       StoreStatus("h:1/s2", error="unreachable: Connection refused")])),
                    "h:1/rs", groups=(GroupStatus("g", 3, 1.0, 7),))
    text = render(report)
    lines = text.splitlines()
    assert lines[1].split() == ["STORE", "SOURCE", "SLOT", "RELAY", "SLOT", "LAG", "LAG", "BYTES", "BEHIND", "S", "WAL"]
    assert lines[2].startswith("h:1/s2") and "unreachable: Connection refused" in lines[2]
    assert lines[3].split()[:4] == ["h:1/s1", "store1", "outbox_s1", "up"] and "2048" in lines[3]
    assert "g" in text and " 7 " in text


def test_group_lag_sums_partitions_against_end_offsets() -> None:
    offsets = [("g", "t.a", 0, 5, 3.0), ("g", "t.a", 1, 10, 1.0), ("h", "t.a", 0, 9, 2.0)]
    lags = group_lags(offsets, {("t.a", 0): 9, ("t.a", 1): 10})
    assert lags == [GroupStatus("g", 2, 1.0, 4), GroupStatus("h", 1, 2.0, 0)]
    assert group_lags(offsets, None)[0].lag is None


def test_source_id_mapping() -> None:
    assert parse_source_ids(["demo_store1=store1"]) == {"demo_store1": "store1"}
    with pytest.raises(ConfigError):
        parse_source_ids(["store1"])


def test_role_sql_is_least_privilege_and_idempotent() -> None:
    sql = "\n".join(inst.relay_role_sql("outbox_relay", "store1"))
    assert "CREATE ROLE outbox_relay LOGIN REPLICATION" in sql and "IF NOT EXISTS" in sql
    assert "GRANT SELECT, INSERT, DELETE ON outbox.events TO outbox_relay" in sql  # INSERT: heartbeats only
    assert "UPDATE" not in sql and "TRUNCATE" not in sql and "SUPERUSER" not in sql and " ALL " not in sql
    consumer = "\n".join(inst.consumer_role_sql("rs", "readstore"))
    assert "GRANT USAGE ON SCHEMA readstore TO rs" in consumer and "REPLICATION" not in consumer
    writeback = "\n".join(inst.writeback_role_sql("wb", "store1"))
    assert "CREATE ROLE wb LOGIN;" in writeback and "REPLICATION" not in writeback
    assert "GRANT USAGE ON SCHEMA outbox_crm TO wb" in writeback
    assert "GRANT INSERT ON outbox.events TO wb" in writeback  # the capture trigger runs as the writer
    assert "DELETE" not in writeback and "TRUNCATE" not in writeback and " ALL " not in writeback
    with pytest.raises(ConfigError):
        inst.check_role_name("bad-name; DROP")
