"""``outbox doctor``: a preflight of one store database, before install and before the relay starts.

Cut like install: :func:`read_doctor_facts` asks the database (read-only, reusing
``outbox.install.read_facts`` for what install also needs), :func:`diagnose` turns the facts
into one :class:`Check` per line (pure, unit-tested on values), and the click command prints
them or a JSON document. Any ``fail`` makes the exit code 1; ``warn`` does not.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import click
import psycopg

from outbox import contract
from outbox import install as inst
from outbox.config import slot_name_for
from outbox.dsn import connect, describe, first_line
from outbox.dsn import parse as parse_dsn
from outbox.errors import DatabaseUnavailable

Status = Literal["pass", "warn", "fail"]
RETAINED_WARN_BYTES = 1 << 30  # a slot holding back more than 1 GiB of WAL deserves a look
_ENABLED = {"O": "enabled", "A": "enabled (always)", "R": "enabled only for replica sessions", "D": "disabled"}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self, width: int = 26) -> str:
        text = f"{self.status.upper():4}  {self.name:<{width}} {self.detail}"
        return text + (f" -- fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class SlotHealth:
    name: str
    database: str | None
    plugin: str | None
    slot_type: str
    active_pid: int | None
    wal_status: str | None
    retained_bytes: int | None  # WAL kept for the slot: current LSN - restart_lsn
    lag_bytes: int | None  # not yet confirmed by the relay: current LSN - confirmed_flush_lsn


@dataclass(frozen=True)
class PublicationFacts:
    tables: tuple[str, ...]
    all_tables: bool
    actions: tuple[str, ...]  # of insert, update, delete, truncate


@dataclass(frozen=True)
class DoctorFacts:
    base: inst.Facts
    slot_name: str
    role: inst.RoleFacts
    server_version_text: str
    server_encoding: str
    max_wal_senders: int
    wal_senders_used: int
    max_slot_wal_keep_size_mb: int  # -1: unlimited
    slot: SlotHealth | None
    publication: PublicationFacts | None
    triggers: dict[str, str] = field(default_factory=dict)  # captured table -> pg_trigger.tgenabled ('' : missing)
    missing_tables: frozenset[str] = frozenset()  # rows of outbox.captures whose table is gone
    primary_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # captured table -> its primary key now
    truncate_triggers: dict[str, str] = field(default_factory=dict)  # captured table -> TRUNCATE trigger's tgenabled
    capture_parked: int | None = None  # changes the capture trigger parked (None: before revision 0005)
    replica_defaults: tuple[str, ...] = ()  # where session_replication_role defaults to replica ("database x", ...)
    foreign_slots: tuple[SlotHealth, ...] = ()  # logical slots of the cluster that outbox did not create


def is_outbox_slot(name: str, plugin: str | None, ours: str) -> bool:
    """A slot outbox made: this store's, or another store's relay slot (outbox_<db>, pgoutput) on the cluster."""
    return name == ours or (name.startswith("outbox_") and plugin == "pgoutput")


# =========================================================================== pure: facts -> checks
def _split(problem: str) -> tuple[str, str]:
    """install's one-line problems read '<what> on host:port/db: <fix>'."""
    detail, _, fix = problem.partition(": ")
    return detail, fix


def diagnose(f: DoctorFacts) -> list[Check]:
    """Every check, in the order a DBA would fix them: server, role, then the outbox itself."""
    b = f.base
    checks = [Check("connection", "pass", f"{b.where}, PostgreSQL {f.server_version_text}")]
    checks += _server_checks(f)
    checks.append(_foreign_slots_check(f))
    checks += _role_checks(f)
    installed = b.revision is not None
    if not installed:
        if b.schema_exists and not b.schema_empty:
            checks.append(Check("outbox installed", "fail", f"schema {contract.SCHEMA} exists but was not made by outbox",
                                "rename or drop it, then outbox install --dsn ... --capture SCHEMA.TABLE=AGGREGATE"))
        else:
            checks.append(Check("outbox installed", "fail", f"no outbox in {b.where}",
                                "outbox install --dsn ... --capture SCHEMA.TABLE=AGGREGATE (review first with --sql)"))
        return checks
    head = inst.store_head()
    if b.revision in inst.store_revisions() and b.revision != head:
        checks.append(Check("outbox installed", "fail", f"revision {b.revision}, older than this outbox-relay's "
                            f"{head}", "outbox install --dsn ... upgrades it (review first with --sql)"))
    elif b.revision != head:
        checks.append(Check("outbox installed", "fail", f"revision {b.revision}, unknown to this outbox-relay "
                            f"(newest {head})", "use the outbox-relay version that installed it or a newer one"))
    else:
        checks.append(Check("outbox installed", "pass", f"revision {b.revision}, {len(b.captured)} captured "
                            f"table{'s' if len(b.captured) != 1 else ''}"))
    checks.append(_slot_check(f))
    checks.append(_publication_check(f))
    checks += _trigger_checks(f)
    checks += _capture_safety_checks(f)
    return checks


