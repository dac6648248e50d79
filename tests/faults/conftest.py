"""Fixtures of the fault suite: a store streaming through its relay, and the sandbox to break."""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator

import pytest

from outbox.dev.sandbox import Sandbox
from tests.conftest import TEST_KAFKA_PORT, TEST_PG_PORT, TEST_SANDBOX_DIR, _unavailable
from tests.faults.harness import Pipeline, create_topics
from tests.integration.support import install_pos


@pytest.fixture
def sandbox(servers: dict[str, str]) -> Iterator[Sandbox]:
    """The test sandbox, for scenarios that stop and start one of its servers; both run afterwards."""
    if os.environ.get("OUTBOX_TEST_EXTERNAL") == "1":
        _unavailable("this scenario restarts a server: it needs the test sandbox, not OUTBOX_TEST_EXTERNAL servers")
    box = Sandbox(TEST_SANDBOX_DIR, pg_port=TEST_PG_PORT, kafka_port=TEST_KAFKA_PORT)
    yield box
    box.up()


@pytest.fixture
def pipeline(new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> Iterator[Callable[..., Pipeline]]:
    """Factory: a store database with the POS schema and the outbox, its topics (3 partitions each);
    ``relay_args`` are added to every ``outbox relay`` it starts. Relays are killed afterwards."""
    made: list[Pipeline] = []

    def make(*relay_args: str) -> Pipeline:
        dsn = new_database("fault")
        install_pos(dsn)
        p = Pipeline(dsn, topic_prefix, kafka_bootstrap, relay_args)
        asyncio.run(create_topics(kafka_bootstrap, p.topics))
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
