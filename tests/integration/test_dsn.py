"""--dsn takes libpq keyword strings and postgresql:// URLs; PG* variables fill the rest, as for psql."""
from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from outbox.dsn import connect, describe
from outbox.errors import ConfigError, DatabaseUnavailable

pytestmark = pytest.mark.integration


def test_both_forms_reach_the_same_database(new_database: Callable[..., str]) -> None:
    name = new_database("dsn").split("=", 1)[1]
    host, port, user = os.environ["PGHOST"], os.environ["PGPORT"], os.environ["PGUSER"]
    forms = [
        f"dbname={name}",  # host, port and user from PGHOST, PGPORT, PGUSER
        f"postgresql:///{name}",  # the same, as a URL
        f"host={host} port={port} user={user} dbname={name}",
        f"postgresql://{user}@{host}:{port}/{name}?application_name=x",
    ]
    for dsn in forms:
        with connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,), dsn
    assert describe(f"postgresql:///{name}") == f"{host}:{port}/{name}"


def test_errors_name_the_database_and_hide_the_password() -> None:
    with pytest.raises(DatabaseUnavailable) as exc:
        connect("postgresql://app:s3cret@127.0.0.1:1/store9")
    assert "127.0.0.1:1/store9" in exc.value.message and "s3cret" not in exc.value.message
    with pytest.raises(ConfigError) as bad:
        connect("host=x password='s3cret")
    assert "s3cret" not in bad.value.message
