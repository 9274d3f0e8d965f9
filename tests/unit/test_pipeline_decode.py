"""Step one of a batch, without I/O: records become events or rejections, with the unknown-type policy
applied, replays recognised, and the batch's positions computed."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from eventhandler.batch import DecodedBatch, Record
from eventhandler.events import DLQ_ID_HEADER, origin_header
from eventhandler.example.devices import DeviceReading
from eventhandler.handlers.loading import load_registry
from eventhandler.ledger import Ledger
from eventhandler.models import ReplayOrigin
from eventhandler.pipeline import BatchProcessor
from eventhandler.policy import FailurePolicy
from eventhandler.tracebacks import format_traceback
from tests.fakes import FakeDeadLetterWriter

Headers = list[tuple[str, bytes | None]]
_offsets: dict[tuple[str, int], int] = {}


def record(
    value: bytes | None,
    headers: Headers | None = None,
    *,
    topic: str = "t",
    partition: int = 0,
    offset: int | None = None,
    timestamp_ms: int | None = None,
) -> Record:
    if offset is None:
        offset = _offsets.get((topic, partition), 0)
    _offsets[(topic, partition)] = offset + 1
    return Record(topic, partition, offset, b"key", value, headers, timestamp_ms)


def ce(event_type: str = "device.reading", data: Any = None, **attrs: Any) -> bytes:
    if data is None:
        data = {"device_id": "d", "metric": "t", "value": 1}
    event = {"specversion": "1.0", "id": "e-1", "source": "/s", "type": event_type, "data": data}
    return json.dumps(event | attrs).encode()


def processor(policy: str = "dead-letter") -> tuple[BatchProcessor, FakeDeadLetterWriter]:
    dlq = FakeDeadLetterWriter()
    return (
        BatchProcessor(
            consumer_group="group",
            registry=load_registry([]),
            ledger=Ledger("group"),
            dlq=dlq,
            policy=FailurePolicy(skip_unknown=policy == "skip"),
        ),
        dlq,
    )


def test_good_records_become_events_in_consumption_order() -> None:
    records = [record(ce(id=f"e-{i}", data={"device_id": "d", "metric": "t", "value": i})) for i in range(5)]
    batch = processor()[0].decode(records)

    assert batch.rejected == []
    assert batch.skipped == 0
    assert [d.event.id for d in batch.events] == [f"e-{i}" for i in range(5)]
    assert [d.record for d in batch.events] == records
    assert batch.events[3].event.data == DeviceReading(device_id="d", metric="t", value=3)
    assert batch.events[0].key == Ledger("group").key("/s", "e-0")
    assert len({d.key for d in batch.events}) == 5
    assert batch.events[0].replay_of is None


def test_bad_records_are_rejected_at_the_deserialize_stage_with_the_reason() -> None:
    bad = [record(b"not json"), record(None), record(b""), record(ce(data={"device_id": "d"}))]
    good = record(ce())
    batch = processor()[0].decode([bad[0], good, *bad[1:]])

    assert [d.record for d in batch.events] == [good]
    assert [r.record for r in batch.rejected] == bad
    for rejected in batch.rejected:
        assert rejected.stage == "deserialize"
        assert rejected.failure.error_type == "DeserializationError"
        assert rejected.failure.event_id is None
        assert rejected.key is None
        assert rejected.failure.error_message
        assert rejected.failure.traceback is None  # the message says it all


def test_a_bug_in_deserialization_is_the_messages_failure_not_the_workers() -> None:
    class Exploding(Exception):
        pass

    proc, _ = processor()

    def explode(value: bytes | None, headers: Headers | None) -> Any:
        raise Exploding("boom")

    proc._deserialize = explode  # type: ignore[assignment]
    batch = proc.decode([record(ce())])
    assert [(r.stage, r.failure.error_type, r.failure.error_message) for r in batch.rejected] == [
        ("deserialize", "Exploding", "boom")
    ]
    traceback = batch.rejected[0].failure.traceback
    assert traceback is not None
    assert "explode" in traceback  # a bug's traceback shows where it is
    assert traceback.endswith("Exploding: boom")


def test_unknown_types_are_dead_lettered_as_handler_failures_by_default() -> None:
    unknown = record(ce("order.created", {"id": 1}))
    batch = processor()[0].decode([unknown, record(ce())])

    assert len(batch.events) == 1
    assert batch.skipped == 0
    [rejected] = batch.rejected
    assert rejected.record is unknown
    assert rejected.stage == "handler"
    assert rejected.failure.error_type == "UnknownEventType"
    assert "order.created" in rejected.failure.error_message
    assert rejected.failure.event_type == "order.created"


def test_unknown_types_are_skipped_and_counted_under_the_skip_policy() -> None:
    records = [record(ce("order.created", {"id": 1})), record(ce()), record(ce("order.paid", {"id": 1}))]
    batch = processor("skip")[0].decode(records)

    assert batch.skipped == 2
    assert batch.rejected == []
    assert [d.record for d in batch.events] == [records[1]]
    assert batch.positions() == {("t", 0): records[-1].offset + 1}  # skipped records still move on


def test_the_skip_policy_still_dead_letters_bad_input() -> None:
    batch = processor("skip")[0].decode([record(b"{oops"), record(ce(data={"device_id": 5}))])
    assert [r.stage for r in batch.rejected] == ["deserialize", "deserialize"]
    assert batch.skipped == 0


def test_a_replayed_record_carries_the_origin_of_its_row() -> None:
    replayed = record(ce(), origin_header(17, "device-events", 1, 5))
    forged = record(ce(id="e-3"), [(DLQ_ID_HEADER, b"18")])  # an id without the original coordinates
    plain = record(ce(id="e-2"), [("other", b"x")])
    batch = processor()[0].decode([replayed, forged, plain])
    assert [d.replay_of for d in batch.events] == [ReplayOrigin(17, "device-events", 1, 5), None, None]


def test_binary_mode_records_are_decoded_too() -> None:
    headers: Headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"bin-1"),
        ("ce_source", b"/s"),
        ("ce_type", b"device.reading"),
        *origin_header(3, "t", 0, 8),
    ]
    batch = processor()[0].decode([record(b'{"device_id": "d", "metric": "t", "value": 2}', headers)])
    assert [(d.event.id, d.replay_of) for d in batch.events] == [("bin-1", ReplayOrigin(3, "t", 0, 8))]


def test_decode_writes_nothing_to_the_dlq() -> None:
    """Rejections are only written by `commit`, in the batch's transaction."""
    proc, dlq = processor()
    batch = proc.decode([record(b"bad"), record(ce()), record(ce("x.y", {}))])
    assert len(batch.rejected) == 2
    assert dlq.failures == []
    assert dlq.resolved == []


