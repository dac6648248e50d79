"""A capture trigger that never fails the application's statement and needs nothing of its writers.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

* ``outbox.capture_change()`` becomes ``SECURITY DEFINER``, owned by ``outbox_owner`` (NOLOGIN),
  which holds exactly USAGE on schema outbox and INSERT on ``outbox.events`` and
  ``outbox.parked``: roles that write to captured tables need no privilege on the outbox, and
  cannot forge events. ``outbox.origin`` is honoured only for members of ``outbox_origin``
  (NOLOGIN; ``outbox grant --writeback-role`` makes the CRM write-back one), so no writer can
  hide a real change from the CRM sink. Both roles are cluster-wide: created when missing.
* The aggregate id comes from the table's primary key as it is now, not from the trigger's
  arguments frozen at install (a renamed or replaced key column follows at once). A change
  that has no key (the primary key was dropped) is parked in ``outbox.parked`` (new column
  ``table_name``; ``commit_lsn`` 0/0, ``topic`` empty) with a marker event of type
  ``outbox.capture_parked`` that the relay counts; ``outbox.redrive_parked(id)`` sends it
  once the table has a key again. The function raises for nothing the application did.
* An UPDATE that changes the key emits ``<aggregate>.deleted`` (old key, old image) then
  ``<aggregate>.created`` (new key, new image).
* TRUNCATE of a captured table emits ``<aggregate>.truncated`` (aggregate id ``*``, payload
  ``{"table": ...}``) through a statement-level trigger ``outbox_capture_truncate``, created here
  for every table already captured (and by ``outbox install`` for new ones).

Downgrade restores 0004's function (SECURITY INVOKER, key from the trigger's arguments), drops
the TRUNCATE triggers, ``redrive_parked``, ``aggregate_id``, the ``table_name`` column and the
grants; it drops the two roles only when no database of the cluster still depends on
``outbox_owner`` (pg_shdepend is cluster-wide), so another store's outbox keeps working.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op
from sqlalchemy import DDL

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

OWNER = "outbox_owner"
ORIGIN_ROLE = "outbox_origin"
TRUNCATE_TRIGGER = "outbox_capture_truncate"

# The table's current primary-key columns, in key order (the same query install reads them with).
_KEY_COLUMNS = """
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO cols
      FROM pg_index x, unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
     WHERE x.indrelid = {rel} AND x.indisprimary AND a.attrelid = {rel} AND a.attnum = k.attnum;"""

ROLES = f"""
DO $outbox$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{OWNER}') THEN
    CREATE ROLE {OWNER} NOLOGIN;
    COMMENT ON ROLE {OWNER} IS 'outbox-relay: owns outbox.capture_change() (SECURITY DEFINER); removed with the last outbox';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ORIGIN_ROLE}') THEN
    CREATE ROLE {ORIGIN_ROLE} NOLOGIN;
    COMMENT ON ROLE {ORIGIN_ROLE} IS 'outbox-relay: members may mark their changes with outbox.origin (the CRM write-back)';
  END IF;
  IF NOT pg_has_role(current_user, '{OWNER}', 'MEMBER') THEN
    EXECUTE format('GRANT {OWNER} TO %I', current_user);  -- to hand it the function (and take it back)
  END IF;
