"""CloudEvents 1.0 deserialization: both Kafka bindings, events built by the official SDK, data_base64,
the replay header, and error messages that say what is wrong with bad input."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from pydantic import BaseModel, ConfigDict

from eventhandler.errors import DeserializationError, UnknownEventType
from eventhandler.events import (
    DLQ_ID_HEADER,
    ORIGIN_HEADER,
    Deserializer,
    header_value,
    origin_header,
    replay_origin,
)
from eventhandler.example.devices import DeviceProjection, DeviceReading, DeviceRegistered
from eventhandler.models import ReplayOrigin

Headers = list[tuple[str, bytes | None]]

deserialize = Deserializer(DeviceProjection.payload_models)

READING = {"device_id": "dev-1", "metric": "temperature", "value": 21.5, "unit": "C"}
WHEN = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)


def envelope(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/sensors/lab",
        "type": "device.reading",
        "time": "2026-03-04T05:06:07.89Z",
        "datacontenttype": "application/json",
        "data": READING,
    }
    event.update(overrides)
    return {k: v for k, v in event.items() if v is not ...}


def structured(**overrides: Any) -> bytes:
    return json.dumps(envelope(**overrides)).encode()


def binary_headers(**overrides: bytes | None) -> Headers:
    headers: dict[str, bytes | None] = {
        "ce_specversion": b"1.0",
        "ce_id": b"evt-2",
        "ce_source": b"/sensors/lab",
        "ce_type": b"device.reading",
        "ce_time": b"2026-03-04T05:06:07.89Z",
        "content-type": b"application/json",
    }
    headers.update(overrides)
    return [(k, v) for k, v in headers.items() if v != b"<drop>"]


def error_of(value: bytes | None, headers: Headers | None = None) -> str:
    with pytest.raises(DeserializationError) as info:
        deserialize(value, headers)
    return str(info.value)


# -- structured mode -------------------------------------------------------------------------------


def test_structured_event_becomes_a_typed_event_with_its_attributes() -> None:
    event = deserialize(structured(subject="room-4"), [("content-type", b"application/cloudevents+json")])

    assert (event.id, event.source, event.type, event.subject) == (
        "evt-1",
        "/sensors/lab",
        "device.reading",
        "room-4",
    )
    assert event.time == WHEN
    assert isinstance(event.data, DeviceReading)
    assert event.data == DeviceReading(**READING)


def test_structured_event_without_headers_and_optional_attributes_is_read() -> None:
    event = deserialize(structured(time=..., datacontenttype=...), None)
    assert event.time is None
    assert event.data == DeviceReading(**READING)


def test_extension_attributes_are_allowed() -> None:
    event = deserialize(structured(partitionkey="dev-1", traceparent="00-abc-def-01"), [])
    assert event.id == "evt-1"


def test_the_payload_model_is_chosen_by_type() -> None:
    event = deserialize(structured(type="device.registered", data={"device_id": "d", "name": "D"}), [])
    assert event.data == DeviceRegistered(device_id="d", name="D", site=None)


# -- binary mode -------------------------------------------------------------------------------------


def test_binary_event_reads_attributes_from_ce_headers_and_data_from_the_value() -> None:
    event = deserialize(json.dumps(READING).encode(), binary_headers(ce_subject=b"room-4"))

    assert (event.id, event.source, event.type, event.subject) == (
        "evt-2",
        "/sensors/lab",
        "device.reading",
        "room-4",
    )
    assert event.time == WHEN
    assert event.data == DeviceReading(**READING)


def test_binary_event_without_content_type_is_taken_as_json() -> None:
    headers = binary_headers(**{"content-type": b"<drop>"})
    assert deserialize(json.dumps(READING).encode(), headers).data == DeviceReading(**READING)


def test_binary_event_with_a_json_content_type_and_parameters_is_read() -> None:
    headers = binary_headers(**{"content-type": b"application/json; charset=utf-8"})
    assert deserialize(json.dumps(READING).encode(), headers).data == DeviceReading(**READING)


def test_binary_event_ignores_headers_that_are_not_cloudevents_attributes() -> None:
    headers = [*binary_headers(), ("traceparent", b"\xff\xfe not utf-8"), (DLQ_ID_HEADER, b"7")]
    assert deserialize(json.dumps(READING).encode(), headers).id == "evt-2"


# -- the official cloudevents SDK ------------------------------------------------------------------------


def sdk_event(data: Any, **attributes: Any) -> CloudEvent:
    return CloudEvent(
        attributes={
            "type": "device.reading",
            "source": "/sdk",
            "id": "sdk-1",
            "datacontenttype": "application/json",
            **attributes,
        },
        data=data,
    )


def as_headers(message: ce_kafka.KafkaMessage) -> Headers:
    return list(message.headers.items())


def test_sdk_binary_event_is_read() -> None:
    message = ce_kafka.to_binary_event(sdk_event(READING, time=WHEN, subject="room-4"))
    assert "ce_specversion" in message.headers  # the SDK really used the binary binding

    event = deserialize(message.value, as_headers(message))

    assert (event.id, event.source, event.type, event.subject, event.time) == (
        "sdk-1",
        "/sdk",
        "device.reading",
        "room-4",
        WHEN,
    )
    assert event.data == DeviceReading(**READING)


def test_sdk_structured_event_is_read() -> None:
    message = ce_kafka.to_structured_event(sdk_event(READING, time=WHEN))
    assert message.headers["content-type"].startswith(b"application/cloudevents+json")

    event = deserialize(message.value, as_headers(message))

    assert (event.id, event.source, event.type, event.time) == ("sdk-1", "/sdk", "device.reading", WHEN)
    assert event.data == DeviceReading(**READING)


def test_sdk_default_attributes_are_read() -> None:
    """The SDK fills `specversion`, a uuid `id` and the current `time` itself."""
    sdk = CloudEvent(attributes={"type": "device.reading", "source": "/sdk"}, data=READING)
    for message in (ce_kafka.to_binary_event(sdk), ce_kafka.to_structured_event(sdk)):
        event = deserialize(message.value, as_headers(message))
        assert event.id == sdk.get_id()
        assert event.time == sdk.get_time()


def test_sdk_structured_event_with_bytes_data_uses_data_base64_and_is_read() -> None:
    message = ce_kafka.to_structured_event(sdk_event(json.dumps(READING).encode()))
    assert "data_base64" in json.loads(message.value)

    assert deserialize(message.value, as_headers(message)).data == DeviceReading(**READING)


def test_sdk_event_with_a_partition_key_extension_is_read() -> None:
    message = ce_kafka.to_binary_event(sdk_event(READING, partitionkey="dev-1"))
    assert message.key == "dev-1"
    assert deserialize(message.value, as_headers(message)).data == DeviceReading(**READING)


def test_sdk_event_with_a_bad_payload_is_a_deserialization_error() -> None:
    message = ce_kafka.to_binary_event(sdk_event({"device_id": "dev-1", "metric": "t", "value": "warm"}))
    assert "data.value" in error_of(message.value, as_headers(message))


# -- data_base64 ---------------------------------------------------------------------------------------


def test_data_base64_is_decoded_and_validated_by_the_type_model() -> None:
    encoded = base64.b64encode(json.dumps(READING).encode()).decode()
    event = deserialize(structured(data=..., data_base64=encoded), [])
    assert event.data == DeviceReading(**READING)


def test_data_base64_that_is_not_base64_says_so() -> None:
    message = error_of(structured(data=..., data_base64="!!! not base64 !!!"))
    assert message == "data_base64 is not valid base64"


def test_data_base64_whose_content_fails_the_model_names_the_type_and_field() -> None:
    encoded = base64.b64encode(b'{"device_id": "dev-1", "metric": "t"}').decode()
    message = error_of(structured(data=..., data_base64=encoded))
    assert message.startswith("device.reading payload invalid: ")
    assert "data.value: Field required" in message


def test_an_envelope_with_both_data_and_data_base64_is_rejected() -> None:
    """CloudEvents JSON format: when `data_base64` is present, `data` MUST NOT be."""
    other = base64.b64encode(json.dumps(READING | {"value": 99}).encode()).decode()
    message = error_of(structured(data_base64=other))
    assert "data" in message
    assert "data_base64" in message


# -- bad input: one clear message each ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, "message value is null (a tombstone), not a CloudEvent", id="tombstone"),
        pytest.param(b"", "message value is empty, not a CloudEvent", id="empty"),
        pytest.param(b"\xff\xfe\x00garbage", "message value is not valid UTF-8", id="not-utf8"),
        pytest.param(b"[1, 2]", "message value is JSON array, not a CloudEvent object", id="array"),
        pytest.param(b'"text"', "message value is JSON string, not a CloudEvent object", id="string"),
        pytest.param(b"42", "message value is JSON number, not a CloudEvent object", id="number"),
        pytest.param(b"null", "message value is JSON null, not a CloudEvent object", id="null"),
        pytest.param(b"true", "message value is JSON boolean, not a CloudEvent object", id="boolean"),
    ],
)
def test_values_that_are_not_an_envelope_say_what_they_are(value: bytes | None, expected: str) -> None:
    assert error_of(value) == expected


@pytest.mark.parametrize("value", [b"hello world", b'{"specversion": "1.0", "id": "x"', b"\x00\x00"])
def test_invalid_json_says_it_is_not_valid_json(value: bytes) -> None:
    assert error_of(value).startswith("message value is not valid JSON: ")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"id": ...}, "id: Field required", id="missing-id"),
        pytest.param({"type": ...}, "type: Field required", id="missing-type"),
        pytest.param({"source": ...}, "source: Field required", id="missing-source"),
        pytest.param({"specversion": ...}, "specversion: Field required", id="missing-specversion"),
        pytest.param({"specversion": "0.3"}, "specversion: Input should be '1.0'", id="old-specversion"),
        pytest.param({"id": ""}, "id: String should have at least 1 character", id="empty-id"),
        pytest.param({"id": 17}, "id: Input should be a valid string", id="numeric-id"),
        pytest.param({"time": "yesterday"}, "time: Input should be a valid datetime", id="bad-time"),
    ],
)
def test_invalid_envelopes_name_the_attribute_and_the_problem(
    overrides: dict[str, Any], expected: str
) -> None:
    message = error_of(structured(**overrides))
    assert message.startswith("not a CloudEvent: ")
    assert expected in message


def test_several_envelope_problems_are_all_named() -> None:
    message = error_of(structured(id=..., source=..., type=...))
    for attribute in ("id", "source", "type"):
        assert f"{attribute}: Field required" in message


def test_many_envelope_problems_are_summarised_not_listed_in_full() -> None:
    message = error_of(b"{}")
    assert "and 1 more error(s)" in message  # specversion, id, source, type: three named, one counted
    assert len(message) < 200


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param({"device_id": "dev-1", "value": 3}, "data.metric: Field required", id="missing-field"),
        pytest.param(
            {"device_id": "dev-1", "metric": "t", "value": "warm"},
            "data.value: Input should be a valid number",
            id="wrong-type",
        ),
        pytest.param(
            {"device_id": "x" * 65, "metric": "t", "value": 1},
            "data.device_id: String should have at most 64 characters",
            id="too-long",
        ),
        pytest.param(None, "data: Input should be a valid dictionary", id="null-data"),
        pytest.param([1, 2], "data: Input should be a valid dictionary", id="array-data"),
    ],
)
def test_payloads_that_fail_their_model_name_the_type_and_the_field(data: Any, expected: str) -> None:
    message = error_of(structured(data=data))
    assert message.startswith("device.reading payload invalid: ")
    assert expected in message


def test_a_number_too_large_for_a_float_is_rejected() -> None:
    value = structured().replace(b'"value": 21.5', b'"value": 1e400')
    assert "data.value" in error_of(value)


def test_an_unknown_type_is_its_own_error_naming_the_type() -> None:
    with pytest.raises(UnknownEventType, match=r"no handler for event type 'device\.exploded'"):
        deserialize(structured(type="device.exploded"), [])


def test_a_time_without_utc_offset_is_not_accepted_as_a_naive_datetime() -> None:
    """RFC 3339 (which CloudEvents `time` follows) requires an offset. A naive datetime cannot be
    compared with the aware ones of other events, so it must be rejected or read as aware."""
    value = structured(time="2026-03-04T05:06:07")
    try:
        event = deserialize(value, [])
    except DeserializationError:
        assert "time" in error_of(value)
        return
    assert event.time is not None
    assert event.time.tzinfo is not None


@pytest.mark.parametrize(
    ("headers", "value", "expected"),
    [
        pytest.param(
            binary_headers(ce_id=b"<drop>"),
            json.dumps(READING).encode(),
            "binary-mode headers: ce.id: Field required",
            id="missing-id",
        ),
        pytest.param(
            binary_headers(ce_specversion=b"0.3"),
            json.dumps(READING).encode(),
            "binary-mode headers: ce.specversion: Input should be '1.0'",
            id="old-specversion",
        ),
        pytest.param(
            binary_headers(ce_source=b"\xff\xfe"),
            json.dumps(READING).encode(),
            "header 'ce_source' is not valid UTF-8",
            id="header-not-utf8",
        ),
        pytest.param(
            binary_headers(ce_type=None),
            json.dumps(READING).encode(),
            "header 'ce_type' has no value",
            id="header-null",
        ),
        pytest.param(
            binary_headers(**{"content-type": b"application/xml"}),
            b"<reading/>",
            "unsupported datacontenttype 'application/xml'; expected JSON",
            id="xml",
        ),
        pytest.param(
            binary_headers(), b"", "binary-mode event has an empty value; data must be JSON", id="empty"
        ),
    ],
)
def test_bad_binary_mode_events_say_what_is_wrong(headers: Headers, value: bytes, expected: str) -> None:
    assert error_of(value, headers) == expected


def test_binary_mode_data_that_is_not_json_is_a_payload_error() -> None:
    message = error_of(b"{not json", binary_headers())
    assert message.startswith("device.reading payload invalid: ")
    assert "JSON" in message


def test_errors_do_not_chain_the_pydantic_exception() -> None:
    """The DLQ row and the log line carry our message; a chained ValidationError would only repeat it."""
    with pytest.raises(DeserializationError) as info:
        deserialize(structured(data={"device_id": "d"}), [])
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_the_deserializer_uses_the_models_it_is_given() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int

    only_strict = Deserializer({"counter.bumped": Strict})
    assert only_strict(structured(type="counter.bumped", data={"n": 3}), []).data == Strict(n=3)
    with pytest.raises(UnknownEventType):
        only_strict(structured(), [])
    assert "data.extra" in error_of_with(
        only_strict, structured(type="counter.bumped", data={"n": 1, "extra": 2})
    )


def error_of_with(deserializer: Deserializer, value: bytes) -> str:
    with pytest.raises(DeserializationError) as info:
        deserializer(value, [])
    return str(info.value)


# -- the replay header --------------------------------------------------------------------------------


ORIGIN = (ORIGIN_HEADER, b"device-events:3:1041")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [(DLQ_ID_HEADER, b"42"), ORIGIN], ReplayOrigin(42, "device-events", 3, 1041), id="plain"
        ),
        pytest.param(
            [("other", b"1"), (DLQ_ID_HEADER, b"9007199254740993"), ORIGIN],
            ReplayOrigin(9007199254740993, "device-events", 3, 1041),
            id="big",
        ),
        pytest.param(
            [(DLQ_ID_HEADER, b"3"), ORIGIN, (DLQ_ID_HEADER, b"5")],
            ReplayOrigin(5, "device-events", 3, 1041),
            id="last-wins",
        ),
        pytest.param(
            [(DLQ_ID_HEADER, b"7"), (ORIGIN_HEADER, b"a.b-c_d:0:0")],
            ReplayOrigin(7, "a.b-c_d", 0, 0),
            id="topic-chars",
        ),
        pytest.param(None, None, id="no-headers"),
        pytest.param([], None, id="empty-headers"),
        pytest.param([("ce_id", b"42"), ORIGIN], None, id="no-dlq-id"),
        pytest.param([(DLQ_ID_HEADER, b"42")], None, id="no-origin: an older replay, or a forged id"),
        pytest.param([(DLQ_ID_HEADER, None), ORIGIN], None, id="null-value"),
        pytest.param([(DLQ_ID_HEADER, b""), ORIGIN], None, id="empty-value"),
        pytest.param([(DLQ_ID_HEADER, b"abc"), ORIGIN], None, id="not-a-number"),
        pytest.param([(DLQ_ID_HEADER, b"4.5"), ORIGIN], None, id="fraction"),
        pytest.param([(DLQ_ID_HEADER, b"-4"), ORIGIN], None, id="negative"),
        pytest.param([(DLQ_ID_HEADER, "٤٢".encode()), ORIGIN], None, id="not-ascii"),
        pytest.param([(DLQ_ID_HEADER, b"\xff"), ORIGIN], None, id="not-utf8"),
        pytest.param([(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b"topic:1")], None, id="origin-short"),
        pytest.param([(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b":1:2")], None, id="origin-no-topic"),
        pytest.param([(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b"t:x:2")], None, id="origin-bad-partition"),
        pytest.param([(DLQ_ID_HEADER, b"7"), (ORIGIN_HEADER, b"t\x00:0:0")], None, id="origin-topic-nul"),
        pytest.param([(DLQ_ID_HEADER, b"7"), (ORIGIN_HEADER, b"a b:0:0")], None, id="origin-topic-space"),
        pytest.param(
            [(DLQ_ID_HEADER, b"7"), (ORIGIN_HEADER, b"t" * 250 + b":0:0")], None, id="origin-topic-long"
        ),
        pytest.param([(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b"t:1:" + b"9" * 400)], None, id="origin-huge"),
        pytest.param([(DLQ_ID_HEADER, b"1" * 50), ORIGIN], None, id="dlq-id-huge"),
        pytest.param([(DLQ_ID_HEADER, b"99999999999999999999"), ORIGIN], None, id="dlq-id-beyond-int8"),
        pytest.param(
            [(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b"t:2147483648:0")], None, id="partition-beyond-int4"
        ),
        pytest.param(
            [(DLQ_ID_HEADER, b"1"), (ORIGIN_HEADER, b"t:0:9223372036854775808")],
            None,
            id="offset-beyond-int8",
        ),
        pytest.param(
            [(DLQ_ID_HEADER, b"9223372036854775807"), (ORIGIN_HEADER, b"t:2147483647:9223372036854775807")],
            ReplayOrigin(2**63 - 1, "t", 2**31 - 1, 2**63 - 1),
            id="largest",
        ),
    ],
)
def test_replay_origin_is_read_from_its_headers(
    headers: Headers | None, expected: ReplayOrigin | None
) -> None:
    assert replay_origin(headers) == expected


def test_the_origin_headers_a_replay_writes_are_read_back() -> None:
    assert replay_origin(origin_header(12, "device-events", 2, 99)) == ReplayOrigin(
        12, "device-events", 2, 99
    )


def test_header_value_returns_the_last_of_repeated_headers() -> None:
    assert header_value([("a", b"1"), ("b", b"2"), ("a", b"3")], "a") == b"3"
    assert header_value([("a", b"1")], "b") is None
    assert header_value(None, "a") is None
