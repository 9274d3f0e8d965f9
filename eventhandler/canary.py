"""Canary replay: publish the first rows, wait for what the workers make of them, and go on with the
rest only if enough of them were resolved.

A replayed row ends one of two ways: the worker applies it (or finds it applied before) and marks it
`resolved`, or it fails again and the worker sets it back to `pending` with the new error. Until then
it stays `replayed`. The canary waits (with a bound) until none of its rows is `replayed`; a row still
waiting at the deadline counts as a failure, as does a row the broker did not take.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventhandler.dlq import OperatorStore
from eventhandler.errors import InvalidOperation
from eventhandler.models import DLQFilter
from eventhandler.replay import ReplayReport

POLL_SECONDS = 0.5
MAX_TIMEOUT_SECONDS = 3600.0
_SIZE = re.compile(r"(\d{1,9})(%?)")


@dataclass(frozen=True)
class CanarySize:
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | int) -> CanarySize:
        """`50` (rows) or `5%` (of the rows matched, at least one)."""
        found = _SIZE.fullmatch(str(text).strip())
        if not found or int(found[1]) == 0 or (found[2] and int(found[1]) > 100):
            raise InvalidOperation(f"canary {text!r}: give a number of rows (10) or a percentage (5%)")
        return cls(percent=float(found[1])) if found[2] else cls(count=int(found[1]))

    def of(self, matched: int) -> int:
        if self.count is not None:
            return min(self.count, matched)
        return min(matched, max(1, math.ceil(matched * (self.percent or 0) / 100)))


@dataclass
class Outcomes:
    """What became of replayed rows: resolved, failed again (back to pending), still waiting."""

    resolved: int = 0
    failed: int = 0
    waiting: int = 0
    not_published: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class CanaryReport:
    rows: int
    required: float  # the success ratio asked for
    outcomes: Outcomes = field(default_factory=Outcomes)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.outcomes.resolved / self.rows if self.rows else 1.0

    @property
    def passed(self) -> bool:
        return self.ratio >= self.required

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "required": self.required,
            "ratio": round(self.ratio, 4),
            "passed": self.passed,
            "outcomes": self.outcomes.as_dict(),
            "seconds": round(self.seconds, 3),
        }


def outcomes(store: OperatorStore, published: Sequence[int], attempted: int) -> Outcomes:
    """The outcomes of `published` rows now (`attempted`: how many the replay tried to publish)."""
    statuses: Counter[str] = Counter()
    for start in range(0, len(published), 1000):
        chunk = tuple(published[start : start + 1000])
        found = store.list_rows(DLQFilter(ids=chunk), limit=len(chunk))
        # resolved by the worker's processing of the replay, not by an operator meanwhile
        statuses.update("by replay" if r.resolved_by == "replay" else r.status for r in found)
    return Outcomes(
        resolved=statuses["by replay"],
        waiting=statuses["replayed"],
        failed=len(published) - statuses["by replay"] - statuses["replayed"],
        not_published=attempted - len(published),
    )


def watch(
    store: OperatorStore,
    published: Sequence[int],
    attempted: int,
    *,
    timeout: float,
    progress: Callable[[Outcomes], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcomes:
    """Poll the rows until none is waiting or `timeout` passed; a row still waiting then is a failure
    of the canary (its outcome is reported as waiting)."""
    deadline = clock() + timeout
    while True:
        now = outcomes(store, published, attempted)
        if progress is not None:
            progress(now)
        if not now.waiting or clock() >= deadline:
            return now
        sleep(min(POLL_SECONDS, max(0.0, deadline - clock())))


@dataclass(frozen=True)
class Canary:
    """Replay `size` rows first; the rest only if `success` of them were resolved within `timeout`."""

    size: CanarySize
    success: float = 1.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.success <= 1:
            raise InvalidOperation("canary success: a ratio above 0 and at most 1 (1.0: every row)")
        if not 0 < self.timeout <= MAX_TIMEOUT_SECONDS:
            raise InvalidOperation(f"canary timeout: more than 0 and at most {MAX_TIMEOUT_SECONDS:g} s")


def canary_replay(
    store: OperatorStore,
    flt: DLQFilter,
    canary: Canary,
    replay: Callable[[DLQFilter], ReplayReport],
    *,
    limit: int | None,
    actor: str,
    on_outcomes: Callable[[Outcomes], None] | None = None,
) -> ReplayReport:
    """Replay the first rows of `flt` (oldest first), watch them, then the rest or nothing; the
    canary's verdict is audited either way. `replay` publishes the rows of a filter."""
    ids = store.matching_ids(flt, limit=limit)
    size = canary.size.of(len(ids))
    started = time.monotonic()
    report = replay(flt.model_copy(update={"ids": tuple(ids[:size])}))
    verdict = CanaryReport(size, canary.success)
    verdict.outcomes = watch(store, report.published_ids, size, timeout=canary.timeout, progress=on_outcomes)
    verdict.seconds = time.monotonic() - started
    report.matched, report.canary = len(ids), verdict.as_dict()
    store.audit(actor, "canary", report.published_ids, verdict.as_dict())
    if verdict.passed and len(ids) > size:
        rest = replay(flt.model_copy(update={"ids": tuple(ids[size:])}))
        report.published += rest.published
        report.failed += rest.failed
        report.published_ids += rest.published_ids
        report.failures.update(rest.failures)
    report.stopped = not verdict.passed
    report.outcomes = outcomes(store, report.published_ids, len(ids) if verdict.passed else size).as_dict()
    return report
