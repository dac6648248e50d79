"""Typed errors. Each carries its policy (retriable or not) and maps to one CLI line.

Messages are one line, say what failed and what to do, and never contain secrets.
"""
from __future__ import annotations

import click


class OutboxError(click.ClickException):
    """Base error: click prints ``Error: <message>`` and exits with ``exit_code``."""

    exit_code = 1
    retriable = False

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ConfigError(OutboxError):
    """A bad option, config file key or environment variable."""

    exit_code = 2


class DatabaseUnavailable(OutboxError):
    """PostgreSQL cannot be reached or refused the login."""

    retriable = True


class DatabaseRefused(DatabaseUnavailable):
    """PostgreSQL answered and said no for good: bad password, unknown role or database, no access.

    Retrying cannot help (the operator changes the DSN, the role or pg_hba.conf), so it is not
    retriable, unlike the connection refused or the shutting-down server of its parent class.
    """

    retriable = False


class NotInstalled(OutboxError):
    """The outbox schema (or a part of it) is missing from a database."""


class PreconditionFailed(OutboxError):
    """The database or cluster is not set up the way the command needs (wal_level, slot, key)."""


class KafkaUnavailable(OutboxError):
    """Kafka cannot be reached."""

    retriable = True


class SandboxError(OutboxError):
    """The local sandbox cannot be started, stopped or described."""