def _server_checks(f: DoctorFacts) -> list[Check]:
    b = f.base
    out = []
    if b.server_version < 130000:
        out.append(Check("server version", "fail", f"PostgreSQL {f.server_version_text}: outbox needs 13 or newer",
                         "upgrade PostgreSQL"))
    wal = inst.wal_level_problem(b.wal_level, b.where)
    out.append(Check("wal_level", "fail", *_split(wal)) if wal else Check("wal_level", "pass", b.wal_level))
    if f.server_encoding != "UTF8":
        out.append(Check("server_encoding", "fail", f"{f.server_encoding}: events are JSON text, the relay needs UTF8",
                         "move the data into a database created WITH ENCODING 'UTF8' (dump and restore)"))
    else:
        out.append(Check("server_encoding", "pass", "UTF8"))

    out.append(_headroom("max_replication_slots", b.slots_used, b.max_replication_slots, ours=f.slot is not None,
                         missing=f"none free for slot {f.slot_name}", full="(ours included): no headroom for another"))
    out.append(_headroom("max_wal_senders", f.wal_senders_used, f.max_wal_senders,
                         ours=f.slot is not None and f.slot.active_pid is not None,
                         missing="none free for the relay", full=": a restarting relay may find none free"))

    if f.max_slot_wal_keep_size_mb < 0:
        out.append(Check("max_slot_wal_keep_size", "warn", "-1 (unlimited): a relay that stays down can fill the disk",
                         "ALTER SYSTEM SET max_slot_wal_keep_size = '<size>'; SELECT pg_reload_conf(); with <size> the "
                         "free space of the WAL disk minus max_wal_size minus a fifth for headroom (docs/operations.md, "
                         "Sizing max_slot_wal_keep_size)"))
    else:
        out.append(Check("max_slot_wal_keep_size", "pass", f"{f.max_slot_wal_keep_size_mb} MB"))
    return out


def _foreign_slots_check(f: DoctorFacts) -> Check:
    """Logical slots outbox did not create: each streams every table of its database, and retains WAL."""
    name = "other logical slots"
    if not f.foreign_slots:
        return Check(name, "pass", "none: every logical slot of the cluster is an outbox relay's")
    listed = "; ".join(
        f"{s.name} ({s.plugin}, database {s.database}, {f'active pid {s.active_pid}' if s.active_pid else 'inactive'}, "
        f"retains {format_bytes(s.retained_bytes)})" for s in f.foreign_slots)
    drop = "; ".join(f"SELECT pg_drop_replication_slot({inst.quote_literal(s.name)})" for s in f.foreign_slots)
    return Check(name, "warn", f"not created by outbox: {listed}: a logical slot decodes every table of its database "
                 "for whoever holds REPLICATION, and pins WAL while nobody reads it",
                 f"find its owner; if nobody needs it: {drop} (docs/install.md, Restricting the relay role)")


def _headroom(setting: str, used: int, maximum: int, *, ours: bool, missing: str, full: str) -> Check:
    """A server limit the relay takes one of: fail when ours is not there and none is free, warn when full."""
    detail = f"{used} of {maximum} in use"
    fix = f"raise {setting} in postgresql.conf and restart PostgreSQL"
    if used < maximum:
        return Check(setting, "pass", detail)
    if not ours:
        return Check(setting, "fail", f"{detail}, {missing}", fix)
    return Check(setting, "warn", f"{detail} {full}".replace(" :", ":"), fix)


