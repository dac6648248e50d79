"""``outbox replay --force`` waits for a killed consumer to leave its group: the wait must outlast the
session timeout our consumers really have (aiokafka's 10 s, not the Java client's 45 s)."""
from __future__ import annotations

import inspect

from outbox.consumers import kafka, replay


def test_force_outwaits_our_consumers_session_timeout() -> None:
    assert kafka.SESSION_TIMEOUT_MS == 10_000
    assert replay.FORCE_WAIT >= 3 * kafka.SESSION_TIMEOUT_MS / 1000
    assert "SESSION_TIMEOUT_MS" in inspect.getsource(kafka._start_consumer)  # stated, not left to the client's default
