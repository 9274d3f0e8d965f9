"""The failure policy: the one place that decides what a failure means.

- Transient (PostgreSQL or Kafka unreachable, timeouts, deadlocks): retry with capped, jittered
  exponential backoff, holding the position.
- Suspect (PostgreSQL answers, but with a statement timeout or an internal error): retry too; after
  `SUSPECT_ATTEMPTS` failures of the same batch while PostgreSQL answers a probe, isolate it: bisect the
  batch and dead-letter the event that still fails, so one event's data cannot stall its partitions.
- Anything else is deterministic for that event: dead-letter it and move on.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from eventhandler.db import classify
from eventhandler.errors import SuspectFailure, TransientError


class Decision(enum.Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


SUSPECT_ATTEMPTS = 3


def decide(exc: BaseException, *, isolate_suspects: bool = False) -> Decision:
    error = classify(exc)
    if isinstance(error, SuspectFailure) and isolate_suspects:
        return Decision.DEAD_LETTER
    return Decision.RETRY if isinstance(error, TransientError) else Decision.DEAD_LETTER


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff: uniform in [base/2, base], base doubling per attempt up to `maximum`."""
        exponent = min(max(0, attempt - 1), 64)  # an outage of hours must not overflow the float
        base = min(self.maximum, self.initial * 2**exponent)
        return (rng or random).uniform(base / 2, base)
