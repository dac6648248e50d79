"""``outbox install`` / ``outbox uninstall``: put the outbox into a store database, or take it out.

The work is cut in three layers:

* pure SQL builders and checks (``capture_sql``, ``check_install``, ``plan_captures`` ...): values
  in, SQL text or a one-line error out, unit-tested without a server;
* ``read_facts``: the one function that asks the database what is there (read-only);
* ``install_outbox`` / ``uninstall_outbox`` / ``install_sql`` / ``uninstall_sql``: the typed
  functions the click commands wrap.

Install runs in this order, so that no event can be written before the slot can decode it
(issue #19.1) and no lock of ours queues the application's statements (issue #21):

1. one transaction through Alembic (``migrations/store``, version table inside the ``outbox``
   schema): schema, events table, publication, registry, trigger function, role grants; it starts
   with ``SET LOCAL lock_timeout`` and is retried as a whole when a lock is not granted in time;
2. the logical replication slot, outside any transaction (PostgreSQL refuses to create one in a
   transaction that has written); it waits for the transactions running when it starts, watched
   and bounded by ``--lock-wait``; its consistent point then precedes every capture trigger;
3. one short transaction per captured table (``SET LOCAL lock_timeout``, the trigger, its
   ``outbox.captures`` row), each retried with backoff while another session holds the table.

Uninstall removes triggers and schema in one transaction (``SET LOCAL lock_timeout``, retried as
a whole, so a failure changes nothing) and drops the slot last. ``outbox/lockwait.py`` holds the
waiting, watching and wording.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import psycopg

from outbox import config as cfg
from outbox import contract, lockwait
from outbox.dsn import connect, describe, first_line
from outbox.dsn import parse as parse_dsn
from outbox.errors import ConfigError, NotInstalled, OutboxError, PreconditionFailed

VERSION_TABLE = "alembic_version"  # in schema outbox
CAPTURE_FUNCTION = f"{contract.SCHEMA}.capture_change"
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_LOCK_KEY = 0x6F7574626F78  # "outbox": serialises concurrent installs on one database

Echo = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# =========================================================================== pure SQL
def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does (only when needed)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


_RESERVED = frozenset(
    "all analyse analyze and any array as asc asymmetric both case cast check collate column constraint create "
    "current_catalog current_date current_role current_time current_timestamp current_user default deferrable desc "
    "distinct do else end except false fetch for foreign from grant group having in initially intersect into lateral "
    "leading limit localtime localtimestamp not null offset on only or order placing primary references returning "
    "select session_user some symmetric table then to trailing true union unique user using variadic when where "
    "window with".split()
)


def quote_literal(value: str) -> str:
    """A SQL string literal, correct whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


def capture_sql(table: str, aggregate: str, key_columns: Sequence[str], *, replace: bool = False,
                exclude: Sequence[str] | None = None) -> list[str]:
    """The statements that start capturing ``table`` (already quoted, ``schema.table``).

    ``replace`` drops an existing outbox_capture trigger first (aggregate or key changed).
    ``exclude``: the columns left out of its events (store revision 0006; None: not registered).
    The same statements run online and are printed by ``--sql``.
    """
    if not key_columns:
        raise ValueError(f"{table} has no key columns")
    contract.topic_for(contract.DEFAULT_TOPIC_PREFIX, aggregate)  # raises ContractError
    args = ", ".join(quote_literal(v) for v in (aggregate, *key_columns))
    statements = []
    if replace:
        statements.append(f"DROP TRIGGER IF EXISTS {contract.CAPTURE_TRIGGER} ON {table}")
    statements.append(
        f"CREATE TRIGGER {contract.CAPTURE_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {CAPTURE_FUNCTION}({args})"
    )
    statements.append(register_sql(table, aggregate, key_columns, exclude))
    return statements


def register_sql(table: str, aggregate: str, key_columns: Sequence[str], exclude: Sequence[str] | None = None) -> str:
    """The capture's row in outbox.captures; its exclude_columns take effect at once (no DDL)."""
    keys = ", ".join(quote_literal(c) for c in key_columns)
    if exclude is None:
        return (f"INSERT INTO {contract.SCHEMA}.captures (table_name, aggregate_type, key_columns) "
                f"VALUES ({quote_literal(table)}, {quote_literal(aggregate)}, ARRAY[{keys}]::text[]) "
                "ON CONFLICT (table_name) DO UPDATE SET aggregate_type = EXCLUDED.aggregate_type, "
                "key_columns = EXCLUDED.key_columns, installed_at = now()")
    columns = ", ".join(quote_literal(c) for c in exclude)
    return (f"INSERT INTO {contract.SCHEMA}.captures (table_name, aggregate_type, key_columns, exclude_columns) "
            f"VALUES ({quote_literal(table)}, {quote_literal(aggregate)}, ARRAY[{keys}]::text[], "
            f"ARRAY[{columns}]::text[]) "
            "ON CONFLICT (table_name) DO UPDATE SET aggregate_type = EXCLUDED.aggregate_type, "
            "key_columns = EXCLUDED.key_columns, exclude_columns = EXCLUDED.exclude_columns, installed_at = now()")


def truncate_capture_sql(table: str, aggregate: str, *, replace: bool = False, always: bool = False) -> list[str]:
    """After capture_sql: the statement-level trigger that turns TRUNCATE into ``<aggregate>.truncated``
    (store revision 0005); ``always``: ENABLE ALWAYS both triggers (session_replication_role = replica)."""
    statements = [f"DROP TRIGGER IF EXISTS {contract.CAPTURE_TRUNCATE_TRIGGER} ON {table}"] if replace else []
    statements.append(f"CREATE TRIGGER {contract.CAPTURE_TRUNCATE_TRIGGER} AFTER TRUNCATE ON {table} "
                      f"FOR EACH STATEMENT EXECUTE FUNCTION {CAPTURE_FUNCTION}({quote_literal(aggregate)})")
    if always:
        statements.append(f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {contract.CAPTURE_TRIGGER}, "
                          f"ENABLE ALWAYS TRIGGER {contract.CAPTURE_TRUNCATE_TRIGGER}")
    return statements


def uncapture_sql(table: str) -> str:
    """Stop capturing a table (its row in outbox.captures goes with the downgrade)."""
    return f"DROP TRIGGER IF EXISTS {contract.CAPTURE_TRIGGER} ON {table}"


def create_slot_sql(slot: str) -> str:
    return f"SELECT pg_create_logical_replication_slot({quote_literal(slot)}, 'pgoutput')"


def drop_slot_sql(slot: str) -> str:
    return f"SELECT pg_drop_replication_slot({quote_literal(slot)})"


def drop_schema_sql() -> list[str]:
    return [f"DROP TABLE {contract.SCHEMA}.{VERSION_TABLE}", f"DROP SCHEMA {contract.SCHEMA}"]


def check_slot_name(name: str) -> str:
    if not _SLOT_NAME.match(name):
        raise ConfigError(f"invalid --slot {name!r}: use 1 to 63 lowercase letters, digits and '_'")
    return name


def check_role_name(name: str, option: str = "--relay-role") -> str:
    if not _ROLE_NAME.match(name):
        raise ConfigError(f"invalid {option} {name!r}: use 1 to 63 letters, digits and '_', not starting with a digit")
    return name


