"""What the sinks must end up holding, computed from the POS store databases.

One copy for the demo's final report (outbox/dev/demo.py, demo_crm.py) and the tests' oracles
(tests/support/checksums.py): a check that drifts between them would let one pass what the other
refuses.
"""
from __future__ import annotations

from typing import Any

import psycopg

from outbox import contract
from outbox.consumers.crm_logic import DEFAULT_MAPPINGS, Mapping
from outbox.dev.pos import POS_CAPTURES


def source_checksum(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Per aggregate type: (row count, md5 over id=row image) of the legacy tables."""
    out = {}
    for table, (aggregate, id_expr) in POS_CAPTURES.items():
        count, digest = conn.execute(
            f"SELECT count(*), coalesce(md5(string_agg(aid || '=' || img, ',' ORDER BY aid)), '')"
            f" FROM (SELECT {id_expr} AS aid, to_jsonb(t)::text AS img FROM {table} t) s"
        ).fetchone()  # type: ignore[misc]
        out[aggregate] = (count, digest)
    return out


def readstore_checksum(conn: psycopg.Connection[Any], source_id: str) -> dict[str, tuple[int, str]]:
    """The same, over the read store's current rows of one source: equal when the read store is current."""
    out = {}
    for aggregate, _ in POS_CAPTURES.values():
        count, digest = conn.execute(
            "SELECT count(*), coalesce(md5(string_agg(aggregate_id || '=' || payload::text, ',' ORDER BY aggregate_id)), '')"
            " FROM readstore.current_entities WHERE source_id = %s AND aggregate_type = %s",
            (source_id, aggregate),
        ).fetchone()  # type: ignore[misc]
        out[aggregate] = (count, digest)
    return out


def expected_records(store_dsn: str, source_id: str,
                         mappings: dict[str, Mapping] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """What a CRM must hold for one store through the mappings: (kind, external id) -> fields."""
    mappings = mappings or DEFAULT_MAPPINGS
    out: dict[tuple[str, str], dict[str, Any]] = {}
    with psycopg.connect(store_dsn, autocommit=True) as conn:
        for table, (aggregate, id_expr) in POS_CAPTURES.items():
            m = mappings.get(aggregate)
            if m is None:
                continue
            for aid, image in conn.execute(f"SELECT {id_expr}, to_jsonb(t) FROM {table} t"):
                fields = {k: image.get(src) for k, src in m.fields.items() if src in image}
                fields.update({k: contract.key_for(source_id, str(image[src]))
                               for k, src in m.references.items() if image.get(src) is not None})
                out[(m.kind, contract.key_for(source_id, aid))] = fields
    return out


def differences(expected: dict[tuple[str, str], dict[str, Any]], crm_dsn: str) -> list[str]:
    """How the CRM's records differ from what the stores say (deleted rows must be inactive)."""
    with psycopg.connect(crm_dsn, autocommit=True) as conn:
        have = {(k, e): (f, a) for k, e, f, a in conn.execute("SELECT kind, external_id, fields, active FROM crm.records")}
    problems = [f"{key} missing" for key in expected if key not in have]
    problems += [f"{key}: {have[key]} != {fields}" for key, fields in expected.items()
                 if key in have and have[key] != (fields, True)]
    problems += [f"{key} deleted in the store, active in the CRM" for key, (_, active) in have.items()
                 if key not in expected and active]
    return problems
