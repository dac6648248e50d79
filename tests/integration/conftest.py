"""Fixtures shared by the relay's integration tests."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from tests.integration.support import RelayProcess, install_pos


@pytest.fixture
def store(new_database: Callable[..., str]) -> str:
    """A store database with the POS schema, captured by the outbox."""
    dsn = new_database("store")
    install_pos(dsn)
    return dsn


@pytest.fixture
def relays() -> Iterator[Callable[..., RelayProcess]]:
    """Factory of relay processes, killed at the end of the test."""
    started: list[RelayProcess] = []

    def make(*args: Any, **kw: Any) -> RelayProcess:
        r = RelayProcess(*args, **kw)
        started.append(r)
        return r

    yield make
    for r in started:
        r.close()