def _ensure_role_sql(role: str, *, replication: bool) -> str:
    """Create a LOGIN role (no password: the DBA sets one) unless it exists; give it REPLICATION if asked."""
    ident, literal = quote_ident(role), quote_literal(role)
    attributes = "LOGIN REPLICATION" if replication else "LOGIN"
    ensure_replication = (f"\n  ELSIF NOT (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = {literal}) THEN\n"
                          f"    ALTER ROLE {ident} REPLICATION;") if replication else ""
    return (f"DO $outbox$ BEGIN\n  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal}) THEN\n"
            f"    CREATE ROLE {ident} {attributes};{ensure_replication}\n  END IF;\nEND $outbox$")


def relay_role_sql(role: str, database: str) -> list[str]:
    """Exactly what the relay needs: stream the slot, read its database, purge old events."""
    r = quote_ident(role)
    return [
        _ensure_role_sql(role, replication=True),
        f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {r}",
        f"GRANT USAGE ON SCHEMA {contract.SCHEMA} TO {r}",
        f"GRANT SELECT, INSERT, DELETE ON {contract.SCHEMA}.{contract.EVENTS_TABLE} TO {r}",  # INSERT: heartbeats
        f"GRANT INSERT ON {contract.SCHEMA}.{contract.PARKED_TABLE} TO {r}",  # events too large for Kafka
    ]


WRITEBACK_SCHEMA = "outbox_crm"  # store revision 0004


def writeback_role_sql(role: str, database: str) -> list[str]:
    """What ``outbox consume crm-writeback`` needs on a store database besides UPDATE on the mapped tables.

    Its ledger and offsets in schema outbox_crm, and INSERT on outbox.events: the capture trigger
    runs as the role that changes a captured table (SECURITY INVOKER). SELECT, UPDATE on the legacy
    tables named in the mapping are the DBA's grant: install does not know the mapping.
    """
    r, schema = quote_ident(role), WRITEBACK_SCHEMA
    return [
        _ensure_role_sql(role, replication=False),
        f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {r}",
        f"GRANT USAGE ON SCHEMA {schema} TO {r}",
        f"GRANT SELECT, INSERT ON {schema}.applied TO {r}",
        f"GRANT SELECT, INSERT, UPDATE ON {schema}.consumer_offsets TO {r}",
        f"GRANT USAGE ON SCHEMA {contract.SCHEMA} TO {r}",
        f"GRANT INSERT ON {contract.SCHEMA}.{contract.EVENTS_TABLE} TO {r}",  # the capture trigger's insert (before 0005)
        f"GRANT {contract.ORIGIN_ROLE} TO {r}",  # its SET LOCAL outbox.origin = 'crm' is honoured (0005)
    ]


READSTORE_SCHEMA = "readstore"


def consumer_role_sql(role: str, database: str) -> list[str]:
    """The read-store consumer's grants when the schema's owner runs the migrations.

    The consumer then runs with ``--no-migrate``: it reads the version table, upserts entities,
    writes its offsets, and needs nothing else (rejected records go to Kafka's ``<topic>.dlq``).
    """
    r, schema = quote_ident(role), READSTORE_SCHEMA
    return [
        _ensure_role_sql(role, replication=False),
        f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {r}",
        f"GRANT USAGE ON SCHEMA {schema} TO {r}",
        f"GRANT SELECT ON {schema}.alembic_version, {schema}.current_entities TO {r}",
        f"GRANT SELECT, INSERT, UPDATE ON {schema}.entities, {schema}.consumer_offsets TO {r}",
    ]


def drop_role_hint(role: str, database: str) -> str:
    """What a DBA runs to remove a role install made; never run automatically (it may own things)."""
    r = quote_ident(role)
    return (f"REVOKE CONNECT ON DATABASE {quote_ident(database)} FROM {r}; "
            f"DROP ROLE {r};  -- after DROP OWNED BY {r} in every database where it still holds privileges")


# =========================================================================== facts and checks
@dataclass(frozen=True)
class TableFacts:
    """What the database says about one table named by --capture."""

    requested: str  # as written on the command line
    name: str | None = None  # canonical, quoted where needed: schema.table; None when not found
    relkind: str | None = None
    key_columns: tuple[str, ...] = ()
    can_trigger: bool = True
    children: tuple[str, ...] = ()  # inheritance children (legacy pre-10 partitioning), not declarative partitions
    columns: tuple[str, ...] = ()  # its columns (for --exclude)


@dataclass(frozen=True)
class SlotFacts:
    name: str
    database: str | None
    plugin: str | None
    active_pid: int | None


@dataclass(frozen=True)
class RoleFacts:
    """One role, and what it may do in this database (None: the outbox object is not there yet)."""

    name: str
    exists: bool
    superuser: bool = False
    replication: bool = False  # the REPLICATION attribute (superusers have it implicitly)
    can_login: bool = False
    connect: bool = False
    outbox_usage: bool | None = None
    events_select: bool | None = None
    events_delete: bool | None = None
    events_insert: bool | None = None

    @property
    def can_replicate(self) -> bool:
        return self.superuser or self.replication


@dataclass(frozen=True)
class Facts:
    """Everything install and uninstall decide on, read in one place (``read_facts``)."""

    where: str  # host:port/db
    database: str
    server_version: int
    wal_level: str
    max_replication_slots: int
    slots_used: int
    can_create: bool  # CREATE on the database: schema and publication
    can_replicate: bool  # superuser or REPLICATION: the slot
    schema_exists: bool
    schema_empty: bool
    publication_exists: bool
    revision: str | None
    slot: SlotFacts | None
    captured: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # table -> (aggregate, keys)
    excluded: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table -> columns left out (revision 0006)
    triggered: frozenset[str] = frozenset()  # tables that carry an outbox_capture trigger
    always: frozenset[str] = frozenset()  # of those, the ones whose capture triggers are ENABLE ALWAYS (and complete)
    tables: tuple[TableFacts, ...] = ()
    superuser: bool = False  # the current user
    roles: dict[str, RoleFacts] = field(default_factory=dict)  # the roles asked about (--relay-role ...)
    relay_roles: tuple[str, ...] = ()  # roles with REPLICATION holding privileges on outbox.events


def wal_level_problem(wal_level: str, where: str) -> str | None:
    if wal_level == "logical":
        return None
    return f"wal_level is {wal_level!r} on {where}: set wal_level = logical in postgresql.conf and restart PostgreSQL"


def check_wal_level(wal_level: str, where: str) -> None:
    problem = wal_level_problem(wal_level, where)
    if problem:
        raise PreconditionFailed(problem)