def _role_checks(f: DoctorFacts) -> list[Check]:
    r, b = f.role, f.base
    name = f"role {r.name}"
    ident = inst.quote_ident(r.name)
    if not r.exists:
        return [Check(name, "fail", "does not exist",
                      f"outbox install --dsn ... --relay-role {r.name} (or CREATE ROLE {ident} LOGIN REPLICATION)")]
    out = []
    if r.can_replicate:
        out.append(Check(name, "pass", "superuser" if r.superuser else "REPLICATION"))
    else:
        out.append(Check(name, "fail", "has neither REPLICATION nor superuser: it cannot stream the slot",
                         f"ALTER ROLE {ident} REPLICATION (as a superuser)"))
    if not r.can_login:
        out.append(Check(f"{name} login", "fail", "NOLOGIN", f"ALTER ROLE {ident} LOGIN"))
    if not r.connect:
        out.append(Check(f"{name} connect", "fail", f"no CONNECT on database {b.database}",
                         f"GRANT CONNECT ON DATABASE {inst.quote_ident(b.database)} TO {ident}"))
    events = f"{contract.SCHEMA}.{contract.EVENTS_TABLE}"
    if r.events_select is None:  # not installed yet: the one "outbox installed" check says so
        return out
    if r.outbox_usage and r.events_select:
        out.append(Check(f"{name} SELECT", "pass", f"on {events}"))
    else:
        out.append(Check(f"{name} SELECT", "fail", f"cannot read {events}",
                         f"GRANT USAGE ON SCHEMA {contract.SCHEMA} TO {ident}; GRANT SELECT ON {events} TO {ident}"))
    if r.outbox_usage and r.events_delete:
        out.append(Check(f"{name} DELETE", "pass", f"on {events} (the relay's purge of old rows)"))
    else:
        out.append(Check(f"{name} DELETE", "warn", f"cannot delete from {events}: the relay's purge will fail and "
                         "the table grows", f"GRANT DELETE ON {events} TO {ident}, or run the relay with --retention 0"))
    if r.outbox_usage and r.events_insert:
        out.append(Check(f"{name} INSERT", "pass", f"on {events} (the relay's heartbeats)"))
    else:
        out.append(Check(f"{name} INSERT", "warn", f"cannot insert into {events}: no heartbeats, so the heartbeat "
                         "alert fires and an idle database's slot advances only with keepalives",
                         f"GRANT INSERT ON {events} TO {ident}, or run the relay with --heartbeat-interval 0"))
    return out


def _slot_check(f: DoctorFacts) -> Check:
    s, b = f.slot, f.base
    name = "replication slot"
    if s is None:
        return Check(name, "fail", f"{f.slot_name} does not exist",
                     "outbox install --dsn ... creates it; if it was dropped, events since then are gone from the "
                     "WAL: re-snapshot the tables with a backfill")
    if s.slot_type != "logical" or s.plugin != "pgoutput" or s.database != b.database:
        return Check(name, "fail", f"{s.name} is not a pgoutput slot of {b.database} (type {s.slot_type}, plugin "
                     f"{s.plugin}, database {s.database})", "choose another --slot")
    if s.wal_status == "lost":
        return Check(name, "fail", f"{s.name} was invalidated: the WAL it needed was removed "
                     "(max_slot_wal_keep_size exceeded)", "drop it, run outbox install again, and re-snapshot the "
                     "tables with a backfill")
    retained = format_bytes(s.retained_bytes)
    state = f"active (pid {s.active_pid})" if s.active_pid else "inactive"
    detail = f"{s.name}: pgoutput, {state}, retains {retained} of WAL, wal_status {s.wal_status}"
    if s.wal_status == "unreserved":
        return Check(name, "warn", detail + ": about to be invalidated",
                     "start (or unblock) the relay now, or raise max_slot_wal_keep_size")
    if (s.retained_bytes or 0) >= RETAINED_WARN_BYTES:
        return Check(name, "warn", detail, "start the relay or see why it is behind: outbox status --dsn ...")
    if not s.active_pid:
        return Check(name, "warn", detail + " (no relay connected: WAL accumulates)",
                     "start it: outbox relay --dsn ... --source-id ...")
    return Check(name, "pass", detail)