# -- positions and revoked partitions ---------------------------------------------------------------------


def test_positions_are_the_next_offset_of_each_partition_whatever_the_outcome() -> None:
    records = [
        record(ce(), topic="a", partition=0, offset=10),
        record(b"bad", topic="a", partition=0, offset=11),
        record(ce(), topic="a", partition=1, offset=3),
        record(ce("x.y", {}), topic="b", partition=0, offset=99),
        record(ce(), topic="a", partition=0, offset=7),  # an older offset never moves a position back
    ]
    batch = processor()[0].decode(records)
    assert batch.positions() == {("a", 0): 12, ("a", 1): 4, ("b", 0): 100}


def test_without_partitions_drops_every_part_of_a_revoked_partition() -> None:
    records = [
        record(ce(), partition=0, offset=0),
        record(b"bad", partition=0, offset=1),
        record(ce(), partition=1, offset=0),
        record(b"bad", partition=1, offset=1),
    ]
    batch = processor()[0].decode(records)
    kept = batch.without_partitions({("t", 0)})

    assert kept.records == records[2:]
    assert [d.record for d in kept.events] == [records[2]]
    assert [r.record for r in kept.rejected] == [records[3]]
    assert kept.positions() == {("t", 1): 2}
    assert batch.positions() == {("t", 0): 2, ("t", 1): 2}  # the original is unchanged


def test_an_empty_batch_has_no_positions() -> None:
    assert DecodedBatch([]).positions() == {}


@pytest.mark.parametrize(
    ("timestamp_ms", "expected"),
    [
        (1_767_225_600_000, datetime(2026, 1, 1, tzinfo=UTC)),
        (None, None),
        (-1, None),  # librdkafka's "no timestamp"
    ],
)
def test_record_timestamp(timestamp_ms: int | None, expected: datetime | None) -> None:
    assert record(b"", timestamp_ms=timestamp_ms).timestamp == expected


def test_the_dlq_row_of_bad_input_names_the_event_type_when_the_message_has_one() -> None:
    cases = {
        b"{not json": None,
        b"\xff\xfe": None,
        b"[1, 2]": None,
        ce(data={"device_id": "d"}): "device.reading",  # a known type whose payload is invalid
        json.dumps(
            {"specversion": "1.0", "source": "/s", "type": "device.reading"}
        ).encode(): "device.reading",
        json.dumps({"specversion": "0.3", "id": "x", "source": "/s", "type": 7}).encode(): None,
    }
    binary = [
        ("ce_specversion", b"1.0"),
        ("ce_type", b"device.reading"),
        ("ce_id", b"1"),
        ("ce_source", b"/s"),
    ]
    batch = processor()[0].decode(
        [record(value) for value in cases]
        + [record(None, binary), record(b"\xff not json", [("ce_type", b"device.reading")])]
    )
    assert [r.failure.event_type for r in batch.rejected] == [
        *cases.values(),
        "device.reading",
        "device.reading",
    ]
    assert [r.stage for r in batch.rejected] == ["deserialize"] * (len(cases) + 2)
    assert "not valid JSON" in batch.rejected[0].failure.error_message
    assert "not valid UTF-8" in batch.rejected[1].failure.error_message


def test_a_kafka_timestamp_beyond_the_year_9999_still_gets_its_dlq_row() -> None:
    far = 2**62  # producers may set any 64-bit CreateTime
    bad, good = record(b"{oops", timestamp_ms=far), record(ce(), timestamp_ms=far)
    batch = processor()[0].decode([bad, good])
    [rejected] = batch.rejected
    assert rejected.record is bad
    assert rejected.failure.timestamp is None
    assert [d.record for d in batch.events] == [good]
    assert record(b"x", timestamp_ms=1_700_000_000_000).timestamp == datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=UTC
    )


def test_a_traceback_names_its_own_file_even_when_another_is_alike() -> None:
    source = "def fail():\n    raise ValueError('boom')\n"
    texts = []
    for filename in ("a_module.py", "b_module.py"):  # same code, same line, another file
        namespace: dict[str, Any] = {}
        exec(compile(source, filename, "exec"), namespace)
        try:
            namespace["fail"]()
        except ValueError as exc:
            texts.append(format_traceback(exc))
    assert 'File "a_module.py", line 2, in fail' in texts[0]
    assert 'File "b_module.py", line 2, in fail' in texts[1]
    assert texts[1].endswith("ValueError: boom")
