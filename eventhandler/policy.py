"""The failure policy: the one place that decides what a failure means.

`FailurePolicy.decide` maps an exception, where it happened and how many times in a row to one
`Decision`; the pipeline asks it for every event that fails and the in-flight batch for every batch that
fails. The rules:

- An event that cannot be read (`deserialize`) is that message's fault: dead-letter it (or skip it, when
  its type is unknown and `unknown_event_policy` is `skip`).
- An event a handler or a projection write rejects is dead-lettered unless the error is transient
  (PostgreSQL or Kafka unreachable, timeouts, deadlocks): then the whole batch is retried, holding the
  position, with capped, jittered exponential backoff.
- A batch whose own statements (ledger, DLQ rows, positions) fail is retried: those never fail for one
  event's data, so the situation is at fault.
- Suspect failures (PostgreSQL answers, but with a statement timeout or an internal error) are retried
  too; after `suspect_attempts` of them in a row while PostgreSQL answers a probe, the batch is isolated:
  bisected, and the event that still fails is dead-lettered, so one event's data cannot stall its
  partitions.
- A batch the flood guard holds (`CircuitOpen`: one failure is systemic) is retried too, as a trial,
  every `probe_seconds` of the guard rather than on the backoff.
- Anything that is not an `Exception` (KeyboardInterrupt, SystemExit) stops the worker.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Literal

from eventhandler.db import classify
from eventhandler.errors import SuspectFailure, TransientError, UnknownEventType
from eventhandler.flood import CircuitOpen
from eventhandler.models import Stage

Where = Stage | Literal["batch"]  # an event's stage, or the batch's own statements


class Decision(enum.Enum):
    RETRY = "retry"  # hold the position; the same batch again after a backoff
    ISOLATE = "isolate"  # the same batch again, dead-lettering the events that still fail
    DEAD_LETTER = "dead_letter"  # the event's own fault: its DLQ row, and move on
    SKIP = "skip"  # an unknown event type under `unknown_event_policy=skip`
    STOP = "stop"  # not a failure of the batch: it ends the worker


SUSPECT_ATTEMPTS = 3


@dataclass(frozen=True)
class Backoff:
    initial: float
    maximum: float

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff: uniform in [base/2, base], base doubling per attempt up to `maximum`."""
        exponent = min(max(0, attempt - 1), 64)  # an outage of hours must not overflow the float
        base = min(self.maximum, self.initial * 2**exponent)
        return (rng or random).uniform(base / 2, base)


@dataclass(frozen=True)
class FailurePolicy:
    backoff: Backoff = Backoff(0.5, 30.0)
    suspect_attempts: int = SUSPECT_ATTEMPTS
    skip_unknown: bool = False

    def decide(
        self, exc: BaseException, where: Where, attempt: int = 1, *, isolating: bool = False
    ) -> Decision:
        """What to do about `exc`, raised at `where` on the `attempt`-th failure in a row of the same
        kind (for a batch; an event's stage passes 1). `isolating`: the batch is being written with its
        suspect events dead-lettered, as an earlier ISOLATE asked.

        What each place can do (a policy of one's own must keep to it; anything else is taken as the
        safe choice in brackets): `deserialize` SKIP or DEAD_LETTER [DEAD_LETTER]; `handler` and
        `projection` DEAD_LETTER or RETRY [RETRY: the whole batch again]; `batch` RETRY or ISOLATE
        [RETRY]. STOP anywhere ends the worker with the exception."""
        if not isinstance(exc, Exception):
            return Decision.STOP
        if where == "deserialize":
            if isinstance(exc, UnknownEventType) and self.skip_unknown:
                return Decision.SKIP
            return Decision.DEAD_LETTER  # any bad input is the message's fault, never the worker's
        if where == "batch":
            if isinstance(classify(exc), SuspectFailure) and attempt >= self.suspect_attempts:
                return Decision.ISOLATE
            return Decision.RETRY
        error = classify(exc)
        if isinstance(error, SuspectFailure) and isolating:
            return Decision.DEAD_LETTER
        return Decision.RETRY if isinstance(error, TransientError) else Decision.DEAD_LETTER

    def delay(self, exc: Exception, attempt: int) -> float:
        """How long to hold the position before the `attempt`-th retry of a batch that failed with `exc`."""
        if isinstance(exc, CircuitOpen):
            if exc.exempted:  # an operator closed it while the batch was judged: at once
                return 0.0
            # jitter, so that the workers of a group do not probe in step
            return random.uniform(0.9, 1.1) * exc.probe_seconds  # noqa: S311
        return self.backoff.delay(attempt)
