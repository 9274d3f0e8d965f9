"""Per-key parking: failures that keep their key's order.

On a parking topic (`EVENTHANDLER_PARKING`), while a key has an open failure — a `pending` or
`replayed` DLQ row — later events of that key are not applied: they are parked, stored byte for byte
as DLQ rows with status `parked`, linked to the row that blocks them (`blocked_by`). When the blocker is
closed (its replay took effect, or an operator resolved or discarded it) the worker releases the parked
rows in order, each exactly once; one that fails becomes the key's new blocker and the rest stay parked.
Other keys flow on; a message without a key is never parked.

This module holds the rules, without I/O: what a message's key is, and which events of a batch are
applied and which parked. The pipeline asks them; the statements are in `dlq.parking`.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from eventhandler.batch import Decoded, DecodedBatch, Record, Rejected
from eventhandler.dlq import DeadLetterWriter
from eventhandler.events import Event
from eventhandler.models import DLQEntry, FailedMessage, Status

PARKED_MESSAGE = "parked: an earlier event of its key has an open failure (see blocked_by)"
RELEASE_KEYS = 100  # keys released per batch at most (the next batch goes on)
RELEASE_ROWS = 1000  # parked rows released per batch at most
RELEASE_EVERY_SECONDS = 1.0  # an idle worker looks for keys to release this often
# A key's digest is asked for several times a batch and a key recurs across batches: short keys' digests
# are cached (benchmarks/README.md has the figure), so the cache holds at most ~4 MB.
DIGEST_CACHE_KEYS = 16_384
DIGEST_CACHE_KEY_BYTES = 128


class Parked(Exception):
    """What a parked row says as its error (it did not fail: it waits)."""


@dataclass(frozen=True)
class OpenKey:
    """A key with open rows: the rows that block it (pending or replayed; none when only parked rows
    are left, until they are released) and the one new parked rows link to."""

    blockers: frozenset[int]
    blocked_by: int | None


class Parking:
    """Which topics park, by what key (`Settings.parking_keys()`: "" is the Kafka message key)."""

    def __init__(self, consumer_group: str, keys: Mapping[str, str]) -> None:
        self.consumer_group = consumer_group
        self.keys = dict(keys)
        self._cached_digest = functools.lru_cache(maxsize=DIGEST_CACHE_KEYS)(self._digest)

    def _digest(self, topic: str, raw: bytes) -> uuid.UUID:
        return digest(self.consumer_group, topic, raw)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def key_of(self, record: Record, event: Event | None) -> uuid.UUID | None:
        """The digest of the message's key, or None when its topic does not park or it has no key
        (an attribute key needs the event: a message that cannot be read has none)."""
        by = self.keys.get(record.topic)
        if by is None:
            return None
        if by == "":
            raw = record.key
        elif event is None:
            return None
        else:
            text = event.subject if by == "subject" else event.partitionkey
            raw = None if text is None else text.encode("utf-8", "surrogatepass")
        if not raw:
            return None
        if len(raw) <= DIGEST_CACHE_KEY_BYTES:
            return self._cached_digest(record.topic, raw)
        return self._digest(record.topic, raw)

    def split(
        self, events: Sequence[Decoded], open_keys: Mapping[uuid.UUID, OpenKey]
    ) -> tuple[list[Decoded], list[Decoded]]:
        """The events to apply and those to park, each in batch order: an event of an open key is
        parked, unless it is the replayed copy of one of the key's blockers (its own replay)."""
        if not open_keys:  # the common case: no key of the batch is blocked
            return list(events), []
        applied: list[Decoded] = []
        parked: list[Decoded] = []
        for decoded in events:
            key = self.key_of(decoded.record, decoded.event)
            state = open_keys.get(key) if key is not None else None
            own_replay = (
                decoded.replay_of is not None
                and state is not None
                and decoded.replay_of.dlq_id in state.blockers
            )
            if state is None or own_replay:
                applied.append(decoded)
            else:
                parked.append(decoded)
        return applied, parked

    def after_failures(self, applied: Sequence[Decoded], rejected: Sequence[Rejected]) -> list[Decoded]:
        """Applied events that come after a failure of their key in the same batch: they must be
        parked instead (the batch is then written again without them)."""
        first_failure: dict[uuid.UUID, tuple[int, int]] = {}
        for rejection in rejected:
            key = self.key_of(rejection.record, rejection.event)
            if key is not None:
                position = _position(rejection.record)
                first_failure[key] = min(position, first_failure.get(key, position))
        if not first_failure:
            return []
        late = []
        for decoded in applied:
            key = self.key_of(decoded.record, decoded.event)
            if key is not None and key in first_failure and _position(decoded.record) > first_failure[key]:
                late.append(decoded)
        return late


