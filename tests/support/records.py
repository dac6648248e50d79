"""Values for the unit tests: a consumed Kafka record without a Kafka client."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rec:
    """What the consumers read of a Kafka record (aiokafka's ConsumerRecord has these attributes)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
