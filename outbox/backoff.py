"""Reconnect delays: exponential, capped, jittered. Pure logic, no I/O."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``next()`` gives the delay before the next attempt: ``initial * 2**n`` capped at ``cap``,
    then jittered into its upper half (so that a fleet of relays does not reconnect in step)."""

    initial: float = 0.5
    cap: float = 30.0
    attempt: int = 0  # attempts made since the last reset
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0
