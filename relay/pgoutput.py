"""Streaming replication CopyData and pgoutput (protocol version 1) messages. Pure, no I/O.

Formats follow the PostgreSQL 15 documentation, "Streaming Replication Protocol" (XLogData,
primary keepalive, standby status update) and "Logical Replication Message Formats". Integers
are big-endian; LSNs are unsigned 64-bit; timestamps are signed microseconds since
2000-01-01 UTC (see ``outbox.contract.pg_timestamp_to_datetime``).

Text values arrive in the server encoding and are decoded as UTF-8: the source database must be
UTF8. Everything malformed raises ``ProtocolError`` (never IndexError or struct.error).
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar


class ProtocolError(ValueError):
    """Bytes that are not a valid replication or pgoutput message."""


class Unchanged(enum.Enum):
    """Marks a TOASTed column value the server did not send because it did not change."""

    TOAST = "u"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = Unchanged.TOAST

Value: TypeAlias = str | bytes | None | Unchanged
TupleData: TypeAlias = tuple[Value, ...]
# A column value as sent, undecoded: text as UTF-8 bytes, a binary-format value as a bytearray
RawValue: TypeAlias = bytes | bytearray | None | Unchanged

_PG_EPOCH_US: Final = 946_684_800_000_000  # 2000-01-01T00:00:00Z in microseconds since the Unix epoch

_B = struct.Struct(">B")
_H = struct.Struct(">H")
_I = struct.Struct(">I")
_Q = struct.Struct(">Q")
_XLOG = struct.Struct(">QQq")  # after 'w': dataStart, walEnd, sendTime
_KEEPALIVE = struct.Struct(">Qq?")  # after 'k': walEnd, sendTime, replyRequested
_STATUS = struct.Struct(">cQQQq?")  # 'r', write, flush, apply, clock, reply
_BEGIN = struct.Struct(">QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit LSN, end LSN, commit time
_COLUMN = struct.Struct(">Ii")  # type OID, atttypmod
_REL_ID_KIND = struct.Struct(">IB")  # relation OID, submessage byte
_TRUNCATE = struct.Struct(">IB")  # number of relations, options
_MESSAGE = struct.Struct(">BQ")  # flags, LSN


# --- CopyData from and to the walsender ------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class XLogData:
    data_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_data(buf: bytes | memoryview) -> XLogData | Keepalive:
    """One CopyData message of a START_REPLICATION stream (the payload copied out of ``buf``)."""
    if not buf:
        raise ProtocolError("empty CopyData message")
    tag = buf[0]
    try:
        if tag == 0x77:  # 'w'
            data_start, wal_end, send_time = _XLOG.unpack_from(buf, 1)
            payload = buf[25:]  # copied once here, so decode() need not
            return XLogData(data_start, wal_end, send_time, payload if type(payload) is bytes else bytes(payload))
        if tag == 0x6B:  # 'k'
            if len(buf) != 18:
                raise ProtocolError(f"primary keepalive message has {len(buf)} bytes, expected 18")
            return Keepalive(*_KEEPALIVE.unpack_from(buf, 1))
    except struct.error:
        raise ProtocolError(f"truncated CopyData message {chr(tag)!r} ({len(buf)} bytes)") from None
    raise ProtocolError(f"unknown CopyData message type {_name(tag)} (expected 'w' XLogData or 'k' keepalive)")


def standby_status_update(write_lsn: int, flush_lsn: int, apply_lsn: int, now_us: int, reply: bool = False) -> bytes:
    """The 'r' message: positions received, flushed and applied, and the client clock."""
    return _STATUS.pack(b"r", write_lsn, flush_lsn, apply_lsn, now_us, reply)


def pg_time_us(unix_ns: int) -> int:
    """A Unix time in nanoseconds as microseconds since 2000-01-01 UTC (the standby status clock).

    No clock is read here: the I/O edge (``relay.replication.pg_now_us``) passes the time in.
    """
    return unix_ns // 1000 - _PG_EPOCH_US


# --- pgoutput messages -----------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class Begin:
    final_lsn: int  # LSN of the commit record; equals Commit.commit_lsn
    commit_time: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(slots=True)  # not frozen: built per event, and a frozen __init__ costs 3x
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int  # end of the commit record: the position to confirm once the transaction is done
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int  # commit LSN on the origin server
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str  # "" stands for pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)  # the relay's hot path uses decode_insert, not this
class Insert:
    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    old: TupleData | None  # whole old row ('O'), with REPLICA IDENTITY FULL
    key: TupleData | None  # old key ('K') when the key changed; non-key columns are None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: TupleData | None
    key: TupleData | None


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int  # bit 1: CASCADE, bit 2: RESTART IDENTITY
    relation_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


Message: TypeAlias = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage

TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2

# Messages of later protocol versions (streaming: 2, two-phase: 3). With proto_version '1'
# the server never sends them; if one arrives the stream was started with other options.
_LATER_VERSIONS: Final = {
    "S": "Stream Start",
    "E": "Stream Stop",
    "c": "Stream Commit",
    "A": "Stream Abort",
    "b": "Begin Prepare",
    "P": "Prepare",
    "K": "Commit Prepared",
    "r": "Rollback Prepared",
    "p": "Stream Prepare",
}


def decode(payload: bytes | memoryview) -> Message:
    """Decode one pgoutput message (the payload of an XLogData)."""
    buf = payload if type(payload) is bytes else bytes(payload)
    if not buf:
        raise ProtocolError("empty pgoutput message")
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        raise ProtocolError(_unknown(buf[0]))
    return _checked(decoder, buf)


def decode_insert(payload: bytes) -> tuple[int, list[RawValue]]:
    """An Insert's relation id and new tuple, its text values left as UTF-8 bytes (the relay's hot
    path: an outbox row's values go to Kafka as bytes, so decoding them to str would be undone)."""
    if not payload or payload[0] != 0x49:  # 'I'
        raise ProtocolError(f"expected an Insert, got {_name(payload[0]) if payload else 'an empty message'}")
    return _checked(_insert_raw, payload)


