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

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eventhandler.batch import Decoded, Record, Rejected
from eventhandler.events import Event

PARKED_ERROR_TYPE = "Parked"
PARKED_MESSAGE = "parked: an earlier event of its key has an open failure (see blocked_by)"


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
        return digest(self.consumer_group, record.topic, raw)

    def split(
        self, events: Sequence[Decoded], open_keys: Mapping[uuid.UUID, OpenKey]
    ) -> tuple[list[Decoded], list[Decoded]]:
        """The events to apply and those to park, each in batch order: an event of an open key is
        parked, unless it is the replayed copy of one of the key's blockers (its own replay)."""
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
