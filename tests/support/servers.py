"""Where the test servers are: the project's own test sandbox, or external servers.

By default the session starts the project's test sandbox (ports 25439 and 29192, apart from a
developer's sandbox) in ``$OUTBOX_TEST_SANDBOX_DIR``, else ``/var/lib/outbox-relay/test-sandbox``
as root or ``.pytest-sandbox/`` otherwise, and leaves it running for the next run;
``make clean-sandbox`` stops it. With ``OUTBOX_TEST_EXTERNAL=1`` the tests use the servers named
by PGHOST/PGPORT/PGUSER and KAFKA_BOOTSTRAP_SERVERS instead.

When a server cannot be had, integration tests fail under CI (CI=true) and skip elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from outbox.dev.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent.parent
# As root, PostgreSQL runs as the postgres user, which may not be able to enter the checkout
# (a clone under /root, say): the test sandbox then lives under /var/lib like the default one.
TEST_SANDBOX_DIR = Path(os.environ.get("OUTBOX_TEST_SANDBOX_DIR")
                        or ("/var/lib/outbox-relay/test-sandbox" if os.geteuid() == 0 else ROOT / ".pytest-sandbox"))
# Below Linux's ephemeral range (32768-60999): the fault tests stop and start the servers, and a
# client socket that happened to take a port of that range meanwhile made the restart fail to bind.
TEST_PG_PORT = int(os.environ.get("OUTBOX_TEST_PG_PORT", "25439"))
TEST_KAFKA_PORT = int(os.environ.get("OUTBOX_TEST_KAFKA_PORT", "29192"))


def external() -> bool:
    """The tests use servers of their caller's (OUTBOX_TEST_EXTERNAL=1), not the test sandbox."""
    return os.environ.get("OUTBOX_TEST_EXTERNAL") == "1"


def unavailable(reason: str) -> None:
    """A server cannot be had: fail under CI, skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"integration servers unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"integration servers unavailable: {reason}")


def make_sandbox() -> Sandbox:
    """The test sandbox (not started: ``up()`` starts what is not running)."""
    from outbox.dev.sandbox import Sandbox

    return Sandbox(TEST_SANDBOX_DIR, pg_port=TEST_PG_PORT, kafka_port=TEST_KAFKA_PORT)

