"""The fault suite's own fixture: a store streaming through its relay (the sandbox to break, and
every shared fixture, come from tests/support)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faults.harness import Pipeline, create_topics
from tests.support.db import install_pos


@pytest.fixture
def pipeline(new_database: Callable[..., str], topic_prefix: str, kafka_bootstrap: str) -> Iterator[Callable[..., Pipeline]]:
    """Factory: a store database with the POS schema and the outbox, its topics (3 partitions each);
    ``relay_args`` are added to every ``outbox relay`` it starts. Relays are killed afterwards."""
    made: list[Pipeline] = []

    def make(*relay_args: str) -> Pipeline:
        dsn = new_database("fault")
        install_pos(dsn)
        p = Pipeline(dsn, topic_prefix, kafka_bootstrap, relay_args)
        create_topics(kafka_bootstrap, p.topics)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