def _position(record: Record) -> tuple[int, int]:
    """Order within a key: a key's messages are in one partition when keyed by the message key; by an
    attribute they may span partitions, whose relative order Kafka does not define."""
    return (record.partition, record.offset)


def digest(consumer_group: str, topic: str, key: bytes) -> uuid.UUID:
    """A key's identity in `dlq.park_key` (MD5 as a 128-bit digest, not for secrecy)."""
    text = consumer_group.encode("utf-8", "surrogatepass") + b"\x00" + topic.encode() + b"\x00" + key
    return uuid.UUID(bytes=hashlib.md5(text, usedforsecurity=False).digest())


class ParkingStore(Protocol):
    """Parking's statements, in the batch's transaction (`dlq.parking.PostgresParkingStore`)."""

    def anything_open(self, conn: psycopg.Connection[Any], consumer: str) -> bool: ...
    def open_keys(
        self, conn: psycopg.Connection[Any], consumer: str, keys: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, OpenKey]: ...
    def set_state(
        self,
        conn: psycopg.Connection[Any],
        states: Sequence[tuple[int, uuid.UUID, Status | None, int | None]],
    ) -> None: ...
    def release_lock(self, conn: psycopg.Connection[Any], consumer: str) -> bool: ...
    def freed_keys(self, conn: psycopg.Connection[Any], consumer: str, *, limit: int) -> list[uuid.UUID]: ...
    def parked_rows(
        self, conn: psycopg.Connection[Any], consumer: str, keys: Sequence[uuid.UUID], *, limit: int
    ) -> list[tuple[DLQEntry, uuid.UUID]]: ...
    def mark_released(self, conn: psycopg.Connection[Any], ids: Sequence[int]) -> list[int]: ...
    def reblock(
        self, conn: psycopg.Connection[Any], consumer: str, blockers: dict[uuid.UUID, int]
    ) -> None: ...


Applied = tuple[list[Decoded], list[Decoded], list[Decoded], list[Rejected], list[Decoded]]


class Writer(Protocol):
    """What parking needs of the batch processor (`pipeline.BatchProcessor`)."""

    consumer_group: str
    dlq: DeadLetterWriter

    def decode(self, records: list[Record]) -> DecodedBatch: ...
    def apply_in_order(
        self,
        conn: psycopg.Connection[Any],
        events: list[Decoded],
        isolate_suspects: bool,
        failed_before: Sequence[Rejected] = (),
    ) -> Applied: ...
    def parked_failure(self, decoded: Decoded) -> FailedMessage: ...


