"""A batch's data, from the records Kafka handed out to what its transaction stored.

`Record` is a consumed message exactly as received; `DecodedBatch` is a batch after decoding (events to
apply, records already rejected); `BatchResult` is what its transaction did.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from eventhandler.events import Event
from eventhandler.models import FailedMessage, Headers, ReplayOrigin, Stage

TP = tuple[str, int]  # (topic, partition)


@dataclass(slots=True)
class Record:
    """A consumed Kafka message, exactly as received."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int | None = None

    @property
    def timestamp(self) -> datetime | None:
        """The Kafka timestamp; None when absent, or beyond what a datetime holds (a producer may
        set any 64-bit value, and the message must still reach the DLQ)."""
        if self.timestamp_ms is None or self.timestamp_ms < 0:
            return None
        try:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            return None


@dataclass(slots=True)
class Decoded:
    record: Record
    event: Event
    replay_of: ReplayOrigin | None
    key: bytes  # the event's ledger key (see `Ledger.key`)


@dataclass(slots=True)
class Rejected:
    """A record that failed, as the DLQ row it becomes (built where it failed, so the exception
    and its traceback, which hold the frames of the whole batch, are freed at once)."""

    record: Record
    failure: FailedMessage
    key: bytes | None = None  # the ledger key of an event claimed before it failed
    event: Event | None = None  # the event, when it was read before it failed

    @property
    def stage(self) -> Stage:
        return self.failure.stage


@dataclass
class DecodedBatch:
    records: list[Record]
    events: list[Decoded] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: int = 0  # unknown event types under the "skip" policy

    def positions(self) -> dict[TP, int]:
        """The next offset to read for each partition in the batch."""
        positions: dict[TP, int] = {}
        for record in self.records:
            tp = (record.topic, record.partition)
            if record.offset + 1 > positions.get(tp, -1):
                positions[tp] = record.offset + 1
        return positions

    def without_partitions(self, partitions: set[TP]) -> DecodedBatch:
        """The batch less the records of revoked partitions (their new owner will read them)."""

        return DecodedBatch(
            records=without_partitions(self.records, partitions),
            events=[d for d in self.events if (d.record.topic, d.record.partition) not in partitions],
            rejected=[r for r in self.rejected if (r.record.topic, r.record.partition) not in partitions],
            skipped=self.skipped,
        )


@dataclass
class BatchResult:
    applied: Counter[str] = field(default_factory=Counter)  # by event type
    duplicates: int = 0
    skipped: int = 0
    failed: Counter[Stage] = field(default_factory=Counter)
    dlq_ids: list[int] = field(default_factory=list)
    dead_letters: list[FailedMessage] = field(default_factory=list)  # parallel to dlq_ids
    positions: dict[TP, int] = field(default_factory=dict)  # what this commit stored
    resolved: list[int] = field(default_factory=list)
    parked: list[int] = field(default_factory=list)  # dlq_ids of the rows parked by this batch
    released: list[int] = field(default_factory=list)  # parked rows that took effect now
    circuits_closed: list[str] = field(default_factory=list)  # fingerprints whose circuit this batch closed


def without_partitions(records: Iterable[Record], partitions: set[TP]) -> list[Record]:
    """`records` less those of `partitions` (revoked: their new owner reads them)."""
    return [r for r in records if (r.topic, r.partition) not in partitions]
