"""One batch, start to end: decode → (claim → handle → project → dead-letter → positions) in one
transaction. Each step is a function you can call alone; the worker loop only strings them together.
"""

from __future__ import annotations

import functools
import json
import linecache
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg

from eventhandler import __version__
from eventhandler.db import classify, error_text
from eventhandler.dlq import DLQRepository
from eventhandler.errors import (
    DeserializationError,
    PermanentError,
    ProjectionFailure,
    TransientError,
    UnknownEventType,
)
from eventhandler.events import Deserializer, Event, replay_origin
from eventhandler.handlers import BatchHandler, Projection, Registry
from eventhandler.ledger import Ledger
from eventhandler.models import FailedMessage, Headers, ReplayOrigin, Stage
from eventhandler.policy import Decision, decide


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
    key: uuid.UUID  # the event's ledger key (see `Ledger.key`)


@dataclass(slots=True)
class Rejected:
    """A record that failed, as the DLQ row it becomes (built where it failed, so the exception
    and its traceback, which hold the frames of the whole batch, are freed at once)."""

    record: Record
    failure: FailedMessage
    key: uuid.UUID | None = None  # the ledger key of an event claimed before it failed

    @property
    def stage(self) -> Stage:
        return self.failure.stage


@dataclass
class DecodedBatch:
    records: list[Record]
    events: list[Decoded] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    skipped: int = 0  # unknown event types under the "skip" policy

    def positions(self) -> dict[tuple[str, int], int]:
        """The next offset to read for each partition in the batch."""
        positions: dict[tuple[str, int], int] = {}
        for record in self.records:
            tp = (record.topic, record.partition)
            if record.offset + 1 > positions.get(tp, -1):
                positions[tp] = record.offset + 1
        return positions

    def without_partitions(self, partitions: set[tuple[str, int]]) -> DecodedBatch:
        """The batch less the records of revoked partitions (their new owner will read them)."""

        def keep(r: Record) -> bool:
            return (r.topic, r.partition) not in partitions

        return DecodedBatch(
            records=[r for r in self.records if keep(r)],
            events=[d for d in self.events if keep(d.record)],
            rejected=[r for r in self.rejected if keep(r.record)],
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
    positions: dict[tuple[str, int], int] = field(default_factory=dict)  # what this commit stored
    resolved: list[int] = field(default_factory=list)


def _format_traceback(exc: BaseException) -> str:
    """The usual traceback text, without the column carets Python 3.11 computes by parsing every
    frame's source (that alone cost ~90 µs a failure, a storm of bad input pays it per message)."""
    text = ""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = []
        tb = current.__traceback__
        while tb is not None:  # walked by hand: traceback.extract_tb computes column positions too
            code = tb.tb_frame.f_code
            frames.append((code.co_filename, tb.tb_lineno, code.co_name))
            tb = tb.tb_next
        stack = _stack_text(tuple(frames)) if len(frames) <= 64 else _stack_text.__wrapped__(tuple(frames))
        text = f"{stack}{type(current).__qualname__}: {error_text(current)}\n{text}"
        if current.__cause__ is not None:
            text = _CAUSE + text
            current = current.__cause__
        elif current.__context__ is not None and not current.__suppress_context__:
            text = _CONTEXT + text
            current = current.__context__
        else:
            current = None
    return text.strip()


@functools.lru_cache(maxsize=1024)  # a storm fails the same way at the same places (deep stacks: uncached)
def _stack_text(frames: tuple[tuple[str, int, str], ...]) -> str:
    lines = ["Traceback (most recent call last):\n"]
    for filename, line, name in frames:
        lines.append(f'  File "{filename}", line {line}, in {name}\n')
        source = linecache.getline(filename, line).strip()
        if source:
            lines.append(f"    {source}\n")
    return "".join(lines)


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


class BatchProcessor:
    def __init__(
        self,
        *,
        consumer: str,
        registry: Registry,
        ledger: Ledger,
        dlq: DLQRepository,
        unknown_event_policy: str = "dead-letter",
        worker_version: str = __version__,
    ) -> None:
        self.consumer = consumer
        self.registry = registry
        self.ledger = ledger
        self.dlq = dlq
        self.skip_unknown = unknown_event_policy == "skip"
        self.worker_version = worker_version
        self._deserialize = Deserializer(registry.payload_models)

    # -- step 1: bytes → events (no I/O) --------------------------------------------------------

    def decode(self, records: list[Record]) -> DecodedBatch:
        batch = DecodedBatch(records)
        deserialize, key = self._deserialize, self.ledger.key
        for record in records:
            try:
                event = deserialize(record.value, record.headers)
            except UnknownEventType as exc:
                if self.skip_unknown:
                    batch.skipped += 1
                else:
                    batch.rejected.append(self._reject(record, "handler", exc, traceback=None))
            except DeserializationError as exc:  # its message says all; a traceback would only
                # show the deserializer's own frames
                batch.rejected.append(self._reject(record, "deserialize", exc, traceback=None))
            except Exception as exc:  # any bad input is the message's fault, never the worker's
                batch.rejected.append(self._reject(record, "deserialize", exc))
            else:
                replay_of = replay_origin(record.headers) if record.headers else None
                batch.events.append(Decoded(record, event, replay_of, key(event.source, event.id)))
        return batch

    # -- step 2: everything that touches PostgreSQL, in the caller's transaction ---------------

    def commit(
        self, conn: psycopg.Connection[Any], batch: DecodedBatch, *, isolate_suspects: bool = False
    ) -> BatchResult:
        """Apply a decoded batch atomically: projections, ledger, DLQ rows and positions.

        Raises `TransientError` (nothing committed; retry the same batch later). With
        `isolate_suspects` (the policy's call, after a suspect failure persisted), a suspect failure of
        the writes is bisected like a permanent one, and the event that still fails is dead-lettered.
        """
        result = BatchResult(skipped=batch.skipped)
        try:
            with conn.transaction():
                fresh, known, repeats = self._claim(conn, batch.events)
                applied, rejected = self._apply(conn, fresh, isolate_suspects)
                if rejected:
                    self.ledger.release(conn, [r.key for r in rejected if r.key is not None])
                rejected = batch.rejected + rejected
                failed = [r.failure for r in rejected]
                result.dlq_ids = self.dlq.record_failures(conn, failed)
                result.dead_letters = failed
                # A repeat within the batch shares its first copy's outcome: it resolves a replayed
                # row only if that copy took effect (a copy that failed just set the row back to pending).
                took_effect = {d.key for d in (*applied, *known)}
                echoes = [d for d in repeats if d.key in took_effect]
                replayed = [
                    (d.replay_of, d.event.source, d.event.id)
                    for d in (*applied, *known, *echoes)
                    if d.replay_of is not None
                ]
                result.resolved = self.dlq.resolve_replayed(conn, self.consumer, replayed)
                duplicates = [*known, *repeats]
                result.positions = batch.positions()
                self.ledger.save_positions(conn, result.positions)
        except (psycopg.Error, PermanentError) as exc:
            # The batch-level statements (ledger, DLQ, positions) never fail for one event's data;
            # a failure here is the situation, so hold the position and retry.
            error = classify(exc)
            raise (error if isinstance(error, TransientError) else TransientError(str(error))) from exc
        result.duplicates = len(duplicates)
        result.applied.update(d.event.type for d in applied)
        result.failed.update(r.stage for r in rejected)
        return result

    def _claim(
        self, conn: psycopg.Connection[Any], events: list[Decoded]
    ) -> tuple[list[Decoded], list[Decoded], list[Decoded]]:
        """Split events into those to apply now (`fresh`), those the ledger knows as applied before
        (`known`), and later copies of an event earlier in this batch (`repeats`)."""
        first: dict[uuid.UUID, Decoded] = {}
        repeats: list[Decoded] = []
        for decoded in events:
            if decoded.key in first:
                repeats.append(decoded)
            else:
                first[decoded.key] = decoded
        new = self.ledger.claim(conn, list(first))
        fresh: list[Decoded] = []  # in consumption order, which keeps each partition's order
        known: list[Decoded] = []
        for key, decoded in first.items():
            (fresh if key in new else known).append(decoded)
        return fresh, known, repeats

    def _apply(
        self, conn: psycopg.Connection[Any], events: list[Decoded], isolate_suspects: bool
    ) -> tuple[list[Decoded], list[Rejected]]:
        """Handle and project `events` in a savepoint; on a permanent write error, bisect to find
        the events at fault (projection failures) and apply the rest."""
        if not events:
            return [], []
        try:
            with conn.transaction():
                return self._handle_and_flush(conn, events, isolate_suspects)
        except Exception as exc:
            if decide(exc, isolate_suspects=isolate_suspects) is Decision.RETRY:
                raise
            if len(events) == 1:
                decoded = events[0]
                failure = classify(exc)
                if isinstance(failure, TransientError):  # a suspect failure that stayed with this event
                    failure = ProjectionFailure(f"{failure} (every attempt, while PostgreSQL answered)")
                traceback = _format_traceback(exc)  # of the driver's error: where the write failed
                return [], [self._reject(decoded.record, "projection", failure, decoded, traceback=traceback)]
        middle = len(events) // 2
        left_ok, left_bad = self._apply(conn, events[:middle], isolate_suspects)
        right_ok, right_bad = self._apply(conn, events[middle:], isolate_suspects)
        return left_ok + right_ok, left_bad + right_bad

    def _handle_and_flush(
        self, conn: psycopg.Connection[Any], events: list[Decoded], isolate_suspects: bool
    ) -> tuple[list[Decoded], list[Rejected]]:
        by_projection: dict[int, tuple[Projection, list[Event]]] = {}
        for decoded in events:
            projection = self.registry.projection_for(decoded.event.type)
            by_projection.setdefault(id(projection), (projection, []))[1].append(decoded.event)
        handlers: dict[int, BatchHandler] = {
            key: projection.begin(conn, projection_events)
            for key, (projection, projection_events) in by_projection.items()
        }
        applied: list[Decoded] = []
        rejected: list[Rejected] = []
        registry = self.registry
        for decoded in events:
            handler = handlers[id(registry.projection_for(decoded.event.type))]
            try:
                handler.handle(decoded.event)
            except Exception as exc:
                if decide(exc, isolate_suspects=isolate_suspects) is Decision.RETRY:
                    raise
                rejected.append(self._reject(decoded.record, "handler", exc, decoded))
            else:
                applied.append(decoded)
        for handler in handlers.values():
            handler.flush(conn)
        return applied, rejected

    def _reject(
        self,
        record: Record,
        stage: Stage,
        exc: BaseException,
        decoded: Decoded | None = None,
        *,
        traceback: str | Literal[True] | None = True,
    ) -> Rejected:
        """The DLQ row of a record that failed with `exc` (traceback=True: format the exception's)."""
        event = decoded.event if decoded else None
        if event is not None:
            event_type: str | None = event.type
        elif isinstance(exc, DeserializationError):
            event_type = exc.event_type or _peek_type(record, parse=exc.json)
        else:
            event_type = _peek_type(record)
        failure = FailedMessage(
            consumer=self.consumer,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp=record.timestamp,
            key=record.key,
            value=record.value,
            headers=list(record.headers or []),
            stage=stage,
            error_type=type(exc).__name__,
            error_message=str(exc) or type(exc).__name__,
            traceback=_format_traceback(exc) if traceback is True else traceback,
            event_id=event.id if event else None,
            event_type=event_type,
            event_source=event.source if event else None,
            worker_version=self.worker_version,
            replay_of=decoded.replay_of if decoded else replay_origin(record.headers),
            event_key=decoded.key if decoded else None,
        )
        return Rejected(record, failure, decoded.key if decoded else None)


def _peek_type(record: Record, *, parse: bool = True) -> str | None:
    """Best effort event type of a message that failed to deserialize, for triage filters: its
    `ce_type` header, else (`parse`: the value is JSON at all) the envelope's `type`."""
    for key, value in record.headers or ():
        if key == "ce_type" and value is not None:
            return value.decode("utf-8", "replace")[:200]
    if parse and record.value and len(record.value) < 1_048_576:
        try:
            parsed = json.loads(record.value)
        except (ValueError, RecursionError):
            return None
        if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
            return str(parsed["type"])[:200]
    return None