def _publication_check(f: DoctorFacts) -> Check:
    p, name = f.publication, "publication"
    events = f"{contract.SCHEMA}.{contract.EVENTS_TABLE}"
    if p is None:
        return Check(name, "fail", f"{contract.PUBLICATION} does not exist",
                     "outbox install --dsn ... recreates it (run outbox uninstall first if the schema is damaged)")
    if not p.all_tables and events not in p.tables:
        return Check(name, "fail", f"{contract.PUBLICATION} does not cover {events}",
                     f"ALTER PUBLICATION {contract.PUBLICATION} ADD TABLE {events}")
    if p.actions != ("insert",):
        return Check(name, "fail", f"{contract.PUBLICATION} publishes {', '.join(p.actions) or 'nothing'}, not insert only",
                     f"ALTER PUBLICATION {contract.PUBLICATION} SET (publish = 'insert')")
    extra = sorted(set(p.tables) - {events})
    detail = f"{contract.PUBLICATION}: {events}, publish = insert"
    if p.all_tables or extra:
        return Check(name, "warn", detail + f"; also {'all tables' if p.all_tables else ', '.join(extra)}",
                     f"the relay only expects {events}: ALTER PUBLICATION {contract.PUBLICATION} DROP TABLE ...")
    return Check(name, "pass", detail)


def _trigger_checks(f: DoctorFacts) -> list[Check]:
    b = f.base
    if not b.captured:
        return [Check("capture triggers", "pass", "no captured tables (events come from outbox.emit() only)")]
    out = []
    for table, (aggregate, _keys) in sorted(b.captured.items()):
        name = f"capture {table}"
        enabled = f.triggers.get(table, "")
        if table in f.missing_tables:
            out.append(Check(name, "fail", "the table no longer exists",
                             f"DELETE FROM {contract.SCHEMA}.captures WHERE table_name = {inst.quote_literal(table)}"))
        elif not enabled:
            out.append(Check(name, "fail", f"trigger {contract.CAPTURE_TRIGGER} is missing: changes are not captured",
                             f"outbox install --dsn ... --capture {table}={aggregate}"))
        elif enabled not in ("O", "A"):
            out.append(Check(name, "fail", f"trigger {contract.CAPTURE_TRIGGER} is {_ENABLED.get(enabled, enabled)}: "
                             "changes are not captured", f"ALTER TABLE {table} ENABLE TRIGGER {contract.CAPTURE_TRIGGER}"))
        else:
            out.append(Check(name, "pass", f"trigger {contract.CAPTURE_TRIGGER} {_ENABLED[enabled]}, as {aggregate}"))
    return out


def _capture_safety_checks(f: DoctorFacts) -> list[Check]:
    """Registered keys against the primary keys, TRUNCATE capture, parked changes, replica mode."""
    b = f.base
    out = []
    for table, (_aggregate, keys) in sorted(b.captured.items()):
        if table in f.missing_tables or not f.triggers.get(table) or table not in f.primary_keys:
            continue
        name = f"key {table}"
        pk = f.primary_keys.get(table, ())
        if not pk:
            out.append(Check(name, "fail", f"{table} has no primary key: its changes are parked in "
                             f"{contract.SCHEMA}.{contract.PARKED_TABLE}, not published",
                             f"ALTER TABLE {table} ADD PRIMARY KEY (...), then SELECT outbox.redrive_parked(id) "
                             f"FROM {contract.SCHEMA}.{contract.PARKED_TABLE} WHERE table_name = {inst.quote_literal(table)}"))
        elif pk != keys:
            out.append(Check(name, "warn", f"registered key ({', '.join(keys)}), primary key now ({', '.join(pk)}): "
                             "events carry the new key, so aggregate ids changed meaning for the sinks",
                             f"tell the consumer teams; outbox install --dsn ... --capture {table}=... registers it"))
        else:
            out.append(Check(name, "pass", f"({', '.join(pk)}), the primary key"))
        if f.capture_parked is not None and f.triggers.get(table) in ("O", "A"):
            if not f.truncate_triggers.get(table):
                out.append(Check(f"truncate {table}", "warn", f"no {contract.CAPTURE_TRUNCATE_TRIGGER} trigger: a "
                                 "TRUNCATE empties the table and every sink keeps its rows",
                                 f"outbox install --dsn ... --capture {table}=... adds it"))
            elif f.truncate_triggers[table] != f.triggers[table]:
                out.append(Check(f"truncate {table}", "warn", f"{contract.CAPTURE_TRUNCATE_TRIGGER} is "
                                 f"{_ENABLED.get(f.truncate_triggers[table], '?')}, unlike {contract.CAPTURE_TRIGGER}",
                                 f"ALTER TABLE {table} ENABLE {'ALWAYS ' if f.triggers[table] == 'A' else ''}TRIGGER "
                                 f"{contract.CAPTURE_TRUNCATE_TRIGGER}"))
    if f.capture_parked:
        out.append(Check("parked changes", "warn", f"{f.capture_parked} change{'s' if f.capture_parked != 1 else ''} "
                         f"parked by the capture trigger in {contract.SCHEMA}.{contract.PARKED_TABLE} (no primary key)",
                         "give the table a primary key, then SELECT outbox.redrive_parked(id) FROM outbox.parked "
                         "WHERE table_name IS NOT NULL (docs/operations.md, Parked events)"))
    not_always = sorted(t for t, e in f.triggers.items() if e == "O")
    if f.replica_defaults and not_always:
        out.append(Check("session_replication_role", "warn",
                         f"defaults to replica for {', '.join(f.replica_defaults)}: those sessions skip the capture "
                         f"triggers of {', '.join(not_always)}, silently",
                         "remove that default (ALTER ... RESET session_replication_role), or outbox install "
                         "--capture-always (docs/install.md, Replica mode)"))
    return out


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


