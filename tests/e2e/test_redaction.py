"""A field listed for redaction appears in no view, whatever path it took into a row: real worker, real
broker, real PostgreSQL; the admin API, the CLI and the worker's log lines."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from eventhandler.api import create_app
from eventhandler.app import build_service
from eventhandler.config import Settings
from eventhandler.logs import configure_logging
from eventhandler.metrics import Metrics
from tests.conftest import settings_env
from tests.support import kafka as k
from tests.support.cli import cli_json, run_cli
from tests.support.worker import run_until_idle, scalar

SECRET = "heatpump-9"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "reader-token-0123456789abcdef"
READER = {"Authorization": f"Bearer {READ_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DLQ = "/api/v1/events/dlq"


def leaks(text: str) -> bool:
    """The value, or its bytes in base64 at any alignment, is in `text`."""
    raw = SECRET.encode()
    encodings = {base64.b64encode(b"x" * shift + raw).decode()[4 if shift else 0 :][:8] for shift in range(3)}
    return SECRET in text or any(encoded in text for encoded in encodings)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        admin_token=ADMIN_TOKEN, admin_read_token=READ_TOKEN, api_redact_fields=["data.device_id"]
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    metrics = Metrics()
    service, pool = build_service(settings, metrics=metrics)
    with TestClient(create_app(service, settings, metrics), raise_server_exceptions=False) as client:
        yield client
    pool.close()


def seed(settings: Settings, kafka_bootstrap: str, topic: str) -> None:
    """The device id reaches rows by every path a probe found: key, header values, the binary binding's
    `ce_subject`, `data_base64`, JSON inside a string, and the error message that quotes it."""
    producer = k.TestProducer(kafka_bootstrap)
    structured = k.structured(k.reading(SECRET))
    producer.send(topic, structured, key=SECRET, headers=[("x-device-id", SECRET.encode())])
    binary_headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"bin-1"),
        ("ce_source", b"/tests"),
        ("ce_type", b"device.reading"),
        ("ce_subject", SECRET.encode()),
        ("content-type", b"application/json"),
    ]
    body = json.dumps({"device_id": SECRET, "metric": "t", "value": 1}).encode()
    producer.send(topic, body, key=SECRET, headers=binary_headers)
    data = json.dumps({"device_id": SECRET, "metric": "t", "value": 2}).encode()
    event = k.cloud_event("device.reading", None)
    del event["data"]
    event["data_base64"] = base64.b64encode(data).decode()
    producer.send(topic, k.structured(event))
    producer.send(topic, k.structured(k.cloud_event("device.reading", json.dumps({"device_id": SECRET}))))
    producer.flush()


def test_a_redacted_field_appears_in_no_response_no_log_line_and_no_cli_output(
    settings: Settings,
    client: TestClient,
    kafka_bootstrap: str,
    topic: str,
    db: psycopg.Connection[Any],
) -> None:
    seed(settings, kafka_bootstrap, topic)
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    run_until_idle(settings, idle=2)
    assert scalar(db, "SELECT count(*) FROM dlq") == 4
    # the rows do hold the value: the views have to hide it
    assert scalar(db, "SELECT count(*) FROM dlq WHERE error_message LIKE %s", f"%{SECRET}%") >= 2
    logs = stream.getvalue()
    assert "events_dead_lettered" in logs
    assert not leaks(logs)

    ids = [row for (row,) in db.execute("SELECT dlq_id FROM dlq ORDER BY dlq_id")]
    for token in (READER, ADMIN):
        responses = [
            client.get(DLQ, params={"limit": 100}, headers=token),
            client.get(f"{DLQ}/stats", headers=token),
            *(client.get(f"{DLQ}/{dlq_id}", headers=token) for dlq_id in ids),
        ]
        for response in responses:
            assert response.status_code == 200, response.text
            assert not leaks(response.text), response.text
    structured = scalar(
        db,
        "SELECT dlq_id FROM dlq WHERE message_key = %s AND NOT 'ce_specversion' = ANY(header_keys)",
        SECRET.encode(),
    )
    detail = client.get(f"{DLQ}/{structured}", headers=READER).json()
    assert detail["payload"]["data"]["device_id"] == "***"
    assert detail["payload_redacted"] is True
    assert detail["key"] == "***"
    assert "is not registered" in detail["error_message"]  # the error stays readable around the mask

    # a search in error text would confirm a guessed value: the reader may not search while redacting
    oracle = client.get(DLQ, params={"error_contains": SECRET}, headers=READER)
    assert oracle.status_code == 403
    assert "EVENTHANDLER_API_REDACT_FIELDS" in oracle.json()["detail"]
    assert client.get(f"{DLQ}/stats", params={"error_contains": SECRET}, headers=READER).status_code == 403

    # the fingerprint a view shows is keyed (the stored one hashes the error's words, so a reader could
    # hash guesses); filtering by the shown one finds the rows, by the stored one nothing
    stored = scalar(db, "SELECT fingerprint FROM dlq WHERE dlq_id = %s", structured)
    shown = detail["fingerprint"]
    assert shown != stored
    found = client.get(DLQ, params={"fingerprint": shown}, headers=READER).json()
    assert structured in [item["dlq_id"] for item in found["items"]]
    assert all(item["fingerprint"] == shown for item in found["items"])
    assert client.get(DLQ, params={"fingerprint": stored}, headers=READER).json()["total"] == 0

    env = settings_env(settings) | {"EVENTHANDLER_API_REDACT_FIELDS": "data.device_id"}
    outputs = [
        json.dumps(cli_json(env, "dlq", "list")),
        json.dumps(cli_json(env, "dlq", "stats")),
        *(json.dumps(cli_json(env, "dlq", "show", str(dlq_id))) for dlq_id in ids),
        *(run_cli(env, "dlq", "show", str(dlq_id)).stdout for dlq_id in ids),
        run_cli(env, "dlq", "list").stdout,
    ]
    for output in outputs:
        assert not leaks(output), output
