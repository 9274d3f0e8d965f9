"""Per-key parking's rules, without I/O: a message's key, and which events of a batch are parked."""

from __future__ import annotations

import uuid

from pydantic import BaseModel

from eventhandler.batch import Decoded, Record, Rejected
from eventhandler.events import Event
from eventhandler.models import FailedMessage, ReplayOrigin
from eventhandler.parking import OpenKey, Parking, digest

PARKING = Parking("group", {"orders": "", "devices": "subject", "meters": "partitionkey"})


class Data(BaseModel):
    n: int = 0


def event(subject: str | None = None, partitionkey: str | None = None) -> Event:
    return Event("id", "/s", "t", Data(), subject=subject, partitionkey=partitionkey)


def decoded(
    topic: str, offset: int, key: bytes | None, ev: Event | None = None, replay_of: int | None = None
) -> Decoded:
    record = Record(topic, 0, offset, key, b"{}", None)
    origin = None if replay_of is None else ReplayOrigin(replay_of, topic, 0, 1)
    return Decoded(record, ev or event(), origin, uuid.uuid4())


def rejected(item: Decoded) -> Rejected:
    failure = FailedMessage(
        consumer="group",
        topic=item.record.topic,
        partition=0,
        offset=item.record.offset,
        stage="handler",
        error_type="HandlerFailure",
        error_message="no",
        worker_version="v",
    )
    return Rejected(item.record, failure, item.key, item.event)


def test_the_key_is_the_message_key_or_the_attribute_the_topic_names() -> None:
    assert PARKING.key_of(Record("orders", 0, 1, b"o-1", b"", None), None) == digest(
        "group", "orders", b"o-1"
    )
    assert PARKING.key_of(Record("devices", 0, 1, b"ignored", b"", None), event(subject="d-1")) == digest(
        "group", "devices", b"d-1"
    )
    assert PARKING.key_of(Record("meters", 0, 1, None, b"", None), event(partitionkey="m")) == digest(
        "group", "meters", b"m"
    )


def test_no_key_no_parking() -> None:
    assert PARKING.key_of(Record("orders", 0, 1, None, b"", None), None) is None  # no message key
    assert PARKING.key_of(Record("orders", 0, 1, b"", b"", None), None) is None  # an empty one
    assert PARKING.key_of(Record("devices", 0, 1, b"k", b"", None), event()) is None  # no subject
    assert PARKING.key_of(Record("devices", 0, 1, b"k", b"", None), None) is None  # unreadable message
    assert PARKING.key_of(Record("other", 0, 1, b"k", b"", None), None) is None  # not a parking topic
    assert not Parking("group", {})


def test_keys_are_per_group_and_topic() -> None:
    assert digest("a", "orders", b"k") != digest("b", "orders", b"k")
    assert digest("a", "orders", b"k") != digest("a", "invoices", b"k")


def test_events_of_an_open_key_are_parked_in_order_and_other_keys_flow() -> None:
    first, other, second = (
        decoded("orders", 5, b"o-1"),
        decoded("orders", 6, b"o-2"),
        decoded("orders", 7, b"o-1"),
    )
    blocked = {digest("group", "orders", b"o-1"): OpenKey(frozenset({41}), 41)}
    applied, parked = PARKING.split([first, other, second], blocked)
    assert applied == [other]
    assert parked == [first, second]


def test_the_replayed_copy_of_a_blocker_is_applied_not_parked_behind_itself() -> None:
    own = decoded("orders", 9, b"o-1", replay_of=41)
    stranger = decoded("orders", 10, b"o-1", replay_of=77)  # a replay of some other row of the key
    blocked = {digest("group", "orders", b"o-1"): OpenKey(frozenset({41}), 41)}
    applied, parked = PARKING.split([own, stranger], blocked)
    assert applied == [own]
    assert parked == [stranger]


def test_events_applied_after_a_failure_of_their_key_in_the_same_batch_are_to_be_parked() -> None:
    before, failed, after, elsewhere = (
        decoded("orders", 1, b"o-1"),
        decoded("orders", 2, b"o-1"),
        decoded("orders", 3, b"o-1"),
        decoded("orders", 4, b"o-2"),
    )
    assert PARKING.after_failures([before, after, elsewhere], [rejected(failed)]) == [after]
    assert PARKING.after_failures([before, after], []) == []