END $outbox$"""

# Runs inside every write to a captured table. TG_ARGV[0] = aggregate type; the key columns
# install passed (TG_ARGV[1..]) are only what was registered: the key is read from the catalog.
# No EXCEPTION block: each would be a subtransaction per row (and past 64 in a transaction, a
# server-wide slowdown); nothing here raises for anything the application's statement did.
CAPTURE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION outbox.capture_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $capture$
DECLARE
    image jsonb;
    old_image jsonb;
    kind text;
    cols text[];
    key text;
    old_key text;
    origin text := nullif(current_setting('outbox.origin', true), '');
    reason text;
    parked uuid;
    i integer;
BEGIN
    IF origin IS NOT NULL AND NOT pg_has_role(session_user, 'outbox_origin', 'MEMBER') THEN
        origin := NULL;  -- only the CRM write-back may say a change came from the CRM
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, origin)
        VALUES (TG_ARGV[0], '*', TG_ARGV[0] || '.truncated',
                jsonb_build_object('table', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)), origin);
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        image := to_jsonb(NEW);
        kind := '.created';
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD *= NEW THEN
            RETURN NULL;  -- an update that changes nothing emits nothing
        END IF;
        image := to_jsonb(NEW);
        old_image := to_jsonb(OLD);
        kind := '.updated';
    ELSE
        image := to_jsonb(OLD);
        kind := '.deleted';
    END IF;
""" + _KEY_COLUMNS.format(rel="TG_RELID") + r"""
    IF cols IS NULL THEN
        reason := format('%I.%I has no primary key: add one, then SELECT outbox.redrive_parked(id)',
                         TG_TABLE_SCHEMA, TG_TABLE_NAME);
    ELSIF array_length(cols, 1) = 1 THEN
        key := image ->> cols[1];
        old_key := old_image ->> cols[1];
    ELSE
        -- composite key: values in key order joined by ':', with '\' -> '\\' and ':' -> '\:'
        key := replace(replace(image ->> cols[1], '\', '\\'), ':', '\:');
        old_key := replace(replace(old_image ->> cols[1], '\', '\\'), ':', '\:');
        FOR i IN 2 .. array_length(cols, 1) LOOP
            key := key || ':' || replace(replace(image ->> cols[i], '\', '\\'), ':', '\:');
            old_key := old_key || ':' || replace(replace(old_image ->> cols[i], '\', '\\'), ':', '\:');
        END LOOP;
    END IF;
    IF reason IS NULL AND key IS NULL THEN
        reason := format('a key column of %I.%I (%s) is null', TG_TABLE_SCHEMA, TG_TABLE_NAME, array_to_string(cols, ', '));
    END IF;
    IF reason IS NOT NULL THEN  -- never fail the application's statement: park the change
        parked := gen_random_uuid();
        INSERT INTO outbox.parked (id, aggregatetype, aggregateid, type, payload, origin, created_at, topic,
                                   commit_lsn, xid, txseq, size_bytes, error, table_name)
        VALUES (parked, TG_ARGV[0], '', TG_ARGV[0] || kind, image, origin, clock_timestamp(), '',
                '0/0', txid_current(), 0, octet_length(image::text), reason,
                format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME));
        INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload)
        VALUES (TG_ARGV[0], parked::text, 'outbox.capture_parked',
                jsonb_build_object('parked_id', parked, 'table', format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME),
                                   'error', reason));
    ELSIF kind = '.updated' AND old_key IS DISTINCT FROM key THEN
        -- the key changed: the old aggregate is gone, a new one exists (in this order)
        INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, origin)
        VALUES (TG_ARGV[0], old_key, TG_ARGV[0] || '.deleted', old_image, origin),
               (TG_ARGV[0], key, TG_ARGV[0] || '.created', image, origin);
    ELSE
        INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, origin)
        VALUES (TG_ARGV[0], key, TG_ARGV[0] || kind, image, origin);
    END IF;
    RETURN NULL;
END
$capture$"""

# The aggregate id of a row image under a table's current primary key (NULL: no key).
AGGREGATE_ID = r"""
CREATE FUNCTION outbox.aggregate_id(tab regclass, image jsonb) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $aggid$
DECLARE
    cols text[];
    key text;
    i integer;
BEGIN
""" + _KEY_COLUMNS.format(rel="tab") + r"""
    IF cols IS NULL THEN
        RETURN NULL;
    ELSIF array_length(cols, 1) = 1 THEN
        RETURN image ->> cols[1];
    END IF;
    key := replace(replace(image ->> cols[1], '\', '\\'), ':', '\:');
    FOR i IN 2 .. array_length(cols, 1) LOOP
        key := key || ':' || replace(replace(image ->> cols[i], '\', '\\'), ':', '\:');
    END LOOP;
    RETURN key;
END
$aggid$"""

# Re-drive one change the capture trigger parked: as the DBA (SECURITY INVOKER), once the table
# has a primary key again. The event gets a new position (now) and id; the parked row goes.
REDRIVE = r"""
CREATE FUNCTION outbox.redrive_parked(parked_id uuid) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $redrive$
DECLARE
    p outbox.parked;
    key text;
BEGIN
    SELECT * INTO p FROM outbox.parked WHERE id = parked_id AND table_name IS NOT NULL FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF to_regclass(p.table_name) IS NULL THEN
        RAISE EXCEPTION 'table % of parked change % no longer exists', p.table_name, parked_id;
    END IF;
    key := outbox.aggregate_id(to_regclass(p.table_name), p.payload);
    IF key IS NULL THEN
        RAISE EXCEPTION 'no aggregate id for parked change % under the primary key of % (none, or its columns are not in the parked image)',
            parked_id, p.table_name USING HINT = 'add a primary key, or insert the event yourself (docs/operations.md)';
    END IF;
    INSERT INTO outbox.events (aggregatetype, aggregateid, type, payload, origin)
    VALUES (p.aggregatetype, key, p.type, p.payload, p.origin);
    DELETE FROM outbox.parked WHERE id = parked_id;
    RETURN true;
END
$redrive$"""