_T = TypeVar("_T")


def _checked(decoder: Callable[[bytes], tuple[_T, int]], buf: bytes) -> _T:
    try:
        message, end = decoder(buf)
    except ProtocolError:
        raise
    except (struct.error, IndexError):
        raise ProtocolError(f"truncated pgoutput message {_name(buf[0])} ({len(buf)} bytes)") from None
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"pgoutput message {_name(buf[0])} holds text that is not UTF-8 ({exc.reason}); "
                            "the source database must use UTF8") from None
    if end != len(buf):
        raise ProtocolError(f"pgoutput message {_name(buf[0])} has {len(buf) - end} unexpected trailing bytes")
    return message


def relation_row(relation: Relation, values: TupleData) -> dict[str, Value]:
    """Column name to value; ``UNCHANGED_TOAST`` passes through."""
    columns = relation.columns
    if len(columns) != len(values):
        raise ProtocolError(
            f"tuple has {len(values)} values but relation {relation.namespace}.{relation.name} "
            f"({relation.relation_id}) has {len(columns)} columns"
        )
    return {column.name: value for column, value in zip(columns, values)}


# --- decoders: each takes the whole message and returns (message, end offset) ----------------


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise IndexError
    return buf[pos:end].decode(), end + 1


def _raw_tuple(buf: bytes, pos: int) -> tuple[list[RawValue], int]:
    (count,) = _H.unpack_from(buf, pos)
    pos += 2
    size = len(buf)
    values: list[RawValue] = []
    append = values.append
    for _ in range(count):
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            start = pos + 5
            pos = start + _I.unpack_from(buf, pos + 1)[0]
            if pos > size:
                raise IndexError
            append(buf[start:pos])
        elif kind == 0x6E:  # 'n' null
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED_TOAST)
            pos += 1
        elif kind == 0x62:  # 'b' binary
            start = pos + 5
            pos = start + _I.unpack_from(buf, pos + 1)[0]
            if pos > size:
                raise IndexError
            append(bytearray(buf[start:pos]))
        else:
            raise ProtocolError(f"unknown tuple column kind {_name(kind)}")
    return values, pos


def _decoded(raw: list[RawValue]) -> TupleData:
    """Text values decoded to str, binary ones as bytes."""
    return tuple(v.decode() if isinstance(v, bytes) else bytes(v) if isinstance(v, bytearray) else v for v in raw)