def install_problems(facts: Facts, slot: str) -> list[str]:
    """Every reason install cannot proceed, each one line with the fix; empty when all is well."""
    problems: list[str] = []
    where = facts.where
    if facts.server_version < 130000:
        problems.append(f"{where} runs PostgreSQL {facts.server_version // 10000}: outbox needs 13 or newer")
    wal = wal_level_problem(facts.wal_level, where)
    if wal:
        problems.append(wal)
    if facts.schema_exists and facts.revision is None and not facts.schema_empty:
        problems.append(f"schema {contract.SCHEMA} already exists on {where} but was not installed by outbox "
                        f"(no {contract.SCHEMA}.{VERSION_TABLE}): rename or drop it, then install again")
    if facts.revision is not None and facts.revision not in store_revisions():
        problems.append(f"the outbox on {where} is at revision {facts.revision}, which this outbox-relay does not "
                        f"know (newest: {store_head()}): use the outbox-relay version that installed it or a newer one")
    needs_create = not facts.schema_exists or not facts.publication_exists or facts.revision is None
    if needs_create and not facts.can_create:
        problems.append(f"the current user cannot create schemas or publications in {where}: "
                        f"GRANT CREATE ON DATABASE {quote_ident(facts.database)} TO <user>, or install as the database owner")
    if facts.slot is None:
        if not facts.can_replicate:
            problems.append(f"the current user cannot create replication slot {slot} on {where}: "
                            "ALTER ROLE <user> REPLICATION, or install as a superuser")
        if facts.slots_used >= facts.max_replication_slots:
            problems.append(f"no free replication slot on {where} (max_replication_slots = {facts.max_replication_slots}, "
                            f"{facts.slots_used} in use): raise max_replication_slots in postgresql.conf and restart PostgreSQL")
    elif facts.slot.database != facts.database or facts.slot.plugin != "pgoutput":
        problems.append(f"replication slot {slot} already exists for database {facts.slot.database} with plugin "
                        f"{facts.slot.plugin}: choose another name with --slot")
    for t in facts.tables:
        problems.extend(table_problems(t, where))
    problems.extend(inheritance_problems(facts))
    for role in facts.roles.values():
        if not facts.superuser and not role.can_replicate:
            problems.append(f"only a superuser can {'give' if role.exists else 'create'} role {role.name} "
                            f"{'the REPLICATION attribute' if role.exists else 'with REPLICATION'} on {where}: "
                            f"install as a superuser, or have one run "
                            f"{'ALTER' if role.exists else 'CREATE'} ROLE {quote_ident(role.name)} "
                            f"{'' if role.exists else 'LOGIN '}REPLICATION first")
    return problems


def table_problems(t: TableFacts, where: str) -> list[str]:
    if t.name is None:
        return [f"table {t.requested} does not exist in {where}: check the --capture SCHEMA.TABLE name"]
    if t.relkind not in ("r", "p"):
        return [f"{t.name} is not a table (relkind {t.relkind!r}): only tables can be captured"]
    if t.name.split(".")[0] == contract.SCHEMA:
        return [f"{t.name} belongs to the outbox itself and cannot be captured"]
    if not t.key_columns:
        return [f"table {t.name} has no primary key: add one (ALTER TABLE {t.name} ADD PRIMARY KEY (...)) "
                "so its events have an aggregate id, then install again"]
    if not t.can_trigger:
        return [f"the current user cannot create triggers on {t.name}: GRANT TRIGGER ON {t.name} TO <user>, "
                "or install as its owner"]
    return []


def inheritance_problems(facts: Facts) -> list[str]:
    """A captured table's inheritance children must be captured too.

    Rows written to a child (legacy partitioning: ``INHERITS``, often filled by a routing trigger
    on the parent) fire the child's row triggers only, so the parent's trigger alone gives no
    event for them. Declarative partitions need nothing: a trigger on the parent is cloned onto
    every partition, present and future.
    """
    covered = {t.name for t in facts.tables if t.name} | set(facts.captured) | facts.triggered
    problems = []
    for t in facts.tables:
        missing = [c for c in t.children if c not in covered]
        if t.name and missing:
            problems.append(f"{t.name} has inheritance children ({', '.join(missing)}) whose rows its trigger never "
                            f"sees: capture them too (--capture {missing[0]}=AGGREGATE for each), or partition "
                            f"{t.name} declaratively")
    return problems


def check_install(facts: Facts, slot: str) -> None:
    problems = install_problems(facts, slot)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise PreconditionFailed(problems[0] + more)


@dataclass(frozen=True)
class CapturePlan:
    table: str
    aggregate: str
    key_columns: tuple[str, ...]
    action: str  # "create", "replace" or "keep"
    previous: str | None = None  # the aggregate it had, when replaced
    always: bool = False  # --capture-always
    exclude: tuple[str, ...] = ()  # --exclude: columns left out of its events

    def statements(self) -> list[str]:
        if self.action == "keep":
            return []
        if self.action == "register":  # only the excluded columns changed: the trigger stays, no DDL
            return [register_sql(self.table, self.aggregate, self.key_columns, self.exclude)]
        replace = self.action == "replace"
        return (capture_sql(self.table, self.aggregate, self.key_columns, replace=replace, exclude=self.exclude)
                + truncate_capture_sql(self.table, self.aggregate, replace=replace, always=self.always))

    def describe(self) -> str:
        keys = ", ".join(self.key_columns) + (f"; without {', '.join(self.exclude)}" if self.exclude else "")
        if self.action == "keep":
            return f"{self.table} already captured as {self.aggregate} (key: {keys})"
        if self.action == "replace" and self.previous and self.previous != self.aggregate:
            return f"capturing {self.table} as {self.aggregate} (key: {keys}; was {self.previous})"
        return f"capturing {self.table} as {self.aggregate} (key: {keys})"


def parse_exclude(text: str) -> tuple[str, str]:
    """``SCHEMA.TABLE.COLUMN`` -> (``SCHEMA.TABLE``, ``COLUMN``); a bad one is one line with an example."""
    table, _, column = text.strip().rpartition(".")
    if not table or "." not in table or not column:
        raise ConfigError(f"invalid --exclude {text!r}: expected SCHEMA.TABLE.COLUMN, e.g. pos.items.description")
    return table, column


def plan_excludes(facts: Facts, captures: Sequence[cfg.Capture], excludes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each --exclude checked against the captures of the same command: canonical table -> columns."""
    by_request = {t.requested: t for t in facts.tables}
    names = {c.table: by_request[c.table] for c in captures}
    out: dict[str, list[str]] = {}
    for text in excludes:
        table, column = parse_exclude(text)
        t = names.get(table) or next((t for t in names.values() if t.name == table), None)
        if t is None or t.name is None:
            raise ConfigError(f"--exclude {text} names no table of a --capture of this command: add "
                              f"--capture {table}=AGGREGATE (an install states each capture whole)")
        if column in t.key_columns:
            raise PreconditionFailed(f"--exclude {text}: {t.name}.{column} is part of the primary key, which every "
                                     "event carries as its aggregate id")
        if t.columns and column not in t.columns:
            raise PreconditionFailed(f"--exclude {text}: column {column} does not exist in {t.name}")
        if column not in out.setdefault(t.name, []):
            out[t.name].append(column)
    return {k: tuple(v) for k, v in out.items()}


def plan_captures(facts: Facts, captures: Iterable[cfg.Capture], *, always: bool = False,
                  excludes: Iterable[str] = ()) -> list[CapturePlan]:
    """Decide, per requested capture, whether to create, replace, register or keep its trigger.

    ``always`` (--capture-always) replaces a trigger that is not ENABLE ALWAYS yet; without it, the
    mode a trigger has is kept. ``excludes`` (--exclude SCHEMA.TABLE.COLUMN) are the columns left
    out of the events; when only they change, the trigger is kept and only its row is updated."""
    captures = list(captures)
    excluded = plan_excludes(facts, captures, excludes)
    by_request = {t.requested: t for t in facts.tables}
    plans: list[CapturePlan] = []
    seen: dict[str, str] = {}
    for c in captures:
        t = by_request[c.table]
        assert t.name is not None, "check_install runs first"
        if t.name in seen:
            raise ConfigError(f"--capture names {t.name} twice ({seen[t.name]} and {c.table})")
        seen[t.name] = c.table
        before = facts.captured.get(t.name)
        exclude = excluded.get(t.name, ())
        if before == (c.aggregate, t.key_columns) and t.name in facts.triggered and (
                not always or t.name in facts.always):
            action = "keep" if facts.excluded.get(t.name, ()) == exclude else "register"
        elif t.name in facts.triggered:
            action = "replace"
        else:
            action = "create"
        plans.append(CapturePlan(t.name, c.aggregate, t.key_columns, action, before[0] if before else None,
                                 always=always, exclude=exclude))
    return plans


# =========================================================================== reading the database
_FACTS_SQL = """
SELECT current_database(),
       current_setting('server_version_num')::int,
       current_setting('wal_level'),
       current_setting('max_replication_slots')::int,
       (SELECT count(*) FROM pg_replication_slots)::int,
       has_database_privilege(current_database(), 'CREATE'),
       (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),
       n.oid IS NOT NULL,
       NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid
                   UNION ALL SELECT 1 FROM pg_proc p WHERE p.pronamespace = n.oid
                   UNION ALL SELECT 1 FROM pg_type t WHERE t.typnamespace = n.oid AND t.typrelid = 0),
       EXISTS (SELECT 1 FROM pg_publication WHERE pubname = %(publication)s),
       to_regclass(%(version_table)s) IS NOT NULL,
       to_regclass(%(captures)s) IS NOT NULL,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
