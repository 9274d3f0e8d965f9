"""One batch, start to end: decode (no I/O), then write: claim → handle → project → dead-letter →
positions, in one PostgreSQL transaction. Each step can be called alone; the in-flight batch
(`inflight`) strings them together. Every failure asks the failure policy what it means (`policy`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import psycopg

from eventhandler import __version__
from eventhandler.batch import BatchResult, Decoded, DecodedBatch, Record, Rejected
from eventhandler.db import classify
from eventhandler.dlq import DeadLetterWriter
from eventhandler.errors import (
    DeserializationError,
    PermanentError,
    ProjectionFailure,
    TransientError,
    UnknownEventType,
)
from eventhandler.events import Deserializer, Event, replay_origin
from eventhandler.flood import CircuitOpen, FloodGuard
from eventhandler.handlers import BatchHandler, Projection, Registry
from eventhandler.ledger import Ledger
from eventhandler.models import FailedMessage, Stage
from eventhandler.parking import PARKED_MESSAGE, OpenKey, Parked, ParkingStep
from eventhandler.policy import Decision, FailurePolicy
from eventhandler.tracebacks import format_traceback


class BatchProcessor:
    def __init__(
        self,
        *,
        consumer_group: str,
        registry: Registry,
        ledger: Ledger,
        dlq: DeadLetterWriter,
        policy: FailurePolicy,
        parking: ParkingStep | None = None,
        guard: FloodGuard | None = None,
        worker_version: str = __version__,
    ) -> None:
        self.consumer_group = consumer_group
        self.registry = registry
        self.ledger = ledger
        self.dlq = dlq
        self.policy = policy
        self.parking = parking
        self.guard = guard
        self.worker_version = worker_version
        self._deserialize = Deserializer(registry.payload_models)

    # -- step 1: bytes → events (no I/O) --------------------------------------------------------

    def decode(self, records: list[Record]) -> DecodedBatch:
        batch = DecodedBatch(records)
        deserialize, key, decide = self._deserialize, self.ledger.key, self.policy.decide
        for record in records:
            try:
                event = deserialize(record.value, record.headers)
            except Exception as exc:
                decision = decide(exc, "deserialize")
                if decision is Decision.STOP:
                    raise
                if decision is Decision.SKIP:
                    batch.skipped += 1
                else:  # nothing else can be done about bytes that do not read: the DLQ holds them
                    batch.rejected.append(self._unreadable(record, exc))
            else:
                replay_of = replay_origin(record.headers) if record.headers else None
                batch.events.append(Decoded(record, event, replay_of, key(event.source, event.id)))
        return batch

    def _unreadable(self, record: Record, exc: Exception) -> Rejected:
        if isinstance(exc, UnknownEventType):  # readable, but no handler takes it
            return self._reject(record, "handler", exc, traceback=None)
        if isinstance(exc, DeserializationError):  # its message says all; a traceback would only
            return self._reject(record, "deserialize", exc, traceback=None)  # show the deserializer
        return self._reject(record, "deserialize", exc)

    # -- step 2: everything that touches PostgreSQL, in the caller's transaction ---------------

    def write(
        self, conn: psycopg.Connection[Any], batch: DecodedBatch, *, isolate_suspects: bool = False
    ) -> BatchResult:
        """Apply a decoded batch atomically: projections, ledger, DLQ rows and positions.

        Raises `TransientError` (nothing committed; retry the same batch later). With
        `isolate_suspects` (the policy's ISOLATE, after a suspect failure persisted), a suspect
        failure of the writes is bisected like a permanent one, and the event that still fails is
        dead-lettered.
        """
        result = BatchResult(skipped=batch.skipped)
        parking, guard, verdict = self.parking, self.guard, None
        try:
            with conn.transaction():
                events, parked = batch.events, list[Decoded]()
                open_keys: dict[uuid.UUID, OpenKey] = {}
                # With no open row on a parking topic (the usual case) nothing parks and nothing is
                # released: one index probe instead of the keys' lookup and the release's two statements.
                unsettled = parking is not None and parking.store.anything_open(conn, self.consumer_group)
                if parking is not None and unsettled:
                    open_keys = parking.open_keys(conn, batch)
                    events, parked = parking.rules.split(events, open_keys)
                applied, known, repeats, rejected, late = self.apply_in_order(
                    conn, events, isolate_suspects, failed_before=batch.rejected
                )
                rejected = batch.rejected + rejected
                failed = [r.failure for r in rejected]
                if guard is not None:  # raises CircuitOpen when a failure is systemic: nothing is written
                    untried = len(parked) + len(late)
                    replays = self.dlq.open_replays(conn, self.consumer_group, failed)
                    verdict = guard.inspect(conn, batch, rejected, applied, untried=untried, replays=replays)
                result.dlq_ids = self.dlq.record_failures(conn, failed)
                result.dead_letters = failed
                if parking is not None:
                    result.parked = parking.park(
                        conn, self, rejected, result.dlq_ids, [*parked, *late], open_keys
                    )
                # A repeat within the batch shares its first copy's outcome: it resolves a replayed
                # row only if that copy took effect (a copy that failed just set the row back to pending).
                took_effect = {d.key for d in (*applied, *known)}
                echoes = [d for d in repeats if d.key in took_effect]
                replayed = [
                    (d.replay_of, d.event.source, d.event.id, d.record.value)
                    for d in (*applied, *known, *echoes)
                    if d.replay_of is not None
                ]
                result.resolved = self.dlq.resolve_replayed(conn, self.consumer_group, replayed)
                if parking is not None and unsettled:
                    result.released = parking.release(conn, self, isolate_suspects)
                duplicates = [*known, *repeats]
                result.positions = batch.positions()
                self.ledger.save_positions(conn, result.positions)
        except CircuitOpen as held:
            if guard is not None:
                try:
                    guard.hold(conn, held)
                except PermanentError as exc:  # still a held batch, never a reason to stop
                    raise TransientError(f"cannot write the flood guard's circuit: {exc}") from exc
            raise
        except (psycopg.Error, PermanentError) as exc:
            if self.policy.decide(exc, "batch") is not Decision.RETRY:
                raise
            error = classify(exc)
            raise (error if isinstance(error, TransientError) else TransientError(str(error))) from exc
        if guard is not None and verdict is not None:
            guard.committed(verdict)
            result.circuits_closed = [*verdict.closed, *verdict.exempted]
        result.duplicates = len(duplicates)
        result.applied.update(d.event.type for d in applied)
        result.failed.update(r.stage for r in rejected)
        return result

    def apply_in_order(
        self,
        conn: psycopg.Connection[Any],
        events: list[Decoded],
        isolate_suspects: bool,
        failed_before: Sequence[Rejected] = (),
    ) -> tuple[list[Decoded], list[Decoded], list[Decoded], list[Rejected], list[Decoded]]:
        """Claim and apply `events`: (applied, known, repeats, rejected, late). On parking topics an
        event must not take effect after a failure of its key in the same batch (`failed_before`:
        those that failed to decode): such events (`late`) are taken out and the batch applied again
        without them, until none is left."""
        late: list[Decoded] = []
        if self.parking is None:  # nothing can be too late: no savepoint to take it back with
            applied, known, repeats, rejected = self._claim_and_apply(conn, events, isolate_suspects)
            return applied, known, repeats, rejected, late
        if failed_before:
            late = self.parking.rules.after_failures(events, failed_before)
            taken = {id(d) for d in late}
            events = [d for d in events if id(d) not in taken]
        while True:
            with conn.transaction():  # a savepoint: what an attempt claimed and applied goes with it
                applied, known, repeats, rejected = self._claim_and_apply(conn, events, isolate_suspects)
                too_late = self.parking.rules.after_failures(applied, [*failed_before, *rejected])
                if too_late:
                    raise psycopg.Rollback()  # leaves this block, rolled back, and goes on below it
                return applied, known, repeats, rejected, late
            late += too_late
            taken = {id(d) for d in too_late}
            events = [d for d in events if id(d) not in taken]

    def _claim_and_apply(
        self, conn: psycopg.Connection[Any], events: list[Decoded], isolate_suspects: bool
    ) -> tuple[list[Decoded], list[Decoded], list[Decoded], list[Rejected]]:
        """(applied, known, repeats, rejected); the ledger forgets the claims of the rejected."""
        fresh, known, repeats = self._claim(conn, events)
        applied, rejected = self._apply(conn, fresh, isolate_suspects)
        if rejected:
            self.ledger.release(conn, [r.key for r in rejected if r.key is not None])
        return applied, known, repeats, rejected

    def parked_failure(self, decoded: Decoded) -> FailedMessage:
        """The DLQ row of an event parked behind an open failure of its key."""
        return self._reject(
            decoded.record, "handler", Parked(PARKED_MESSAGE), decoded, traceback=None
        ).failure

    def _claim(
        self, conn: psycopg.Connection[Any], events: list[Decoded]
    ) -> tuple[list[Decoded], list[Decoded], list[Decoded]]:
        """Split events into those to apply now (`fresh`), those the ledger knows as applied before
        (`known`), and later copies of an event earlier in this batch (`repeats`)."""
        first: dict[bytes, Decoded] = {}
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
            if self.policy.decide(exc, "projection", isolating=isolate_suspects) is not Decision.DEAD_LETTER:
                raise  # a retry of the batch (or STOP)
            if len(events) == 1:
                decoded = events[0]
                failure = classify(exc)
                if isinstance(failure, TransientError):  # a suspect failure that stayed with this event
                    failure = ProjectionFailure(f"{failure} (every attempt, while PostgreSQL answered)")
                traceback = format_traceback(exc)  # of the driver's error: where the write failed
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
                if self.policy.decide(exc, "handler", isolating=isolate_suspects) is not Decision.DEAD_LETTER:
                    raise  # a retry of the batch (or STOP)
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
            consumer=self.consumer_group,
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
            traceback=format_traceback(exc) if traceback is True else traceback,
            event_id=event.id if event else None,
            event_type=event_type,
            event_source=event.source if event else None,
            worker_version=self.worker_version,
            replay_of=decoded.replay_of if decoded else replay_origin(record.headers),
            event_key=decoded.key if decoded else None,
        )
        return Rejected(record, failure, decoded.key if decoded else None, event)


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