def _tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    raw, pos = _raw_tuple(buf, pos)
    return _decoded(raw), pos


def _begin(buf: bytes) -> tuple[Message, int]:
    return Begin(*_BEGIN.unpack_from(buf, 1)), 1 + _BEGIN.size


def _commit(buf: bytes) -> tuple[Message, int]:
    return Commit(*_COMMIT.unpack_from(buf, 1)), 1 + _COMMIT.size


def _origin(buf: bytes) -> tuple[Message, int]:
    (lsn,) = _Q.unpack_from(buf, 1)
    name, pos = _string(buf, 9)
    return Origin(lsn, name), pos


def _relation(buf: bytes) -> tuple[Message, int]:
    (relation_id,) = _I.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity = chr(buf[pos])
    (count,) = _H.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _string(buf, pos + 1)
        type_oid, modifier = _COLUMN.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(flags, column, type_oid, modifier))
    return Relation(relation_id, namespace, name, identity, tuple(columns)), pos


def _type(buf: bytes) -> tuple[Message, int]:
    (type_oid,) = _I.unpack_from(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    return Type(type_oid, namespace, name), pos


def _insert_raw(buf: bytes) -> tuple[tuple[int, list[RawValue]], int]:
    relation_id, kind = _REL_ID_KIND.unpack_from(buf, 1)
    if kind != 0x4E:  # 'N'
        raise ProtocolError(f"Insert: expected 'N' before the new tuple, got {_name(kind)}")
    new, pos = _raw_tuple(buf, 6)
    return (relation_id, new), pos


def _insert(buf: bytes) -> tuple[Message, int]:
    (relation_id, raw), pos = _insert_raw(buf)
    return Insert(relation_id, _decoded(raw)), pos


def _update(buf: bytes) -> tuple[Message, int]:
    relation_id, kind = _REL_ID_KIND.unpack_from(buf, 1)
    old = key = None
    pos = 6
    if kind == 0x4F:  # 'O'
        old, pos = _tuple(buf, pos)
        kind = buf[pos]
        pos += 1
    elif kind == 0x4B:  # 'K'
        key, pos = _tuple(buf, pos)
        kind = buf[pos]
        pos += 1
    if kind != 0x4E:  # 'N'
        raise ProtocolError(f"Update: expected 'K', 'O' or 'N', got {_name(kind)}")
    new, pos = _tuple(buf, pos)
    return Update(relation_id, old, key, new), pos


def _delete(buf: bytes) -> tuple[Message, int]:
    relation_id, kind = _REL_ID_KIND.unpack_from(buf, 1)
    if kind == 0x4F:  # 'O'
        old, pos = _tuple(buf, 6)
        return Delete(relation_id, old, None), pos
    if kind == 0x4B:  # 'K'
        key, pos = _tuple(buf, 6)
        return Delete(relation_id, None, key), pos
    raise ProtocolError(f"Delete: expected 'K' or 'O', got {_name(kind)}")


def _truncate(buf: bytes) -> tuple[Message, int]:
    count, options = _TRUNCATE.unpack_from(buf, 1)
    ids = struct.unpack_from(f">{count}I", buf, 6)
    return Truncate(options, ids), 6 + 4 * count


def _message(buf: bytes) -> tuple[Message, int]:
    flags, lsn = _MESSAGE.unpack_from(buf, 1)
    prefix, pos = _string(buf, 10)
    start = pos + 4
    end = start + _I.unpack_from(buf, pos)[0]
    if end > len(buf):
        raise IndexError
    return LogicalMessage(flags, lsn, prefix, buf[start:end]), end


_DECODERS: Final[dict[int, Callable[[bytes], tuple[Message, int]]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}


def _name(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"0x{byte:02x}"


def _unknown(byte: int) -> str:
    later = _LATER_VERSIONS.get(chr(byte))
    if later is not None:
        return (
            f"pgoutput message {_name(byte)} ({later}) belongs to a later protocol version "
            "(streaming or two-phase); start replication with proto_version '1' and without streaming"
        )
    return f"unknown pgoutput message type {_name(byte)}"
