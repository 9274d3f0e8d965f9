"""The project's poison corpus: every kind of message that cannot become an event, or that a
handler or PostgreSQL rejects, each with the stage and the error it must get."""

from __future__ import annotations

import json
from typing import Any

from tests.support import kafka as k

Headers = list[tuple[str, bytes | None]]


def _envelope(**overrides: Any) -> bytes:
    event = k.reading("dev-1")
    event.update(overrides)
    return json.dumps({key: value for key, value in event.items() if value is not ...}).encode()


def _binary_headers(**overrides: bytes | None) -> Headers:
    headers: dict[str, bytes | None] = {
        "ce_specversion": b"1.0",
        "ce_id": b"bin-1",
        "ce_source": b"/tests",
        "ce_type": b"device.reading",
        "content-type": b"application/json",
    }
    headers.update(overrides)
    return [(key, value) for key, value in headers.items() if value != b"<drop>"]


READING_DATA = json.dumps({"device_id": "dev-1", "metric": "t", "value": 1}).encode()
NESTED = (
    b'{"specversion":"1.0","id":"n","source":"/s","type":"device.reading","data":'
    + b"[" * 5000
    + b"]" * 5000
    + b"}"
)

# (name, value, headers, expected stage, expected error fragment)
POISON: list[tuple[str, bytes | None, Headers, str, str]] = [
    ("not_json", b"hello world", [], "deserialize", "not valid JSON"),
    ("not_utf8", b"\xff\xfe\xfd\x00garbage", [], "deserialize", "not valid UTF-8"),
    ("nul_bytes", b"\x00\x00\x00\x00", [], "deserialize", "not valid JSON"),
    ("empty_value", b"", [], "deserialize", "empty"),
    ("tombstone", None, [], "deserialize", "tombstone"),
    ("json_array", b"[1, 2, 3]", [], "deserialize", "JSON array"),
    ("json_string", b'"just a string"', [], "deserialize", "JSON string"),
    ("json_null", b"null", [], "deserialize", "JSON null"),
    ("truncated_json", b'{"specversion": "1.0", "id": "x"', [], "deserialize", "not valid JSON"),
    ("missing_id", _envelope(id=...), [], "deserialize", "id: Field required"),
    ("missing_type", _envelope(type=...), [], "deserialize", "type: Field required"),
    ("missing_specversion", _envelope(specversion=...), [], "deserialize", "specversion: Field required"),
    ("wrong_specversion", _envelope(specversion="0.3"), [], "deserialize", "specversion"),
    ("empty_id", _envelope(id=""), [], "deserialize", "id: String should have at least 1 character"),
    ("bad_time", _envelope(time="yesterday"), [], "deserialize", "time"),
    (
        "data_fails_model",
        _envelope(data={"device_id": "dev-1", "value": 3}),
        [],
        "deserialize",
        "data.metric: Field required",
    ),
    (
        "wrong_types",
        _envelope(data={"device_id": "dev-1", "metric": "t", "value": "warm"}),
        [],
        "deserialize",
        "data.value",
    ),
    (
        "huge_number",
        _envelope(data=None).replace(
            b'"data": null', b'"data": {"device_id": "dev-1", "metric": "t", "value": 1e400}'
        ),
        [],
        "deserialize",
        "data.value",
    ),
    (
        "device_id_too_long",
        _envelope(data={"device_id": "x" * 65, "metric": "t", "value": 1}),
        [],
        "deserialize",
        "data.device_id",
    ),
    ("deep_nesting", NESTED, [], "deserialize", ""),
    ("bad_base64", _envelope(data=..., data_base64="!!!not base64"), [], "deserialize", "base64"),
    (
        "binary_missing_id",
        READING_DATA,
        _binary_headers(ce_id=b"<drop>"),
        "deserialize",
        "ce.id: Field required",
    ),
    (
        "binary_header_not_utf8",
        READING_DATA,
        _binary_headers(ce_source=b"\xff\xfe"),
        "deserialize",
        "not valid UTF-8",
    ),
    ("binary_header_null", READING_DATA, _binary_headers(ce_type=None), "deserialize", "has no value"),
    (
        "binary_xml",
        b"<reading/>",
        _binary_headers(**{"content-type": b"application/xml"}),
        "deserialize",
        "unsupported datacontenttype",
    ),
    ("binary_bad_data", b"{not json", _binary_headers(), "deserialize", "payload invalid"),
    ("one_mib", b'{"junk": "' + b"a" * (1024 * 1024) + b'"}', [], "deserialize", "specversion"),
    ("unknown_type", _envelope(type="device.exploded"), [], "handler", "no handler for event type"),
    ("unregistered_device", json.dumps(k.reading("ghost-device")).encode(), [], "handler", "not registered"),
    ("nul_in_name", json.dumps(k.registered("dev-nul", name="bad\u0000name")).encode(), [], "projection", ""),
]
