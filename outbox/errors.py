"""Typed errors: one plain tree, each class carrying its policy (retriable or not, exit code).

Nothing here knows about the CLI: pure modules raise these without importing click. Only the CLI
edge (``outbox.cli``) maps an :class:`OutboxError` to one ``Error: <message>`` line and its exit
code. Messages are one line, say what failed and what to do, and never contain secrets.
"""
from __future__ import annotations


class OutboxError(Exception):
    """Base error. ``message`` is the one line the CLI prints; ``exit_code`` its exit status."""

    exit_code = 1
    retriable = False

    def __init__(self, message: str) -> None:
        self.message = " ".join(str(message).split())
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ConfigError(OutboxError):
    """A bad option, config file key, environment variable or argument value."""

    exit_code = 2


class ContractError(OutboxError, ValueError):
    """A value that cannot be expressed in the event contract: a poison event, a bad argument to emit().

    Also a ``ValueError``: ``outbox.emit`` has always raised ValueError for bad arguments, and
    callers may keep catching that.
    """


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
