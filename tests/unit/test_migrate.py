"""outbox.migrate: the migration sets, their heads and revision lists read from the scripts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from outbox import migrate
from outbox.errors import OutboxError


def _files(name: str) -> list[str]:
    versions = migrate.location(name) / "versions"
    found = []
    for path in versions.glob("*.py"):
        match = re.search(r'^revision = "([^"]+)"', path.read_text(), re.M)
        if match:
            found.append(match.group(1))
    return sorted(found)


@pytest.mark.parametrize("name", [migrate.STORE, migrate.READSTORE])
def test_revisions_come_from_the_version_files(name: str) -> None:
    revisions = migrate.revisions(name)
    assert sorted(revisions) == _files(name)
    assert revisions[-1] == migrate.head(name)
    assert len(set(revisions)) == len(revisions)


def test_store_revisions_oldest_first() -> None:
    revisions = migrate.revisions(migrate.STORE)
    assert revisions[0] == "0001"
    assert list(revisions) == sorted(revisions)


def test_sets_found_through_the_package() -> None:
    import outbox.migrations

    assert migrate.location(migrate.STORE).parent in {Path(p) for p in outbox.migrations.__path__}
    with pytest.raises(OutboxError, match="nosuch migrations"):
        migrate.location("nosuch")


def test_offline_sql_of_the_store_set() -> None:
    text = migrate.offline_sql(migrate.STORE, "head", attributes={"outbox_before": ["CREATE SCHEMA IF NOT EXISTS outbox"],
                                                                  "outbox_after": ["SELECT 1"]})
    assert text.index("CREATE SCHEMA IF NOT EXISTS outbox") < text.index("CREATE TABLE outbox.events")
    assert text.rstrip().endswith("COMMIT;")
    assert f"UPDATE outbox.alembic_version SET version_num='{migrate.head(migrate.STORE)}'" in text
    down = migrate.offline_sql(migrate.STORE, f"{migrate.head(migrate.STORE)}:base", downgrade=True)
    assert "DROP TABLE outbox.events" in down