class ParkingStep:
    """Parking inside a batch's transaction: which keys are open, the rows this batch parks, and the
    release of keys whose blocker is closed."""

    def __init__(self, rules: Parking, store: ParkingStore) -> None:
        self.rules = rules
        self.store = store

    def open_keys(self, conn: psycopg.Connection[Any], batch: DecodedBatch) -> dict[uuid.UUID, OpenKey]:
        key_of = self.rules.key_of
        keys = {key_of(d.record, d.event) for d in batch.events}
        keys |= {key_of(r.record, r.event) for r in batch.rejected}
        keys.discard(None)
        return self.store.open_keys(conn, self.rules.consumer_group, [k for k in keys if k is not None])

    def park(
        self,
        conn: psycopg.Connection[Any],
        writer: Writer,
        rejected: Sequence[Rejected],
        dlq_ids: Sequence[int],
        parked: Sequence[Decoded],
        open_keys: Mapping[uuid.UUID, OpenKey],
    ) -> list[int]:
        """Mark this batch's rows of parking topics: a failure of a key that was not open blocks it
        (a failure of one that was is parked behind it), and `parked` become parked rows. Returns
        the ids of the parked rows."""
        key_of = self.rules.key_of
        blockers = {key: state.blocked_by for key, state in open_keys.items() if state.blocked_by is not None}
        states: list[tuple[int, uuid.UUID, Status | None, int | None]] = []
        failures = sorted(zip(rejected, dlq_ids, strict=True), key=lambda pair: _position(pair[0].record))
        for rejection, dlq_id in failures:
            key = key_of(rejection.record, rejection.event)
            if key is None or dlq_id < 0:  # -1: a replayed copy whose row is gone
                continue
            state = open_keys.get(key)
            origin = rejection.failure.replay_of
            if origin is not None and state is not None and origin.dlq_id in state.blockers:
                states.append((dlq_id, key, None, None))  # a blocker's own replay failed again
            elif state is not None or key in blockers:  # behind an open failure, or one of this batch
                states.append((dlq_id, key, "parked", blockers.get(key)))
            else:
                states.append((dlq_id, key, None, None))  # the first failure of its key: it blocks it
                blockers[key] = dlq_id
        ids = writer.dlq.record_failures(conn, [writer.parked_failure(d) for d in parked]) if parked else []
        for decoded, dlq_id in zip(parked, ids, strict=True):
            key = key_of(decoded.record, decoded.event)
            if key is not None:
                states.append((dlq_id, key, "parked", blockers.get(key)))
        self.store.set_state(conn, states)
        return ids

    def release(self, conn: psycopg.Connection[Any], writer: Writer, isolate_suspects: bool) -> list[int]:
        """Apply the parked rows of keys nothing blocks any more, in order; returns those that took
        effect. One that fails blocks its key again, and the rows behind it stay parked."""
        store, group = self.store, self.rules.consumer_group
        if not store.release_lock(conn, group):
            return []  # another worker of the group is releasing: its turn
        keys = store.freed_keys(conn, group, limit=RELEASE_KEYS)
        taken = store.parked_rows(conn, group, keys, limit=RELEASE_ROWS)
        if not taken:
            return []
        rows = {(e.source_topic, e.source_partition, e.source_offset): (e.dlq_id, key) for e, key in taken}
        batch = writer.decode([_record(entry) for entry, _ in taken])
        applied, known, repeats, rejected, _late = writer.apply_in_order(
            conn, batch.events, isolate_suspects, failed_before=batch.rejected
        )
        failures = sorted([*batch.rejected, *rejected], key=lambda r: _position(r.record))
        failed_ids = writer.dlq.record_failures(conn, [r.failure for r in failures])
        blockers: dict[uuid.UUID, int] = {}
        states: list[tuple[int, uuid.UUID, Status | None, int | None]] = []
        for rejection, dlq_id in zip(failures, failed_ids, strict=True):
            _, key = rows[(rejection.record.topic, rejection.record.partition, rejection.record.offset)]
            if key in blockers:  # a later failure of a key that blocks again: it stays parked
                states.append((dlq_id, key, "parked", blockers[key]))
            else:
                states.append((dlq_id, key, "pending", None))
                blockers[key] = dlq_id
        store.set_state(conn, states)
        store.reblock(conn, group, blockers)
        took_effect = [
            rows[(d.record.topic, d.record.partition, d.record.offset)][0]
            for d in (*applied, *known, *repeats)
        ]
        return store.mark_released(conn, took_effect)


def _record(entry: DLQEntry) -> Record:
    """A parked row as the message it was."""
    timestamp = entry.message_timestamp
    return Record(
        entry.source_topic,
        entry.source_partition,
        entry.source_offset,
        entry.message_key,
        entry.event_payload,
        list(entry.headers) or None,
        None if timestamp is None else int(timestamp.timestamp() * 1000),
    )