# =========================================================================== reading the database
_SERVER_SQL = """
SELECT current_setting('server_version'), current_setting('server_encoding'),
       current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
       pg_size_bytes(CASE current_setting('max_slot_wal_keep_size') WHEN '-1' THEN '-1MB'
                     ELSE current_setting('max_slot_wal_keep_size') END) / (1024 * 1024),
       current_user
"""

_SLOT_SQL = """
SELECT slot_name, database, plugin, slot_type, active_pid, wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s
"""

# Every logical slot of the cluster (pg_replication_slots is cluster-wide), for the ones outbox did not make.
_ALL_SLOTS_SQL = """
SELECT slot_name, database, plugin, slot_type, active_pid, wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name
"""

_PUBLICATION_SQL = """
SELECT p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate,
       ARRAY(SELECT format('%%I.%%I', t.schemaname, t.tablename) FROM pg_publication_tables t
             WHERE t.pubname = p.pubname ORDER BY 1)
FROM pg_publication p WHERE p.pubname = %s
"""

_TRIGGERS_SQL = """
SELECT c.table_name, to_regclass(c.table_name) IS NOT NULL, coalesce(t.tgenabled::text, ''),
       coalesce(u.tgenabled::text, ''),
       ARRAY(SELECT a.attname::text
             FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
             WHERE i.indrelid = to_regclass(c.table_name) AND i.indisprimary AND a.attrelid = i.indrelid
               AND a.attnum = k.attnum ORDER BY k.ord)
FROM outbox.captures c
LEFT JOIN pg_trigger t ON t.tgrelid = to_regclass(c.table_name) AND t.tgname = %s AND NOT t.tgisinternal
LEFT JOIN pg_trigger u ON u.tgrelid = to_regclass(c.table_name) AND u.tgname = %s AND NOT u.tgisinternal
"""

# Defaults that put sessions in replica mode (ordinary triggers off): the server's, this
# database's, a role's (here or everywhere).
_REPLICA_SQL = """
SELECT 'the server (postgresql.conf)' WHERE current_setting('session_replication_role') = 'replica'
       AND (SELECT source FROM pg_settings WHERE name = 'session_replication_role') IN ('configuration file', 'command line')
UNION ALL
SELECT CASE WHEN s.setrole = 0 THEN 'database ' || current_database()
            ELSE 'role ' || r.rolname || CASE WHEN s.setdatabase = 0 THEN '' ELSE ' in this database' END END
  FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
 WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
   AND 'session_replication_role=replica' = ANY(s.setconfig)
"""


