"""Fixtures (a plugin, loaded by tests/conftest.py): a store database and the processes a test
starts, killed at its end."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.db import install_pos
from tests.support.processes import OutboxProcess, RelayProcess


@pytest.fixture
def store(new_database: Callable[..., str]) -> str:
    """A store database with the POS schema, captured by the outbox."""
    dsn = new_database("store")
    install_pos(dsn)
    return dsn


@pytest.fixture
def relays() -> Iterator[Callable[..., RelayProcess]]:
    """Factory of relay processes (RelayProcess's arguments), killed at the end of the test."""
    started: list[RelayProcess] = []

    def make(*args: Any, **kw: Any) -> RelayProcess:
        r = RelayProcess(*args, **kw)
        started.append(r)
        return r

    yield make
    for r in started:
        r.close()


@pytest.fixture
def processes() -> Iterator[list[OutboxProcess]]:
    """A list to append started processes to; each is killed at the end of the test."""
    started: list[OutboxProcess] = []
    yield started
    for p in started:
        p.close()