TRUNCATE_TRIGGERS = f"""
DO $outbox$ DECLARE c record; BEGIN
  FOR c IN SELECT k.table_name, k.aggregate_type, t.tgenabled FROM outbox.captures k
             JOIN pg_trigger t ON t.tgrelid = to_regclass(k.table_name) AND t.tgname = 'outbox_capture'
            WHERE NOT EXISTS (SELECT FROM pg_trigger u WHERE u.tgrelid = t.tgrelid AND u.tgname = '{TRUNCATE_TRIGGER}')
  LOOP
    EXECUTE format('CREATE TRIGGER {TRUNCATE_TRIGGER} AFTER TRUNCATE ON %s FOR EACH STATEMENT '
                   'EXECUTE FUNCTION outbox.capture_change(%L)', c.table_name, c.aggregate_type);
    IF c.tgenabled = 'A' THEN
      EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER {TRUNCATE_TRIGGER}', c.table_name);
    END IF;
  END LOOP;
END $outbox$"""

DROP_TRUNCATE_TRIGGERS = f"""
DO $outbox$ DECLARE t record; BEGIN
  FOR t IN SELECT tgrelid::regclass::text AS tab FROM pg_trigger WHERE tgname = '{TRUNCATE_TRIGGER}' AND NOT tgisinternal
  LOOP
    EXECUTE format('DROP TRIGGER {TRUNCATE_TRIGGER} ON %s', t.tab);
  END LOOP;
END $outbox$"""

DROP_ROLES_WHEN_UNUSED = f"""
DO $outbox$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_shdepend d JOIN pg_roles r ON r.oid = d.refobjid
                  WHERE d.refclassid = 'pg_authid'::regclass AND r.rolname = '{OWNER}') THEN
    DROP ROLE {ORIGIN_ROLE};
    DROP ROLE {OWNER};
  END IF;
END $outbox$"""

UPGRADE = (
    ROLES,
    "ALTER TABLE outbox.parked ADD COLUMN table_name text",
    "COMMENT ON COLUMN outbox.parked.table_name IS 'set for changes the capture trigger parked (no key): "
    "SELECT outbox.redrive_parked(id) once the table has a primary key'",
    f"GRANT USAGE ON SCHEMA outbox TO {OWNER}",
    f"GRANT INSERT ON outbox.events, outbox.parked TO {OWNER}",
    CAPTURE_FUNCTION,
    f"ALTER FUNCTION outbox.capture_change() OWNER TO {OWNER}",
    AGGREGATE_ID,
    REDRIVE,
    TRUNCATE_TRIGGERS,
)


def _execute(stmt: str) -> None:
    op.execute(DDL(stmt.strip().replace("%", "%%")))


def upgrade() -> None:
    for stmt in UPGRADE:
        _execute(stmt)


def downgrade() -> None:
    previous = _previous_function().replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    _execute(DROP_TRUNCATE_TRIGGERS)
    _execute("DROP FUNCTION outbox.redrive_parked(uuid)")
    _execute("DROP FUNCTION outbox.aggregate_id(regclass, jsonb)")
    _execute("ALTER FUNCTION outbox.capture_change() OWNER TO CURRENT_USER")
    _execute(previous)
    _execute(f"REVOKE INSERT ON outbox.events, outbox.parked FROM {OWNER}")
    _execute(f"REVOKE USAGE ON SCHEMA outbox FROM {OWNER}")
    _execute("ALTER TABLE outbox.parked DROP COLUMN table_name")
    _execute(DROP_ROLES_WHEN_UNUSED)


def _previous_function() -> str:
    """0001's function, read from its script (Alembic loads revision files outside any package)."""

    path = Path(__file__).with_name("0001_outbox.py")
    spec = importlib.util.spec_from_file_location("_outbox_store_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.CAPTURE_FUNCTION)