FROM (SELECT 1) one LEFT JOIN pg_namespace n ON n.nspname = %(schema)s
"""

_TABLE_SQL = """
SELECT format('%%I.%%I', n.nspname, c.relname), c.relkind,
       has_table_privilege(c.oid, 'TRIGGER'),
       ARRAY(SELECT a.attname::text
             FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
             WHERE i.indrelid = c.oid AND i.indisprimary AND a.attrelid = c.oid AND a.attnum = k.attnum
             ORDER BY k.ord),
       ARRAY(SELECT format('%%I.%%I', cn.nspname, cc.relname)
             FROM pg_inherits h JOIN pg_class cc ON cc.oid = h.inhrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
             WHERE h.inhparent = c.oid AND NOT cc.relispartition ORDER BY 1),
       ARRAY(SELECT attname::text FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""


_ROLE_SQL = """
SELECT r.rolname, r.rolsuper, r.rolreplication, r.rolcanlogin,
       has_database_privilege(r.oid, current_database(), 'CONNECT'),
       CASE WHEN to_regnamespace(%(schema)s) IS NOT NULL THEN has_schema_privilege(r.oid, %(schema)s, 'USAGE') END,
       CASE WHEN to_regclass(%(events)s) IS NOT NULL THEN has_table_privilege(r.oid, %(events)s, 'SELECT') END,
       CASE WHEN to_regclass(%(events)s) IS NOT NULL THEN has_table_privilege(r.oid, %(events)s, 'DELETE') END,
       CASE WHEN to_regclass(%(events)s) IS NOT NULL THEN has_table_privilege(r.oid, %(events)s, 'INSERT') END
FROM pg_roles r WHERE r.rolname = %(role)s
"""

_RELAY_ROLES_SQL = """
SELECT DISTINCT r.rolname FROM pg_class c, aclexplode(c.relacl) a, pg_roles r
WHERE c.oid = to_regclass(%s) AND r.oid = a.grantee AND r.rolreplication AND r.oid <> c.relowner
ORDER BY 1
"""


def read_role(conn: psycopg.Connection[Any], role: str) -> RoleFacts:
    """A role's attributes and its privileges on this database's outbox."""
    row = conn.execute(_ROLE_SQL, {"schema": contract.SCHEMA, "events": f"{contract.SCHEMA}.{contract.EVENTS_TABLE}",
                                   "role": role}).fetchone()
    return RoleFacts(role, False) if row is None else RoleFacts(row[0], True, *row[1:])


def read_facts(conn: psycopg.Connection[Any], *, slot: str, tables: Iterable[str] = (),
               roles: Iterable[str] = ()) -> Facts:
    """Read, without changing anything, what install and uninstall need to know."""
    version_table = f"{contract.SCHEMA}.{VERSION_TABLE}"
    row = conn.execute(_FACTS_SQL, {
        "publication": contract.PUBLICATION, "version_table": version_table,
        "captures": f"{contract.SCHEMA}.captures", "schema": contract.SCHEMA,
    }).fetchone()
    assert row is not None
    (database, version, wal_level, max_slots, used, can_create, can_replicate,
     schema_exists, schema_empty, pub_exists, has_version, has_captures, superuser) = row
    revision = None
    if has_version:
        rev = conn.execute(f"SELECT version_num FROM {version_table}").fetchone()
        revision = rev[0] if rev else None
    captured: dict[str, tuple[str, tuple[str, ...]]] = {}
    excluded: dict[str, tuple[str, ...]] = {}
    if has_captures:
        has_excludes = conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'exclude_columns' "
            "AND NOT attisdropped", (f"{contract.SCHEMA}.captures",)).fetchone() is not None
        for name, aggregate, keys, exclude in conn.execute(
            f"SELECT table_name, aggregate_type, key_columns, {'exclude_columns' if has_excludes else 'NULL'} "
            f"FROM {contract.SCHEMA}.captures ORDER BY table_name"
        ):
            captured[name] = (aggregate, tuple(keys))
            if exclude:
                excluded[name] = tuple(exclude)
    triggered = frozenset(r[0] for r in conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = %s AND NOT t.tgisinternal "
        "AND t.tgparentid = 0",  # a partition's clone of its parent's trigger goes with the parent's
        (contract.CAPTURE_TRIGGER,),
    ))
    always = frozenset(r[0] for r in conn.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = ANY(%s) AND NOT t.tgisinternal "
        "GROUP BY 1 HAVING bool_and(t.tgenabled = 'A') AND count(*) = 2",
        ([contract.CAPTURE_TRIGGER, contract.CAPTURE_TRUNCATE_TRIGGER],),
    ))
    slot_row = conn.execute(
        "SELECT slot_name, database, plugin, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    table_facts = []
    for requested in tables:
        t = conn.execute(_TABLE_SQL, (requested,)).fetchone()
        if t is None:
            table_facts.append(TableFacts(requested))
        else:
            table_facts.append(TableFacts(requested, t[0], t[1], tuple(t[3]), bool(t[2]), tuple(t[4]), tuple(t[5])))
    return Facts(
        where=_where(conn), database=database, server_version=version, wal_level=wal_level,
        max_replication_slots=max_slots, slots_used=used, can_create=bool(can_create),
        can_replicate=bool(can_replicate), schema_exists=schema_exists, schema_empty=bool(schema_empty),
        publication_exists=pub_exists, revision=revision,
        slot=SlotFacts(*slot_row) if slot_row else None,
        captured=captured, excluded=excluded, triggered=triggered, always=always, tables=tuple(table_facts), superuser=bool(superuser),
        roles={r: read_role(conn, r) for r in roles},
        relay_roles=tuple(r[0] for r in conn.execute(_RELAY_ROLES_SQL, (f"{contract.SCHEMA}.{contract.EVENTS_TABLE}",))),
    )


def _where(conn: psycopg.Connection[Any]) -> str:
    info = conn.info
    host = info.host if not info.host.startswith("/") else "localhost"
    return f"{host}:{info.port}/{info.dbname}"


# =========================================================================== Alembic
def store_head() -> str:
    """The newest store revision, read from migrations/store/versions."""
    from outbox import migrate

    return migrate.head(migrate.STORE)


def store_revisions() -> tuple[str, ...]:
    """Every store revision, oldest first; install upgrades an outbox at any of them."""
    from outbox import migrate

    return migrate.revisions(migrate.STORE)


def alembic_config(*, before: Sequence[str] = (), after: Sequence[str] = (), connection: Any = None,
                   output: io.StringIO | None = None, lock_timeout: float = lockwait.DEFAULT_LOCK_TIMEOUT) -> Any:
    """An Alembic Config for migrations/store, with the statements env.py runs before and after the revisions."""
    from outbox import migrate

    return migrate.config(migrate.STORE, connection=connection, output=output,
                          attributes=_statements(before=before, after=after, lock_timeout=lock_timeout))


def _statements(*, before: Sequence[str], after: Sequence[str],
                lock_timeout: float = lockwait.DEFAULT_LOCK_TIMEOUT) -> dict[str, Any]:
    """What migrations/store/env.py runs in the migration's transaction, before and after the revisions."""
    return {"outbox_before": list(before), "outbox_after": list(after), "outbox_lock_timeout": lock_timeout}


def _quiet_alembic() -> None:
    """Alembic logs each step at INFO; our own lines say what happened. -vv (DEBUG) shows them."""
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _engine(dsn: str) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine("postgresql+psycopg://", creator=lambda: connect(dsn), poolclass=NullPool)


def _engine_on(conn: psycopg.Connection[Any]) -> Any:
    """An engine whose one connection is ``conn`` (so the watcher knows the backend pid); dispose() closes it."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    return create_engine("postgresql+psycopg://", creator=lambda: conn, poolclass=StaticPool)


@contextlib.contextmanager
def _sql_errors(where: str) -> Iterator[None]:
    """Turn errors raised while changing the schema into one line (the transaction rolls back)."""
    from alembic.util import CommandError
    from sqlalchemy import exc as sa_exc

    def line(e: BaseException) -> str:
        text = first_line(e)
        detail = getattr(getattr(e, "diag", None), "message_detail", None)
        if isinstance(e, psycopg.errors.DependentObjectsStillExist) and detail:  # name the object in the way
            text += f": {first_line(Exception(detail))}"
        return text

    try:
        yield
    except sa_exc.DBAPIError as e:
        raise OutboxError(f"{where}: {line(e.orig or e)} (nothing was changed)") from None
    except psycopg.Error as e:
        raise OutboxError(f"{where}: {line(e)} (nothing was changed)") from None
    except CommandError as e:
        raise OutboxError(f"{where}: alembic: {first_line(e)}") from None


# =========================================================================== install
@dataclass(frozen=True)
class InstallResult:
    where: str
    revision: str
    schema_created: bool
    captures: tuple[CapturePlan, ...]
    slot: str
    slot_created: bool

    def summary(self) -> str:
        changed = sum(1 for c in self.captures if c.action != "keep")
        return (f"outbox installed on {self.where}: revision {self.revision}, publication {contract.PUBLICATION}, "
                f"{len(self.captures)} capture{'s' if len(self.captures) != 1 else ''} requested ({changed} changed), "
                f"slot {self.slot}")


def install_outbox(settings: cfg.InstallSettings, *, echo: Echo = _quiet) -> InstallResult:
    """Install or bring up to date the outbox in one store database; idempotent.

    Schema first, then the slot, then one short transaction per capture trigger (module docstring).
    """
    _quiet_alembic()
    from alembic import command

    where = describe(settings.dsn)
    with connect(settings.dsn, autocommit=True) as monitor, connect(settings.dsn) as work:
        # one install or uninstall at a time per database; a session lock, as install spans transactions
        monitor.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        engine = _engine_on(work)

        def schema() -> tuple[Facts, str, list[CapturePlan]]:
            with engine.begin() as sa_conn:
                raw: psycopg.Connection[Any] = sa_conn.connection.driver_connection
                slot = _slot_name(settings.slot, raw)
                facts = read_facts(raw, slot=slot, tables=[c.table for c in settings.captures], roles=_roles(settings))
                check_install(facts, slot)
                plans = plan_captures(facts, settings.captures, always=settings.capture_always,
                                      excludes=settings.excludes)
                config = alembic_config(before=[f"CREATE SCHEMA IF NOT EXISTS {contract.SCHEMA}"],
                                        after=_role_statements(settings, facts), connection=sa_conn,
                                        lock_timeout=settings.lock_timeout)
                command.upgrade(config, "head")
                return facts, slot, plans

        with _sql_errors(where):
            facts, slot, plans = lockwait.retry_on_lock_timeout(
                work, monitor, schema, what=f"schema {contract.SCHEMA}", lock_timeout=settings.lock_timeout,
                lock_wait=settings.lock_wait, echo=echo,
                give_up=lambda msg: f"{where}: {msg}: commit or end that session, then run install again (nothing was changed)")
        where = facts.where
        head = store_head()
        echo(f"outbox schema at revision {head}" + (" (created)" if facts.revision is None else " (up to date)"
                                                    if facts.revision == head else f" (upgraded from {facts.revision})"))
        validate_constraints(work, where, lock_timeout=settings.lock_timeout, echo=echo)
        slot_created = False
        if facts.slot is None:
            slot_created = _create_slot(work, monitor, slot, where, lock_wait=settings.lock_wait, echo=echo)
        _capture(work, monitor, plans, where, settings, echo=echo, slot_created=slot_created)
        for role in facts.roles.values():
            echo(f"relay role {role.name} {'granted' if role.exists else 'created (LOGIN, no password: set one)'}: "
                 f"REPLICATION, CONNECT, USAGE on schema {contract.SCHEMA}, SELECT, INSERT (heartbeats) and DELETE (purge) on "
                 f"{contract.SCHEMA}.{contract.EVENTS_TABLE}")
        engine.dispose()
    if slot_created:
        echo(f"replication slot {slot} created")
        if facts.triggered:
            echo(f"warning: replication slot {slot} was missing while {len(facts.triggered)} table"
                 f"{'s were' if len(facts.triggered) != 1 else ' was'} captured: changes written since it was lost are "
                 "in outbox.events but will never be relayed; re-snapshot the captured tables with 'outbox backfill'")
    else:
        echo(f"replication slot {slot} exists (kept)")
    result = InstallResult(where, head, facts.revision is None, tuple(plans), slot, slot_created)
    echo(result.summary())
    return result


VALIDATE_SQL = f"ALTER TABLE {contract.SCHEMA}.{contract.EVENTS_TABLE} VALIDATE CONSTRAINT {contract.AGGREGATE_TYPE_CONSTRAINT}"


def validate_constraints(work: psycopg.Connection[Any], where: str, *, lock_timeout: float, echo: Echo) -> bool:
    """Validate outbox.events' aggregatetype CHECK (store revision 0007 adds it NOT VALID) in a
    transaction of its own: VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE, which the application's
    writes do not wait for, and scans the table. When existing rows break it (or the lock is not
    granted in time) it stays NOT VALID, still checks every new row, and install says so; the relay
    parks such rows. Returns whether the constraint is valid."""
    table = f"{contract.SCHEMA}.{contract.EVENTS_TABLE}"
    name = contract.AGGREGATE_TYPE_CONSTRAINT
    row = work.execute("SELECT convalidated FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
                       (table, name)).fetchone()
    work.commit()
    if row is None or row[0]:
        return row is not None
    try:
        work.execute(lockwait.lock_timeout_sql(lock_timeout))
        work.execute(VALIDATE_SQL)
        work.commit()
    except (psycopg.errors.CheckViolation, psycopg.errors.LockNotAvailable) as exc:
        work.rollback()
        why = ("rows of it break it: they are parked by the relay when it reaches them; find them with SELECT id, "
               "aggregatetype FROM outbox.events WHERE NOT (aggregatetype ~ '^[A-Za-z0-9_-][A-Za-z0-9._-]*$')"
               if isinstance(exc, psycopg.errors.CheckViolation) else f"its lock was not granted: {first_line(exc)}")
        echo(f"warning: constraint {name} on {table} stays NOT VALID (it checks every new row) on {where}: {why}; "
             "run install again to validate it")
        return False
    return True


def _create_slot(work: psycopg.Connection[Any], monitor: psycopg.Connection[Any], slot: str, where: str, *,
                 lock_wait: float, echo: Echo) -> bool:
    """Create the slot before any capture trigger exists; True when created here.

    PostgreSQL makes a new logical slot wait until every transaction running when it starts has
    ended (its consistent point). It takes no table lock, so nobody queues behind it; install
    says whom it waits for and cancels after ``lock_wait`` seconds.
    """
    started = time.monotonic()
    last: list[Any] = [None, 0.0]  # blocker pids last reported, when

    def report(waiting: lockwait.Waiting) -> None:
        pids = tuple(b.pid for b in waiting.blockers)
        now = time.monotonic()
        if pids != last[0] or now - last[1] >= 10:
            last[:] = [pids, now]
            echo(f"waiting for {lockwait.describe_blockers(waiting.blockers)} before creating replication slot {slot}: "
                 "a new slot waits for the transactions running when it starts (no lock is taken, nothing queues "
                 f"behind it); giving up in {max(0, lock_wait - (now - started)):.0f} s (--lock-wait)")

    work.autocommit = True
    try:
        # the wait is ours to bound (--lock-wait): a role's own timeouts must not cut it short
        work.execute("SET lock_timeout = 0")
        work.execute("SET statement_timeout = 0")
        if work.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
            return False
        result, seen = lockwait.watched(work, monitor, lambda: work.execute(create_slot_sql(slot)),
                                        deadline=started + lock_wait, on_wait=report)
        if isinstance(result, psycopg.errors.DuplicateObject):
            return False
        if isinstance(result, psycopg.errors.QueryCanceled):
            raise lockwait.LockWaitExceeded(
                f"gave up after {lockwait.seconds_text(lock_wait)} (--lock-wait) waiting for "
                f"{lockwait.describe_blockers(seen.blockers)} to end before creating replication slot {slot} on {where}: "
                "commit or end that transaction, then run install again (the outbox schema is installed; "
                "no capture trigger was created, so nothing is captured yet)")
        if isinstance(result, psycopg.Error):
            raise PreconditionFailed(f"the outbox schema is installed but replication slot {slot} could not be created "
                                     f"on {where}: {first_line(result)}; fix it and run install again "
                                     "(no capture trigger was created)")
        if isinstance(result, BaseException):
            raise result
        return True
    finally:
        with contextlib.suppress(psycopg.Error):
            work.execute("RESET lock_timeout")
            work.execute("RESET statement_timeout")
        work.autocommit = False


def _capture(work: psycopg.Connection[Any], monitor: psycopg.Connection[Any], plans: Sequence[CapturePlan], where: str,
             settings: cfg.InstallSettings, *, echo: Echo, slot_created: bool) -> None:
    """One short transaction per table: lock_timeout, the trigger, its outbox.captures row; retried while blocked."""
    done: list[str] = []

    def state(table: str) -> str:
        captured = f"{', '.join(done)} {'is' if len(done) == 1 else 'are'} captured, " if done else ""
        slot = "the slot is created; " if slot_created else ""
        return (f"{slot}{captured}{table} is not captured: commit or end that session, then run install again "
                "(it goes on where it stopped)")

    for p in plans:
        if p.action != "keep":
            def attempt(plan: CapturePlan = p) -> None:
                with work.transaction():
                    work.execute(lockwait.lock_timeout_sql(settings.lock_timeout))
                    for statement in plan.statements():
                        work.execute(statement)

            try:
                lockwait.retry_on_lock_timeout(
                    work, monitor, attempt, what=p.table, lock_timeout=settings.lock_timeout,
                    lock_wait=settings.lock_wait, echo=echo,
                    give_up=functools.partial(_give_up, where, state(p.table)))
            except psycopg.Error as e:
                raise OutboxError(f"{where}: {first_line(e)} while capturing {p.table}; {state(p.table)}") from None
        done.append(p.table)
        echo(p.describe())


def _give_up(where: str, state: str, message: str) -> str:
    return f"{where}: {message}; {state}"


def ensure_slot(dsn: str, slot: str, *, echo: Echo = _quiet, lock_wait: float = lockwait.DEFAULT_LOCK_WAIT) -> bool:
    """Create the logical replication slot unless it exists; True when created here."""
    with connect(dsn, autocommit=True) as monitor, connect(dsn) as work:
        created = _create_slot(work, monitor, slot, describe(dsn), lock_wait=lock_wait, echo=echo)
    if created:
        echo(f"replication slot {slot} created")
    return created


def _slot_name(slot: str | None, conn: psycopg.Connection[Any]) -> str:
    if slot:
        return check_slot_name(slot)
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return cfg.slot_name_for(row[0])


def _roles(settings: cfg.InstallSettings) -> list[str]:
    return [settings.relay_role] if settings.relay_role else []


def _role_statements(settings: cfg.InstallSettings, facts: Facts) -> list[str]:
    return relay_role_sql(settings.relay_role, facts.database) if settings.relay_role else []


def _read_only_facts(dsn: str, slot: str | None, tables: Sequence[str], roles: Sequence[str] = ()) -> tuple[Facts, str]:
    with connect(dsn) as conn:
        conn.read_only = True
        name = _slot_name(slot, conn)
        facts = read_facts(conn, slot=name, tables=tables, roles=roles)
        conn.rollback()
    return facts, name


def install_sql(settings: cfg.InstallSettings) -> str:
    """The SQL install would run, for review. Reads the database (read-only), changes nothing."""
    _quiet_alembic()
    from outbox import migrate

    facts, slot = _read_only_facts(settings.dsn, settings.slot, [c.table for c in settings.captures], _roles(settings))
    for t in facts.tables:  # fatal only when no SQL can be written; privileges become warnings
        problems = table_problems(dataclasses.replace(t, can_trigger=True), facts.where)
        if problems:
            raise PreconditionFailed(problems[0])
    plans = plan_captures(facts, settings.captures, always=settings.capture_always, excludes=settings.excludes)
    out = io.StringIO()
    out.write(f"-- outbox install for {facts.where} (outbox-relay revision {store_head()})\n")
    for problem in install_problems(facts, slot):
        out.write(f"-- WARNING: {problem}\n")
    for p in plans:
        if p.action == "keep":
            out.write(f"-- {p.describe()}\n")
    start = f"{facts.revision}:head" if facts.revision else "head"
    out.write(migrate.offline_sql(migrate.STORE, start, attributes=_statements(
        before=[f"CREATE SCHEMA IF NOT EXISTS {contract.SCHEMA}"], after=_role_statements(settings, facts),
        lock_timeout=settings.lock_timeout)))
    if facts.slot is None:
        out.write("\n-- after the COMMIT above, outside any transaction block, before any capture trigger exists\n"
                  "-- (it waits for the transactions running when it starts to end; no table lock is taken):\n")
        out.write(create_slot_sql(slot) + ";\n")
    else:
        out.write(f"\n-- replication slot {slot} already exists\n")
    changes = [p for p in plans if p.action != "keep"]
    if changes:
        out.write(f"\n-- one short transaction per table: a lock not granted within {lockwait.seconds_text(settings.lock_timeout)} "
                  "rolls it back (install then retries it),\n-- so the application's statements never queue behind it\n")
    for p in changes:
        out.write("BEGIN;\n" + "".join(f"{s};\n" for s in [lockwait.lock_timeout_sql(settings.lock_timeout), *p.statements()])
                  + "COMMIT;\n")
    out.write("\n-- revision 0007's CHECK on outbox.events, added NOT VALID, validated in a transaction of its own\n"
              "-- (SHARE UPDATE EXCLUSIVE: the application's writes neither wait for it nor queue behind it); if\n"
              "-- existing rows break it, it fails and the constraint stays NOT VALID, still checking new rows\n"
              "-- (docs/operations.md, Parked events):\n")
    out.write(f"{VALIDATE_SQL};\n")
    return out.getvalue()


# =========================================================================== uninstall
@dataclass(frozen=True)
class UninstallResult:
    where: str
    nothing: bool
    tables: tuple[str, ...] = ()
    slot_dropped: bool = False
    schema_dropped: bool = False


def _our_slot(facts: Facts) -> SlotFacts | None:
    s = facts.slot
    return s if s is not None and s.database == facts.database and s.plugin == "pgoutput" else None


def uninstall_outbox(dsn: str, *, slot: str | None = None, echo: Echo = _quiet,
                     lock_timeout: float = lockwait.DEFAULT_LOCK_TIMEOUT,
                     lock_wait: float = lockwait.DEFAULT_LOCK_WAIT) -> UninstallResult:
    """Remove what install created: capture triggers, the schema, then the slot. Legacy data untouched.

    Triggers and schema go in one transaction that starts with ``SET LOCAL lock_timeout`` and is
    retried as a whole while another session holds a captured table: a failure changes nothing,
    and the slot, dropped last, is still there for the relay while anything still writes events.
    """
    _quiet_alembic()
    from alembic import command

    facts, slot_name = _read_only_facts(dsn, slot, ())
    ours = _our_slot(facts)
    if not facts.schema_exists and not facts.publication_exists and ours is None:
        echo(f"nothing to uninstall on {facts.where}: no outbox schema, publication or replication slot {slot_name}")
        return UninstallResult(facts.where, nothing=True)
    if facts.schema_exists and facts.revision is None and not facts.schema_empty:
        raise PreconditionFailed(f"schema {contract.SCHEMA} on {facts.where} was not installed by outbox "
                                 f"(no {contract.SCHEMA}.{VERSION_TABLE}): leaving it alone")
    if ours is not None and ours.active_pid:
        raise PreconditionFailed(f"replication slot {slot_name} on {facts.where} is active (a relay is connected, "
                                 f"pid {ours.active_pid}): stop the relay, then run uninstall again")
    # parents only: a partition's cloned trigger goes with its parent's (read_facts skips clones)
    tables = tuple(sorted(set(facts.captured) | facts.triggered)) if facts.revision else ()
    where = facts.where
    slot_dropped = False
    with connect(dsn, autocommit=True) as monitor, connect(dsn) as work:
        monitor.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        if facts.schema_exists or facts.publication_exists:
            engine = _engine_on(work)

            def remove() -> None:
                with engine.begin() as sa_conn:
                    if facts.revision is not None:
                        command.downgrade(alembic_config(before=[uncapture_sql(t) for t in tables], after=drop_schema_sql(),
                                                         connection=sa_conn, lock_timeout=lock_timeout), "base")
                    elif facts.schema_exists:
                        sa_conn.exec_driver_sql(lockwait.lock_timeout_sql(lock_timeout))
                        sa_conn.exec_driver_sql(f"DROP SCHEMA {contract.SCHEMA}")

            with _sql_errors(where):
                lockwait.retry_on_lock_timeout(
                    work, monitor, remove, what=", ".join(tables) or f"schema {contract.SCHEMA}",
                    lock_timeout=lock_timeout, lock_wait=lock_wait, echo=echo,
                    give_up=lambda msg: f"{where}: {msg}: commit or end that session, then run uninstall again "
                                        "(nothing was changed)")
            for t in tables:
                echo(f"stopped capturing {t}")
            echo(f"schema {contract.SCHEMA} and publication {contract.PUBLICATION} dropped")
        if ours is not None:  # last: while anything may still write events, the slot keeps them for the relay
            work.autocommit = True
            try:
                work.execute(drop_slot_sql(slot_name))
            except psycopg.errors.ObjectInUse:
                raise PreconditionFailed(f"replication slot {slot_name} on {where} became active (a relay connected) "
                                         f"and was kept{', the rest of the outbox is removed' if facts.schema_exists else ''}"
                                         ": stop the relay, then run uninstall again") from None
            slot_dropped = True
            echo(f"replication slot {slot_name} dropped")
    for role in facts.relay_roles:
        echo(f"role {role} is kept (it may own objects or have privileges elsewhere); to remove it: "
             + drop_role_hint(role, facts.database))
    result = UninstallResult(where, False, tables, slot_dropped, facts.schema_exists)
    echo(f"outbox uninstalled from {where}: {len(tables)} capture trigger{'s' if len(tables) != 1 else ''} "
         f"removed, slot {'dropped' if slot_dropped else 'absent'}, legacy tables untouched")
    return result


def uninstall_sql(dsn: str, *, slot: str | None = None, lock_timeout: float = lockwait.DEFAULT_LOCK_TIMEOUT) -> str:
    """The SQL uninstall would run, for review. Reads the database (read-only), changes nothing."""
    _quiet_alembic()
    from outbox import migrate

    facts, slot_name = _read_only_facts(dsn, slot, ())
    out = io.StringIO()
    out.write(f"-- outbox uninstall for {facts.where}\n")
    ours = _our_slot(facts)
    if not facts.schema_exists and not facts.publication_exists and ours is None:
        out.write("-- nothing to uninstall\n")
        return out.getvalue()
    if ours is not None and ours.active_pid:
        out.write(f"-- WARNING: slot {slot_name} is active (pid {ours.active_pid}): stop the relay first\n")
    if facts.revision is not None:
        tables = sorted(set(facts.captured) | facts.triggered)
        out.write(migrate.offline_sql(migrate.STORE, f"{facts.revision}:base", downgrade=True, attributes=_statements(
            before=[uncapture_sql(t) for t in tables], after=drop_schema_sql(), lock_timeout=lock_timeout)))
    elif facts.schema_exists:
        out.write(f"BEGIN;\n{lockwait.lock_timeout_sql(lock_timeout)};\nDROP SCHEMA {contract.SCHEMA};\nCOMMIT;\n")
    if ours is not None:
        out.write("\n-- last, after the COMMIT above (outside any transaction block):\n" + drop_slot_sql(slot_name) + ";\n")
    for role in facts.relay_roles:
        out.write(f"\n-- role {role} is kept (it may own objects elsewhere); to remove it:\n"
                  f"-- {drop_role_hint(role, facts.database)}\n")
    return out.getvalue()


# =========================================================================== click
def parse_capture(text: str) -> cfg.Capture:
    """``SCHEMA.TABLE=AGGREGATE``; a bad one is one line naming the option and an example."""
    try:
        return cfg.Capture.parse(text)
    except ConfigError as exc:
        if exc.message.startswith("invalid --capture"):
            raise
        reason = exc.message.split(": ", 1)[-1].replace("Value error, ", "")
        raise ConfigError(f"invalid --capture {text!r}: {reason} (expected SCHEMA.TABLE=AGGREGATE, "
                          "e.g. pos.customers=customer)") from None


@click.command()
@cfg.options_for(cfg.InstallSettings)
def install(dsn: str, captures: tuple[str, ...], sql: bool, slot: str | None, relay_role: str | None,
            lock_timeout: float, lock_wait: float, capture_always: bool, excludes: tuple[str, ...]) -> None:
    """Install the outbox into a store database (idempotent; run again to add captures).

    Creates schema outbox (events table, publication outbox_events, capture registry and
    trigger function, version table outbox.alembic_version), then the logical replication slot
    the relay reads, then an outbox_capture trigger on each captured table, one short transaction
    per table (--lock-timeout, retried up to --lock-wait). Checks wal_level, privileges and
    primary keys before changing anything.
    """
    settings = cfg.build(cfg.InstallSettings, dsn=dsn, captures=tuple(parse_capture(c) for c in captures),
                         slot=check_slot_name(slot) if slot else None, sql=sql,
                         relay_role=check_role_name(relay_role) if relay_role else None,
                         lock_timeout=lock_timeout, lock_wait=lock_wait, capture_always=capture_always,
                         excludes=excludes)
    if settings.sql:
        click.echo(install_sql(settings), nl=False)
    else:
        install_outbox(settings, echo=click.echo)


@click.command()
@cfg.options_for(cfg.UninstallSettings)
def uninstall(dsn: str, slot: str | None, sql: bool, lock_timeout: float, lock_wait: float) -> None:
    """Remove the outbox from a store database: capture triggers, schema, slot. Legacy data untouched.

    Refuses while a relay is connected to the slot. Triggers and schema go in one transaction
    (--lock-timeout, retried up to --lock-wait; a failure changes nothing), the slot last.
    """
    settings = cfg.build(cfg.UninstallSettings, dsn=dsn, slot=slot, sql=sql, lock_timeout=lock_timeout,
                         lock_wait=lock_wait)
    if slot:
        check_slot_name(slot)
    if sql:
        click.echo(uninstall_sql(dsn, slot=slot, lock_timeout=settings.lock_timeout), nl=False)
    else:
        uninstall_outbox(dsn, slot=slot, echo=click.echo, lock_timeout=settings.lock_timeout,
                         lock_wait=settings.lock_wait)


def grant_sql(dsn: str, *, relay_role: str | None = None, consumer_role: str | None = None,
              writeback_role: str | None = None, database: str | None = None) -> list[str]:
    """The GRANT set for a relay or CRM write-back role (on a store) and/or a read-store consumer role."""
    db = database or _database_name(dsn)
    statements = relay_role_sql(relay_role, db) if relay_role else []
    statements += writeback_role_sql(writeback_role, db) if writeback_role else []
    return statements + (consumer_role_sql(consumer_role, db) if consumer_role else [])


def _database_name(dsn: str) -> str:
    with connect(dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        return str(row[0])


def apply_grants(dsn: str, *, relay_role: str | None = None, consumer_role: str | None = None,
                 writeback_role: str | None = None, echo: Echo = _quiet) -> None:
    """Create or grant the roles in one transaction; the schemas they are granted on must exist."""
    where = describe(dsn)
    with connect(dsn) as conn:
        needed = (([contract.SCHEMA] if relay_role or writeback_role else []) + ([WRITEBACK_SCHEMA] if writeback_role else [])
                  + ([READSTORE_SCHEMA] if consumer_role else []))
        for schema in needed:
            if conn.execute("SELECT to_regnamespace(%s) IS NULL", (schema,)).fetchone() == (True,):
                fix = ("outbox install --dsn ... first" if schema in (contract.SCHEMA, WRITEBACK_SCHEMA) else
                       "migrate it first as its owner: outbox consume readstore --sql | psql, or one run of "
                       "outbox consume readstore as the owner")
                raise NotInstalled(f"schema {schema} does not exist in {where}: {fix}")
        database = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        try:
            for statement in grant_sql(dsn, relay_role=relay_role, consumer_role=consumer_role,
                                       writeback_role=writeback_role, database=database):
                conn.execute(statement)
            conn.commit()
        except psycopg.Error as e:
            raise OutboxError(f"{where}: {first_line(e)} (nothing was changed)") from None
    for role, what in ((relay_role, "relay"), (writeback_role, "CRM write-back"), (consumer_role, "read-store consumer")):
        if role:
            echo(f"{what} role {role} has its privileges on {where}")


@click.command()
@click.option("--dsn", required=True, metavar="DSN",
              help="A store database (with --relay-role or --writeback-role) or the read store (with --consumer-role).")
@click.option("--relay-role", default=None, metavar="NAME",
              help="Grant (creating it if absent) what the relay needs on this store database.")
@click.option("--consumer-role", default=None, metavar="NAME",
              help="Grant (creating it if absent) what 'outbox consume readstore --no-migrate' needs on this "
                   "read store, whose schema its owner migrated.")
@click.option("--writeback-role", default=None, metavar="NAME",
              help="Grant (creating it if absent) what 'outbox consume crm-writeback' needs on this store database "
                   "(schema outbox_crm, INSERT on outbox.events); SELECT, UPDATE on the mapped tables are yours to grant.")
@click.option("--sql", is_flag=True, default=False, help="Print the statements instead of running them.")
def grant(dsn: str, relay_role: str | None, consumer_role: str | None, writeback_role: str | None, sql: bool) -> None:
    """Create least-privilege roles for the relay, the CRM write-back or the read-store consumer, or print their GRANTs.

    Roles are created with LOGIN and no password (set one, or use certificates). Nothing in
    outbox-relay drops them: see docs/install.md, "Running without superuser".
    """
    if not relay_role and not consumer_role and not writeback_role:
        raise ConfigError("name a role: --relay-role NAME or --writeback-role NAME (store database), "
                          "or --consumer-role NAME (read store)")
    relay_role = check_role_name(relay_role) if relay_role else None
    consumer_role = check_role_name(consumer_role, "--consumer-role") if consumer_role else None
    writeback_role = check_role_name(writeback_role, "--writeback-role") if writeback_role else None
    parse_dsn(dsn)
    if sql:
        statements = grant_sql(dsn, relay_role=relay_role, consumer_role=consumer_role, writeback_role=writeback_role)
        click.echo("BEGIN;\n" + "".join(f"{s};\n" for s in statements) + "COMMIT;")
    else:
        apply_grants(dsn, relay_role=relay_role, consumer_role=consumer_role, writeback_role=writeback_role,
                     echo=click.echo)


__all__ = [
    "CapturePlan", "Facts", "InstallResult", "RoleFacts", "apply_grants", "consumer_role_sql", "grant", "grant_sql",
    "read_role", "relay_role_sql", "SlotFacts", "TableFacts", "UninstallResult",
    "capture_sql", "register_sql", "parse_exclude", "plan_excludes", "check_install", "check_wal_level", "create_slot_sql",
    "drop_slot_sql", "install", "install_outbox",
    "install_problems", "install_sql", "plan_captures", "read_facts", "uncapture_sql", "uninstall", "uninstall_outbox",
    "uninstall_sql", "wal_level_problem", "writeback_role_sql",
]
