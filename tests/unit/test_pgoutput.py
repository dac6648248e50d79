"""relay.pgoutput on bytes: hand-built messages, hex literals, and messages captured from PostgreSQL 15.

fixtures/pgoutput_v1.json holds real messages (pg_logical_slot_get_binary_changes with
proto_version '1', messages 'true'; 'insert_binary/*' with binary 'true') and, under 'copydata/*',
raw CopyData frames of a START_REPLICATION stream. Names are "<step>/<index>:<type>".
"""
from __future__ import annotations

import json
import struct
from datetime import datetime, timezone
from pathlib import Path

import pytest

from outbox.contract import parse_lsn, pg_timestamp_to_datetime
from outbox.relay.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Keepalive,
    LogicalMessage,
    Origin,
    ProtocolError,
    Relation,
    Truncate,
    Type,
    Update,
    Value,
    XLogData,
    decode,
    decode_insert,
    parse_copy_data,
    pg_time_us,
    relation_row,
    standby_status_update,
)
from outbox.relay.replication import pg_now_us

FIXTURES: dict[str, bytes] = {
    item["name"]: bytes.fromhex(item["hex"])
    for item in json.loads((Path(__file__).parent / "fixtures" / "pgoutput_v1.json").read_text(encoding="utf-8"))
}
MESSAGES = {name: data for name, data in FIXTURES.items() if not name.startswith("copydata/")}
FRAMES = [data for name, data in FIXTURES.items() if name.startswith("copydata/")]


# --- a small builder, independent of the decoder ------------------------------------------


def s(text: str) -> bytes:
    return text.encode() + b"\0"


