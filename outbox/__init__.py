"""outbox-relay: every change in your PostgreSQL store databases, as ordered events on Kafka."""
from outbox.emit import emit

__all__ = ["emit"]
