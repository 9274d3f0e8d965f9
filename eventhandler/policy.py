"""The failure policy: the one place that decides what a failure means.

- Transient (PostgreSQL or Kafka unreachable, timeouts, deadlocks): retry with capped, jittered
  exponential backoff, holding the position.
- Anything else is deterministic for that event: dead-letter it and move on.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from eventhandler.db import classify
from eventhandler.errors import TransientError


class Decision(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


def decide(exc: BaseException) -> Decision:
    return Decision.RETRY if isinstance(classify(exc), TransientError) else Decision.DEAD_LETTER


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff: uniform in [base/2, base], base doubling per attempt up to `maximum`."""
        exponent = min(max(0, attempt - 1), 64)  # an outage of hours must not overflow the float
        base = min(self.maximum, self.initial * 2**exponent)
        return (rng or random).uniform(base / 2, base)