def tup(*values: Value) -> bytes:
    out = struct.pack(">H", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED_TOAST:
            out += b"u"
        elif isinstance(v, str):
            out += b"t" + struct.pack(">I", len(v.encode())) + v.encode()
        else:
            assert isinstance(v, bytes)
            out += b"b" + struct.pack(">I", len(v)) + v
    return out


BUILT: dict[str, tuple[bytes, object]] = {
    "begin": (b"B" + struct.pack(">QqI", 0x1_0000_0010, 5, 7), Begin(0x1_0000_0010, 5, 7)),
    "commit": (b"C" + struct.pack(">BQQq", 0, 10, 20, -3), Commit(0, 10, 20, -3)),
    "origin": (b"O" + struct.pack(">Q", 99) + s("upstream"), Origin(99, "upstream")),
    "relation": (
        b"R" + struct.pack(">I", 16384) + s("") + s("tbl") + b"i" + struct.pack(">H", 2)
        + b"\x01" + s("id") + struct.pack(">Ii", 20, -1) + b"\x00" + s("amount") + struct.pack(">Ii", 1700, 655366),
        Relation(16384, "", "tbl", "i", (Column(1, "id", 20, -1), Column(0, "amount", 1700, 655366))),
    ),
    "relation_no_columns": (
        b"R" + struct.pack(">I", 1) + s("s") + s("t") + b"n" + struct.pack(">H", 0),
        Relation(1, "s", "t", "n", ()),
    ),
    "type": (b"Y" + struct.pack(">I", 70000) + s("public") + s("mood"), Type(70000, "public", "mood")),
    "insert": (b"I" + struct.pack(">I", 5) + b"N" + tup("1", None, UNCHANGED_TOAST, b"\x00\xff", "", b""),
               Insert(5, ("1", None, UNCHANGED_TOAST, b"\x00\xff", "", b""))),
    "insert_empty_tuple": (b"I" + struct.pack(">I", 5) + b"N" + tup(), Insert(5, ())),
    "update_plain": (b"U" + struct.pack(">I", 5) + b"N" + tup("1", "x"), Update(5, None, None, ("1", "x"))),
    "update_old": (b"U" + struct.pack(">I", 5) + b"O" + tup("1", "é") + b"N" + tup("1", "x"),
                   Update(5, ("1", "é"), None, ("1", "x"))),
    "update_key": (b"U" + struct.pack(">I", 5) + b"K" + tup("1", None) + b"N" + tup("2", UNCHANGED_TOAST),
                   Update(5, None, ("1", None), ("2", UNCHANGED_TOAST))),
    "delete_old": (b"D" + struct.pack(">I", 5) + b"O" + tup("1", "x"), Delete(5, ("1", "x"), None)),
    "delete_key": (b"D" + struct.pack(">I", 5) + b"K" + tup("1", None), Delete(5, None, ("1", None))),
    "truncate": (b"T" + struct.pack(">IB", 3, 2) + struct.pack(">3I", 10, 11, 0xFFFFFFFF), Truncate(2, (10, 11, 0xFFFFFFFF))),
    "truncate_none": (b"T" + struct.pack(">IB", 0, 0), Truncate(0, ())),
    "message": (b"M" + b"\x01" + struct.pack(">Q", 77) + s("outbox") + struct.pack(">I", 3) + b"a\0b",
                LogicalMessage(1, 77, "outbox", b"a\0b")),
    "message_empty": (b"M" + b"\x00" + struct.pack(">Q", 77) + s("") + struct.pack(">I", 0), LogicalMessage(0, 77, "", b"")),
}


@pytest.mark.parametrize("name", BUILT)
def test_built_messages(name: str) -> None:
    data, expected = BUILT[name]
    assert decode(data) == expected
    assert decode(memoryview(data)) == expected
    assert decode(bytearray(data)) == expected


# --- hex literals, written by hand from the documentation -----------------------------------

BEGIN_HEX = "42" "00000000016b3748" "0002b0ec8515f340" "000002e4"
COMMIT_HEX = "43" "00" "00000000016b3748" "00000000016b3778" "0002b0ec8515f340"
RELATION_HEX = (
    "52" "00004013" "7075626c696300" "7400" "64" "0002"  # 16403, "public", "t", 'd', 2 columns
    "01" "696400" "00000017" "ffffffff"  # key column "id" int4, typmod -1
    "00" "6e616d6500" "00000019" "ffffffff"  # "name" text
)
INSERT_HEX = "49" "00004013" "4e" "0004" "74" "00000001" "31" "74" "00000003" "68c3a9" "6e" "75"  # '1', 'hé', null, unchanged


def test_hex_begin() -> None:
    begin = decode(bytes.fromhex(BEGIN_HEX))
    assert begin == Begin(final_lsn=parse_lsn("0/16B3748"), commit_time=0x0002B0EC8515F340, xid=740)
    assert isinstance(begin, Begin)
    assert pg_timestamp_to_datetime(begin.commit_time) == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_hex_commit() -> None:
    assert decode(bytes.fromhex(COMMIT_HEX)) == Commit(0, parse_lsn("0/16B3748"), parse_lsn("0/16B3778"), 0x0002B0EC8515F340)


def test_hex_relation() -> None:
    relation = decode(bytes.fromhex(RELATION_HEX))
    assert relation == Relation(16403, "public", "t", "d", (Column(1, "id", 23, -1), Column(0, "name", 25, -1)))
    assert isinstance(relation, Relation)
    assert [c.is_key for c in relation.columns] == [True, False]


def test_hex_insert() -> None:
    assert decode(bytes.fromhex(INSERT_HEX)) == Insert(16403, ("1", "hé", None, UNCHANGED_TOAST))


# --- captured from PostgreSQL 15 ------------------------------------------------------------


def m(name: str) -> object:
    return decode(MESSAGES[name])


def test_real_relation_and_type() -> None:
    mood = m("insert_binary/1:Y")
    items = m("insert_binary/2:R")
    assert isinstance(mood, Type) and isinstance(items, Relation)
    assert (mood.namespace, mood.name) == ("public", "mood")
    assert (items.namespace, items.name, items.replica_identity) == ("public", "items", "f")
    assert [(c.name, c.type_oid, c.type_modifier) for c in items.columns] == [
        ("id", 23, -1),
        ("name", 25, -1),
        ("price", 1700, (10 << 16 | 2) + 4),  # numeric(10,2)
        ("at", 1184, -1),
        ("blob", 17, -1),
        ("doc", 3802, -1),
        ("note", 25, -1),
        ("feeling", mood.type_oid, -1),
    ]
    # REPLICA IDENTITY FULL: every column counts as part of the identity
    assert all(c.is_key for c in items.columns)
    docs = m("insert_toast/1:R")
    assert isinstance(docs, Relation) and docs.replica_identity == "d"
    assert [c.is_key for c in docs.columns] == [True, False, False]


def test_real_insert_text_and_binary() -> None:
    items = m("insert_binary/2:R")
    assert isinstance(items, Relation)
    insert = m("insert/3:I")
    assert isinstance(insert, Insert) and insert.relation_id == items.relation_id
    assert relation_row(items, insert.new) == {
        "id": "1",
        "name": "Grüße, 世界 ☃",
        "price": "1234.50",
        "at": "2024-05-06 07:08:09.123456+00",
        "blob": "\\x00ff10",
        "doc": '{"a": [1, 2], "é": null}',
        "note": None,
        "feeling": "élan",
    }
    # the relay's path: the same values, undecoded (text as the UTF-8 bytes PostgreSQL sent)
    relation_id, raw = decode_insert(MESSAGES["insert/3:I"])
    assert relation_id == insert.relation_id
    assert raw == [v.encode() if isinstance(v, str) else v for v in insert.new]
    binary = m("insert_binary/3:I")
    assert isinstance(binary, Insert)
    assert binary.new[0] == b"\x00\x00\x00\x01"
    assert binary.new[1] == "Grüße, 世界 ☃".encode()
    assert binary.new[4] == b"\x00\xff\x10"
    assert binary.new[5] == b'\x01{"a": [1, 2], "\xc3\xa9": null}'  # jsonb binary: version byte 1, then text
    assert binary.new[6] is None


def test_real_transactions_frame_their_changes() -> None:
    steps = sorted({name.split("/")[0] for name in MESSAGES} - {"message_nontransactional"})
    for step in steps:
        decoded = [decode(data) for name, data in MESSAGES.items() if name.startswith(step + "/")]
        begin, commit = decoded[0], decoded[-1]
        assert isinstance(begin, Begin) and isinstance(commit, Commit), step
        assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
        assert begin.commit_time == commit.commit_time
        assert commit.flags == 0
        assert not any(isinstance(x, (Begin, Commit)) for x in decoded[1:-1])


def test_real_nulls_update_and_delete_full() -> None:
    items = m("insert_binary/2:R")
    assert isinstance(items, Relation)
    assert m("insert_nulls/3:I") == Insert(items.relation_id, ("2",) + (None,) * 7)
    update = m("update_full/3:U")
    assert isinstance(update, Update) and update.key is None and update.old is not None
    assert update.old[1] == "Grüße, 世界 ☃" and update.new[1] == "renamed"
    assert (update.old[6], update.new[6]) == (None, "n")
    delete = m("delete_full/3:D")
    assert isinstance(delete, Delete) and delete.key is None
    assert delete.old == ("2",) + (None,) * 7


def test_real_toast_and_key_changes() -> None:
    insert = m("insert_toast/2:I")
    assert isinstance(insert, Insert) and isinstance(insert.new[1], str) and len(insert.new[1]) == 6400
    assert m("update_toast_unchanged/2:U") == Update(insert.relation_id, None, None, ("1", UNCHANGED_TOAST, "1"))
    # key changed under REPLICA IDENTITY DEFAULT: 'K' carries the old key, other columns null
    assert m("update_key/2:U") == Update(insert.relation_id, None, ("1", None, None), ("10", UNCHANGED_TOAST, "1"))
    assert m("delete_key/2:D") == Delete(insert.relation_id, None, ("10", None, None))


def test_real_truncate_messages_and_origin() -> None:
    kids, items = m("multi/1:R"), m("insert_binary/2:R")
    assert isinstance(kids, Relation) and isinstance(items, Relation)
    assert m("truncate/4:T") == Truncate(options=3, relation_ids=(kids.relation_id, items.relation_id))  # CASCADE|RESTART IDENTITY
    assert [m("multi/2:I"), m("multi/3:I")] == [Insert(kids.relation_id, ("1", "1")), Insert(kids.relation_id, ("2", "1"))]

    tx = m("message_transactional/1:M")
    assert isinstance(tx, LogicalMessage) and tx.transactional
    assert (tx.prefix, tx.content) == ("outbox", "héllo".encode())
    non_tx = m("message_nontransactional/0:M")
    assert isinstance(non_tx, LogicalMessage) and not non_tx.transactional and non_tx.content == b"\x00\x01\xff"

    assert m("origin/1:O") == Origin(parse_lsn("1/2345678"), "upstream")
    begin = m("origin/0:B")
    assert isinstance(begin, Begin)  # the origin's commit timestamp replaces the local one
    assert pg_timestamp_to_datetime(begin.commit_time) == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def test_real_copy_data_stream() -> None:
    frames = [parse_copy_data(f) for f in FRAMES]
    assert [type(f).__name__ for f in frames] == ["Keepalive", "XLogData", "XLogData", "XLogData", "XLogData", "Keepalive"]
    xlog = [f for f in frames if isinstance(f, XLogData)]
    begin, relation, insert, commit = (decode(x.payload) for x in xlog)
    assert isinstance(begin, Begin) and isinstance(relation, Relation) and isinstance(commit, Commit)
    assert insert == Insert(relation.relation_id, ("5", "streamed", "5"))
    assert begin.final_lsn == commit.commit_lsn
    # Relation messages travel with a zero position; the Commit's dataStart is its end LSN
    assert (xlog[1].data_start, xlog[1].wal_end) == (0, 0)
    assert xlog[3].data_start == commit.end_lsn
    last = frames[-1]
    assert isinstance(last, Keepalive) and last.wal_end == commit.end_lsn and not last.reply_requested


@pytest.mark.parametrize("name", MESSAGES)
def test_every_truncation_and_extension_is_a_protocol_error(name: str) -> None:
    data = MESSAGES[name]
    decode(data)
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        decode(data + b"\0")


@pytest.mark.parametrize("name", BUILT)
def test_every_truncation_of_built_messages_is_a_protocol_error(name: str) -> None:
    data = BUILT[name][0]
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


# --- CopyData framing -----------------------------------------------------------------------


def test_xlogdata() -> None:
    frame = bytes.fromhex("77" "0000000100000010" "0000000100000020" "0002b0ec8515f340") + b"B..."
    x = parse_copy_data(frame)
    assert x == XLogData(0x1_0000_0010, 0x1_0000_0020, 0x0002B0EC8515F340, x.payload)
    assert isinstance(x, XLogData) and bytes(x.payload) == b"B..."
    assert parse_copy_data(memoryview(frame)) == x


def test_keepalive() -> None:
    assert parse_copy_data(bytes.fromhex("6b" "00000000016b3748" "0002b0ec8515f340" "01")) == Keepalive(
        parse_lsn("0/16B3748"), 0x0002B0EC8515F340, True
    )
    assert parse_copy_data(bytes.fromhex("6b" "00000000016b3748" "0000000000000000" "00")) == Keepalive(
        parse_lsn("0/16B3748"), 0, False
    )


def test_standby_status_update_bytes() -> None:
    msg = standby_status_update(parse_lsn("0/16B3748"), parse_lsn("0/16B3740"), parse_lsn("1/0"), 0x0002B0EC8515F340, True)
    assert msg == bytes.fromhex("72" "00000000016b3748" "00000000016b3740" "0000000100000000" "0002b0ec8515f340" "01")
    assert standby_status_update(0, 0, 0, 0)[-1:] == b"\x00" and len(standby_status_update(0, 0, 0, 0)) == 34


def test_pg_now_us() -> None:
    now = pg_timestamp_to_datetime(pg_now_us())
    assert abs((now - datetime.now(timezone.utc)).total_seconds()) < 5


def test_pg_time_us_reads_no_clock() -> None:
    assert pg_time_us(946_684_800_000_000_000) == 0  # 2000-01-01T00:00:00Z
    assert pg_time_us(946_684_800_000_001_999) == 1  # nanoseconds truncate to microseconds
    assert pg_timestamp_to_datetime(pg_time_us(1_700_000_000_123_456_000)) == datetime(
        2023, 11, 14, 22, 13, 20, 123456, tzinfo=timezone.utc)
    assert "time" not in vars(__import__("outbox.relay.pgoutput", fromlist=["x"]))  # the decoder has no clock


@pytest.mark.parametrize(
    "frame",
    [b"", b"w", b"w" + bytes(23), b"k", b"k" + bytes(16), b"k" + bytes(18), b"r" + bytes(33), b"x"],
)
def test_malformed_copy_data(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_copy_data(frame)


def test_unknown_copy_data_names_the_tag() -> None:
    with pytest.raises(ProtocolError, match="'r'"):
        parse_copy_data(b"r" + bytes(33))


# --- malformed pgoutput ----------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["S", "E", "c", "A", "b", "P", "K", "r", "p"])
def test_later_protocol_messages_are_refused_by_name(tag: str) -> None:
    with pytest.raises(ProtocolError, match=f"'{tag}'.*proto_version '1'"):
        decode(tag.encode() + bytes(30))


@pytest.mark.parametrize("data", [b"", b"Z", b"\x00", b"\xff" + bytes(8)])
def test_unknown_messages(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    "data",
    [
        b"I" + struct.pack(">I", 5) + b"X" + tup("1"),  # no 'N'
        b"U" + struct.pack(">I", 5) + b"O" + tup("1") + b"X" + tup("1"),  # no 'N' after 'O'
        b"D" + struct.pack(">I", 5) + b"N" + tup("1"),  # neither 'K' nor 'O'
        b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">H", 1) + b"x",  # unknown column kind
        b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">I", 0xFFFFFFFF) + b"abc",
        b"I" + struct.pack(">I", 5) + b"N" + struct.pack(">H", 1) + b"t" + struct.pack(">I", 2) + b"\xff\xfe",  # not UTF-8
        b"Y" + struct.pack(">I", 1) + b"public\0mood",  # unterminated string
        b"R" + struct.pack(">I", 1) + s("a") + b"b\xff\0" + b"d" + struct.pack(">H", 0),  # name not UTF-8
        b"M" + b"\x01" + struct.pack(">Q", 1) + s("p") + struct.pack(">I", 10) + b"short",
        b"T" + struct.pack(">IB", 2, 0) + struct.pack(">I", 1),
    ],
)
def test_malformed_messages(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_relation_row() -> None:
    relation = Relation(1, "public", "t", "d", (Column(1, "id", 23, -1), Column(0, "body", 25, -1)))
    row = relation_row(relation, ("1", UNCHANGED_TOAST))
    assert row == {"id": "1", "body": UNCHANGED_TOAST}
    assert row["body"] is UNCHANGED_TOAST
    with pytest.raises(ProtocolError, match="2 columns"):
        relation_row(relation, ("1",))


def test_decode_insert_refuses_what_decode_refuses() -> None:
    message = MESSAGES["insert/3:I"]
    with pytest.raises(ProtocolError, match="truncated pgoutput message 'I'"):
        decode_insert(message[:-3])
    with pytest.raises(ProtocolError, match="2 unexpected trailing bytes"):
        decode_insert(message + b"xx")
    with pytest.raises(ProtocolError, match="expected an Insert, got 'B'"):
        decode_insert(b"B" + message[1:])
    with pytest.raises(ProtocolError, match="empty"):
        decode_insert(b"")