def read_doctor_facts(conn: psycopg.Connection[Any], *, slot: str | None, role: str | None) -> DoctorFacts:
    version, encoding, max_senders, senders, keep_mb, current_user = conn.execute(_SERVER_SQL).fetchone()  # type: ignore[misc]
    slot_name = inst.check_slot_name(slot) if slot else None
    if slot_name is None:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        slot_name = slot_name_for(row[0])
    role_name = role or current_user
    base = inst.read_facts(conn, slot=slot_name, roles=[role_name])
    s = conn.execute(_SLOT_SQL, (slot_name,)).fetchone()
    p = conn.execute(_PUBLICATION_SQL, (contract.PUBLICATION,)).fetchone()
    triggers: dict[str, str] = {}
    truncates: dict[str, str] = {}
    keys: dict[str, tuple[str, ...]] = {}
    missing: set[str] = set()
    parked = None
    if base.revision is not None:
        for table, exists, enabled, truncate, pk in conn.execute(
                _TRIGGERS_SQL, (contract.CAPTURE_TRIGGER, contract.CAPTURE_TRUNCATE_TRIGGER)):
            triggers[table], truncates[table], keys[table] = enabled, truncate, tuple(pk)
            if not exists:
                missing.add(table)
        has_column = conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'table_name' "
                                  "AND NOT attisdropped", (f"{contract.SCHEMA}.{contract.PARKED_TABLE}",)).fetchone()
        if has_column:
            parked = conn.execute(f"SELECT count(*) FROM {contract.SCHEMA}.{contract.PARKED_TABLE} "
                                  "WHERE table_name IS NOT NULL").fetchone()[0]  # type: ignore[index]
    replica = tuple(r[0] for r in conn.execute(_REPLICA_SQL))
    foreign = tuple(SlotHealth(*r) for r in conn.execute(_ALL_SLOTS_SQL) if not is_outbox_slot(r[0], r[2], slot_name))
    return DoctorFacts(
        base=base, slot_name=slot_name, role=base.roles[role_name], server_version_text=version,
        server_encoding=encoding, max_wal_senders=max_senders, wal_senders_used=senders,
        max_slot_wal_keep_size_mb=int(keep_mb),
        slot=SlotHealth(*s) if s else None,
        publication=PublicationFacts(
            tuple(p[5]), bool(p[0]),
            tuple(a for a, on in zip(("insert", "update", "delete", "truncate"), p[1:5]) if on)) if p else None,
        triggers=triggers, missing_tables=frozenset(missing), primary_keys=keys, truncate_triggers=truncates,
        capture_parked=parked, replica_defaults=replica, foreign_slots=foreign,
    )


def run_doctor(dsn: str, *, slot: str | None = None, role: str | None = None) -> tuple[str, list[Check]]:
    """Connect read-only and diagnose; an unreachable database is one failing check, not an exception."""
    where = describe(dsn)
    try:
        with connect(dsn, application_name="outbox-doctor", connect_timeout=10) as conn:
            conn.read_only = True
            facts = read_doctor_facts(conn, slot=slot, role=role)
            conn.rollback()
    except DatabaseUnavailable as exc:
        return where, [Check("connection", "fail", exc.message.removesuffix(
            " (check --dsn and the PG* environment variables)"), "check --dsn and the PG* environment variables")]
    except psycopg.errors.InsufficientPrivilege as exc:  # e.g. run as the least-privilege relay role itself
        return where, [Check("read access", "fail", first_line(exc),
                             "run outbox doctor as the database owner or a superuser, with --role <the relay's role>")]
    return facts.base.where, diagnose(facts)


# =========================================================================== click
@click.command()
@click.option("--dsn", required=True, metavar="DSN",
              help="Store database: a libpq string or a postgresql:// URL; PG* environment variables fill the rest.")
@click.option("--slot", default=None, metavar="NAME", help="Replication slot name (default: outbox_<database>).")
@click.option("--role", default=None, metavar="NAME",
              help="The role the relay runs as, whose privileges are checked (default: the DSN's user).")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print a JSON document instead of lines.")
def doctor(dsn: str, slot: str | None, role: str | None, as_json: bool) -> None:
    """Check a store database before install and before starting its relay.

    One line per check (PASS, WARN or FAIL, each problem with its fix): wal_level, replication
    slots and WAL senders, max_slot_wal_keep_size, encoding, the relay role's privileges, the
    slot's health, the publication and every capture trigger. Read-only. Exit code 1 when any
    check fails; warnings do not fail.
    """
    parse_dsn(dsn)
    if role:
        inst.check_role_name(role, "--role")
    where, checks = run_doctor(dsn, slot=slot, role=role)
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if as_json:
        click.echo(json.dumps({"database": where, "ok": failed == 0, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        click.echo(f"outbox doctor: {where}")
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(c.line(width))
        click.echo(f"{failed} failed, {warned} warning{'s' if warned != 1 else ''}, "
                   f"{len(checks) - failed - warned} passed")
    if failed:
        click.get_current_context().exit(1)
