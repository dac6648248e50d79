"""Connecting to PostgreSQL from a DSN, with one-line errors and no secrets in them.

A DSN is a libpq keyword string (``dbname=store1 host=...``) or a ``postgresql://`` URL; the
libpq environment variables (PGHOST, PGPORT, PGUSER, PGPASSWORD, ...) fill what it leaves out,
exactly as ``psql`` does, because libpq itself reads them.
"""
from __future__ import annotations

import os
import re
from typing import Any

import psycopg
from psycopg import conninfo

from outbox.errors import ConfigError, DatabaseRefused, DatabaseUnavailable

_URL_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/@\s]*):[^@\s]*@")
_KW_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# What a server says when retrying cannot help: libpq carries no SQLSTATE for a failed login,
# so the server's words decide (28000, 28P01, 3D000, 42501 and pg_hba.conf rejections).
_PERMANENT = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry|"
    r"(role|database) \"[^\"]*\" does not exist|is not permitted to log in|permission denied|"
    r"must be superuser or replication role|must have replication|not allowed|password is required|"
    r"server does not support SSL|invalid (connection option|dsn|integer value)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Remove passwords from a DSN or from a message that may quote one."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    return _KW_PASSWORD.sub(r"\1***", text)


def parse(dsn: str) -> dict[str, str]:
    """Validate a DSN's syntax and return its keywords (libpq defaults not applied)."""
    try:
        return {k: str(v) for k, v in conninfo.conninfo_to_dict(dsn).items() if v is not None}
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid DSN {redact(dsn)!r}: {redact(str(exc).strip())}") from None


def describe(dsn: str) -> str:
    """A short, secret-free name for a database: ``host:port/dbname``, env defaults applied."""
    info = parse(dsn)
    host = info.get("host") or os.environ.get("PGHOST") or "localhost"
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    db = info.get("dbname") or os.environ.get("PGDATABASE") or info.get("user") or os.environ.get("PGUSER") or "?"
    return f"{host}:{port}/{db}"


def connect(dsn: str, *, autocommit: bool = False, application_name: str = "outbox", **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection, turning libpq failures into one clear line."""
    parse(dsn)
    try:
        return psycopg.connect(dsn, autocommit=autocommit, application_name=application_name, **kwargs)
    except psycopg.OperationalError as exc:
        error = DatabaseRefused if is_permanent(str(exc)) else DatabaseUnavailable
        raise error(f"cannot connect to {describe(dsn)}: {first_line(exc)} (check --dsn and the PG* environment variables)") from None


def is_permanent(message: str) -> bool:
    """Whether a connection failure will fail again the same way (auth, missing role or database)."""
    return _PERMANENT.search(message) is not None


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return redact(lines[0]) if lines else type(exc).__name__
