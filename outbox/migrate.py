"""The Alembic migration sets of outbox-relay, found and configured in one place.

A migration set is a folder of the ``outbox.migrations`` package with an ``env.py`` and its
``versions/``: ``store`` (the ``outbox`` schema of a store database), ``readstore`` (the read
store's schema) and, later, ``c360``. Each is driven from code, never from an alembic.ini:

* :func:`config`: an Alembic ``Config`` for a set, with what its ``env.py`` reads from
  ``config.attributes`` (an open connection online, extra statements, ...);
* :func:`head` / :func:`revisions`: read from the set's scripts (Alembic's ``ScriptDirectory``),
  so a new revision file is all it takes to move the head;
* :func:`offline_sql`: the SQL an upgrade or downgrade would run, rendered in Alembic's offline
  mode, for a DBA to review.

Needs Alembic (the ``[admin]`` and ``[consumers]`` extras); imported only by the parts that migrate.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from outbox.errors import OutboxError

STORE = "store"
READSTORE = "readstore"


def location(name: str) -> Path:
    """The folder of migration set ``name``, found through the ``outbox.migrations`` package."""
    import outbox.migrations as migrations

    for entry in migrations.__path__:
        candidate = Path(entry) / name
        if (candidate / "env.py").is_file():
            return candidate
    raise OutboxError(f"the {name} migrations (migrations/{name}/env.py) are missing from this installation")


def config(name: str, *, connection: Any = None, output: io.StringIO | None = None,
           attributes: Mapping[str, Any] | None = None) -> Config:
    """An Alembic Config for migration set ``name``; ``connection`` and ``attributes`` go to its env.py."""
    cfg = Config(output_buffer=output, stdout=io.StringIO())
    cfg.set_main_option("script_location", str(location(name)).replace("%", "%%"))
    cfg.attributes.update(attributes or {})
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def script(name: str) -> ScriptDirectory:
    """The set's revision scripts (read once per process: they do not change while it runs)."""
    return ScriptDirectory.from_config(config(name))


def head(name: str) -> str:
    """The newest revision of set ``name`` (each set is one straight line of revisions)."""
    found = script(name).get_current_head()  # raises when the set has several heads
    if found is None:
        raise OutboxError(f"the {name} migrations have no revisions")
    return found


def revisions(name: str) -> tuple[str, ...]:
    """Every revision of set ``name``, oldest first."""
    return tuple(reversed([s.revision for s in script(name).walk_revisions()]))


def offline_sql(name: str, revision: str, *, downgrade: bool = False,
                attributes: Mapping[str, Any] | None = None) -> str:
    """The SQL of ``alembic upgrade|downgrade <revision> --sql`` for set ``name``; connects to nothing.

    ``revision`` is a target (``head``) or a range (``0002:head``, ``0003:base``).
    """
    buffer = io.StringIO()
    cfg = config(name, output=buffer, attributes=attributes)
    (command.downgrade if downgrade else command.upgrade)(cfg, revision, sql=True)
    return buffer.getvalue()


__all__ = ["READSTORE", "STORE", "config", "head", "location", "offline_sql", "revisions", "script"]
