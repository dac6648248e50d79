"""The relay's errors that its decisions (``relay.policy``) tell apart: plain values, no client library.

``publisher.delivery_failed`` builds a :class:`DeliveryFailed` from librdkafka's error, and
``replication`` raises :class:`SlotInUse`; the policy only reads their fields.
"""
from __future__ import annotations

from outbox.errors import OutboxError, PreconditionFailed


class DeliveryFailed(OutboxError):
    """Kafka did not take an event (after librdkafka's own retries); built by ``publisher.delivery_failed``."""

    def __init__(self, message: str, *, code: int, outage: bool, too_large: bool, purged: bool, fatal: bool,
                 fenced: bool) -> None:
        super().__init__(message)
        self.code = code
        # The relay restarts from its slot with a new producer after an outage: Kafka (or the way
        # to it) was away, or the producer's idempotence state is spent; nothing is lost that way.
        self.outage = outage
        self.retriable = outage
        self.too_large = too_large
        self.purged = purged  # by the relay itself
        self.fatal = fatal  # a transactional producer fenced by a newer instance, say
        self.fenced = fenced


class SlotInUse(PreconditionFailed):
    """Another process streams the slot: a second relay, or (just after a reconnect) our own old
    walsender that PostgreSQL has not noticed is gone yet."""

    def __init__(self, slot: str, pid: int | None, where: str) -> None:
        super().__init__(f"slot {slot} on {where} is in use by another relay (pid {pid if pid is not None else '?'}): "
                         "run one relay per store database; stop the other one first")
